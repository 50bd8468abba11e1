"""ECMNet model: output shapes at real and odd sizes, parameter counts (whole model, variants and the modules of
spec section 5), determinism, that one optimiser step learns, and how the selective-scan backend is chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecmnet_core.bench.cost import stubbed_scans
from ecmnet_core.model import DDA, EDAB, FFM, MSAU, SS2D, VARIANTS, build_model
from ecmnet_core.ops.selective_scan import ENV_VAR

# one intra-op thread (conftest): on the shared 2-core machine OpenMP spinning makes 2 threads much slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def ecmnet11() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("ecmnet", 11).eval()


# ---------------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("size", [(360, 480), (512, 1024), (375, 1242)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_output_shape_real_compute(ecmnet11: torch.nn.Module, size: tuple[int, int]) -> None:
    """Logits come back at the input size for CamVid, the paper's FLOPs size and an odd KITTI-like size."""
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = ecmnet11(x)
    assert y.shape == (1, 11, *size)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(1024, 2048), (1023, 2047), (17, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_output_shape_meta(size: tuple[int, int]) -> None:
    """Shape propagation at Cityscapes full resolution and awkward sizes, on meta tensors (no arithmetic; the
    scan is stubbed because autocast has no meta device). A real 1024x2048 forward takes minutes on 2 CPUs."""
    with torch.device("meta"):
        model = build_model("ecmnet", 19).eval()
    with torch.no_grad(), stubbed_scans(model) as calls:
        y = model(torch.empty(2, 3, *size, device="meta"))
    assert y.shape == (2, 19, *size)
    h16, w16 = -(-size[0] // 16), -(-size[1] // 16)
    assert calls[0]["length"] == h16 * w16 and calls[0]["dim"] == 4 * 256


def test_batch_and_variants_shapes() -> None:
    """Every ablation variant maps (B, 3, H, W) to (B, K, H, W) for B > 1."""
    x = torch.randn(2, 3, 48, 80)
    for name in VARIANTS:
        with torch.no_grad():
            assert build_model(name, 5).eval()(x).shape == (2, 5, 48, 80), name


# ---------------------------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name, classes, expected", [
    ("ecmnet", 19, 873_969), ("ecmnet", 11, 873_841), ("baseline", 19, 503_640), ("lines", 19, 542_216),
    ("lines_msau", 19, 584_785),
])
def test_parameter_counts(name: str, classes: int, expected: int) -> None:
    assert n_params(build_model(name, classes)) == expected


def test_paper_parameter_budget() -> None:
    """The paper reports 0.87 M for 19 classes; we accept +-1.5 %."""
    assert abs(n_params(build_model("ecmnet", 19)) / 0.87e6 - 1) < 0.015


@pytest.mark.parametrize("module, expected", [
    (lambda: EDAB(128, 4), 48_660), (lambda: EDAB(64, 2), 12_812), (lambda: EDAB(32, 1), 3_528),
    (lambda: EDAB(16, 2), 1_046), (lambda: DDA(64), 5_201), (lambda: MSAU(64), 9_603), (lambda: MSAU(128), 29_443),
    (lambda: SS2D(128), 168_960), (lambda: FFM(64 + 128 + 32 + 32, 128, 32), 289_184),
], ids=["EDAB128", "EDAB64", "EDAB32", "EDAB16", "DDA64", "MSAU64", "MSAU128", "SS2D128", "FFM"])
def test_module_parameter_counts(module, expected: int) -> None:
    """Per-module counts of spec section 5.2/5.3."""
    assert n_params(module()) == expected


def test_ffm_inside_model_matches_spec_split() -> None:
    """FFM = fuse 33,152 + SS2D 168,960 + FFN 82,368 + LNs 512 + proj 4,192 (spec 5.3)."""
    ffm = build_model("ecmnet", 19).ffm
    assert n_params(ffm.fuse) == 33_152
    assert n_params(ffm.vss.ss2d) == 168_960
    assert n_params(ffm.ffn) - n_params(ffm.ffn.norm) == 82_368
    assert n_params(ffm.vss.norm) + n_params(ffm.ffn.norm) == 512
    assert n_params(ffm.proj) == 4_192


# ---------------------------------------------------------------------------------------------------------------
# determinism and learning


def test_same_seed_same_output() -> None:
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(build_model("ecmnet", 11).eval()(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_one_optimiser_step_lowers_the_loss() -> None:
    """Gradients reach the parameters (scan backward included) and a small Adam step reduces the loss."""
    torch.manual_seed(0)
    model = build_model("ecmnet", 4).train()
    x = torch.randn(2, 3, 64, 96)
    target = torch.randint(0, 4, (2, 64, 96))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss0 = F.cross_entropy(model(x), target)
    opt.zero_grad()
    loss0.backward()
    ss2d = model.ffm.vss.ss2d
    for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"):
        grad = getattr(ss2d, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    opt.step()
    loss1 = F.cross_entropy(model(x), target)
    assert loss1.item() < loss0.item()


# ---------------------------------------------------------------------------------------------------------------
# selective-scan backend selection


def _run_small(model: torch.nn.Module) -> str | None:
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 48))
    return model.ffm.vss.ss2d.scan.last_backend


def test_backend_from_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = build_model("ecmnet", 3, scan_backend="reference").eval()
    assert model.scan_backend("cpu") == "reference"
    assert _run_small(model) == "reference"


def test_backend_from_environment_and_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "reference")
    model = build_model("ecmnet", 3).eval()
    assert model.scan_backend("cpu") == "reference"
    assert _run_small(model) == "reference"
    assert build_model("ecmnet", 3, scan_backend="torch").scan_backend("cpu") == "torch"


def test_backend_automatic(monkeypatch: pytest.MonkeyPatch) -> None:
    from ecmnet_core.ops.selective_scan import available_backends

    monkeypatch.delenv(ENV_VAR, raising=False)
    model = build_model("ecmnet", 3).eval()
    assert model.scan_backend("cpu") == available_backends("cpu")[0]
    assert build_model("baseline", 3).scan_backend("cpu") is None  # no FFM, no scan


def test_backend_invalid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=r"unknown selective-scan backend 'fast'.*choose one of"):
        build_model("ecmnet", 3, scan_backend="fast").scan_backend("cpu")
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=rf"'bogus'.*{ENV_VAR}"):
        _run_small(build_model("ecmnet", 3).eval())
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(ValueError, match="mamba"):
        build_model("ecmnet", 3, scan_backend="mamba").scan_backend("cpu")
