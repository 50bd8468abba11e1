"""``ecmnet-core bench baseline --rev REV``: this tree's ``Segmenter`` against the one of an earlier git revision, in
one process, interleaved, on the same images.

Speed-ups are claimed against a revision ("≥ 1.8x end to end against 2822c60"), and a CPU's speed drifts between
processes and minutes, so both versions run side by side: the revision's ``ecmnet_core`` is extracted with
``git archive`` into the cache (``$ECMNET_CACHE_DIR/baseline/<rev>``) and imported under another package name, its
compiled operators registered under another namespace (``torch.ops.ecmnet_base_<rev>``), so the two never share a
module or an operator. Both load the same checkpoint (default: this tree's packaged model). Reported per input size:
end to end (``Segmenter.segment``: a uint8 BGR image in, labels out; the image is the input size, or a camera's
``image_size`` resized to it) and the forward alone
(``engine.logits`` on a pre-processed batch), medians of interleaved rounds, the ratios, and the share of pixels
whose labels agree. ``dtype`` is this tree's ``InferenceConfig.dtype`` (the revision runs its default).

Denormals: this tree flushes them to zero on PyTorch's threads (:mod:`ecmnet_core.ops.fp_mode_cpu`), which is
process state the revision would inherit here; each of its calls is preceded by restoring IEEE denormals, so it
runs as it did on its own (on Intel cores that is slower with the shipped weights).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from ecmnet_core.bench.timing import disturbance_note, environment, time_interleaved
from ecmnet_core.device import cache_dir
from ecmnet_core.ops import fp_mode_cpu

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where each version's ``Segmenter``/``InferenceConfig`` live (the package was reorganised after 2822c60).
SEGMENTER_MODULES = ("inference.segmenter", "inference")
#: Version of :func:`_rename`: part of the extraction's folder name, so a changed renaming extracts afresh.
RENAMING = "r1"


@dataclass
class BaselineBenchConfig:
    rev: str = "2822c60"
    sizes: tuple[tuple[int, int], ...] = ((352, 480),)
    #: The image size (a camera's), resized to each network input size; None: the input size itself.
    image_size: tuple[int, int] | None = None
    checkpoint: str | None = None
    dtype: str = "fp32"
    runs: int = 20
    warmup: int = 3
    budget_s: float = 120.0
    repo: Path = REPO_ROOT


def _resolve(repo: Path, rev: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                             capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise ValueError("git is not installed: the baseline is read from the repository's history") from None
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"revision {rev!r} is not a commit of {repo}: {exc.stderr.strip()}") from None
    return out.stdout.strip()


def extract_revision(rev: str, repo: Path = REPO_ROOT) -> tuple[Path, str]:
    """The revision's ``ecmnet_core`` as package ``ecmnet_base_<short sha>`` under the cache; returns (folder to put
    on ``sys.path``, package name). Extracted once per commit."""
    sha = _resolve(repo, rev)
    name = f"ecmnet_base_{sha[:10]}"
    root = cache_dir("baseline") / f"{sha[:10]}-{RENAMING}"
    if (root / name / "__init__.py").is_file():
        return root, name
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "tree.tar"
        with archive.open("wb") as fh:
            subprocess.run(["git", "-C", str(repo), "archive", sha, "ecmnet_core"], stdout=fh, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        package = Path(tmp) / "ecmnet_core"
        for path in package.rglob("*.py"):
            path.write_text(_rename(path.read_text(), name))
        staged = Path(tmp) / name
        package.rename(staged)
        shutil.rmtree(root / name, ignore_errors=True)
        staged.rename(root / name)
    return root, name


def _rename(source: str, package: str) -> str:
    """Point a module of the old tree at its new package name and operator namespace."""
    source = source.replace("ecmnet_core", package)
    source = re.sub(r'^NAMESPACE = "ecmnet"$', f'NAMESPACE = "{package}"', source, flags=re.MULTILINE)
    source = source.replace('"ecmnet::', f'"{package}::').replace("torch.ops.ecmnet.", f"torch.ops.{package}.")
    return source


def import_segmenter(root: Path, package: str) -> ModuleType:
    """The module of the extracted package that defines ``Segmenter`` and ``InferenceConfig``."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for sub in SEGMENTER_MODULES:
        try:
            module = importlib.import_module(f"{package}.{sub}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, "Segmenter") and hasattr(module, "InferenceConfig"):
            return module
    raise ValueError(f"{package} has no Segmenter in {', '.join(SEGMENTER_MODULES)}")


def _segmenter(module: ModuleType, checkpoint: str, size: tuple[int, int]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old tree's tracer warnings
        return module.Segmenter(module.InferenceConfig(checkpoint=checkpoint, device="cpu", input_size=size,
                                                       warmup=1))


def _as_it_ran(call, arg):
    """``call(arg)`` of the revision, with IEEE denormals as it had them (this tree flushes them)."""
    fp_mode_cpu.keep_denormals()
    return call(arg)


def bench_baseline(cfg: BaselineBenchConfig) -> dict:
    from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT
    from ecmnet_core.inference import InferenceConfig, Segmenter

    checkpoint = str(cfg.checkpoint or DEFAULT_CHECKPOINT)
    root, package = extract_revision(cfg.rev, cfg.repo)
    old_module = import_segmenter(root, package)
    device = torch.device("cpu")
    load_before = environment(device)["load_avg_1min"]
    rng = np.random.default_rng(0)
    results = []
    for h, w in cfg.sizes:
        new = Segmenter(InferenceConfig(checkpoint=checkpoint, device="cpu", input_size=(h, w), warmup=1,
                                        dtype=cfg.dtype))
        old = _segmenter(old_module, checkpoint, (h, w))
        image = rng.integers(0, 256, (*(cfg.image_size or (h, w)), 3), dtype=np.uint8)
        batch_new = new.preprocess(image)[None]
        batch_old = old.preprocess(image)[None]
        timings = time_interleaved({
            "new_e2e": lambda s=new, im=image: s.segment(im),
            "old_e2e": lambda s=old, im=image: _as_it_ran(s.segment, im),
            "new_forward": lambda s=new, x=batch_new: s.engine.logits(x),
            "old_forward": lambda s=old, x=batch_old: _as_it_ran(s.engine.logits, x),
        }, cfg.runs, cfg.warmup, device, cfg.budget_s)
        agree = float((new.segment(image).labels == _as_it_ran(old.segment, image).labels).mean())
        med = {k: t.median for k, t in timings.items()}
        results.append({"size": [h, w], "image_size": list(image.shape[:2]), **{f"{k}_ms": v for k, v in med.items()},
                        "e2e_speedup": med["old_e2e"] / med["new_e2e"],
                        "forward_speedup": med["old_forward"] / med["new_forward"], "label_agreement": agree,
                        "runs": min(len(t.samples_ms) for t in timings.values())})
    env = environment(device)
    chosen = list(dict.fromkeys(str(v) for v in getattr(new.engine, "chosen", {}).values()))
    return {"rev": cfg.rev, "dtype": cfg.dtype, "chosen": chosen, "baseline_package": package,
            "checkpoint": checkpoint, "results": results,
            "environment": env, "note": disturbance_note(load_before, env["load_avg_1min"], env["threads"])}


def format_baseline(report: dict) -> str:
    env = report["environment"]
    lines = [f"this tree against {report['rev']} ({env['device_name']}, {env['threads']} threads, "
             f"torch {env['torch']}), checkpoint {report['checkpoint']}",
             f"this tree: dtype {report.get('dtype', 'fp32')}"
             + (f" ({'; '.join(report['chosen'])})" if report.get("chosen") else "")
             + f"; {report['rev']}: its default, with IEEE denormals as it ran (this tree flushes them)",
             f"{'size':>9}  {'image':>9}  {'e2e old':>8}  {'e2e new':>8}  {'speed-up':>8}  {'fwd old':>8}  "
             f"{'fwd new':>8}  {'speed-up':>8}  {'labels agree':>12}"]
    for r in report["results"]:
        image = r.get("image_size", r["size"])
        lines.append(f"{r['size'][0]:>4}x{r['size'][1]:<4}  {image[0]:>4}x{image[1]:<4}  "
                     f"{r['old_e2e_ms']:>6.1f}ms  {r['new_e2e_ms']:>6.1f}ms  "
                     f"{r['e2e_speedup']:>7.2f}x  {r['old_forward_ms']:>6.1f}ms  {r['new_forward_ms']:>6.1f}ms  "
                     f"{r['forward_speedup']:>7.2f}x  {100 * r['label_agreement']:>11.3f}%")
    if report.get("note"):
        lines.append(f"warning: {report['note']}")
    return "\n".join(lines)


__all__ = ["BaselineBenchConfig", "bench_baseline", "extract_revision", "format_baseline", "import_segmenter"]
