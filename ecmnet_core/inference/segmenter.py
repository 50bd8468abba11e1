"""The one inference class shared by ``predict``, ``eval``, rosbag replay and the ROS node (no ROS inside).

Pre-processing is the checkpoint's (:meth:`ecmnet_core.checkpoint.Checkpoint.preprocess`: resize to the network
size, BGR normalisation); the prediction step is :func:`ecmnet_core.inference.pipeline.predict_labels` (logits
upsampled bilinearly to the input size, argmax); here also the colour mask, overlay and coverage.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ecmnet_core.checkpoint import (
    DEFAULT_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    random_checkpoint,
    random_checkpoint_hash,
)
from ecmnet_core.data.classes import bgr_lut
from ecmnet_core.device import resolve_device
from ecmnet_core.engines import (
    DTYPE_CHOICES,
    ENGINES,
    OnnxRuntimeEngine,
    TorchEngine,
    TorchEngineOptions,
    onnx_model_for,
)
from ecmnet_core.inference.pipeline import SegmenterRunner, check_min_confidence, check_tta, predict_labels


def checkpoint_temperature(ckpt: Checkpoint) -> float:
    """The softmax temperature stored by ``ecmnet-core calibrate`` in ``metadata["temperature"]`` (1.0 if none)."""
    value = ckpt.metadata.get("temperature", 1.0)
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint metadata temperature {value!r} is not a number") from None
    if not 0.0 < temperature < 1e3:
        raise CheckpointError(f"checkpoint metadata temperature {temperature} is not in (0, 1000)")
    return temperature


@dataclass
class InferenceConfig:
    """How to build a :class:`Segmenter`.

    ``checkpoint`` None or "" loads the packaged CamVid model; ``model`` (with no checkpoint) builds that variant
    with random weights, which is only useful for tests and timing. ``input_size`` None uses the checkpoint's
    recommended network size; (0, 0) runs at the native input size.
    """

    checkpoint: str | None = None
    model: str | None = None
    num_classes: int = 11
    device: str = "auto"
    fp16: bool = False  # shorthand for dtype="fp16"
    channels_last: bool = True
    input_size: tuple[int, int] | None = None
    warmup: int = 1
    scan_backend: str | None = None
    backend: str = "torch"  # torch | onnxruntime
    #: fp32 | fp16 (CUDA autocast) | bf16 (CUDA autocast; CPU: bf16 convolutions) | auto (CPU: bf16 convolutions
    #: where the CPU has native bf16 and they are measured faster, else fp32; CUDA: fp32)
    dtype: str = "fp32"
    optimize: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    jit: bool = True  # CPU with a fixed input_size: a torch.export graph (captured during warm-up)
    tta: str = "none"  # none | flip: also run the mirrored image and average the logits (2x the cost)
    #: pixels whose calibrated confidence is below this get label 255 (unknown); 0 = off
    min_confidence: float = 0.0

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else self.dtype


@dataclass
class SegmentationResult:
    """Labels (H, W) uint8 class ids at the input size (255 = unlabeled or, with ``min_confidence``, unknown),
    per-class coverage of the labelled pixels, the share of unknown pixels, timing; with ``confidence=True``
    also the calibrated softmax probability (H, W) float32 of each pixel's class."""

    labels: np.ndarray
    coverage: np.ndarray
    inference_ms: float
    extra: dict = field(default_factory=dict)
    confidence: np.ndarray | None = None
    unknown_share: float = 0.0


class Segmenter:
    """Loads a model once and segments BGR images (HxWx3 uint8) or mono8 images (HxW uint8).

    The network runs on an engine (:mod:`ecmnet_core.engines`): ``backend`` ``torch`` or ``onnxruntime``.
    """

    def __init__(self, config: InferenceConfig | None = None) -> None:
        self.config = config = config or InferenceConfig()
        if config.backend not in ENGINES:
            raise ValueError(f"inference backend {config.backend!r} is not available (choose {', '.join(ENGINES)})")
        self.device = resolve_device(config.device)
        check_tta(config.tta)
        check_min_confidence(config.min_confidence)
        if config.precision not in DTYPE_CHOICES:
            raise ValueError(f"dtype {config.precision!r} is not supported (choose {', '.join(DTYPE_CHOICES)})")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 inference needs a CUDA device (on the CPU: fp32, bf16 or auto)")
        self.checkpoint = self._load(config)
        ckpt = self.checkpoint
        self.class_names: list[str] = list(ckpt.class_names)
        self.num_classes = len(self.class_names)
        self.palette = np.asarray(ckpt.palette, dtype=np.uint8).reshape(self.num_classes, 3)
        self.mean, self.std = tuple(ckpt.mean), tuple(ckpt.std)
        self.model_name = ckpt.model_config.name
        self.input_size = self._network_size(config.input_size, ckpt.input_size)
        self._preprocess = ckpt.preprocess(self.input_size)
        #: softmax temperature fitted by ``ecmnet-core calibrate`` (1 = uncalibrated), stored in the checkpoint
        self.temperature = checkpoint_temperature(ckpt)

        self.engine = self._engine(config, ckpt)
        #: the PyTorch module (None with the onnxruntime backend)
        self.model = getattr(self.engine, "model", None)
        self.scan_backend = self.engine.scan_backend
        self._runner = SegmenterRunner(self)
        self._bgr_lut = bgr_lut(self.palette)  # 255 (and unknown ids) stay black
        #: seconds the warm-up took (graph capture, kernel builds, first allocations); 0 before one ran
        self.warmup_s = 0.0
        self.warm_up(config.warmup)

    def warm_up(self, runs: int = 1) -> float:
        """Segment ``runs`` black frames at the network size, so that the first real frame is not the one paying
        for graph capture and first-call costs; returns (and keeps in ``warmup_s``) the seconds it took. Nothing to
        do at the native input size (no fixed size; the engine runs eagerly there)."""
        if runs < 1 or self.input_size is None:
            return 0.0
        start = time.perf_counter()
        dummy = np.zeros((*self.input_size, 3), np.uint8)
        for _ in range(runs):
            self.segment(dummy)
        self.warmup_s = time.perf_counter() - start
        return self.warmup_s

    # ------------------------------------------------------------------------------------------------ loading
    def _engine(self, config: InferenceConfig, ckpt: Checkpoint) -> TorchEngine | OnnxRuntimeEngine:
        if config.backend == "torch":
            if "onnx_file" in ckpt.metadata:
                raise ValueError(f"{ckpt.metadata['onnx_file']} is an ONNX model: run it with backend onnxruntime")
            return TorchEngine(ckpt, self.device, TorchEngineOptions(
                dtype=config.precision, channels_last=config.channels_last, optimize=config.optimize,
                compile=config.compile, cuda_graphs=config.cuda_graphs,
                # native-size runs stay eager: each new image size would cost a trace on a live frame
                jit=config.jit and self.input_size is not None,
                scan_backend=config.scan_backend))
        if self.input_size is None:
            raise ValueError("backend onnxruntime needs a fixed input_size (an ONNX export is made for one size), "
                             "not the native image size")
        if "onnx_file" in ckpt.metadata:
            path = Path(ckpt.metadata["onnx_file"])
            if ckpt.input_size and tuple(ckpt.input_size) != tuple(self.input_size):
                raise ValueError(f"{path} was exported for {ckpt.input_size[0]}x{ckpt.input_size[1]} inputs, "
                                 f"input_size asks for {self.input_size[0]}x{self.input_size[1]}: re-export it "
                                 "with 'ecmnet-core export --size H W' or use the .pt checkpoint")
        else:
            path = onnx_model_for(ckpt, self.checkpoint_hash, self.input_size)
        return OnnxRuntimeEngine(path, self.device, config.precision)

    def _load(self, config: InferenceConfig) -> Checkpoint:
        if config.checkpoint and str(config.checkpoint).lower().endswith(".onnx"):
            from ecmnet_core.engines.export import read_onnx_checkpoint

            self.checkpoint_path = Path(config.checkpoint)
            ckpt = read_onnx_checkpoint(config.checkpoint)
            self.random_weights = bool(ckpt.metadata.get("random_weights"))
            return ckpt
        if config.checkpoint:
            self.random_weights = False
            self.checkpoint_path: Path | None = Path(config.checkpoint)
            return load_checkpoint(config.checkpoint)
        if config.model:
            self.random_weights = True
            self.checkpoint_path = None
            ckpt = random_checkpoint(config.model, config.num_classes)  # an unknown model fails here, unwarned
            warnings.warn(f"RANDOM WEIGHTS: no checkpoint given, model {config.model!r} is untrained and its "
                          "output is meaningless", stacklevel=3)
            return ckpt
        self.random_weights = False
        self.checkpoint_path = DEFAULT_CHECKPOINT
        return load_checkpoint(None)

    @staticmethod
    def _network_size(requested, stored) -> tuple[int, int] | None:
        size = requested if requested is not None else stored
        if size is None:
            return None
        h, w = (int(v) for v in size)
        if (h, w) == (0, 0):
            return None
        if h < 16 or w < 16:
            raise ValueError(f"input_size {h}x{w} is too small (minimum 16x16, or 0 0 for native size)")
        return h, w

    @property
    def checkpoint_hash(self) -> str:
        """Short sha256 of the checkpoint file ("random-<model>-<classes>" for random weights)."""
        if self.checkpoint_path is None:
            return random_checkpoint_hash(self.checkpoint.model_config.name, self.num_classes)
        if not hasattr(self, "_hash"):
            self._hash = file_sha256(self.checkpoint_path)
        return self._hash

    # ------------------------------------------------------------------------------------------------ running
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 BGR (or HxW mono) uint8 -> (3, h, w) normalised RGB at the network size."""
        return self._preprocess(image)

    def segment(self, image: np.ndarray) -> SegmentationResult:
        return self.segment_batch([image])[0]

    def segment_batch(self, images: list[np.ndarray], confidence: bool = False,
                      min_confidence: float | None = None) -> list[SegmentationResult]:
        """Segment several images (e.g. one per camera); same-size inputs run as one batch.

        Labels are made exactly as ``ecmnet-core eval`` makes them
        (:func:`ecmnet_core.inference.pipeline.predict_labels`: logits upsampled bilinearly to the input size, then
        argmax), so node, replay and eval agree.
        ``confidence`` adds each pixel's calibrated class probability (``~/confidence``, painted point clouds);
        ``min_confidence`` (default ``config.min_confidence``) turns pixels below it into 255, the unknown id.
        """
        tensors = [self.preprocess(img) for img in images]
        threshold = self.config.min_confidence if min_confidence is None else check_min_confidence(min_confidence)
        start = time.perf_counter()
        probs: list[torch.Tensor] | None = [] if confidence else None
        preds = predict_labels(self._runner, tensors, [img.shape[:2] for img in images], probs, threshold)
        labels = [p.to(torch.uint8).cpu().numpy() for p in preds]
        conf = [p.cpu().numpy() for p in probs] if probs is not None else [None] * len(labels)
        elapsed = (time.perf_counter() - start) * 1000.0 / max(len(images), 1)
        return [SegmentationResult(labels=lab, coverage=self.coverage(lab), inference_ms=elapsed, confidence=c,
                                   unknown_share=self.unknown_share(lab) if threshold > 0 else 0.0)
                for lab, c in zip(labels, conf)]

    # ------------------------------------------------------------------------------------------------ outputs
    def coverage(self, labels: np.ndarray) -> np.ndarray:
        """Fraction of pixels per class over pixels with a valid class id; zeros when none is valid."""
        counts = np.bincount(labels.ravel(), minlength=256)[: self.num_classes].astype(np.float64)
        total = counts.sum()
        return (counts / total if total else counts).astype(np.float32)

    def unknown_share(self, labels: np.ndarray) -> float:
        """Fraction of pixels without a class (255: unknown, below ``min_confidence``)."""
        return float(np.count_nonzero(labels >= self.num_classes)) / max(labels.size, 1)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) class ids -> (H, W, 3) BGR colour mask; unlabeled pixels are black."""
        return self._bgr_lut[labels]

    def overlay(self, image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """Blend the colour mask over the image (BGR uint8); unlabeled pixels keep the image."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        blended = cv2.addWeighted(image, 1.0 - alpha, self.colorize(labels), alpha, 0.0)
        valid = labels < self.num_classes
        return np.where(valid[..., None], blended, image)

    def describe(self) -> dict[str, str]:
        """Static facts for logs and diagnostics."""
        return {
            "model": self.model_name,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else "random weights",
            "checkpoint_hash": self.checkpoint_hash,
            "device": str(self.device),
            "dtype": self.config.precision,
            "temperature": f"{self.temperature:.4g}",
            "scan_backend": str(self.scan_backend),
            **self.engine.describe(),
            "input_size": "native" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}",
            "classes": str(self.num_classes),
            "warmup_s": f"{self.warmup_s:.2f}",
        }

    def park(self) -> None:
        """Free GPU memory while idle (weights wait on the CPU); :meth:`unpark` before the next frame."""
        self.engine.park()

    def unpark(self) -> None:
        self.engine.unpark()

    def release(self) -> None:
        """Free the model (and cached GPU memory); the Segmenter is unusable afterwards."""
        self.model = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
