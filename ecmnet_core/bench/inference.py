"""``bench inference``: every inference path against eager fp32 PyTorch, in one run, at several input sizes.

A *path* is one way to run the network (the engine of :mod:`ecmnet_core.engines` and its options). The baseline,
``eager``, is the plain ``model(x)`` in fp32 and NCHW with the pure-PyTorch selective scan and attention -- what the
model costs without any of the inference work. Each path is timed on the same normalised input through the same
call the :class:`~ecmnet_core.inference.Segmenter` makes (``engine.logits``), reporting ms/frame p50/p90, frames/s
and the speed-up over the baseline's median measured in this run. The paths of one size are timed in rounds, one
call of each per round (:func:`ecmnet_core.bench.timing.time_interleaved`), so a shared machine's drift in speed
lands on the baseline and the path alike instead of skewing their ratio.

With ``--agreement DIR`` every path also segments the images in DIR (e.g. CamVid val) at the first size, and the
share of pixels whose arg-max label equals the baseline's is reported (the acceptance bar is 99.9 %).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from ecmnet_core.bench.timing import disturbance_note, environment, time_interleaved
from ecmnet_core.checkpoint import (
    DEFAULT_CHECKPOINT,
    Checkpoint,
    file_sha256,
    load_checkpoint,
    random_checkpoint,
    random_checkpoint_hash,
)
from ecmnet_core.data import load_raw
from ecmnet_core.data.builders import IMAGE_EXTENSIONS, build_dataset, detect_kind, image_files
from ecmnet_core.data.transforms import Preprocess
from ecmnet_core.device import resolve_device
from ecmnet_core.engines import OnnxRuntimeEngine, TorchEngine, TorchEngineOptions, onnx_model_for
from ecmnet_core.inference.pipeline import logits_to_labels
from ecmnet_core.metrics import ConfusionMatrix
from ecmnet_core.model.attention import set_attention_backend

BASELINE = "eager"


@dataclass(frozen=True)
class PathSpec:
    """One inference path: ``engine`` torch|onnxruntime|eager and the engine options."""

    description: str
    engine: str = "torch"
    dtype: str = "fp32"
    channels_last: bool = True
    optimize: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    jit: bool = True
    kernels: bool = True  # compiled scan/attention kernels where the device has them
    cuda_only: bool = False


PATHS: dict[str, PathSpec] = {
    BASELINE: PathSpec("eager fp32 PyTorch, NCHW, pure-PyTorch scan and attention (baseline)", engine="eager",
                       channels_last=False, optimize=False, kernels=False),
    "eager-kernels": PathSpec("eager fp32, NCHW, with the compiled scan/attention kernels", engine="eager",
                              channels_last=False, optimize=False),
    "torch-eager": PathSpec("inference rewrites, channels-last, compiled kernels; eager", jit=False),
    "torch": PathSpec("Segmenter default: torch-eager + torch.export graph on CPU"),
    "torch-compile": PathSpec("torch + torch.compile (inductor)", compile=True),
    "onnxruntime": PathSpec("ONNX Runtime (exported graph, scan as an ONNX Scan)", engine="onnxruntime"),
    "torch-fp16": PathSpec("torch + fp16 autocast", dtype="fp16", cuda_only=True),
    "torch-bf16": PathSpec("torch + bf16 (CUDA: autocast; CPU: the graph's convolutions in bf16)", dtype="bf16"),
    "torch-fp16-graphs": PathSpec("torch + fp16 autocast + CUDA graphs", dtype="fp16", cuda_graphs=True,
                                  cuda_only=True),
}
DEFAULT_CPU_PATHS = ("eager", "eager-kernels", "torch-eager", "torch", "onnxruntime")
DEFAULT_CUDA_PATHS = ("eager", "torch", "torch-fp16", "torch-bf16", "torch-fp16-graphs", "onnxruntime")
DEFAULT_SIZES = ((360, 480), (512, 1024), (1024, 2048))


@dataclass
class PathsBenchConfig:
    checkpoint: str | None = None
    model: str | None = None  # random weights (timing only) when no checkpoint is given
    classes: int = 11
    device: str = "cpu"
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    paths: tuple[str, ...] | None = None  # None: the device's defaults
    runs: int = 10
    warmup: int = 2
    budget_s: float = 60.0  # per path and size: stop timing early past this
    agreement: str | None = None  # folder of images
    agreement_limit: int | None = None
    miou: str | None = None  # a labelled dataset root: every path's mIoU on its split, at the first size
    miou_split: str = "val"
    miou_limit: int | None = None
    progress: Callable[[str], None] | None = None
    onnx_cache: Path | None = None
    extra: dict = field(default_factory=dict)


def _set_kernels(model: torch.nn.Module, on: bool) -> None:
    """Force the pure-PyTorch scan and attention (``on`` False) or leave both on automatic."""
    for module in model.modules():
        if hasattr(module, "scan") and hasattr(module.scan, "backend"):
            module.scan.backend = None if on else "torch"
    set_attention_backend(model, None if on else "torch")


class _Eager:
    """``model(x)`` as a user would call it: no folding, the model's own memory format."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, spec: PathSpec) -> None:
        self.model = ckpt.build_model().eval().to(device)
        _set_kernels(self.model, spec.kernels)
        self.device = device
        self.scan_backend = "torch" if not spec.kernels else self.model.scan_backend(device)

    @torch.inference_mode()
    def logits(self, batch: Tensor) -> Tensor:
        return self.model(batch.to(self.device)).float()


def build_path(name: str, ckpt: Checkpoint, device: torch.device, size: tuple[int, int],
               checkpoint_hash: str, onnx_cache: Path | None = None):
    """An object with ``logits(batch)`` for path ``name`` (see :data:`PATHS`)."""
    spec = PATHS[name]
    if spec.engine == "eager":
        return _Eager(ckpt, device, spec)
    if spec.engine == "onnxruntime":
        return OnnxRuntimeEngine(onnx_model_for(ckpt, checkpoint_hash, size, onnx_cache), device, spec.dtype)
    engine = TorchEngine(ckpt, device, TorchEngineOptions(
        dtype=spec.dtype, channels_last=spec.channels_last, optimize=spec.optimize, compile=spec.compile,
        cuda_graphs=spec.cuda_graphs, jit=spec.jit))
    if not spec.kernels:
        _set_kernels(engine.model, False)
    return engine


def _images(folder: str, limit: int | None) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--agreement {folder}: not a folder of images")
    files = image_files(root, recursive=True)
    if not files:
        raise ValueError(f"--agreement {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files[:limit] if limit else files


def _load_inputs(files: list[Path], preprocess: Preprocess) -> list[Tensor]:
    """(1, 3, h, w) network inputs of the images, made as ``eval`` makes them."""
    inputs = []
    for file in files:
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"--agreement: cannot read image {file}")
        inputs.append(preprocess(image)[None])
    return inputs


def _scored_inputs(root: str, split: str, limit: int | None, preprocess: Preprocess, num_classes: int
                   ) -> tuple[list[tuple[Tensor, np.ndarray]], int]:
    """(network input, label) of every sample of a labelled split, and the dataset's ignore index."""
    info, samples = build_dataset(detect_kind(root), root, split)
    if info.num_classes != num_classes:
        raise ValueError(f"--miou {root}: {info.num_classes} classes, the checkpoint has {num_classes}")
    count = min(len(samples), limit) if limit else len(samples)
    pairs = []
    for i in range(count):
        image, label = load_raw(samples, i)
        if label is None:
            raise ValueError(f"--miou {root} split {split}: sample {i} has no label")
        pairs.append((preprocess(image)[None], label))
    return pairs, info.ignore_index


def _miou(runner, pairs: list[tuple[Tensor, np.ndarray]], num_classes: int, ignore_index: int) -> dict:
    cm = ConfusionMatrix(num_classes, ignore_index)
    for x, label in pairs:
        pred, _ = logits_to_labels(runner.logits(x).float().cpu(), label.shape)
        cm.update(pred, label)
    return {"images": len(pairs), "miou": cm.miou(), "miou_framework": cm.miou_framework()}


def _labels(runner, x: Tensor) -> np.ndarray:
    return runner.logits(x).argmax(1).to(torch.uint8).cpu().numpy()


def bench_checkpoint(checkpoint: str | None, model: str | None, classes: int) -> tuple[Checkpoint, str, str]:
    """(checkpoint, its hash, where it came from): random weights of ``model`` when no checkpoint is given, else
    ``checkpoint`` or the packaged model."""
    if model and not checkpoint:
        return random_checkpoint(model, classes), random_checkpoint_hash(model, classes), f"random weights ({model})"
    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    return load_checkpoint(checkpoint), file_sha256(path), str(path)


def bench_paths(cfg: PathsBenchConfig) -> dict:
    """Time every path at every size (and optionally check label agreement); returns a JSON-ready dict."""
    device = resolve_device(cfg.device)
    names = tuple(cfg.paths or (DEFAULT_CUDA_PATHS if device.type == "cuda" else DEFAULT_CPU_PATHS))
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise ValueError(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    if device.type != "cuda":
        skipped = [n for n in names if PATHS[n].cuda_only]
        names = tuple(n for n in names if not PATHS[n].cuda_only)
    else:
        skipped = []
    if BASELINE not in names:
        names = (BASELINE, *names)
    for h, w in cfg.sizes:
        if min(h, w) < 16:
            raise ValueError(f"size {h}x{w}: both sides must be >= 16")
    ckpt, ckpt_hash, source = bench_checkpoint(cfg.checkpoint, cfg.model, cfg.classes)
    say = cfg.progress or (lambda _msg: None)
    load_before = environment(device)["load_avg_1min"]
    results: dict[str, dict[str, dict]] = {}
    agreement: dict[str, dict] = {}
    images = _images(cfg.agreement, cfg.agreement_limit) if cfg.agreement else []
    # read and pre-process the agreement images once, at the first size, for every path
    inputs = _load_inputs(images, ckpt.preprocess(cfg.sizes[0])) if images else []
    scored, ignore = (_scored_inputs(cfg.miou, cfg.miou_split, cfg.miou_limit, ckpt.preprocess(cfg.sizes[0]),
                                     ckpt.num_classes) if cfg.miou else ([], 255))
    scores: dict[str, dict] = {}
    for size in cfg.sizes:
        key = f"{size[0]}x{size[1]}"
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, *size, generator=gen)
        results[key] = {}
        runners = {}
        for name in names:
            try:
                runners[name] = build_path(name, ckpt, device, size, ckpt_hash, cfg.onnx_cache)
            except (ValueError, RuntimeError) as exc:  # e.g. no onnxruntime, no compiler
                results[key][name] = {"error": str(exc)}
                say(f"{key} {name}: unavailable ({exc})")
        timings = time_interleaved({name: (lambda r=runner, x=x: r.logits(x)) for name, runner in runners.items()},
                                   cfg.runs, cfg.warmup, device, cfg.budget_s)
        for name, timing in timings.items():
            results[key][name] = {**timing.summary(), "fps": 1e3 / timing.median,
                                  "description": PATHS[name].description,
                                  "scan_backend": str(getattr(runners[name], "scan_backend", "")), "cold": timing.cold}
            say(f"{key} {name}: p50 {timing.median:.1f} ms, p90 {timing.p90:.1f} ms")
        results[key] = {name: results[key][name] for name in names}  # table order = path order
        if inputs and size == cfg.sizes[0] and BASELINE in runners:
            baseline_labels = [_labels(runners[BASELINE], x_image) for x_image in inputs]
            for name, runner in runners.items():
                if name == BASELINE:
                    continue
                same = total = 0
                for x_image, expected in zip(inputs, baseline_labels):
                    labels = _labels(runner, x_image)
                    same += int((labels == expected).sum())
                    total += labels.size
                agreement[name] = {"images": len(images), "pixels": total, "identical": same / max(total, 1)}
                say(f"{key} {name}: identical labels on {100 * same / max(total, 1):.4f} % of pixels")
        if scored and size == cfg.sizes[0]:
            for name, runner in runners.items():
                scores[name] = _miou(runner, scored, ckpt.num_classes, ignore)
                say(f"{key} {name}: mIoU {100 * scores[name]['miou']:.2f} %")
        del runners
        base = results[key].get(BASELINE, {})
        for entry in results[key].values():
            if "median_ms" in entry and "median_ms" in base:
                entry["speedup"] = base["median_ms"] / entry["median_ms"]
    env = environment(device)
    return {
        "mode": "paths", "checkpoint": source, "checkpoint_hash": ckpt_hash, "model": ckpt.model_config.name,
        "classes": ckpt.num_classes, "batch": 1, "baseline": BASELINE, "paths": list(names),
        "skipped_cuda_only": skipped, "results": results, "agreement": agreement,
        "agreement_size": list(cfg.sizes[0]) if images else None, "agreement_folder": cfg.agreement,
        "miou": scores, "miou_data": f"{cfg.miou} split {cfg.miou_split}" if cfg.miou else None,
        "runs": cfg.runs, "warmup": cfg.warmup, "environment": env,
        "note": disturbance_note(load_before, env["load_avg_1min"], env["threads"]),
        "pid": os.getpid(),
    }


def format_paths(r: dict) -> str:
    env = r["environment"]
    lines = [f"inference paths vs '{r['baseline']}' ({PATHS[r['baseline']].description})",
             f"model {r['model']} ({r['classes']} classes), {r['checkpoint']} (sha256 {r['checkpoint_hash']}), batch 1",
             f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads; "
             f"{r['warmup']} warm-up + up to {r['runs']} timed runs per row, in rounds across the paths",
             f"{'size':<10} {'path':<18} {'p50 ms':>9} {'p90 ms':>9} {'frames/s':>9} {'speed-up':>9}  scan"]
    for size, rows in r["results"].items():
        for name, e in rows.items():
            if "error" in e:
                lines.append(f"{size:<10} {name:<18} unavailable: {e['error']}")
                continue
            speed = f"{e['speedup']:.2f}x" if "speedup" in e else "-"
            lines.append(f"{size:<10} {name:<18} {e['median_ms']:>9.1f} {e['p90_ms']:>9.1f} {e['fps']:>9.2f} "
                         f"{speed:>9}  {e['scan_backend']}")
    for name, a in r["agreement"].items():
        h, w = r["agreement_size"]
        lines.append(f"labels of {name} identical to the baseline's on {100 * a['identical']:.4f} % of "
                     f"{a['pixels']:,} pixels ({a['images']} images of {r['agreement_folder']} at {h}x{w})")
    for name, m in r.get("miou", {}).items():
        lines.append(f"mIoU of {name}: {100 * m['miou']:.2f} % (framework {100 * m['miou_framework']:.2f} %) on "
                     f"{m['images']} images of {r['miou_data']} at {next(iter(r['results']))}")
    if r["skipped_cuda_only"]:
        lines.append(f"skipped (CUDA only): {', '.join(r['skipped_cuda_only'])}")
    if r["note"]:
        lines.append(f"WARNING: {r['note']}")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    """``360x480`` -> (360, 480)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"size {text!r}: write HxW, e.g. 360x480") from exc
    return h, w
