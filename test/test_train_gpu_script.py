"""``scripts/train_gpu.sh`` on the CPU: prepare packs the data and PyYAML, run trains (here 2 iterations, no CUDA:
it says so) and copies the run to $OUT, restore puts it back for the next call, which resumes from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_camvid

from ecmnet_core.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_gpu.sh"
TINY = ["--model", "baseline", "--crop", "32", "48", "--batch-size", "2", "--epochs", "2", "--val-every", "1"]


def sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.usefixtures("one_torch_thread")
def test_prepare_run_restore_and_resume(tmp_path):
    data = make_camvid(tmp_path / "camvid", n_train=4, n_val=2)
    env = {**os.environ, "GPU_DIR": str(tmp_path / ".gpu"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    prep = sh("prepare", "--data", str(data), env=env)
    assert prep.returncode == 0, prep.stderr
    assert (tmp_path / ".gpu" / "camvid" / "index.json").is_file()
    assert (tmp_path / ".gpu" / "pydeps" / "yaml" / "__init__.py").is_file()
    assert not list((tmp_path / ".gpu" / "pydeps").rglob("*.so"))

    first = sh("run", "--budget", "300", *TINY, "--max-iters", "2", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no CUDA device here" in first.stdout
    assert {"last.pt", "best.pt", "log.csv", "train.log"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert load_checkpoint(tmp_path / "out" / "last.pt").training_state["global_iter"] == 2

    # a fresh machine: only what came back under $OUT survives
    env2 = {**env, "GPU_DIR": str(tmp_path / ".gpu2")}
    (tmp_path / ".gpu").rename(tmp_path / ".gpu2")
    (tmp_path / ".gpu2" / "run" / "last.pt").unlink()
    restored = sh("restore", str(tmp_path / "out"), env=env2)
    assert restored.returncode == 0, restored.stderr
    again = sh("run", "--budget", "300", *TINY, "--max-iters", "2", env={**env2, "OUT": str(tmp_path / "out2")})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout


def test_usage_without_a_mode():
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr
