"""Lower precision for the CPU graph: the convolutions in bf16 where the CPU has native bf16 (AVX-512 BF16, AMX),
and the run-time choice of ``dtype: auto``.

Only the convolutions change: each takes its input rounded to bf16 and bf16 weights (converted once) and its
output is widened back to fp32, so oneDNN's bf16 kernels (twice the fp32 multiply-add rate on a CPU with
``avx512_bf16``) do the bulk of the arithmetic while attention, the scan, the EDAB kernels and every reduction stay
fp32. (Autocasting the whole model was measured slower on a Zen 4: the compiled fp32 kernels then fall back to
PyTorch.) On a CPU without native bf16 PyTorch emulates it, about 10x slower than fp32: ``auto`` never picks it
there, and an explicit ``bf16`` still runs (for accuracy checks), slowly.

``auto`` on the CPU: fp32 unless the CPU has native bf16; then both graphs are timed on the first input of each size
(interleaved, a few runs) and the faster one is kept. The choice is reported by the engine's ``describe()``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from ecmnet_core.bench.timing import time_interleaved

#: Runs of each graph when ``auto`` chooses (after one warm-up each), interleaved.
AUTO_RUNS = 3


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX), i.e. when a bf16 path can win."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _conv2d_bf16(x: Tensor, weight: Tensor, bias: Tensor | None = None, *args) -> Tensor:
    """``torch.conv2d`` on ``x`` rounded to bf16 with bf16 ``weight``/``bias``, widened back to fp32."""
    return torch.conv2d(x.to(torch.bfloat16), weight, bias, *args).float()


def bf16_convolutions(module: nn.Module) -> nn.Module:
    """A copy of the captured (streamlined) graph ``module`` whose 2-D convolutions run in bf16 (weights converted
    once, held by the copy); every other node is shared with the original. Returns the copy."""
    with warnings.catch_warnings():  # copying torch's pytree code generation trips its own deprecation warning
        warnings.filterwarnings("ignore", message=r".*treespec.*deprecated", category=Warning)
        graph = copy.deepcopy(module.graph)
    converted: dict[str, Tensor] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.conv2d:
            continue
        params = [(i, a) for i, a in enumerate(node.args[1:3], start=1) if isinstance(a, torch.fx.Node)]
        if not params or any(a.op != "get_attr" for _, a in params):
            continue  # a weight computed in the graph: leave that convolution in fp32
        for index, source in params:
            name = f"{source.target}_bf16"
            if name not in converted:
                converted[name] = getattr(module, source.target).detach().to(torch.bfloat16)
            with graph.inserting_before(node):
                node.update_arg(index, graph.get_attr(name))
        node.target = _conv2d_bf16
    attrs: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            attrs[node.target] = converted[node.target] if node.target in converted else getattr(module, node.target)
    result = torch.fx.GraphModule(attrs, graph)
    result.graph.eliminate_dead_code()  # the fp32 weights the converted convolutions no longer read
    result.recompile()
    return result


def time_graphs(graphs: dict[str, nn.Module], example: Tensor, runs: int = AUTO_RUNS) -> dict[str, float]:
    """Median ms of each graph on ``example``: one warm-up each, then ``runs`` interleaved rounds."""
    with torch.inference_mode():
        timings = time_interleaved({name: (lambda g=graph: g(example)) for name, graph in graphs.items()}, runs,
                                   warmup=1, device=example.device)
    return {name: timing.median for name, timing in timings.items()}


__all__ = ["AUTO_RUNS", "bf16_convolutions", "cpu_has_native_bf16", "time_graphs"]
