"""Two-process DistributedDataParallel training on the CPU (gloo), launched the way users do: torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import make_camvid

from ecmnet_core.checkpoint import load_checkpoint


def test_torchrun_two_gloo_processes(tmp_path):
    root = make_camvid(tmp_path / "camvid", n_train=6, n_val=3)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ecmnet_core", "train", "--config", "camvid", "--data", str(root), "--out", str(out),
           "--model", "baseline", "--crop", "32", "48", "--batch-size", "1", "--workers", "0", "--epochs", "1",
           "--device", "cpu", "--no-amp", "--no-progress", "--no-tensorboard", "--sync-bn",
           "--set", "schedule.warmup_iters=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 alone logs and saves: one summary, one header
    assert proc.stdout.count("run ") == 1 and proc.stderr.count("train baseline") == 1
    assert "batch 1 x 2 process(es), 3 it/epoch" in proc.stderr
    assert "sync_bn ignored: SyncBatchNorm needs CUDA" in proc.stderr  # gloo on CPU: plain BatchNorm per rank

    last = load_checkpoint(out / "last.pt")
    state = last.training_state
    assert (state["world_size"], state["global_iter"], state["epoch"]) == (2, 3, 1)
    # each rank evaluated part of the 3 validation images; the all-reduced matrix covers all of them
    val = last.metadata["last_val"]
    assert val["images"] == 3 and 0.0 <= val["miou"] <= 1.0
    assert (out / "best.pt").is_file() and len((out / "log.csv").read_text().splitlines()) == 2
