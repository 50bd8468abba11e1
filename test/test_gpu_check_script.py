"""``scripts/gpu_check.sh`` on a machine without CUDA: prepare copies val images (labels beside them) and PyYAML,
run says in one line that the CUDA parts are skipped, checks the harness on the CPU (val mIoU and latency of the
default path) and writes the table and the JSON to $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_camvid

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.usefixtures("one_torch_thread")
def test_prepare_and_run_without_cuda(tmp_path):
    data = make_camvid(tmp_path / "camvid", n_train=1, n_val=6)
    env = {**os.environ, "GPU_DIR": str(tmp_path / ".gpu"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    prep = sh("prepare", "--data", str(data), env=env)
    assert prep.returncode == 0, prep.stderr
    val = tmp_path / ".gpu" / "check" / "camvid" / "val"
    picked = sorted(p.name for p in val.iterdir())
    assert picked and picked == sorted(p.name for p in (val.parent / "valannot").iterdir())
    assert (tmp_path / ".gpu" / "pydeps" / "yaml" / "__init__.py").is_file()

    run = sh("run", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no CUDA device here" in run.stdout and "skipping the CUDA tests" in run.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["cuda"] is False
    fp32 = report["paths"]["fp32"]
    assert 0.0 <= fp32["miou"] <= 1.0 and fp32["images"] == 2
    assert fp32["64x96"]["forward_ms"] > 0 and fp32["64x96"]["e2e_ms"] > 0
    assert "| fp32 |" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_run_with_missing_data_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "ecmnet_core.bench.gpu_check", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
