"""The logits -> labels step, the one way every prediction is made: evaluation, training-time validation,
``predict``, rosbag replay and the ROS node (through :class:`ecmnet_core.inference.Segmenter`).

Resize the image to the network size, normalise, run the model, upsample the logits bilinearly to the label
(original image) size, then take the argmax. With flip test-time augmentation (``tta="flip"``) the model also runs
on the mirrored batch and the two logit maps are averaged (the mirrored one mirrored back) before upsampling: about
twice the cost, +0.8 points of CamVid val mIoU on the shipped model (MODEL_CARD.md).

Confidence is the softmax probability of the chosen class, with the checkpoint's calibrated temperature
(``softmax(logits / T)``, ``ecmnet-core calibrate``); with ``min_confidence`` > 0 pixels below it get the unknown
label 255 (:data:`ecmnet_core.data.UNLABELED`).

Below :mod:`~ecmnet_core.inference.segmenter` and ``evaluate``; it knows a Segmenter only by its attributes
(``preprocess``, ``engine``, ``device``, ``num_classes``). Pre-processing is :class:`ecmnet_core.data.Preprocess`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecmnet_core.data.classes import UNLABELED
from ecmnet_core.data.transforms import Preprocess
from ecmnet_core.model import ECMNet
from ecmnet_core.ops import fp_mode_cpu, labels_cpu

#: Test-time augmentations: none, or the mean of the logits of the image and of its mirror image.
TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise ValueError(f"tta {tta!r} is not supported (choose {', '.join(TTA_MODES)})")
    return tta


def check_min_confidence(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1] (0 = off), got {value}")
    return value


def top_probability(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, K, H, W) logits -> (B, H, W) float32 softmax probability of the arg-max class at ``temperature``:
    ``1 / sum_k exp((l_k - l_max) / T)``, without the full softmax tensor."""
    logits = logits.float()
    top = logits.amax(dim=1, keepdim=True)
    return torch.exp((logits - top) / temperature).sum(dim=1).reciprocal()


def confidence_image(confidence: np.ndarray) -> np.ndarray:
    """(H, W) probabilities in [0, 1] -> mono8 grey levels ``round(255 * p)`` (``~/confidence``, --save-confidence)."""
    return np.clip(np.rint(np.asarray(confidence, np.float32) * 255.0), 0, 255).astype(np.uint8)


def tta_logits(logits_fn: Callable[[Tensor], Tensor], batch: Tensor, tta: str) -> Tensor:
    """``logits_fn(batch)``, or with ``tta="flip"`` its mean with the mirrored logits of the mirrored batch.

    The mirrored batch runs as a separate call of the same shape (a traced or graph-captured engine sees the
    shapes it was made for); the sum is symmetric, so an image and its mirror image get mirrored logits.
    """
    logits = logits_fn(batch)
    if tta == "none":
        return logits
    mirrored = logits_fn(batch.flip(-1)).flip(-1)
    return (logits + mirrored) * 0.5


class ModelRunner:
    """A bare model plus its pre-processing: what a :class:`ecmnet_core.inference.Segmenter` holds, for models
    still in training. ``logits`` runs (B, 3, h, w) normalised batches in eval mode without gradients."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, device: torch.device | str | None = None,
                 amp: bool = False, tta: str = "none", temperature: float = 1.0, min_confidence: float = 0.0) -> None:
        self.model = model
        self.preprocess = preprocess
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.amp = amp and self.device.type == "cuda"
        self.tta = check_tta(tta)
        self.temperature = float(temperature)
        self.min_confidence = check_min_confidence(min_confidence)

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    @torch.inference_mode()
    def logits(self, batch: Tensor) -> Tensor:
        return tta_logits(self._forward, batch.to(self.device, non_blocking=True), self.tta)

    def _forward(self, batch: Tensor) -> Tensor:
        if self.device.type == "cpu":
            fp_mode_cpu.flush_denormals()  # as the engines do
        with torch.autocast(self.device.type, enabled=self.amp):
            if isinstance(self.model, ECMNet):  # as the Segmenter: logits at the network's resolution
                return self.model(batch, upsample=False).float()
            return self.model(batch).float()


class SegmenterRunner:
    """Adapter giving a :class:`ecmnet_core.inference.Segmenter` the runner interface (its own pre-processing,
    device, dtype and memory format)."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.preprocess: Callable[[np.ndarray], Tensor] = segmenter.preprocess
        self.device = segmenter.device
        self.num_classes = int(segmenter.num_classes)

    @property
    def tta(self) -> str:
        """The Segmenter's current ``config.tta`` (eval --compare-tta switches it between runs)."""
        return check_tta(getattr(self.segmenter.config, "tta", "none"))

    @property
    def temperature(self) -> float:
        return float(self.segmenter.temperature)

    @property
    def min_confidence(self) -> float:
        return float(self.segmenter.config.min_confidence)

    def logits(self, batch: Tensor) -> Tensor:
        """The engine's logits at the network's output resolution (not upsampled to the input first: the labels
        are resampled from them to each image's size in one step)."""
        return tta_logits(lambda b: self.segmenter.engine.logits(b, upsample=False), batch, self.tta)


Runner = ModelRunner | SegmenterRunner


def as_runner(predictor: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              input_size: tuple[int, int] | None = None, scale: float = 1.0, amp: bool = False,
              tta: str = "none") -> Runner:
    """A Segmenter, a runner, or an ``nn.Module`` (which then needs ``mean``/``std``) as a runner. ``tta``
    applies to a bare model; a Segmenter brings its own (``InferenceConfig.tta``)."""
    if isinstance(predictor, (ModelRunner, SegmenterRunner)):
        return predictor
    if isinstance(predictor, nn.Module):
        if mean is None or std is None:
            raise ValueError("evaluating a bare model needs the normalisation mean and std")
        return ModelRunner(predictor, Preprocess(mean, std, input_size, scale), amp=amp, tta=tta)
    if hasattr(predictor, "preprocess") and hasattr(predictor, "engine"):
        return SegmenterRunner(predictor)
    raise TypeError(f"cannot evaluate a {type(predictor).__name__}: pass a Segmenter or an nn.Module")


def stack_images(tensors: Sequence[Tensor]) -> Tensor:
    """Same-shape (C, H, W) images -> a (B, C, H, W) batch, channels-last when every image is laid out (H, W, C)
    (what :class:`ecmnet_core.data.transforms.Preprocess` returns): no transposing copy on the way to the engine."""
    if all(t.dim() == 3 and t.permute(1, 2, 0).is_contiguous() for t in tensors):
        return torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)
    return torch.stack(list(tensors))


def predict_labels(runner: Runner, tensors: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
                   confidence: list[Tensor] | None = None, min_confidence: float | None = None,
                   logits_out: list[Tensor] | None = None) -> list[Tensor]:
    """Class ids (h, w) per image (uint8 on the CPU, int64 elsewhere; :func:`logits_to_labels`): same-shape inputs
    run as one batch, logits are upsampled bilinearly to ``sizes[i]`` before the argmax. Results stay on the
    runner's device.

    ``confidence``: a list that receives, per image, the calibrated softmax probability (h, w) float32 of the
    chosen class (``~/confidence``, point painting's per-point probability).
    ``min_confidence`` (default: the runner's): pixels below it get label 255, the unknown id.
    ``logits_out``: a list that receives the (K, h, w) float32 logits at the output size (evaluation statistics).
    """
    threshold = check_min_confidence(runner_min_confidence(runner) if min_confidence is None else min_confidence)
    temperature = float(getattr(runner, "temperature", 1.0))
    out: list[Tensor | None] = [None] * len(tensors)
    probs: list[Tensor | None] = [None] * len(tensors)
    full: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    for idx in groups.values():
        logits = runner.logits(stack_images([tensors[i] for i in idx]))
        for j, i in enumerate(idx):
            one = logits[j:j + 1]
            if logits_out is not None:
                if tuple(one.shape[-2:]) != tuple(sizes[i]):
                    one = F.interpolate(one, size=tuple(sizes[i]), mode="bilinear", align_corners=False)
                full[i] = one[0].float()
            out[i], probs[i] = logits_to_labels(one, sizes[i], temperature, threshold, confidence is not None)
    if confidence is not None:
        confidence.extend(probs)  # type: ignore[arg-type]
    if logits_out is not None:
        logits_out.extend(full)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def logits_to_labels(logits: Tensor, size: tuple[int, int], temperature: float = 1.0, min_confidence: float = 0.0,
                     confidence: bool = False) -> tuple[Tensor, Tensor | None]:
    """(1, K, h, w) logits -> (labels (H, W), probability (H, W) float32 or None) at ``size`` = (H, W): bilinear
    upsampling (align_corners=False) when the sizes differ, argmax, and pixels below ``min_confidence`` set to 255.

    On the CPU one compiled pass (:mod:`ecmnet_core.ops.labels_cpu`, uint8 labels, bit for bit PyTorch's result);
    elsewhere PyTorch (int64 labels). The probability is computed only when asked for or needed for the threshold.
    """
    if labels_cpu.fits(logits):
        labels, prob = labels_cpu.labels_from_logits(logits, size, temperature, min_confidence,
                                                     confidence=confidence, unknown=UNLABELED)
        return labels[0], prob[0] if prob is not None else None
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    labels = logits.argmax(dim=1)[0]
    prob = None
    if confidence or min_confidence > 0:
        prob = top_probability(logits, temperature)[0]
        if min_confidence > 0:
            labels = labels.masked_fill(prob < min_confidence, UNLABELED)
    return labels, prob if confidence else None


def runner_min_confidence(runner: Runner) -> float:
    return float(getattr(runner, "min_confidence", 0.0))


def segment_images(predictor: Any, images: Sequence[np.ndarray],
                   confidence: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """(H, W) uint8 class ids at each image's own size, predicted as in evaluation (for predict and replay);
    ``confidence`` receives each image's (H, W) float32 calibrated probability of its label."""
    runner = as_runner(predictor)
    probs: list[Tensor] | None = [] if confidence is not None else None
    labels = predict_labels(runner, [runner.preprocess(im) for im in images], [im.shape[:2] for im in images],
                            confidence=probs)
    if confidence is not None:
        confidence.extend(p.cpu().numpy() for p in probs or [])
    return [lab.to(torch.uint8).cpu().numpy() for lab in labels]


__all__ = ["TTA_MODES", "ModelRunner", "Runner", "SegmenterRunner", "as_runner", "confidence_image", "stack_images",
           "logits_to_labels", "predict_labels", "segment_images", "top_probability", "tta_logits"]
