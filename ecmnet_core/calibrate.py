"""``ecmnet-core calibrate``: fit a checkpoint's softmax temperature on a labelled split, and the plots of calibration.

Temperature scaling (Guo et al., 2017): one scalar ``T`` divides the logits before the softmax; it changes no label
(the arg-max is the same) but makes the probabilities honest. ``T`` minimises the pixel-wise negative log-likelihood
on a sample of labelled pixels of the split (``--pixels-per-image`` per image, void excluded), and is stored in the
checkpoint's ``metadata["temperature"]``; every inference path (node, predict, eval, replay, painted clouds) then
reports calibrated probabilities. The expected calibration error over 15 equal-width bins is printed before
(``T = 1``) and after, over every labelled pixel of the split.

    ecmnet-core calibrate --data ../shared/camvid --split val --out calibrated.pt [--reliability rel.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ecmnet_core.data import DatasetInfo, load_raw
from ecmnet_core.inference.pipeline import as_runner, predict_labels, top_probability
from ecmnet_core.metrics import CalibrationStats


class ConfidenceEval:
    """Calibration and confidence-threshold statistics over a split: ECE and reliability at ``temperature`` and at
    1, the coverage/accuracy curve, and mIoU over the pixels kept at ``min_confidence``
    (``evaluate_samples(confidence=True)``, ``ecmnet-core calibrate``)."""

    def __init__(self, info: DatasetInfo, temperature: float, min_confidence: float, curve: bool = True) -> None:
        self.temperature, self.min_confidence = temperature, min_confidence
        # one confusion matrix per threshold: the curve's only when it is asked for
        self.calibrated = CalibrationStats(info.num_classes, info.ignore_index,
                                           **({} if curve else {"thresholds": ()}))
        if min_confidence > 0:
            self.calibrated.add_threshold(min_confidence)
        self.raw = CalibrationStats(info.num_classes, info.ignore_index, thresholds=()) if temperature != 1.0 \
            else None

    def update(self, logits: Tensor, pred: Tensor, label: np.ndarray) -> None:
        target = torch.from_numpy(label)
        self.calibrated.update(top_probability(logits[None], self.temperature)[0], pred, target)
        if self.raw is not None:
            self.raw.update(top_probability(logits[None], 1.0)[0], pred, target)

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "temperature": self.temperature, "ece": self.calibrated.ece(),
            "ece_uncalibrated": self.raw.ece() if self.raw is not None else self.calibrated.ece(),
            "bins": self.calibrated.bins, "reliability": self.calibrated.reliability(),
            "reliability_uncalibrated": (self.raw or self.calibrated).reliability(),
            "curve": self.calibrated.curve(), "min_confidence": self.min_confidence}
        if self.min_confidence > 0:
            share, kept = self.calibrated.kept_at(self.min_confidence)
            out.update(kept_share=share, kept=kept.summary(class_names))
        return out


def labelled_logits(predictor: Any, samples: Sequence[Any]) -> Iterator[tuple[Tensor, Tensor, np.ndarray]]:
    """(logits (K, H, W) at the label resolution, labels (H, W), ground truth (H, W)) of every labelled sample,
    predicted as the evaluation predicts, with no pixel masked."""
    runner = as_runner(predictor)
    for index in range(len(samples)):
        image, label = load_raw(samples, index)
        if label is None:
            continue
        full: list[Tensor] = []
        pred = predict_labels(runner, [runner.preprocess(image)], [label.shape[:2]], min_confidence=0.0,
                              logits_out=full)[0]
        yield full[0], pred, label


def calibration_pass(predictor: Any, samples: Sequence[Any], info: DatasetInfo, temperature: float) -> dict:
    """:class:`ConfidenceEval` summary over every labelled pixel of ``samples`` at ``temperature`` (and at 1)."""
    stats = ConfidenceEval(info, temperature, 0.0, curve=False)
    for logits, pred, label in labelled_logits(predictor, samples):
        stats.update(logits, pred, label)
    return stats.summary(info.class_names)


def collect_logits(predictor: Any, samples: Sequence[Any], info: DatasetInfo, pixels_per_image: int = 4096,
                   seed: int = 0) -> tuple[Tensor, Tensor]:
    """(N, K) float32 logits and (N,) int64 labels of up to ``pixels_per_image`` random labelled pixels per image,
    at the label resolution, predicted as the evaluation predicts."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for logits, _, label in labelled_logits(predictor, samples):
        target = torch.from_numpy(label.astype(np.int64)).reshape(-1)
        valid = torch.nonzero((target < info.num_classes) & (target != info.ignore_index)).squeeze(1)
        if valid.numel() == 0:
            continue
        pick = valid[torch.randperm(valid.numel(), generator=gen)[:pixels_per_image]]
        xs.append(logits.reshape(info.num_classes, -1)[:, pick].T.cpu())
        ys.append(target[pick])
    if not xs:
        raise ValueError("no labelled pixels to calibrate on")
    return torch.cat(xs), torch.cat(ys)


def nll(logits: Tensor, targets: Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(logits / temperature, targets))


#: The temperatures a fit may return: 0.05 (sharpen 20x) .. 100 (nearly uniform: an untrained model).
T_RANGE = (0.05, 100.0)


def fit_temperature(logits: Tensor, targets: Tensor, iterations: int = 80) -> float:
    """The temperature in :data:`T_RANGE` minimising the NLL. The NLL is convex in the inverse temperature
    (a log-sum-exp of linear functions minus a linear one), so a golden-section search over it is exact and
    needs no gradient; an optimum outside the range returns the nearest end."""
    logits, targets = logits.double(), targets.long()

    def loss(beta: float) -> float:
        return float(F.cross_entropy(logits * beta, targets))

    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return 1.0 / ((lo + hi) / 2.0)


def plot_reliability(confidence: dict[str, Any], path: str | Path) -> Path:
    """Reliability diagram (accuracy against confidence per bin, before and after calibration) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for key, name, ece in (("reliability_uncalibrated", "T = 1", confidence["ece_uncalibrated"]),
                           ("reliability", f"T = {confidence['temperature']:.3g}", confidence["ece"])):
        rows = [r for r in confidence[key] if r["pixels"]]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", ms=3,
                label=f"{name} (ECE {100 * ece:.2f} %)")
    ax.set(xlabel="confidence (mean per bin)", ylabel="pixel accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability, {confidence['bins']} bins")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_confidence_curve(confidence: dict[str, Any], path: str | Path) -> Path:
    """Share of pixels kept and mIoU / pixel accuracy over them, against the confidence threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(confidence["curve"], key=lambda r: r["threshold"])
    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, [r["kept"] for r in rows], label="pixels kept")
    ax.plot(t, [r["miou"] for r in rows], label="mIoU over kept pixels")
    ax.plot(t, [r["pixel_accuracy"] for r in rows], label="pixel accuracy over kept pixels")
    ax.set(xlabel="min_confidence", ylabel="fraction", ylim=(0, 1.01), title="coverage and accuracy by threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to calibrate (default: the packaged ecmnet_core/weights/ecmnet_camvid.pt)")
    parser.add_argument("--data", required=True, help="dataset root with a labelled split")
    parser.add_argument("--split", default="val", help="split to fit on (default: val)")
    parser.add_argument("--kind", default="auto", choices=["auto", "camvid", "cityscapes", "folder", "shards"],
                        help="dataset layout (default: detected from the root)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", default=None, help="write the calibrated checkpoint here")
    out.add_argument("--in-place", action="store_true", help="rewrite --checkpoint with the temperature")
    parser.add_argument("--pixels-per-image", type=int, default=4096,
                        help="labelled pixels sampled per image for the fit (default 4096)")
    parser.add_argument("--reliability", default=None, metavar="PNG", help="draw the reliability diagram here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the figures as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
    from ecmnet_core.data import DataError, build_dataset
    from ecmnet_core.inference import InferenceConfig, Segmenter

    if args.in_place and not args.checkpoint:
        print("calibrate: --in-place needs --checkpoint (the packaged model is not rewritten)", file=sys.stderr)
        return 2
    if args.pixels_per_image < 1:
        print(f"calibrate: --pixels-per-image must be >= 1, got {args.pixels_per_image}", file=sys.stderr)
        return 2
    try:
        info, samples = build_dataset(args.kind, args.data, args.split)
        segmenter = Segmenter(InferenceConfig(checkpoint=args.checkpoint, device=args.device, warmup=0))
        if segmenter.num_classes != info.num_classes:
            raise ValueError(f"checkpoint has {segmenter.num_classes} classes but {args.data} ({info.name}) has "
                             f"{info.num_classes}")
        logits, targets = collect_logits(segmenter, samples, info, args.pixels_per_image)
        before = segmenter.temperature
        temperature = fit_temperature(logits, targets)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    conf = calibration_pass(segmenter, samples, info, temperature)
    figures = {"temperature": temperature, "previous_temperature": before, "split": args.split,
               "pixels_fitted": int(targets.numel()), "nll_before": nll(logits, targets, 1.0),
               "nll_after": nll(logits, targets, temperature), "ece_before": conf["ece_uncalibrated"],
               "ece_after": conf["ece"], "bins": conf["bins"]}
    source = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    ckpt = load_checkpoint(source)
    ckpt.metadata = {**ckpt.metadata, "temperature": temperature,
                     "calibration": {k: v for k, v in figures.items() if k != "temperature"}}
    target = save_checkpoint(ckpt, source if args.in_place else args.out)
    print(f"temperature {temperature:.4f} (fitted on {figures['pixels_fitted']:,} pixels of {info.name} "
          f"{args.split}); NLL {figures['nll_before']:.4f} -> {figures['nll_after']:.4f}; ECE ({conf['bins']} bins, "
          f"every labelled pixel) {100 * figures['ece_before']:.2f} % -> {100 * figures['ece_after']:.2f} %")
    print(f"calibrated checkpoint written to {target}")
    if args.reliability:
        print(f"reliability diagram: {plot_reliability(conf, args.reliability)}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**figures, "reliability": conf["reliability"],
                                                   "reliability_uncalibrated": conf["reliability_uncalibrated"]},
                                                  indent=2))
    return 0
