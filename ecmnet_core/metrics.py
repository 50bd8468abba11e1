"""Segmentation metrics from one confusion matrix accumulated over a whole split.

Two mIoU conventions (see ``shared/README.md``):

* ``miou()``: the standard one (torchmetrics ``MulticlassJaccardIndex(average="macro")``, mmsegmentation,
  cityscapesscripts): mean IoU over classes present in ground truth or prediction.
* ``miou_framework()``: the LETNet/ECMNet framework's, mean over classes with TP != 0 only, which drops
  classes a weak model never gets right and so inflates its score. Report it beside the standard number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ConfusionMatrix:
    """(K, K) int64 confusion matrix, rows = ground truth, columns = prediction.

    Pixels whose target equals ``ignore_index`` (or lies outside [0, K)) are skipped. Predictions must be class
    ids in [0, K).
    """

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` hold class ids with the same shape (any shape).

        Torch tensors are counted on their own device (``torch.bincount``), so GPU predictions need no copy.
        """
        k = self.num_classes
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
            pred_t = torch.as_tensor(pred)
            target_t = torch.as_tensor(target, device=pred_t.device).reshape(-1).long()
            pred_t = pred_t.reshape(-1).long()
            valid = (target_t >= 0) & (target_t < k) & (target_t != self.ignore_index)
            p, t = pred_t[valid], target_t[valid]
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
                raise ValueError(f"predictions must be class ids in [0, {k}), got range "
                                 f"[{int(p.min())}, {int(p.max())}]")
            counts = torch.bincount(t * k + p, minlength=k * k).cpu().numpy()
        else:
            pred_a = np.asarray(pred).reshape(-1).astype(np.int64, copy=False)
            target_a = np.asarray(target).reshape(-1).astype(np.int64, copy=False)
            valid = (target_a >= 0) & (target_a < k) & (target_a != self.ignore_index)
            p, t = pred_a[valid], target_a[valid]
            if p.size and (p.min() < 0 or p.max() >= k):
                raise ValueError(f"predictions must be class ids in [0, {k}), got range [{p.min()}, {p.max()}]")
            counts = np.bincount(t * k + p, minlength=k * k)
        self.matrix += counts.reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix (e.g. from another worker) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all torch.distributed ranks (no-op when not initialised); returns self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.from_numpy(self.matrix).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.matrix[:] = t.cpu().numpy()
        return self

    # --- derived numbers -------------------------------------------------------------------------------------
    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix)

    def iou(self) -> np.ndarray:
        """(K,) float64 IoU = TP / (TP + FP + FN); nan for classes absent in both ground truth and prediction."""
        tp = self.true_positives.astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Standard mIoU: mean over classes present in ground truth or prediction (nan if none)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def miou_framework(self) -> float:
        """LETNet/ECMNet framework mIoU: mean over classes with TP != 0 only (0.0 if there are none)."""
        tp = self.true_positives
        iou = self.iou()
        return float(iou[tp != 0].mean()) if (tp != 0).any() else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.true_positives.sum() / total) if total else float("nan")

    def class_accuracy(self) -> np.ndarray:
        """(K,) recall per class; nan for classes absent in ground truth."""
        rows = self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, self.true_positives / np.maximum(rows, 1), np.nan)

    def _names(self, class_names: Sequence[str] | None) -> list[str]:
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a {self.num_classes}-class matrix")
        return names

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-able dict: miou, miou_framework, pixel_accuracy, per_class {name: iou or None}, pixels."""

        def num(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        names = self._names(class_names)
        return {
            "miou": num(self.miou()),
            "miou_framework": num(self.miou_framework()),
            "pixel_accuracy": num(self.pixel_accuracy()),
            "per_class": {n: num(v) for n, v in zip(names, self.iou())},
            "pixels": int(self.matrix.sum()),
        }

    def table(self, class_names: Sequence[str] | None = None) -> str:
        """Printable per-class table (IoU and accuracy in %) with the summary lines below it."""
        names = self._names(class_names)
        width = max(12, *(len(n) for n in names))
        lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}  {'gt pixels':>12}"]
        for n, iou, acc, rows in zip(names, self.iou(), self.class_accuracy(), self.matrix.sum(1)):
            fmt = lambda v: f"{100 * v:7.2f}" if np.isfinite(v) else f"{'-':>7}"  # noqa: E731
            lines.append(f"{n:<{width}}  {fmt(iou)}  {fmt(acc)}  {int(rows):>12d}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou():7.2f}   (standard: classes in gt or prediction)")
        lines.append(f"{'mIoU (fw)':<{width}}  {100 * self.miou_framework():7.2f}   (framework: classes with TP > 0)")
        lines.append(f"{'pixel acc':<{width}}  {100 * self.pixel_accuracy():7.2f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, pixels={int(self.matrix.sum())})"


#: Confidence thresholds of the coverage/accuracy curve (``eval --confidence-curve``).
CURVE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20))


class CalibrationStats:
    """Per-pixel confidence against correctness over a split: the expected calibration error (ECE) over equal-width
    confidence bins, the reliability diagram, and the coverage/accuracy curve over confidence thresholds.

    ``update(confidence, pred, target)``: confidence in [0, 1] of the predicted class, (any shape, same as the
    class-id maps); pixels whose target is the ignore index (or outside [0, K)) are skipped. For the curve, one
    confusion matrix per threshold over the pixels kept (confidence >= threshold), so mIoU over kept pixels too.
    """

    def __init__(self, num_classes: int, ignore_index: int, bins: int = 15,
                 thresholds: Sequence[float] = CURVE_THRESHOLDS) -> None:
        self.num_classes, self.ignore_index, self.bins = int(num_classes), int(ignore_index), int(bins)
        self.count = np.zeros(self.bins, np.int64)
        self.conf_sum = np.zeros(self.bins, np.float64)
        self.correct = np.zeros(self.bins, np.int64)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.kept = [ConfusionMatrix(num_classes, ignore_index) for _ in self.thresholds]
        self.pixels = 0

    def update(self, confidence: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor,
               target: np.ndarray | torch.Tensor) -> None:
        conf = torch.as_tensor(confidence).reshape(-1).float().cpu()
        p = torch.as_tensor(pred).reshape(-1).long().cpu()
        t = torch.as_tensor(target).reshape(-1).long().cpu()
        valid = (t >= 0) & (t < self.num_classes) & (t != self.ignore_index)
        conf, p, t = conf[valid], p[valid], t[valid]
        self.pixels += int(t.numel())
        b = (conf * self.bins).long().clamp_(0, self.bins - 1)
        self.count += torch.bincount(b, minlength=self.bins).numpy()
        self.conf_sum += torch.bincount(b, weights=conf.double(), minlength=self.bins).numpy()
        self.correct += torch.bincount(b, weights=(p == t).double(), minlength=self.bins).numpy().astype(np.int64)
        for threshold, cm in zip(self.thresholds, self.kept):
            keep = conf >= threshold
            cm.update(p[keep], t[keep])

    def ece(self) -> float:
        """sum over bins of (bin share) * |accuracy - mean confidence|; nan with no pixels."""
        if self.pixels == 0:
            return float("nan")
        seen = self.count > 0
        acc = self.correct[seen] / self.count[seen]
        mean_conf = self.conf_sum[seen] / self.count[seen]
        return float(np.sum(self.count[seen] / self.pixels * np.abs(acc - mean_conf)))

    def reliability(self) -> list[dict]:
        """Per bin: its confidence range, pixel count, mean confidence and accuracy (None when empty)."""
        out = []
        for i in range(self.bins):
            n = int(self.count[i])
            out.append({"lo": i / self.bins, "hi": (i + 1) / self.bins, "pixels": n,
                        "confidence": float(self.conf_sum[i] / n) if n else None,
                        "accuracy": float(self.correct[i] / n) if n else None})
        return out

    def curve(self) -> list[dict]:
        """Per threshold: the share of labelled pixels kept, pixel accuracy and standard mIoU over them."""
        rows = []
        for threshold, cm in zip(self.thresholds, self.kept):
            kept = int(cm.matrix.sum())
            rows.append({"threshold": threshold, "kept": kept / self.pixels if self.pixels else float("nan"),
                         "pixel_accuracy": cm.pixel_accuracy() if kept else float("nan"),
                         "miou": cm.miou() if kept else float("nan")})
        return rows

    def kept_at(self, threshold: float) -> tuple[float, ConfusionMatrix]:
        """(share kept, confusion over the kept pixels) at one of the curve's thresholds, or at any threshold
        added with :meth:`add_threshold` before the updates."""
        i = self.thresholds.index(float(threshold))
        kept = int(self.kept[i].matrix.sum())
        return (kept / self.pixels if self.pixels else float("nan")), self.kept[i]

    def add_threshold(self, threshold: float) -> None:
        if float(threshold) not in self.thresholds:
            self.thresholds = (*self.thresholds, float(threshold))
            self.kept.append(ConfusionMatrix(self.num_classes, self.ignore_index))
