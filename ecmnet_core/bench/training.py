"""``bench train``: seconds per optimisation step of the baseline and default training paths, and data loading.

A step is what the trainer does per iteration: forward, ENet-weighted cross-entropy, backward, Adam step. Both
paths start from the same weights and see the same random batch; they are timed in rounds
(:func:`ecmnet_core.bench.timing.time_interleaved`) so a shared machine's drift lands on both. Data loading is timed on
its own: images/s of the real training pipeline (decode once into the uint8 cache, then random scale, crop, flip
and normalisation) over a CamVid-style folder, when one is given (``--data``, or ``$ECMNET_CAMVID``).

The allocator policy is process-wide, so both paths run under the same one: by default glibc's own (every buffer
over 32 MiB is mmapped and faulted in each step, as the issue's baseline was measured), or with
``trainer_allocator`` (``--trainer-allocator``) the policy ``ecmnet-core train`` sets for the default path
(:func:`ecmnet_core.allocator.keep_freed_memory`). The baseline gains more from that policy than the default path
does (it allocates more large NCHW buffers), so the speed-up is smaller there.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ecmnet_core.allocator import keep_freed_memory
from ecmnet_core.bench.timing import environment, time_interleaved
from ecmnet_core.model import build_model, model_config
from ecmnet_core.ops import fp_mode_cpu
from ecmnet_core.train.losses import WeightedCrossEntropy
from ecmnet_core.train.train_path import apply_train_path, prepare_batch, train_path

#: environment variable naming a CamVid-style root for the data-loading figure when --data is not given
DATA_ENV = "ECMNET_CAMVID"


@dataclass
class TrainBenchConfig:
    """Step shape (H, W, batch), timing limits and the dataset for the loading figure (None: skip it)."""

    size: tuple[int, int] = (360, 480)
    batch: int = 8
    classes: int = 11
    model: str = "ecmnet"
    runs: int = 5
    warmup: int = 1
    budget_s: float = 120.0
    data: str | None = None
    data_images: int = 48
    trainer_allocator: bool = False


def _step_fn(model: torch.nn.Module, path_name: str, images: torch.Tensor, labels: torch.Tensor, classes: int):
    path = train_path(path_name, "cpu")
    apply_train_path(model, path)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=2e-4, fused=path.fused_optimizer)
    criterion = WeightedCrossEntropy(classes, None, classes)
    x = prepare_batch(images, path)

    def step() -> float:
        fp_mode_cpu.flush_denormals()  # as the trainer does
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def data_throughput(root: str | Path, crop: tuple[int, int], images: int) -> dict | None:
    """Images/s of the training pipeline (first pass decodes into the cache; timed: the cached passes)."""
    from ecmnet_core.data import SegmentationDataset, TrainTransform, build_dataset, compute_stats

    root = Path(root)
    if not root.is_dir():
        return None
    info, samples = build_dataset("camvid", root, "train", validate=False)
    samples = list(samples)[:images]
    stats = compute_stats(samples, info)
    dataset = SegmentationDataset(samples, TrainTransform(crop, stats.mean_bgr, stats.std_bgr, info.ignore_index),
                                  info, seed=0, cache=True)
    t0 = time.perf_counter()
    dataset.fill_cache()
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for epoch in (1, 2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            dataset[i]
    aug_s = time.perf_counter() - t0
    return {"root": str(root), "images": len(dataset), "decode_images_per_s": len(dataset) / decode_s,
            "data_images_per_s": 2 * len(dataset) / aug_s}


def bench_train(cfg: TrainBenchConfig) -> dict:
    h, w = cfg.size
    allocator = "glibc defaults" if not cfg.trainer_allocator else (
        "freed memory kept (the trainer's policy)" if keep_freed_memory() else "glibc defaults (no glibc)")
    torch.manual_seed(0)
    base = build_model(model_config(cfg.model, cfg.classes))
    models = {"baseline": base, "default": copy.deepcopy(base)}
    images = torch.randn(cfg.batch, 3, h, w)
    labels = torch.randint(0, cfg.classes, (cfg.batch, h, w))
    steps = {name: _step_fn(m, name, images, labels, cfg.classes) for name, m in models.items()}
    timings = time_interleaved(steps, cfg.runs, cfg.warmup, torch.device("cpu"), cfg.budget_s)
    result = {"environment": environment(torch.device("cpu")), "size": [h, w], "batch": cfg.batch,
              "model": cfg.model, "allocator": allocator, "paths": {}}
    for name, t in timings.items():
        result["paths"][name] = {**t.summary(), "s_per_iter": t.median / 1e3,
                                 "images_per_s": cfg.batch / (t.median / 1e3), "path": vars(train_path(name))}
    result["baseline_s_per_iter"] = result["paths"]["baseline"]["s_per_iter"]
    result["default_s_per_iter"] = result["paths"]["default"]["s_per_iter"]
    result["speedup"] = result["baseline_s_per_iter"] / result["default_s_per_iter"]
    root = cfg.data or os.environ.get(DATA_ENV) or None
    data = data_throughput(root, cfg.size, cfg.data_images) if root else None
    result["data"] = data
    result["data_images_per_s"] = data["data_images_per_s"] if data else None
    return result


def format_train(r: dict) -> str:
    env = r["environment"]
    h, w = r["size"]
    lines = [f"training step: {r['model']}, batch {r['batch']} x 3 x {h} x {w}, forward + loss + backward + Adam",
             f"device {env['device']} ({env['device_name']}), torch {env['torch']}, {env['threads']} threads",
             f"allocator, both paths: {r['allocator']}",
             f"{'path':<10} {'s/iter p50':>10} {'p90':>7} {'runs':>4} {'images/s':>9}"]
    for name, p in r["paths"].items():
        lines.append(f"{name:<10} {p['s_per_iter']:>10.2f} {p['p90_ms'] / 1e3:>7.2f} {p['runs']:>4} "
                     f"{p['images_per_s']:>9.2f}")
    lines.append(f"default speed-up vs baseline: {r['speedup']:.2f}x")
    d = r["data"]
    if d:
        lines.append(f"data loading ({d['images']} images of {d['root']}, 1 process): decode "
                     f"{d['decode_images_per_s']:.1f} images/s (once, into the cache), augmentation "
                     f"{d['data_images_per_s']:.1f} images/s "
                     f"({r['batch'] / d['data_images_per_s']:.2f} s per batch)")
    else:
        lines.append("data loading: no dataset (give --data ROOT; ../shared/camvid not found)")
    return "\n".join(lines)


__all__ = ["TrainBenchConfig", "bench_train", "data_throughput", "format_train"]
