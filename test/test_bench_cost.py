"""``info``: parameter counts, the paper-convention GMac (pip ptflops configured like the paper's counter) and the
full count (fvcore + analytic scan, scan ops not counted twice), through the API and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ecmnet_core.bench.cost import full_macs, measure, paper_macs, stubbed_scans
from ecmnet_core.cli import main
from ecmnet_core.model import DDA, SS2D, SelectiveScan, build_model

# one intra-op thread (conftest): on the shared 2-core machine OpenMP spinning makes 2 threads much slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytest.importorskip("ptflops", reason="ptflops is not installed (pip install -e '.[cost]')")
pytest.importorskip("fvcore", reason="fvcore is not installed (pip install -e '.[cost]')")

#: pip ptflops 0.7.5 under the paper convention, ecmnet / 19 classes / 1x3x512x1024 (spec, vendored: 8.466).
PAPER_GMAC_MEASURED = 8.473184832


def scan_macs(h: int, w: int, d: int = 1024, n: int = 16) -> int:
    length = math.ceil(h / 16) * math.ceil(w / 16)
    return 9 * length * d * n + d * length


def test_paper_convention_at_paper_setting() -> None:
    """0.87 M +- 1.5 % and 8.27 GMac +- 3 % (paper), and the value pip ptflops gives under the convention."""
    report = measure("ecmnet", 19, (512, 1024), full=False)
    assert report.params == 873_969
    assert abs(report.params / 0.87e6 - 1) < 0.015
    assert abs(report.gmac_paper / 8.27 - 1) < 0.03
    assert report.gmac_paper == pytest.approx(PAPER_GMAC_MEASURED, rel=1e-6)
    assert report.paper is not None and report.paper["gmac_diff_pct"] == pytest.approx(2.46, abs=0.01)


def test_paper_convention_ignores_attention_scan_linear_and_layernorm() -> None:
    """Only conv/BN/activation/pooling modules count. Linear (old per-dim1 rule), LayerNorm, GELU, matmul, softmax,
    SiLU and the scan are free: a block of those costs exactly SS2D's depthwise conv plus 3 x 16*16 for the three
    Linears on a (1, 16, 8, C) channels-last input."""

    class Free(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)
            self.act = nn.GELU()
            self.ss2d = SS2D(16, d_state=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.repeat(1, 6, 1, 1)[:, :16].permute(0, 2, 3, 1)  # 16 channels without a counted op
            t = self.ss2d(self.act(self.norm(self.fc(t))))
            t = torch.softmax(t @ t.transpose(-1, -2), -1) @ t
            return t.permute(0, 3, 1, 2)

    h, w, d_inner = 16, 8, 32
    depthwise = h * w * 9 * d_inner + d_inner * h * w  # 3x3 depthwise conv with bias
    assert paper_macs(Free(), (h, w)) == depthwise + 3 * 16 * 16
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True))
    assert paper_macs(conv, (8, 8)) == 8 * 8 * (3 * 4 * 9) + 4 * 8 * 8


def test_full_count_parts_add_up() -> None:
    """full = fvcore (scan stubbed) + analytic scan; DDA attention is inside fvcore's bmm count."""
    h, w = 64, 128
    model = build_model("ecmnet", 11).eval()
    fc = full_macs(model, (h, w))
    assert fc.scan_macs == scan_macs(h, w)
    assert [c["module"] for c in fc.scan_calls] == ["ffm.vss.ss2d.scan"]
    assert fc.total_macs == fc.fvcore_macs + fc.scan_macs
    assert fc.attention_in_fvcore and fc.by_operator["bmm"] == fc.attention_macs
    # attention = sum of DDA.attention_macs over every DDA call, checked independently with hooks
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m.attention_macs(i[0].shape)))
             for m in model.modules() if isinstance(m, DDA)]
    with torch.no_grad():
        model(torch.zeros(1, 3, h, w))
    for hk in hooks:
        hk.remove()
    assert fc.attention_macs == sum(seen) > 0
    assert sum(fc.by_stage.values()) == fc.total_macs
    assert fc.by_stage["ffm"] > fc.scan_macs


def test_stub_is_invisible_to_fvcore_and_restored() -> None:
    """The stub keeps shapes, costs 0 in fvcore, records the call, and the real scan is back afterwards."""
    from fvcore.nn import FlopCountAnalysis

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scan = SelectiveScan("torch")

        def forward(self, u, delta, A, B, C, D, bias):
            return self.scan(u, delta, A, B, C, D, bias)

    model = Wrap()
    args = (torch.randn(1, 8, 10), torch.randn(1, 8, 10), -torch.rand(8, 4), torch.randn(1, 2, 4, 10),
            torch.randn(1, 2, 4, 10), torch.ones(8), torch.zeros(8))
    with stubbed_scans(model) as calls:
        analysis = FlopCountAnalysis(model, args)
        analysis.unsupported_ops_warnings(False)
        assert analysis.total() == 0
        assert model(*args).shape == (1, 8, 10)
    assert calls[-1] == {"module": "scan", "batch": 1, "dim": 8, "length": 10, "d_state": 4,
                         "macs": SelectiveScan.flops(torch.Size([1, 8, 10]), 4)}
    assert "forward" not in model.scan.__dict__
    real = model(*args)
    assert not torch.allclose(real, args[0] * args[5][:, None])  # the stub would return D*u


def test_variant_without_ffm_has_no_scan_cost() -> None:
    fc = full_macs(build_model("lines_msau", 11).eval(), (64, 64))
    assert fc.scan_macs == 0 and fc.scan_calls == []
    assert fc.total_macs == fc.fvcore_macs


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli_json(capsys, "--model", "ecmnet", "--classes", "11", "--size", "96", "128")
    for key in ("params", "gmac_paper", "gflops_full", "input_size", "classes", "model", "gmac_full", "scan_gflops",
                "scan_gmac", "attention_gmac"):
        assert key in out, key
    assert out["params"] == 873_841 and out["classes"] == 11 and out["input_size"] == [96, 128]
    assert out["gflops_full"] == pytest.approx(2 * out["gmac_full"], abs=2e-6)
    assert out["scan_gflops"] == pytest.approx(2e-9 * scan_macs(96, 128), abs=1e-6)  # JSON rounds to 1e-6
    assert out["gmac_full"] > out["gmac_paper"] > 0
    assert out["paper"] is None  # only compared with the paper at its own setting


def test_cli_all_variants(capsys: pytest.CaptureFixture[str]) -> None:
    out = _cli_json(capsys, "--all-variants", "--size", "64", "64")
    params = {row["model"]: row["params"] for row in out["variants"]}
    assert params == {"baseline": 503_640, "lines": 542_216, "lines_msau": 584_785, "ecmnet": 873_969}
    gmacs = [row["gmac_paper"] for row in out["variants"]]
    assert gmacs == sorted(gmacs)  # each ablation step adds work


def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--size", "64", "64", "--classes", "11"]) == 0
    text = capsys.readouterr().out
    for label in ("parameters", "GMac, paper convention", "GMAC, full count", "GFLOPs, full count",
                  "selective scan (analytic)", "DDA attention products"):
        assert label in text, label


@pytest.mark.parametrize("argv, message", [
    (["--size", "8", "64"], "must be >= 16"),
    (["--classes", "0"], "--classes must be >= 1"),
])
def test_cli_bad_input(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["info", *argv])
