"""``ecmnet-core bench baseline`` runs this tree and an earlier revision side by side in one process: the revision is
extracted from git under its own package name and operator namespace (no clash with ``torch.ops.ecmnet``), and both
Segmenters are timed on the same images with their labels compared."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from ecmnet_core.bench.baseline import REPO_ROOT, BaselineBenchConfig, _rename, bench_baseline, format_baseline

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(),
                                reason="needs git and the repository's history")


def test_renaming_moves_package_and_operator_namespace_only():
    source = ('from ecmnet_core.ops import cbuild\nNAMESPACE = "ecmnet"\n'
              '@torch.library.custom_op("ecmnet::selective_scan_cpu", mutates_args=())\n'
              'x = torch.ops.ecmnet.dw_pair_cpu\nmodel = build_model("ecmnet")\n')
    out = _rename(source, "ecmnet_base_x")
    assert "from ecmnet_base_x.ops import cbuild" in out
    assert 'NAMESPACE = "ecmnet_base_x"' in out
    assert '"ecmnet_base_x::selective_scan_cpu"' in out and "torch.ops.ecmnet_base_x.dw_pair_cpu" in out
    assert 'build_model("ecmnet")' in out  # the model's name is data, not the namespace


def test_head_against_itself_agrees_and_reports_ratios(tmp_path, monkeypatch):
    monkeypatch.setenv("ECMNET_CACHE_DIR", str(tmp_path))
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    # a camera image of another size, resized to the network's input size by both
    report = bench_baseline(BaselineBenchConfig(rev=head, sizes=((40, 56),), image_size=(48, 72), runs=1, warmup=0))
    (row,) = report["results"]
    assert row["label_agreement"] == 1.0  # the same code on the same image
    assert row["size"] == [40, 56] and row["image_size"] == [48, 72]
    assert row["e2e_speedup"] > 0 and row["forward_speedup"] > 0
    assert report["baseline_package"].startswith("ecmnet_base_")
    assert hasattr(torch.ops, report["baseline_package"])  # its operators live apart from torch.ops.ecmnet
    assert "labels agree" in format_baseline(report)


def test_unknown_revision_is_a_clear_error():
    with pytest.raises(ValueError, match="not a commit"):
        bench_baseline(BaselineBenchConfig(rev="no-such-revision-123", sizes=((40, 56),), runs=1, warmup=0))
