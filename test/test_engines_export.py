"""ONNX export (``ecmnet_core.engines.export``): each building block and the whole model export, and onnxruntime
reproduces PyTorch's outputs on CPU at a small size (64x96; the selective scan is one ONNX Scan over time).

With the packaged (trained) checkpoint the logits agree within 1e-3 absolute (measured ~1.3e-5). A random-init
ECMNet in eval mode is numerically chaotic (BatchNorm at identity statistics lets activations grow to ~1e8 in the
encoder; even PyTorch fp32 vs fp64 then differ by ~1e-2 on the logits), so the random-weight check first calibrates
the BatchNorm statistics on random batches, as training would, and compares logits within 1e-3 of their range.
The blocks are compared much more tightly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ecmnet_core.engines.export import export_onnx, lower_recurrence, run_onnx, verify_onnx
from ecmnet_core.model import DDA, EDAB, MSAU, SS2D, build_model
from ecmnet_core.model.ffm import FFM
from ecmnet_core.model.layers import DownSamplingBlock, UpsamplingBlock

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")

# the blocks below call torch.onnx.export directly: legacy-exporter deprecation and shape TracerWarnings are expected
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def calibrate_batchnorm(model: nn.Module, size: tuple[int, int], batches: int = 3) -> nn.Module:
    """Running statistics from random batches (cumulative average), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(2, 3, *size, generator=gen))
    return model.eval()


class _Block(nn.Module):
    """Wraps a block with a fixed input layout so the exporter sees one 4-D input."""

    def __init__(self, block: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.block, self.channels_last = block, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.block(x)


def _export_module(model: nn.Module, args: tuple, path) -> None:
    """torch.onnx.export plus what export_onnx adds: the scan placeholder becomes a standard ONNX Scan."""
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, custom_opsets={"ecmnet": 1})
    proto = onnx.load(str(path))
    lower_recurrence(proto)
    onnx.save(proto, str(path))


def _export_block(block: nn.Module, shape: tuple[int, ...], path, channels_last: bool = False):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _Block(block, channels_last).eval()
    x = torch.randn(*shape)
    _export_module(model, (x,), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        return got, model(x)


def _dda_active() -> DDA:
    dda = DDA(16)
    with torch.no_grad():
        dda.gamma.fill_(0.7)  # gamma = 0 at init would hide the attention path
    return dda


@pytest.mark.parametrize("make, shape, channels_last", [
    (lambda: EDAB(32, 2), (1, 32, 12, 20), False),
    (_dda_active, (1, 16, 9, 14), False),
    (lambda: MSAU(32), (1, 32, 12, 20), False),
    (lambda: SS2D(16, d_state=4), (1, 16, 5, 7), True),
    (lambda: DownSamplingBlock(16, 32), (1, 16, 15, 21), False),
    (lambda: UpsamplingBlock(16, 8), (1, 16, 6, 10), False),
], ids=["EDAB", "DDA", "MSAU", "SS2D", "Down", "Up"])
def test_blocks_export_exactly(make, shape, channels_last, tmp_path) -> None:
    got, expected = _export_block(make(), shape, tmp_path / "block.onnx", channels_last)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max())))


def test_ffm_exports_exactly(tmp_path) -> None:
    """FFM with its four inputs of different sizes (adaptive pooling to the 1/16 map) and the Scan-based scan."""
    import onnxruntime as ort

    torch.manual_seed(0)
    ffm = FFM(16 + 24 + 8 + 8, 32, 8, d_state=4).eval()
    # 18x26 and 9x13 pool to 5x7: sizes that do not divide (the export writes the pooling as matrix products)
    feats = [torch.randn(1, 16, 18, 26), torch.randn(1, 24, 9, 13), torch.randn(1, 8, 5, 7), torch.randn(1, 8, 5, 7)]

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ffm = ffm

        def forward(self, a, b, c, d):
            return self.ffm([a, b, c, d])

    path = tmp_path / "ffm.onnx"
    _export_module(Wrap().eval(), tuple(feats), path)
    with torch.no_grad():
        expected = ffm(feats)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: f.numpy() for i, f in zip(session.get_inputs(), feats)})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The calibrated model exported once, from train mode, to check that export works on an eval copy."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("ecmnet", 11), (64, 96)).train()
    before = copy.deepcopy(model.state_dict())
    path = tmp_path_factory.mktemp("onnx") / "sub" / "ecmnet_64x96.onnx"
    info = export_onnx(model, path, (64, 96), metadata={"class_names": '["a", "b"]'})
    untouched = model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return model.eval(), info, untouched


def test_whole_model_matches_pytorch(exported) -> None:
    model, info, _ = exported
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    got = run_onnx(info.path, x)
    assert got.shape == (1, 11, 64, 96)
    scale = max(1.0, float(expected.abs().max()))
    err = float((got - expected).abs().max())
    assert err <= 1e-3 * scale, f"onnxruntime differs from PyTorch by {err:.2e} (logit range {scale:.1f})"
    assert verify_onnx(info.path, model, x) == pytest.approx(err, rel=1e-6, abs=1e-9)


def test_packaged_checkpoint_matches_within_1e3(tmp_path) -> None:
    """With trained weights (the packaged CamVid checkpoint) the logits agree within 1e-3 absolute."""
    from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"packaged checkpoint {DEFAULT_CHECKPOINT} is not there")
    model = load_checkpoint().build_model().eval()
    info = export_onnx(model, tmp_path / "camvid.onnx", (64, 96))
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # normalised-image statistics
    err = verify_onnx(info.path, model, x)
    assert err < 1e-3, f"onnxruntime differs from PyTorch by {err:.2e}"


def test_export_info_and_graph(exported) -> None:
    """The scan is one Scan node (its body holds the recurrence), and the graph has no custom/unsupported ops."""
    _, info, _ = exported
    proto = onnx.load(str(info.path))
    onnx.checker.check_model(proto)
    assert info.scan_length == 4 * 6 and info.opset == 17
    assert info.nodes == len(proto.graph.node)
    assert info.op_counts.get("Scan") == 1 and "Loop" not in info.op_counts
    assert {"Conv", "ConvTranspose", "MatMul", "Exp", "Softplus"} <= set(info.op_counts)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    assert {p.key: p.value for p in proto.metadata_props}["class_names"] == '["a", "b"]'
    inp = proto.graph.input[0]
    assert inp.name == "image" and [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, 64, 96]
    assert proto.graph.output[0].name == "logits"


def test_export_leaves_the_model_alone(exported) -> None:
    """Exported from a copy in eval mode: the caller's model stays in train mode with unchanged weights and BN
    statistics; missing parent folders are created."""
    _, info, untouched = exported
    assert untouched
    assert info.path.is_file() and info.file_bytes > 0 and info.path.parent.name == "sub"


@pytest.mark.parametrize("size, message", [((8, 48), "too small"), ((32,), "must be \\(H, W\\)")])
def test_export_rejects_bad_sizes(size, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message):
        export_onnx(build_model("baseline", 3), tmp_path / "m.onnx", size)
