"""``bench --paths``: every inference path is timed against the eager fp32 baseline in the same run (speed-up
ratios), CUDA-only paths are skipped on the CPU, label agreement with the baseline is measured on an image folder,
and bad settings are refused with the option named. Tiny sizes: the acceptance figures come from the command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from ecmnet_core.bench.inference import BASELINE, PATHS, PathsBenchConfig, bench_paths, parse_size
from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT
from ecmnet_core.cli import main

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.zeros((90, 120, 3), np.uint8)
        img[:30], img[30:60], img[60:] = (200, 160, 120), (90, 90, 110), (100, 100, 100)
        cv2.imwrite(str(folder / f"{i}.png"), np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8))
    return folder


def test_paths_against_the_baseline(tmp_path, images) -> None:
    """Each path has p50/p90/fps and a speed-up over the baseline's median; the optimised torch path (BN folding,
    channels-last, kernels) keeps the labels on >= 99.9 % of pixels; fp16 is skipped without CUDA."""
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("packaged checkpoint missing")
    result = bench_paths(PathsBenchConfig(device="cpu", sizes=((64, 96), (80, 112)), runs=2, warmup=1,
                                          paths=("torch", "eager-kernels", "torch-fp16"), agreement=str(images),
                                          onnx_cache=tmp_path / "onnx"))
    assert result["paths"][0] == BASELINE and result["skipped_cuda_only"] == ["torch-fp16"]
    for size in ("64x96", "80x112"):
        rows = result["results"][size]
        assert set(rows) == {BASELINE, "torch", "eager-kernels"}
        assert rows[BASELINE]["speedup"] == pytest.approx(1.0)
        for row in rows.values():
            assert row["p90_ms"] >= row["median_ms"] > 0 and row["fps"] == pytest.approx(1e3 / row["median_ms"])
            assert row["speedup"] == pytest.approx(rows[BASELINE]["median_ms"] / row["median_ms"])
    assert rows[BASELINE]["scan_backend"] == "torch"
    assert result["agreement_size"] == [64, 96]
    for name in ("torch", "eager-kernels"):
        agree = result["agreement"][name]
        assert agree["images"] == 2 and agree["pixels"] == 2 * 64 * 96 and agree["identical"] >= 0.999


def test_cli_paths_json_with_onnxruntime(capsys, tmp_path, monkeypatch) -> None:
    """``ecmnet-core bench inference --paths onnxruntime --random --json`` prints one JSON object with the ratio."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("ECMNET_CACHE_DIR", str(tmp_path))
    assert main(["bench", "inference", "--paths", "onnxruntime", "--random", "--model", "baseline", "--sizes", "64x96",
                 "--runs", "1", "--warmup", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["results"]["64x96"]["onnxruntime"]
    assert out["mode"] == "paths" and row["speedup"] > 0 and row["scan_backend"] == "onnx-scan"
    assert out["checkpoint"].startswith("random weights")


def test_bad_settings_name_the_option(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown path"):
        bench_paths(PathsBenchConfig(paths=("warp-drive",), sizes=((64, 96),)))
    with pytest.raises(ValueError, match="write HxW"):
        parse_size("360by480")
    with pytest.raises(ValueError, match="no images"):
        bench_paths(PathsBenchConfig(paths=("torch",), sizes=((64, 96),), agreement=str(tmp_path), model="baseline"))
    with pytest.raises(SystemExit, match="bench inference: size 8x8"):
        main(["bench", "inference", "--sizes", "8x8", "--random"])
    assert set(PATHS) >= {"eager", "torch", "torch-compile", "onnxruntime", "torch-fp16", "torch-fp16-graphs"}


def test_profile_tables_account_for_the_kernels(capsys) -> None:
    """``bench profile`` on the default path lists the compiled kernels as operators, sorts the kinds of work by
    time with shares that add up to 1, and splits convolutions by weight shape (1x1 / depthwise / other)."""
    assert main(["bench", "profile", "--random", "--sizes", "48x64", "--runs", "2", "--warmup", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "profile" and r["path"] == "torch"
    res = r["results"]["48x64"]
    ops = {o["op"] for o in res["ops"]}
    assert "ecmnet::axial_attention_qkv_cpu" in ops and "ecmnet::selective_scan_cpu" in ops
    shares = [c["share"] for c in res["categories"]]
    assert sum(shares) == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
    assert {"attention", "scan", "conv 1x1"} <= {c["category"] for c in res["categories"]}
    assert res["wall_ms"] > 0 and res["self_ms_total"] > 0


def test_conv_kinds_by_weight_shape() -> None:
    from ecmnet_core.bench.profile import op_category

    assert op_category("aten::mkldnn_convolution", [[1, 8, 9, 9], [16, 8, 1, 1]]) == "conv 1x1"
    assert op_category("aten::mkldnn_convolution", [[1, 8, 9, 9], [8, 1, 3, 1]]) == "conv depthwise"
    assert op_category("aten::_slow_conv2d_forward", [[1, 8, 9, 9], [8, 8, 3, 3]]) == "conv other"
    assert op_category("ecmnet::dw_pair_cpu", []).startswith("EDAB kernels")
    assert op_category("aten::_prelu_kernel", []) == "activation"


def test_profile_refuses_an_unknown_path() -> None:
    with pytest.raises(SystemExit, match="unknown path 'fast'"):
        main(["bench", "profile", "--path", "fast", "--random", "--sizes", "48x64"])


def test_paths_are_scored_on_a_labelled_split(tmp_path) -> None:
    """``--miou DATA``: every path's mIoU on the split's labels, at the first size, printed beside the timings."""
    from helpers import make_camvid

    from ecmnet_core.bench.inference import format_paths

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("packaged checkpoint missing")
    root = make_camvid(tmp_path / "camvid", n_train=1, n_val=2)
    result = bench_paths(PathsBenchConfig(device="cpu", sizes=((48, 64),), runs=1, warmup=0, paths=("torch",),
                                          miou=str(root), miou_split="val"))
    scores = result["miou"]
    assert set(scores) == {BASELINE, "torch"} and all(s["images"] == 2 for s in scores.values())
    assert 0.0 <= scores[BASELINE]["miou"] <= 1.0
    assert scores["torch"]["miou"] == pytest.approx(scores[BASELINE]["miou"], abs=0.01)  # same labels, nearly
    assert f"mIoU of torch: {100 * scores['torch']['miou']:.2f} %" in format_paths(result)
