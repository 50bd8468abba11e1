"""Inference engines and their model rewrites: batch-norm folding, the ONNX export path (Scan-based recurrence, matrix
adaptive pooling, metadata) and the ``onnxruntime`` backend of the Segmenter, which must give the torch backend's
labels. Sizes are small (72x104 has non-dividing pooling sizes: 18x26 -> 5x7) so that the file runs in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ecmnet_core.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, random_checkpoint
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.model import build_model
from ecmnet_core.model.fuse import fold_batchnorm, optimize_for_inference
from ecmnet_core.model.layers import adaptive_avg_pool
from ecmnet_core.ops.op_registry import direct_kernel
from ecmnet_core.ops.selective_scan import selective_scan_export, selective_scan_ref

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")]

SIZE = (72, 104)


def _calibrated(model: nn.Module, size=SIZE) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, *size, generator=gen))
    return model.eval()


def _street_image(h: int = 180, w: int = 240) -> np.ndarray:
    """A BGR street-like test image: sky, buildings, road, with some texture."""
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 3] = (200, 160, 120)
    img[h // 3: 2 * h // 3] = (90, 90, 110)
    img[2 * h // 3:] = (100, 100, 100)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def test_fold_batchnorm_keeps_outputs_and_leaves_the_original() -> None:
    """Folding removes the BatchNorms that follow a convolution (most of them), the folded copy computes the same
    logits (checked in float64, where only rounding differs), and the caller's model keeps its BatchNorms."""
    model = _calibrated(build_model("ecmnet", 5, scan_backend="reference")).double()
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    after = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.folded_batchnorms == before - after and after < before / 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == before
    optimized = optimize_for_inference(model)  # + classifier before the final upsampling
    assert optimized.classify_before_upsample and not model.classify_before_upsample
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        for out in (folded(x), optimized(x)):
            assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_matrix_adaptive_pooling_equals_torch(monkeypatch) -> None:
    """The export form of adaptive pooling (two matrix products) has torch's bins, also for sizes that do not divide."""
    x = torch.randn(2, 3, 18, 26)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (5, 7))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # take the export branch
    assert torch.allclose(adaptive_avg_pool(x, (5, 7)), expected, atol=1e-6)


def test_export_scan_matches_reference() -> None:
    """The exported scan formulation (all steps' terms at once, then a loop) equals the sequential recurrence."""
    gen = torch.Generator().manual_seed(2)
    b, groups, per, n, length = 2, 4, 3, 5, 37
    dim = groups * per
    u, delta, z = (torch.randn(b, dim, length, generator=gen) for _ in range(3))
    A = -torch.rand(dim, n, generator=gen) * 4
    B, C = (torch.randn(b, groups, n, length, generator=gen) for _ in range(2))
    D, bias = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    out = selective_scan_export(u, delta, A, B, C, D, z, bias, True)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECMNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def _need_checkpoint() -> None:
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"packaged checkpoint {DEFAULT_CHECKPOINT} is not there")


def test_onnxruntime_backend_gives_the_torch_labels(cache) -> None:
    """backend onnxruntime exports the packaged checkpoint once at the network size (cached, same
    metadata, one Scan node) and labels a street image like the torch backend (>= 99.9 % identical pixels)."""
    _need_checkpoint()
    common = dict(device="cpu", input_size=SIZE, warmup=0)
    torch_seg = Segmenter(InferenceConfig(**common))
    ort_seg = Segmenter(InferenceConfig(backend="onnxruntime", **common))
    files = list(cache.glob("*.onnx"))
    assert len(files) == 1 and "72x104" in files[0].name
    proto = onnx.load(str(files[0]))
    assert sum(node.op_type == "Scan" for node in proto.graph.node) == 1
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == torch_seg.class_names
    assert json.loads(meta["mean_bgr"]) == pytest.approx(list(torch_seg.mean))
    assert json.loads(meta["input_size"]) == list(SIZE)
    image = _street_image()
    a, b = torch_seg.segment(image), ort_seg.segment(image)
    assert a.labels.shape == b.labels.shape == image.shape[:2]
    assert (a.labels == b.labels).mean() >= 0.999
    # the engines share one contract: the graph's own 1/2-resolution output, or the logits at the input size
    x = torch_seg.preprocess(image)[None]
    half, full = ort_seg.engine.logits(x, upsample=False), ort_seg.engine.logits(x)
    assert half.shape[-2:] == torch_seg.engine.logits(x, upsample=False).shape[-2:] == (SIZE[0] // 2, SIZE[1] // 2)
    assert full.shape[-2:] == torch_seg.engine.logits(x).shape[-2:] == SIZE
    assert (full.argmax(1) == torch_seg.engine.logits(x).argmax(1)).float().mean() >= 0.999
    assert ort_seg.describe()["backend"] == "onnxruntime"
    Segmenter(InferenceConfig(backend="onnxruntime", **common))  # second one reuses the cached export
    assert len(list(cache.glob("*.onnx"))) == 1


def test_exported_file_runs_without_the_checkpoint(tmp_path, cache) -> None:
    """An ``ecmnet-core export`` file is a complete model: classes, palette, normalisation and size come from it."""
    from ecmnet_core.engines.export import export_checkpoint, read_onnx_checkpoint

    ckpt = random_checkpoint("ecmnet", 4)
    ckpt.class_names = ["road", "sky", "car", "tree"]
    path = tmp_path / "model.onnx"
    export_checkpoint(ckpt, path, SIZE)
    meta = read_onnx_checkpoint(path)
    assert meta.class_names == ckpt.class_names and meta.input_size == list(SIZE) and meta.state_dict == {}
    seg = Segmenter(InferenceConfig(checkpoint=str(path), backend="onnxruntime", device="cpu", warmup=0))
    assert seg.class_names == ckpt.class_names and seg.input_size == SIZE and seg.random_weights
    result = seg.segment(_street_image(50, 60))
    assert result.labels.shape == (50, 60) and result.labels.max() < 4
    with pytest.raises(ValueError, match="run it with backend onnxruntime"):
        Segmenter(InferenceConfig(checkpoint=str(path), device="cpu", warmup=0))
    with pytest.raises(ValueError, match="exported for 72x104"):
        Segmenter(InferenceConfig(checkpoint=str(path), backend="onnxruntime", input_size=(96, 128), warmup=0))


def test_backend_errors_name_the_problem(tmp_path, cache) -> None:
    """Unknown backend, native size with onnxruntime, half precision on CPU, an ONNX file without our metadata."""
    with pytest.raises(ValueError, match="inference backend 'tensorflow'"):
        Segmenter(InferenceConfig(model="baseline", backend="tensorflow", device="cpu"))
    with pytest.raises(ValueError, match="fixed input_size"):
        Segmenter(InferenceConfig(model="baseline", backend="onnxruntime", device="cpu", input_size=(0, 0)))
    with pytest.raises(ValueError, match="fp16 inference needs a CUDA device"):
        Segmenter(InferenceConfig(model="baseline", dtype="fp16", device="cpu"))
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        Segmenter(InferenceConfig(model="baseline", dtype="int4", device="cpu"))
    with pytest.raises(ValueError, match="onnxruntime supports fp32"):
        Segmenter(InferenceConfig(model="baseline", backend="onnxruntime", dtype="bf16", device="cpu",
                                  input_size=(32, 48)))
    bare = tmp_path / "bare.onnx"
    torch.onnx.export(nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),), str(bare), dynamo=False)
    with pytest.raises(CheckpointError, match="bare.onnx lacks the ecmnet metadata"):
        Segmenter(InferenceConfig(checkpoint=str(bare), backend="onnxruntime", device="cpu"))
    with pytest.raises(CheckpointError, match="does not exist"):
        Segmenter(InferenceConfig(checkpoint=str(tmp_path / "missing.onnx"), backend="onnxruntime"))


def test_torch_engine_options_keep_labels() -> None:
    """The torch engine's rewrites (BN folding, channels-last) do not change the labels of the trained model."""
    _need_checkpoint()
    image = _street_image()
    plain = Segmenter(InferenceConfig(device="cpu", input_size=SIZE, warmup=0, optimize=False, channels_last=False))
    fast = Segmenter(InferenceConfig(device="cpu", input_size=SIZE, warmup=0))
    assert "optimized" in fast.describe()["optimisations"]
    assert (plain.segment(image).labels == fast.segment(image).labels).mean() >= 0.999
    ckpt = load_checkpoint()
    assert plain.num_classes == ckpt.num_classes


def test_cpu_bf16_convolutions_keep_the_labels() -> None:
    """dtype bf16 on the CPU runs the captured graph with every convolution in bf16 (weights converted once, fp32
    around them): the packaged model labels a street image as in fp32 (>= 99 % of pixels); fp16 stays CUDA only."""
    from ecmnet_core.engines.cpu_precision import _conv2d_bf16

    _need_checkpoint()
    common = dict(device="cpu", input_size=SIZE, warmup=0)
    image = _street_image()
    fp32 = Segmenter(InferenceConfig(**common)).segment(image).labels
    seg = Segmenter(InferenceConfig(dtype="bf16", **common))
    bf16 = seg.segment(image).labels
    assert (fp32 == bf16).mean() >= 0.99
    (graph,) = seg.engine._traces.values()
    convs = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in (_conv2d_bf16, torch.conv2d)]
    assert convs and all(n.target is _conv2d_bf16 for n in convs)
    assert seg.describe()["cpu_precision"] == "bf16 convolutions"
    with pytest.raises(ValueError, match="fp16 inference needs a CUDA device"):
        Segmenter(InferenceConfig(dtype="fp16", **common))


def test_auto_dtype_falls_back_to_fp32_without_native_bf16_and_else_keeps_the_faster(monkeypatch) -> None:
    """dtype auto on the CPU: fp32 (bit for bit) when the CPU lacks native bf16 (simulated); with it (simulated),
    the bf16-convolution graph only when it timed faster on the first input (timings injected, none measured)."""
    from ecmnet_core.engines import TorchEngine, TorchEngineOptions, cpu_precision

    ckpt = random_checkpoint("ecmnet", 3)
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    reference = TorchEngine(ckpt, torch.device("cpu")).logits(x)

    def auto_engine(native: bool, bf16_ms: float | None = None) -> TorchEngine:
        monkeypatch.setattr(cpu_precision, "cpu_has_native_bf16", lambda: native)
        if bf16_ms is not None:
            monkeypatch.setattr(cpu_precision, "time_graphs", lambda graphs, example: {"fp32": 10.0, "bf16": bf16_ms})
        engine = TorchEngine(ckpt, torch.device("cpu"), TorchEngineOptions(dtype="auto"))
        engine.logits(x)
        return engine

    without = auto_engine(native=False)
    assert torch.equal(without.logits(x), reference)
    assert "no native bf16" in without.describe()["cpu_precision"]
    faster = auto_engine(native=True, bf16_ms=6.0)
    assert faster.describe()["cpu_precision"].startswith("bf16 convolutions (auto: bf16 6.0 ms, fp32 10.0 ms)")
    assert not torch.equal(faster.logits(x), reference)  # the bf16 graph runs
    slower = auto_engine(native=True, bf16_ms=14.0)
    assert slower.describe()["cpu_precision"].startswith("fp32 (auto")
    assert torch.equal(slower.logits(x), reference)


def test_cpu_graph_per_input_size_and_eager_fallback(monkeypatch) -> None:
    """On the CPU the torch engine captures one torch.export graph per input size (recording the compiled kernels
    as custom ops, never the deprecated TorchScript tracer), bit for bit the eager engine's logits; if capture fails
    it warns and keeps running eagerly."""
    from ecmnet_core.engines import TorchEngine, TorchEngineOptions

    def no_tracer(*args, **kwargs):
        raise AssertionError("torch.jit.trace is deprecated and must not be used")

    monkeypatch.setattr(torch.jit, "trace", no_tracer)
    ckpt = random_checkpoint("ecmnet", 3)
    graph_engine = TorchEngine(ckpt, torch.device("cpu"))
    eager = TorchEngine(ckpt, torch.device("cpu"), TorchEngineOptions(jit=False))
    gen = torch.Generator().manual_seed(4)
    for size in (SIZE, (64, 96), SIZE):
        x = torch.randn(1, 3, *size, generator=gen)
        assert torch.equal(graph_engine.logits(x), eager.logits(x))
    assert sorted(graph_engine._traces) == [(1, 3, 64, 96, True), (1, 3, *SIZE, True)]
    # the network's own resolution (what the Segmenter resamples from) is one more graph, the same logits
    half = graph_engine.logits(x, upsample=False)
    assert half.shape[-2:] == (SIZE[0] // 2, SIZE[1] // 2) and torch.equal(half, eager.logits(x, upsample=False))
    full = F.interpolate(half.contiguous(), size=SIZE, mode="bilinear", align_corners=False)
    assert torch.equal(full, eager.logits(x))
    assert "graph" in graph_engine.describe()["optimisations"] and "graph" not in eager.describe()["optimisations"]
    graph = graph_engine._traces[(1, 3, *SIZE, True)]
    called = {node.target for sub in graph.modules() if isinstance(sub, torch.fx.GraphModule)
              for node in sub.graph.nodes if node.op == "call_function"}
    # DDA's attention reads its stacked projections (optimize_for_inference), EDAB's kernels are recorded too, as
    # their ops or (streamlined) the ops' kernels called directly
    for op in ("axial_attention_qkv_cpu", "selective_scan_cpu", "dw_pair_cpu", "edab_merge_cpu", "add_shuffle_cpu"):
        overload = getattr(torch.ops.ecmnet, op).default
        assert overload in called or direct_kernel(overload) in called, op
    assert not any(isinstance(t, torch._ops.OpOverload) and t.namespace == "aten" for t in called)

    def broken(*args, **kwargs):
        raise RuntimeError("cannot export")

    monkeypatch.setattr(torch.export, "export", broken)
    fresh = TorchEngine(ckpt, torch.device("cpu"))
    x = torch.randn(1, 3, *SIZE, generator=gen)
    with pytest.warns(RuntimeWarning, match="running the model eagerly"):
        out = fresh.logits(x)
    assert torch.equal(out, eager.logits(x))


def test_unreadable_checkpoints_get_one_clear_line(tmp_path):
    """Empty, random, foreign-pickle, truncated files and directories: one line naming the file and the reason,
    never PyTorch's advice to load untrusted files with weights_only=False."""
    import collections

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    torch.save(collections.OrderedDict(layer=torch.nn.Linear(2, 2)), tmp_path / "objects.pt")
    (tmp_path / "truncated.pt").write_bytes(DEFAULT_CHECKPOINT.read_bytes()[:100_000])
    (tmp_path / "folder.pt").mkdir()
    expected = {"empty.pt": "is empty (0 bytes)", "random.pt": "not a PyTorch checkpoint file",
                "objects.pt": "holds Python objects other than tensors", "truncated.pt": "not a PyTorch checkpoint",
                "folder.pt": "is a directory, not a checkpoint file"}
    for name, reason in expected.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name)
        message = str(err.value)
        assert str(tmp_path / name) in message and reason in message and "\n" not in message, message
        assert "weights_only" not in message


def test_an_unknown_model_is_an_error_before_any_random_weights_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RANDOM WEIGHTS warning would fail the test
        with pytest.raises(ValueError, match="unknown model 'foo'"):
            Segmenter(InferenceConfig(model="foo", device="cpu"))
