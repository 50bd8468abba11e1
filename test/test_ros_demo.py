"""The README's main job and the node benchmark run end to end (tiny images, random-weight baseline): the demo
segments the synthetic camera's frames and writes overlay PNGs and a summary; the bench reports paired overhead."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

from ecmnet_ros import bench, demo  # noqa: E402
from ecmnet_ros.synthetic import StreetPattern  # noqa: E402


def test_street_pattern_moves_and_is_deterministic():
    a, b = StreetPattern(64, 96), StreetPattern(64, 96)
    f0, f1 = a.frame(0), a.frame(10)
    assert f0.shape == (64, 96, 3) and f0.dtype == np.uint8
    np.testing.assert_array_equal(f0, b.frame(0))
    assert np.abs(f0.astype(int) - f1.astype(int)).mean() > 1.0


def test_demo_runs_the_pipeline_and_writes_overlays(tmp_path, capsys):
    out = tmp_path / "demo"
    code = demo.main(["--model", "baseline", "--size", "64", "96", "--rate", "20", "--frames", "12",
                      "--save", "2", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_sent"] == 12 and summary["frames_segmented"] >= 1
    assert summary["frames_segmented"] + summary["frames_dropped"] == summary["frames_received"]
    assert summary["random_weights"] is True and summary["latency_ms"]["p50"] > 0
    assert sum(summary["mean_coverage"].values()) == pytest.approx(1.0, abs=1e-3)
    assert summary["overlays"] and all(cv2.imread(p).shape == (64, 96, 3) for p in summary["overlays"])
    text = capsys.readouterr().out
    assert "segmented" in text and "latency p50" in text and "done:" in text


def test_bench_reports_paired_node_overhead():
    args = bench.build_parser().parse_args(["--frames", "3", "--warmup", "1", "--size", "64", "96",
                                            "--model", "baseline"])
    result = bench.run(args)
    assert result["dropped"] == 0 and result["end_to_end_ms"]["count"] == 3
    assert result["end_to_end_ms"]["min"] >= result["node_model_call_ms"]["min"] > 0
    assert result["node_overhead_ms"]["p50"] > 0 and "overhead_pct" in result
    assert "node overhead" in bench.report(result)
