"""One check of every GPU path, for the first lent GPU (``scripts/gpu_check.sh run``; ≤ 8 minutes on an H100/H200).

In order, each under the remaining time (``--deadline``, default 420 s; what does not fit is listed as skipped):

1. CUDA tests: the Triton selective scan against the float64 reference loop (all options, forward and gradients;
   :func:`ecmnet_core.bench.triton_check.check_reference`) and against the PyTorch scan at the FFM's shapes.
2. Per GPU path (:data:`GPU_PATHS`: fp32, fp16, CUDA graphs, the Triton and PyTorch scans, ONNX Runtime's CUDA and
   TensorRT providers when installed): val mIoU on the packed CamVid images (``--data``, 20 by default) through
   ``Segmenter`` as ``ecmnet-core eval`` runs it, the share of pixels whose labels agree with fp32, then the forward
   latency (``engine.logits``) and end-to-end latency (``Segmenter.segment``: a uint8 image in, labels out) at
   360x480, 512x1024 and 1024x2048.
3. ``gpu_check.md`` (a table) and ``gpu_check.json`` under ``--out``.

Without CUDA it says so in one line, skips the CUDA parts and runs the same harness on the CPU with the default
path on two images at one small size (a check that the script and its data work; how the tests run it). Exit status:
0 when every check that ran passed, 1 when an agreement check failed, 2 for bad arguments or data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ecmnet_core.bench.timing import environment, time_fn

SIZES = ((360, 480), (512, 1024), (1024, 2048))
#: name -> InferenceConfig overrides (device added); the first is the reference the others' labels are compared with.
GPU_PATHS: dict[str, dict] = {
    "fp32": {},
    "fp16": {"dtype": "fp16"},
    "fp32-graphs": {"cuda_graphs": True},
    "fp16-graphs": {"dtype": "fp16", "cuda_graphs": True},
    "fp32-triton-scan": {"scan_backend": "triton"},
    "fp32-torch-scan": {"scan_backend": "torch"},
    "ort-cuda": {"backend": "onnxruntime"},
    "ort-fp16": {"backend": "onnxruntime", "dtype": "fp16"},
}
#: fp16 and the other GPU paths must label at least this share of pixels as fp32 does
MIN_AGREEMENT = 0.99


@dataclass
class GpuCheckConfig:
    data: str | None = None
    images: int = 20
    out: Path = Path("gpu_check_out")
    deadline_s: float = 420.0
    runs: int = 20
    paths: tuple[str, ...] = tuple(GPU_PATHS)
    sizes: tuple[tuple[int, int], ...] = SIZES
    device: str = "cuda"
    checkpoint: str | None = None
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)


def _samples(cfg: GpuCheckConfig):
    from ecmnet_core.data import build_dataset

    if not cfg.data:
        return None, []
    info, samples = build_dataset("auto", cfg.data, "val", validate=False)
    step = max(len(samples) // max(cfg.images, 1), 1)
    picked = [samples[i] for i in range(0, len(samples), step)][: cfg.images]
    return info, picked


def cuda_tests(report: dict) -> bool:
    """The Triton scan against the float64 reference and the PyTorch scan; results into ``report['tests']``."""
    from ecmnet_core.bench import triton_check
    from ecmnet_core.ops import scan_triton

    tests = report.setdefault("tests", {})
    if not scan_triton.triton_available():
        tests["triton_scan"] = "skipped: triton is not installed"
        return True
    ok = triton_check.check_reference("cuda")
    tests["triton_vs_float64_reference"] = "pass" if ok else "FAIL"
    for batch, length in triton_check.SHAPES[:2]:
        inputs = triton_check.ffm_inputs(batch, length)
        upstream = torch.randn(inputs["u"].shape, device="cuda")
        got = triton_check.run(triton_check.backend_fn("triton"), inputs, True, upstream)
        ref = triton_check.run(triton_check.backend_fn("torch"), inputs, True, upstream)
        good = triton_check.compare(got, ref, triton_check.RTOL, triton_check.ATOL)
        tests[f"triton_vs_torch_scan_b{batch}_L{length}"] = "pass" if good else "FAIL"
        ok &= good
    return ok


def _segmenter(cfg: GpuCheckConfig, overrides: dict, size: tuple[int, int] | None):
    from ecmnet_core.inference import InferenceConfig, Segmenter

    return Segmenter(InferenceConfig(checkpoint=cfg.checkpoint, device=cfg.device, input_size=size, warmup=2,
                                     **overrides))


def _accuracy(cfg: GpuCheckConfig, seg, info, samples, reference: list[np.ndarray] | None) -> dict:
    from ecmnet_core.data.dataset import load_raw
    from ecmnet_core.evaluate import evaluate_samples

    summary = evaluate_samples(seg, samples, info)
    labels = [seg.segment(load_raw(samples, i)[0]).labels for i in range(len(samples))]
    out = {"miou": summary["miou"], "images": summary["images"], "labels": labels}
    if reference is not None:
        same = sum(int((a == b).sum()) for a, b in zip(labels, reference))
        out["agreement_with_fp32"] = same / max(sum(r.size for r in reference), 1)
    return out


def _latency(cfg: GpuCheckConfig, overrides: dict, size: tuple[int, int]) -> dict:
    seg = _segmenter(cfg, overrides, size)
    device = seg.device
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    batch = seg.preprocess(image)[None]
    budget = max(min(20.0, cfg.left() / 4), 1.0)
    forward = time_fn(lambda: seg.engine.logits(batch), cfg.runs, 3, device, budget)
    e2e = time_fn(lambda: seg.segment(image), cfg.runs, 3, device, budget)
    return {"forward_ms": forward.median, "e2e_ms": e2e.median, "runs": len(forward.samples_ms),
            "describe": seg.describe()}


def run_paths(cfg: GpuCheckConfig, report: dict) -> bool:
    info, samples = _samples(cfg)
    reference: list[np.ndarray] | None = None
    ok = True
    for name in cfg.paths:
        overrides = GPU_PATHS[name]
        entry: dict = report["paths"].setdefault(name, {})
        if cfg.left() < 30:
            entry["skipped"] = f"out of time ({cfg.deadline_s:.0f} s deadline)"
            continue
        try:
            if samples:
                acc = _accuracy(cfg, _segmenter(cfg, overrides, None), info, samples, reference)
                if reference is None:
                    reference = acc["labels"]
                entry.update({k: v for k, v in acc.items() if k != "labels"})
                if entry.get("agreement_with_fp32", 1.0) < MIN_AGREEMENT:
                    entry["agreement_check"] = "FAIL"
                    ok = False
            for size in cfg.sizes:
                if cfg.left() < 20:
                    entry.setdefault("skipped_sizes", []).append(f"{size[0]}x{size[1]}")
                    continue
                entry[f"{size[0]}x{size[1]}"] = _latency(cfg, overrides, size)
        except Exception as exc:  # one path failing (a missing provider, out of memory) must not end the check
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=4)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return ok


def format_report(report: dict) -> str:
    sizes = report["sizes"]
    head = " | ".join(f"{s} fwd / e2e ms" for s in sizes)
    lines = [f"# GPU check: {report['environment'].get('device_name')}", "",
             f"torch {report['environment']['torch']}; {report.get('note', '')}", "",
             "| test | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.get("tests", {}).items()]
    lines += ["", f"| path | val mIoU ({report['images']} images) | labels as fp32 | {head} |",
              "|---|---|---|" + "---|" * len(sizes)]
    for name, p in report["paths"].items():
        if "skipped" in p or "error" in p:
            lines.append(f"| {name} | {p.get('skipped') or p.get('error')} | | " + " | " * len(sizes))
            continue
        miou = f"{100 * p['miou']:.2f} %" if "miou" in p else "-"
        agree = f"{100 * p['agreement_with_fp32']:.3f} %" if "agreement_with_fp32" in p else "(reference)"
        cells = [f"{p[s]['forward_ms']:.2f} / {p[s]['e2e_ms']:.2f}" if s in p else "skipped" for s in sizes]
        lines.append(f"| {name} | {miou} | {agree} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gpu_check(cfg: GpuCheckConfig) -> tuple[dict, bool]:
    cuda = torch.cuda.is_available() and cfg.device.startswith("cuda")
    report: dict = {"cuda": cuda, "paths": {}, "sizes": [f"{h}x{w}" for h, w in cfg.sizes],
                    "environment": environment(torch.device(cfg.device)), "images": cfg.images}
    ok = True
    if cuda:
        ok &= cuda_tests(report)
    else:
        report["note"] = "CPU run: the harness only (default path, 2 images, one small size)"
    ok &= run_paths(cfg, report)
    report["seconds"] = time.monotonic() - cfg.started
    return report, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecmnet_core.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="CamVid-style root holding val/ and valannot/ (or shards)")
    parser.add_argument("--images", type=int, default=20, help="val images per path (default 20)")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole check (default 420)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency (default 20)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged CamVid model)")
    args = parser.parse_args(argv)
    cfg = GpuCheckConfig(data=args.data, images=args.images, out=Path(args.out), deadline_s=args.deadline,
                         runs=args.runs, checkpoint=args.checkpoint)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): skipping the CUDA tests and "
              "the GPU paths' mIoU and latency; checking the harness on the CPU", flush=True)
        cfg.device, cfg.paths, cfg.sizes, cfg.images, cfg.runs = "cpu", ("fp32",), ((64, 96),), 2, 2
    else:
        print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    if cfg.data and not Path(cfg.data).exists():
        print(f"gpu_check: --data {cfg.data} does not exist (run 'bash scripts/gpu_check.sh prepare' first)",
              file=sys.stderr)
        return 2
    report, ok = gpu_check(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = format_report(report)
    (cfg.out / "gpu_check.md").write_text(text)
    print(text)
    print("gpu_check: all checks passed" if ok else "gpu_check: AGREEMENT FAILURES (see FAIL above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
