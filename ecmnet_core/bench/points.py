"""``ecmnet-core bench points --points N``: time point painting (projection + label lookup) on the synthetic scene.

Cases, timed in rounds: one raw camera with plumb_bob distortion (K, D), the same with per-point probability,
a rectified camera (R, P), and two cameras (front and rear). The clouds are float32 like a LiDAR driver's; most
points are in front of the camera, the costlier case (points behind it are dropped before the distortion).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ecmnet_core.bench.timing import disturbance_note, environment, time_interleaved
from ecmnet_core.points.painting import LabelFrame, paint_points
from ecmnet_core.points.synthetic import driving_scene


def bench_painting(points: int = 100_000, size: tuple[int, int] = (720, 1280), runs: int = 50,
                   warmup: int = 5) -> dict:
    """Median/p90 milliseconds per cloud for each case, points per second, and the environment."""
    if points < 1:
        raise ValueError(f"--points must be >= 1, got {points}")
    height, width = size
    scene = driving_scene(width=width, height=height, points=points, seed=0)
    pts = scene.points
    if len(pts) < points:  # the scene keeps only unambiguous points: repeat them up to the requested count
        pts = np.resize(pts, (points, 3))
    confidence = np.full(scene.labels.shape, 0.9, np.float32)
    raw = LabelFrame(0, scene.labels, scene.camera)
    with_prob = LabelFrame(0, scene.labels, scene.camera, confidence=confidence)
    turned = scene.lidar_to_camera.copy()
    turned[:3, :3] = turned[:3, :3] @ np.diag([-1.0, -1.0, 1.0])  # a rear camera: the LiDAR frame turned 180 deg
    cases = {
        "raw (K, D)": lambda: paint_points(pts, [(raw, scene.lidar_to_camera)]),
        "raw + probability": lambda: paint_points(pts, [(with_prob, scene.lidar_to_camera)]),
        "rectified (R, P)": lambda: paint_points(pts, [(raw, scene.lidar_to_camera)], rectified=True),
        "two cameras": lambda: paint_points(pts, [(raw, scene.lidar_to_camera), (raw, turned)]),
    }
    load_before = os.getloadavg()[0]
    timings = time_interleaved(cases, runs, warmup, torch.device("cpu"))
    load_after = os.getloadavg()[0]
    painted = paint_points(pts, [(raw, scene.lidar_to_camera)]).painted
    results = {name: {**t.summary(), "points_per_s": points / (t.median / 1e3)} for name, t in timings.items()}
    return {"points": points, "label_size": [height, width], "painted_one_camera": painted, "cases": results,
            "environment": environment(torch.device("cpu")),
            "note": disturbance_note(load_before, load_after, 1)}


def format_painting(r: dict) -> str:
    h, w = r["label_size"]
    lines = [f"point painting: {r['points']:,} points (float32), labels {h}x{w}, {r['painted_one_camera']:,} "
             "painted by one camera",
             f"{'case':<20} {'median ms':>10} {'p90 ms':>8} {'Mpoints/s':>10}"]
    for name, c in r["cases"].items():
        lines.append(f"{name:<20} {c['median_ms']:>10.2f} {c['p90_ms']:>8.2f} {c['points_per_s'] / 1e6:>10.1f}")
    env = r["environment"]
    lines.append(f"{env['device_name']}, numpy {np.__version__}")
    if r.get("note"):
        lines.append(f"WARNING: {r['note']}")
    return "\n".join(lines)
