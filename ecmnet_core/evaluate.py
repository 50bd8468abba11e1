"""``ecmnet-core eval``: one confusion matrix over a dataset split, standard and framework mIoU, per-class IoU.

The loop is :func:`evaluate_samples`, shared by this command, training-time validation and the rosbag replay
tool, so all three give identical numbers. Every prediction is made the same way (:func:`predict_labels`):
resize the image to the network size, normalise, run the model, upsample the logits bilinearly to the label
(original image) size, then take the argmax.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ecmnet_core.calibrate import ConfidenceEval
from ecmnet_core.data import DataError, DatasetInfo, Sample, bgr_lut, load_raw, trainid_to_labelid, write_image
from ecmnet_core.inference.pipeline import as_runner, predict_labels, runner_min_confidence
from ecmnet_core.metrics import ConfusionMatrix


class _EvalItems(Dataset):
    """(index, normalised image, label (H, W) uint8 or None) of the selected samples."""

    def __init__(self, samples: Sequence[Sample] | Any, indices: Sequence[int],
                 preprocess: Callable[[np.ndarray], Tensor]) -> None:
        self.samples, self.indices, self.preprocess = samples, list(indices), preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, np.ndarray | str | None, tuple[int, int]]:
        """(index, tensor, label, size); a sample that cannot be decoded comes back as (index, None, reason, ())
        so that one damaged file is skipped and counted instead of ending the evaluation."""
        index = self.indices[i]
        try:
            image, label = load_raw(self.samples, index)
        except DataError as exc:
            return index, None, str(exc), ()
        return index, self.preprocess(image), label, image.shape[:2]


def _collate(items: list) -> list:
    return items


def _stem(samples: Sequence[Sample] | Any, index: int) -> str:
    if hasattr(samples, "stem"):
        return samples.stem(index)
    return samples[index].stem


def evaluate_samples(predictor: Any, samples: Sequence[Sample] | Any, info: DatasetInfo, *,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     input_size: tuple[int, int] | None = None, scale: float = 1.0, amp: bool = False,
                     batch_size: int = 1, workers: int = 0, rank: int = 0, world_size: int = 1,
                     progress: bool = False, save_color: str | Path | None = None,
                     cityscapes_export: str | Path | None = None, confidence: bool = False,
                     min_confidence: float | None = None) -> dict[str, Any]:
    """Evaluate ``predictor`` on every labelled sample and return the summary of one confusion matrix.

    Args:
        predictor: a :class:`ecmnet_core.inference.Segmenter` (its pre-processing and input size are used), or an
            ``nn.Module`` with ``mean``/``std`` (BGR, 0..255) and ``input_size`` (H, W) or ``scale``.
        samples: a list of :class:`Sample` or a ShardReader; samples without a label are only predicted.
        rank, world_size: evaluate ``samples[rank::world_size]`` and all-reduce the matrix (torch.distributed).
        save_color: folder for ``<stem>.png`` colour predictions (BGR, palette of ``info``).
        cityscapes_export: folder for ``<stem>_gtFine_labelIds.png`` official-labelId predictions, the names
            ``csEvalPixelLevelSemanticLabeling`` matches (set ``CITYSCAPES_RESULTS`` to this folder).
        confidence: also measure calibration (ECE over 15 bins at the runner's temperature and at 1, the
            reliability diagram) and the coverage/accuracy curve over confidence thresholds (``summary["confidence"]``).
        min_confidence: (default: the runner's) report mIoU over the pixels whose confidence reaches it and the
            share kept; the main figures always count every pixel.

    Returns:
        ``ConfusionMatrix.summary`` (miou, miou_framework, pixel_accuracy, per_class, pixels) plus ``images``,
        ``seconds`` and the ``confusion_matrix`` itself (K x K list, rows = ground truth).
    """
    runner = as_runner(predictor, mean, std, input_size, scale, amp)
    if runner.num_classes != info.num_classes:
        raise ValueError(f"model predicts {runner.num_classes} classes but dataset {info.name!r} has "
                         f"{info.num_classes}")
    model = getattr(runner, "model", None)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    dirs = [Path(d) for d in (save_color, cityscapes_export) if d is not None]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    colours = bgr_lut(info.palette)

    cm = ConfusionMatrix(info.num_classes, info.ignore_index)
    threshold = runner_min_confidence(runner) if min_confidence is None else float(min_confidence)
    conf_eval = ConfidenceEval(info, float(getattr(runner, "temperature", 1.0)), threshold, curve=confidence) \
        if confidence or threshold > 0 else None
    indices = range(rank, len(samples), world_size)
    loader = DataLoader(_EvalItems(samples, indices, runner.preprocess), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="eval", unit="img", dynamic_ncols=True, file=sys.stderr, leave=False,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
    start = time.perf_counter()
    images = 0
    skipped: list[dict[str, str]] = []  # damaged samples: reported, not scored
    try:
        for batch in loader:
            for index, _, reason, _ in (b for b in batch if b[1] is None):
                skipped.append({"sample": _stem(samples, index), "reason": reason})
                print(f"eval: warning: skipped {reason}", file=sys.stderr)
            batch = [b for b in batch if b[1] is not None]
            images += len(batch)
            if not batch:
                continue
            logits: list[Tensor] | None = [] if conf_eval is not None else None
            preds = predict_labels(runner, [b[1] for b in batch], [b[3] for b in batch], min_confidence=0.0,
                                   logits_out=logits)
            for j, ((index, _, label, _), pred) in enumerate(zip(batch, preds)):
                if label is not None:
                    cm.update(pred, torch.from_numpy(label).to(pred.device))
                    if conf_eval is not None:
                        conf_eval.update(logits[j], pred, label)
                if dirs:
                    _write_prediction(pred, _stem(samples, index), colours, save_color, cityscapes_export)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    if world_size > 1:
        cm.all_reduce()
        images = _all_reduce_count(images)
    summary = cm.summary(info.class_names)
    summary.update(images=images, skipped=skipped, seconds=time.perf_counter() - start,
                   confusion_matrix=cm.matrix.tolist())
    if conf_eval is not None:
        summary["confidence"] = conf_eval.summary(info.class_names)
    return summary


def _write_prediction(pred: Tensor, stem: str, colours: np.ndarray, save_color: str | Path | None,
                      cityscapes_export: str | Path | None) -> None:
    labels = pred.to(torch.uint8).cpu().numpy()
    if save_color is not None:
        write_image(Path(save_color) / f"{stem}.png", colours[labels])
    if cityscapes_export is not None:
        write_image(Path(cityscapes_export) / f"{stem}_gtFine_labelIds.png", trainid_to_labelid(labels))


def _all_reduce_count(count: int) -> int:
    import torch.distributed as dist

    counts = torch.tensor([count])
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts)
    return int(counts.item())


def format_summary(summary: dict[str, Any], class_names: Sequence[str]) -> str:
    """The per-class table with standard and framework mIoU and pixel accuracy."""
    cm = ConfusionMatrix(len(class_names), 255)
    cm.matrix[:] = np.asarray(summary["confusion_matrix"], dtype=np.int64)
    return cm.table(class_names)


# ------------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecmnet_core.inference.options import add_segmenter_arguments

    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default: the packaged ecmnet_core/weights/ecmnet_camvid.pt)")
    parser.add_argument("--data", required=True, help="dataset root (or shard folder / index JSON)")
    parser.add_argument("--split", default="val", help="split name (default: val)")
    parser.add_argument("--kind", default="auto", choices=["auto", "camvid", "cityscapes", "folder", "shards"],
                        help="dataset layout (default: detected from the root)")
    parser.add_argument("--list", dest="list_file", default=None, help="'image [label]' list file for the split")
    parser.add_argument("--classes-yaml", default=None, help="classes.yaml of a folder dataset")
    add_segmenter_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (same-size images)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default: 2)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the summary as JSON to this file")
    parser.add_argument("--save-color", default=None, metavar="DIR", help="write colour predictions here")
    parser.add_argument("--cityscapes-export", default=None, metavar="DIR",
                        help="write official Cityscapes labelId PNGs here (for csEvalPixelLevelSemanticLabeling)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compare-tta", action="store_true",
                        help="evaluate without and with flip test-time augmentation and print both mIoUs and costs")
    parser.add_argument("--calibration", action="store_true",
                        help="also report the expected calibration error (15 bins) at the checkpoint's temperature "
                             "and at 1, and the coverage/accuracy over confidence thresholds")
    parser.add_argument("--reliability", default=None, metavar="PNG",
                        help="draw the reliability diagram here (implies --calibration)")
    parser.add_argument("--confidence-curve", default=None, metavar="PNG",
                        help="plot pixels kept, mIoU and accuracy over them against min_confidence (implies "
                             "--calibration)")


def run(args: argparse.Namespace) -> int:
    from ecmnet_core.checkpoint import CheckpointError
    from ecmnet_core.data import DataError, build_dataset
    from ecmnet_core.inference import Segmenter
    from ecmnet_core.inference.options import inference_config_from_args

    if args.batch_size < 1 or args.workers < 0:
        print("eval: --batch-size must be >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    try:
        info, samples = build_dataset(args.kind, args.data, args.split, list_file=args.list_file,
                                      classes_yaml=args.classes_yaml)
        segmenter = Segmenter(inference_config_from_args(args))
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    if segmenter.num_classes != info.num_classes:
        print(f"eval: checkpoint {segmenter.checkpoint_path} has {segmenter.num_classes} classes but dataset "
              f"{info.name} ({args.data}) has {info.num_classes}", file=sys.stderr)
        return 2
    if [n.lower() for n in segmenter.class_names] != [n.lower() for n in info.class_names]:
        print(f"eval: warning: class names differ between checkpoint ({', '.join(segmenter.class_names)}) and "
              f"dataset ({', '.join(info.class_names)})", file=sys.stderr)
    desc = segmenter.describe()
    print(f"checkpoint {desc['checkpoint']} ({desc['checkpoint_hash']}), model {desc['model']}, "
          f"input {desc['input_size']}, device {desc['device']}, backend {desc['backend']}, "
          f"scan {desc['scan_backend']}")
    print(f"dataset {info.name} split {args.split!r} at {args.data}: {len(samples)} images")
    modes = ("none", "flip") if args.compare_tta else (segmenter.config.tta,)
    results = {}
    for mode in modes:
        segmenter.config.tta = mode  # the Segmenter's runner reads it per call
        results[mode] = evaluate_samples(segmenter, samples, info, batch_size=args.batch_size,
                                         workers=args.workers, progress=not args.no_progress,
                                         save_color=args.save_color, cityscapes_export=args.cityscapes_export,
                                         confidence=bool(args.calibration or args.reliability
                                                         or args.confidence_curve))
        if len(modes) > 1:
            print(f"-- tta {mode}")
        print(format_summary(results[mode], info.class_names))
        print(f"{results[mode]['images']} images in {results[mode]['seconds']:.1f} s (tta {mode})")
        if results[mode]["skipped"]:
            print(f"warning: {len(results[mode]['skipped'])} image(s) could not be decoded and were left out of the "
                  "figures above (eval: warning lines on stderr name them)")
        if "confidence" in results[mode]:
            _report_confidence(results[mode]["confidence"], info.class_names, args)
    summary = results[modes[-1]]
    if args.compare_tta:
        plain, flip = results["none"], results["flip"]
        ms = {m: 1000.0 * r["seconds"] / max(r["images"], 1) for m, r in results.items()}
        print(f"tta comparison: mIoU {100 * plain['miou']:.2f} % without, {100 * flip['miou']:.2f} % with flip "
              f"({100 * (flip['miou'] - plain['miou']):+.2f} points); {ms['none']:.0f} vs {ms['flip']:.0f} ms per "
              f"image including loading ({ms['flip'] / max(ms['none'], 1e-9):.2f}x)")
    if args.json_out:
        out = dict(summary)
        out.update(checkpoint=desc["checkpoint"], checkpoint_hash=desc["checkpoint_hash"], model=desc["model"],
                   input_size=desc["input_size"], dataset=info.name, split=args.split, data=str(args.data),
                   class_names=list(info.class_names), tta=modes[-1])
        if args.compare_tta:
            out["tta_none"] = {k: results["none"][k] for k in ("miou", "miou_framework", "pixel_accuracy",
                                                               "per_class", "seconds", "images")}
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"summary written to {path}")
    return 0


def _report_confidence(conf: dict[str, Any], class_names: Sequence[str], args: argparse.Namespace) -> None:
    """Print the confidence figures of a summary and draw the plots asked for."""
    from ecmnet_core.calibrate import plot_confidence_curve, plot_reliability

    if args.calibration or args.reliability or args.confidence_curve:
        print(f"calibration: ECE ({conf['bins']} bins) {100 * conf['ece']:.2f} % at temperature "
              f"{conf['temperature']:.4g}, {100 * conf['ece_uncalibrated']:.2f} % at temperature 1")
        print("min_confidence  kept %  pixel acc %  mIoU %")
        for row in sorted(conf["curve"], key=lambda r: r["threshold"]):
            print(f"{row['threshold']:>14.2f}  {100 * row['kept']:6.2f}  {100 * row['pixel_accuracy']:11.2f}  "
                  f"{100 * row['miou']:6.2f}")
    if conf.get("kept"):
        miou, acc = (conf["kept"][k] if conf["kept"][k] is not None else math.nan for k in ("miou", "pixel_accuracy"))
        print(f"min_confidence {conf['min_confidence']:g}: {100 * conf['kept_share']:.2f} % of the labelled pixels "
              f"kept; over them mIoU {100 * miou:.2f} %, pixel accuracy {100 * acc:.2f} %")
    if args.reliability:
        print(f"reliability diagram: {plot_reliability(conf, args.reliability)}")
    if args.confidence_curve:
        print(f"confidence curve: {plot_confidence_curve(conf, args.confidence_curve)}")
