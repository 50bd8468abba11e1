"""The fast training path computes what the baseline computes: the fused BatchNorm+PReLU kernel against a float64
PyTorch reference (outputs, running statistics, every gradient), and whole-model losses and gradients of the
default path against the baseline's; plus the data cache and the ``bench train`` report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ecmnet_core.model import build_model, model_config
from ecmnet_core.model.layers import BNPReLU
from ecmnet_core.ops import bn_prelu_cpu
from ecmnet_core.train.losses import WeightedCrossEntropy
from ecmnet_core.train.train_path import TrainPath, apply_train_path, prepare_batch, train_path

needs_kernel = pytest.mark.skipif(not bn_prelu_cpu.is_available(), reason="no C++ compiler for the CPU kernel")


def _random_bn_prelu(channels: int, single: bool = False) -> BNPReLU:
    m = BNPReLU(channels)
    if single:
        m[1] = type(m[1])(1)
    with torch.no_grad():
        m[0].weight.uniform_(0.5, 1.5)
        m[0].bias.uniform_(-0.5, 0.5)
        m[0].running_mean.uniform_(-1, 1)
        m[0].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.0, 0.5)
    return m.train()


def _run(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    bn, prelu = module[0], module[1]
    return {"out": out.detach(), "dx": x.grad, "dgamma": bn.weight.grad, "dbeta": bn.bias.grad,
            "da": prelu.weight.grad, "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}


@needs_kernel
@pytest.mark.parametrize("shape,single,momentum", [
    ((2, 8, 7, 5), False, 0.1),     # rows not a multiple of the kernel's row blocks, channels < one vector
    ((3, 24, 13, 17), True, 0.1),   # one shared PReLU weight (nn.PReLU() default)
    ((2, 40, 9, 11), False, None),  # cumulative running average
    ((1, 16, 1, 2), False, 0.1),    # two rows: the unbiased variance's n - 1
    ((2, 13, 9, 7), False, 0.1),    # channels not a multiple of the vector width (AVX2 8, AVX-512 16 lanes)
    ((2, 21, 40, 50), False, 0.1),  # enough work for a two-thread team (run with 2 threads below)
])
def test_fused_bn_prelu_matches_float64_reference(shape, single, momentum, one_torch_thread):
    if shape[2] * shape[3] >= 2000:
        torch.set_num_threads(2)  # the fixture restores its thread count afterwards
    torch.manual_seed(0)
    ref = _random_bn_prelu(shape[1], single)
    ref[0].momentum = momentum
    fused = copy.deepcopy(ref)
    fused.fused = True
    x = (torch.randn(*shape) * 3 + 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(*shape)
    assert bn_prelu_cpu.fits(x, fused[0])
    want = _run(copy.deepcopy(ref).double(), x.double(), grad.double())
    got = _run(fused, x, grad)
    assert got["out"].is_contiguous(memory_format=torch.channels_last)
    for key, value in want.items():
        err = float((got[key].double() - value).abs().max() / value.abs().max().clamp_min(1e-12))
        assert err < 1e-5, f"{key}: relative error {err:.2e}"
    assert int(fused[0].num_batches_tracked) == 1


@needs_kernel
def test_fused_path_is_used_only_where_it_applies():
    m = _random_bn_prelu(8)
    x = torch.randn(2, 8, 6, 6)
    assert not bn_prelu_cpu.fits(x, m[0])  # NCHW
    cl = x.contiguous(memory_format=torch.channels_last)
    assert bn_prelu_cpu.fits(cl, m[0])
    assert not bn_prelu_cpu.fits(cl.double(), m[0])
    m.eval()
    assert not bn_prelu_cpu.fits(cl, m[0])  # eval mode uses the running statistics: PyTorch's path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not bn_prelu_cpu.fits(cl, _random_bn_prelu(8)[0])


def _grads(model: nn.Module, path: TrainPath, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    apply_train_path(model, path)
    model.train()
    loss = WeightedCrossEntropy(5, [1.0, 2.0, 1.5, 3.0, 1.0], 5)(model(prepare_batch(x, path)), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_default_path_gradients_agree_with_the_baseline(one_torch_thread):
    """Loss and gradients of the default path against float64, held to the fp32 noise of PyTorch's own kernels.

    In fp32 this random network's gradients are a few % (relative L2) off float64 even on the baseline, most of it
    in the stem (long reductions in BatchNorm's backward), and PyTorch's channels-last BatchNorm backward is about
    3x less exact than its NCHW one. The default path runs channels-last, so it is held to PyTorch channels-last
    training: the fused kernels, the classifier order and the compiled scan must not add error to it.
    """
    torch.manual_seed(0)
    base = build_model(model_config("ecmnet", 5))
    with torch.no_grad():  # DDA's gamma starts at 0, which would hide its attention's gradients
        for name, p in base.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    x = torch.randn(2, 3, 64, 96)
    y = torch.randint(0, 6, (2, 64, 96))  # 5 = ignore
    cl_torch = TrainPath("channels-last", channels_last=True, fused_bn_prelu=False, fused_depthwise=False,
                         classify_before_upsample=False, scan_backend="torch")
    loss64, g64 = _grads(copy.deepcopy(base).double(), train_path("baseline"), x.double(), y)
    runs = {name: _grads(copy.deepcopy(base), path, x, y)
            for name, path in (("baseline", train_path("baseline")), ("channels-last", cl_torch),
                               ("default", train_path("default")))}
    for name, (loss, grads) in runs.items():
        assert grads.keys() == g64.keys()
        assert abs(loss - loss64) < 1e-4 * abs(loss64), f"{name}: loss {loss} vs float64 {loss64}"

    def flat(g):
        return torch.cat([g[n].double().flatten() for n in sorted(g64)])

    ref = flat(g64)
    err = {name: float((flat(g) - ref).norm() / ref.norm()) for name, (_, g) in runs.items()}
    assert err["baseline"] < 0.1 and err["channels-last"] < 0.2, err
    assert err["default"] <= 1.25 * err["channels-last"] + 1e-3, err


def test_default_path_on_cuda_keeps_pytorch_layout():
    path = train_path("default", "cuda")
    assert not path.channels_last and not path.fused_bn_prelu and path.classify_before_upsample
    with pytest.raises(ValueError, match="train.path"):
        train_path("fastest")


def test_dataset_cache_returns_the_same_samples(tmp_path):
    from helpers import make_camvid

    from ecmnet_core.data import SegmentationDataset, TrainTransform, build_dataset

    root = make_camvid(tmp_path / "camvid", n_train=3, n_val=1)
    info, samples = build_dataset("camvid", root, "train")
    transform = TrainTransform((32, 48), [100.0] * 3, [60.0] * 3, info.ignore_index)
    plain = SegmentationDataset(samples, transform, info, seed=3)
    cached = SegmentationDataset(samples, transform, info, seed=3, cache=True)
    assert cached.fill_cache() > 0 and len(cached.cache) == 3
    for epoch in (0, 1):  # augmentation from the cached uint8 arrays must leave them untouched
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(3):
            (a, la), (b, lb) = plain[i], cached[i]
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_bench_train_reports_both_paths(tmp_path, one_torch_thread):
    from helpers import make_camvid

    from ecmnet_core.bench.training import TrainBenchConfig, bench_train, format_train

    root = make_camvid(tmp_path / "camvid", n_train=4, n_val=1)
    # (glibc's allocator defaults: --trainer-allocator's policy is process-wide and would stay in pytest's)
    r = bench_train(TrainBenchConfig(size=(32, 48), batch=2, runs=2, warmup=1, data=str(root), data_images=4))
    assert set(r["paths"]) == {"baseline", "default"}
    assert r["speedup"] == pytest.approx(r["baseline_s_per_iter"] / r["default_s_per_iter"])
    assert r["data_images_per_s"] > 0 and r["data"]["images"] == 4
    assert "default speed-up vs baseline" in format_train(r) and r["allocator"] == "glibc defaults"


def test_progressive_resizing_changes_the_crop_per_stage(tmp_path):
    from helpers import make_camvid

    from ecmnet_core.train.config import load_config
    from ecmnet_core.train.trainer import Trainer

    root = make_camvid(tmp_path / "camvid", n_train=4, n_val=1)
    config = load_config("camvid_cpu", [f"data.root={root}", "model.name=baseline", "data.crop=[32, 48]",
                                        "data.batch_size=2", "data.workers=0", "train.epochs=3",
                                        "data.stages=[{epochs: 2, scale: 0.5}]", "train.progress=false"])
    trainer = Trainer(config, tmp_path / "run", tensorboard=False, plots=False)
    assert trainer.optimizer.defaults["fused"]  # the default path's one-kernel Adam
    assert [trainer.stage_scale(e) for e in range(3)] == [0.5, 0.5, 1.0]
    for epoch, shape in ((0, (16, 24)), (2, (32, 48))):
        images, labels = next(iter(trainer._loader(epoch, 0)))
        assert tuple(images.shape[-2:]) == shape and tuple(labels.shape[-2:]) == shape
    with pytest.raises(ValueError, match=r"data.stages\[0\].scale"):
        Trainer(config.with_overrides(["data.stages=[{epochs: 1, scale: 0}]"]), tmp_path / "bad")
    with pytest.raises(ValueError, match="more than train.epochs"):
        Trainer(config.with_overrides(["data.stages=[{epochs: 9, scale: 0.5}]"]), tmp_path / "bad")


def test_stale_checkpoint_temporaries_are_removed_on_start(tmp_path):
    import os
    import time

    from ecmnet_core.checkpoint import remove_stale_temporaries

    old, fresh = tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.def456.tmp"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "last.pt").write_bytes(b"kept")
    assert remove_stale_temporaries(tmp_path) == [old]
    assert fresh.exists() and (tmp_path / "last.pt").exists() and not old.exists()
