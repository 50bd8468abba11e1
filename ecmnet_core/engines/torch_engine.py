"""The PyTorch inference engine: the eager model, made faster without changing what it computes.

* inference rewrites (:func:`ecmnet_core.model.fuse.optimize_for_inference`): batch norms folded into the preceding
  convolutions, the 1x1 classifier applied before the last bilinear upsampling;
* channels-last memory format (the depthwise and 1x1 convolutions of EDAB run faster that way on CPU);
* fp16/bf16 autocast on CUDA (the selective scan itself always runs in fp32);
* on the CPU one graph per input size captured with ``torch.export`` (``jit``, default): the same ops without the
  Python overhead of ~1,500 module calls per frame (the compiled kernels are recorded as the custom ops
  ``torch.ops.ecmnet.*``), run as the exported program's module, whose Python cost :func:`streamline` trims (direct
  C bindings and kernel calls, no dispatcher round trips); bit for bit the eager model's output, as fast as the
  deprecated ``torch.jit.trace`` it replaced (README § Performance);
* optional ``torch.compile`` (inductor; minutes of compilation on a small CPU, cached on disk by inductor);
* optional CUDA graphs: one captured graph per input shape, replayed with a static input buffer.
"""

from __future__ import annotations

import linecache
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ecmnet_core.checkpoint import Checkpoint
from ecmnet_core.engines import cpu_precision
from ecmnet_core.engines.export import FixedUpsample
from ecmnet_core.model.fuse import optimize_for_inference
from ecmnet_core.ops import fp_mode_cpu
from ecmnet_core.ops.op_registry import direct_kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``dtype`` values: the DTYPES, and ``auto`` (CPU: fp32 or bf16 convolutions, whichever is faster here).
DTYPE_CHOICES = (*DTYPES, "auto")
#: Traced modules kept per engine (one per input shape; a fixed network size needs one).
MAX_TRACES = 8


@dataclass
class TorchEngineOptions:
    """``dtype``: fp32; fp16 (CUDA autocast); bf16 (CUDA autocast; on the CPU the graph's convolutions in bf16,
    :mod:`ecmnet_core.engines.cpu_precision`); auto (CPU: fp32, or bf16 convolutions where the CPU has native bf16
    and they are measured faster on the first input; CUDA: fp32). ``optimize`` applies the inference rewrites of
    :func:`ecmnet_core.model.fuse.optimize_for_inference`."""

    dtype: str = "fp32"
    channels_last: bool = True
    optimize: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    jit: bool = True  # CPU only: a torch.export graph per input size
    scan_backend: str | None = None


def capture(model: nn.Module, example: Tensor, upsample: bool = True) -> nn.Module:
    """``model(example, upsample=upsample)`` as a graph for ``example``'s shape: ``torch.export`` (strict=False,
    static shapes), run as the exported program's module (called with the input alone). Gradients are off while
    capturing, so the inference kernels are recorded as their ``torch.ops.ecmnet.*`` custom ops (not the training
    kernels, which read raw data pointers)."""
    before = set(_fx_sources())
    with torch.inference_mode(False), torch.no_grad():
        example = example.detach().clone()  # an inference tensor cannot enter export's functional tracing
        program = torch.export.export(FixedUpsample(model, upsample), (example,), strict=False)
    module = program.module()
    streamline(module)
    # torch.fx keeps the source of every generated forward for tracebacks, for the life of the process: drop the
    # ones of the intermediate graphs now and the module's own when it is freed, or every configure of a node
    # would keep ~5 MB (lifecycle cleanup -> configure cycles)
    live = {sub.forward.__code__.co_filename for sub in module.modules() if isinstance(sub, torch.fx.GraphModule)}
    _forget_sources(set(_fx_sources()) - before - live)
    weakref.finalize(module, _forget_sources, live)
    return module


def _fx_sources() -> dict:
    loader = getattr(torch.fx.graph_module, "_loader", None)  # private; absent in another torch: nothing to do
    return getattr(loader, "eval_cache", None) or {}


def _forget_sources(keys: set[str]) -> None:
    cache = _fx_sources()
    for key in keys:
        cache.pop(key, None)
        linecache.cache.pop(key, None)


def streamline(module: nn.Module) -> int:
    """Cut the Python cost of running the captured graphs (the root and the nested ones), leaving every kernel and
    argument as it is; returns the nodes rewritten or removed.

    * every ``aten`` node calls the operator's C binding (``torch.conv2d`` for ``torch.ops.aten.conv2d.default``,
      ``torch._C._nn.linear``, ``Tensor.contiguous``): the same kernel without the Python ``OpOverload`` layer;
    * every ``torch.ops.ecmnet.*`` node calls the op's CPU kernel function itself
      (:func:`ecmnet_core.ops.op_registry.direct_kernel`), not the dispatcher that calls back into Python;
    * the checks export adds around a ``.to(dtype)`` and the conversions to the dtype a tensor already has go;
    * every weight and buffer the graph reads becomes a plain instance attribute with a flat name: the generated
      code's ``self.stem.0.0.weight`` walked ``nn.Module.__getattr__`` once per level, ~7,500 calls a frame.
      The tensors are the model's own (nothing is copied); a captured graph is for the CPU it was made on.
    """
    count = 0
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in list(sub.graph.nodes):
            target = node.target
            if node.op == "call_function":
                if target in (torch.ops.aten._assert_tensor_metadata.default, torch._assert_tensor_metadata) \
                        and not node.users:
                    sub.graph.erase_node(node)
                elif target is torch.ops.aten.to.dtype and _same_dtype(node):
                    node.replace_all_uses_with(node.args[0])
                    sub.graph.erase_node(node)
                else:
                    binding = _binding(target)
                    if binding is None:
                        continue
                    node.target = binding
                count += 1
            elif node.op == "get_attr" and "." in target:
                value = sub
                for part in target.split("."):
                    value = getattr(value, part)
                if isinstance(value, Tensor):
                    flat = f"_const_{count}"
                    object.__setattr__(sub, flat, value)  # an instance attribute: no nn.Module lookup
                    node.target = flat
                    count += 1
        sub.recompile()
    return count


def _binding(target: object) -> object | None:
    """What a graph node calling ``target`` can call instead, for the same kernel at less Python cost, or None."""
    kernel = direct_kernel(target)
    if kernel is not None or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return kernel
    name = target._schema.name.split("::", 1)[1]
    for home in (torch._C._VariableFunctions, torch._C._nn, Tensor):  # the last: methods such as contiguous, view
        function = getattr(home, name, None)
        if function is not None:
            return function
    return None


def _same_dtype(node: torch.fx.Node) -> bool:
    """True for ``aten.to.dtype(x, dtype)`` with ``x`` already of that dtype (a no-op; export records each)."""
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    return isinstance(value, Tensor) and len(node.args) == 2 and not node.kwargs and value.dtype == node.args[1]


class TorchEngine:
    """Runs a checkpoint's model with PyTorch on ``device``."""

    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: torch.device, options: TorchEngineOptions | None = None) -> None:
        self.options = opts = options or TorchEngineOptions()
        if opts.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype {opts.dtype!r} is not supported (choose {', '.join(DTYPE_CHOICES)})")
        if opts.dtype == "fp16" and device.type != "cuda":
            raise ValueError(f"dtype fp16 needs a CUDA device (autocast); on {device} use fp32, bf16 or auto")
        if opts.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, not {device}")
        self.device = device
        model = ckpt.build_model(scan_backend=opts.scan_backend).eval()
        if opts.optimize:
            model = optimize_for_inference(model, inplace=True)
        model = model.to(device)
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.scan_backend = model.scan_backend(device)
        # dynamic=False: one specialised graph per input size, which is what a camera stream has
        self._forward = torch.compile(model, dynamic=False) if opts.compile else model
        # auto on CUDA stays fp32 until the GPU paths are measured (scripts/gpu_check.sh)
        self._auto = opts.dtype == "auto" and device.type == "cpu"
        self._amp_dtype = DTYPES["fp32" if opts.dtype == "auto" else opts.dtype]
        #: CPU graphs: per input (shape, upsample), the precision the graph runs in and why (``describe``)
        self.chosen: dict[tuple, str] = {}
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        # capturing on CUDA would record the plain scan loop (the CUDA kernels are not custom ops); torch.compile wins
        self._jit = opts.jit and device.type == "cpu" and not opts.compile
        self._cpu_bf16_graph = device.type == "cpu" and opts.dtype == "bf16" and self._jit
        self._traces: dict[tuple[int, ...], nn.Module] = {}
        self._flushed: bool | None = None  # CPU: whether the last forward ran with denormals flushed to zero

    @property
    def dtype(self) -> str:
        return self.options.dtype

    def _autocast(self) -> torch.autocast:
        enabled = self._amp_dtype != torch.float32 and not self._cpu_bf16_graph
        return torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=enabled)

    @torch.inference_mode()
    def logits(self, batch: Tensor, upsample: bool = True) -> Tensor:
        """(B, 3, h, w) normalised float32 -> (B, K, h, w) float32 logits on the engine's device; with
        ``upsample=False`` at the network's own output resolution (ECMNet: h/2 x w/2), to be resampled to the size
        the caller needs in one step, as :func:`ecmnet_core.inference.pipeline.logits_to_labels` does."""
        batch = batch.to(self.device, non_blocking=True)
        if self.device.type == "cpu":  # trained weights are often denormal: slow on Intel cores
            self._flushed = fp_mode_cpu.flush_denormals()
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.options.cuda_graphs:
            return self._replay(batch, upsample)
        if self._jit:
            return self._traced(batch, upsample)
        with self._autocast():
            return self._forward(batch, upsample=upsample).float()

    def _traced(self, batch: Tensor, upsample: bool) -> Tensor:
        key = (*batch.shape, upsample)
        module = self._traces.get(key)
        if module is None:
            try:
                module = capture(self.model, batch, upsample)
            except Exception as exc:  # a model that cannot be captured keeps working, eagerly
                warnings.warn(f"graph capture (torch.export) failed ({type(exc).__name__}: {exc}); running the "
                              "model eagerly", RuntimeWarning, stacklevel=3)
                self._jit = self._cpu_bf16_graph = False  # eagerly, bf16 is autocast
                with self._autocast():
                    return self._forward(batch, upsample=upsample).float()
            module = self._precision(module, batch, key)
            if len(self._traces) >= MAX_TRACES:  # native-size input with many sizes: keep the newest few
                self._traces.pop(next(iter(self._traces)))
            self._traces[key] = module
        return module(batch).float()

    def _precision(self, graph: nn.Module, batch: Tensor, key: tuple) -> nn.Module:
        """The captured fp32 ``graph``, or its bf16-convolution copy (dtype bf16; auto when faster here)."""
        if self._cpu_bf16_graph:
            self.chosen[key] = "bf16 convolutions"
            return cpu_precision.bf16_convolutions(graph)
        if not self._auto:
            self.chosen[key] = "fp32"
            return graph
        if not cpu_precision.cpu_has_native_bf16():
            self.chosen[key] = "fp32 (auto: no native bf16 on this CPU)"
            return graph
        candidate = cpu_precision.bf16_convolutions(graph)
        ms = cpu_precision.time_graphs({"fp32": graph, "bf16": candidate}, batch)
        faster = "bf16" if ms["bf16"] < ms["fp32"] else "fp32"
        self.chosen[key] = (f"{faster}{' convolutions' if faster == 'bf16' else ''} (auto: bf16 "
                            f"{ms['bf16']:.1f} ms, fp32 {ms['fp32']:.1f} ms)")
        return candidate if faster == "bf16" else graph

    def _replay(self, batch: Tensor, upsample: bool) -> Tensor:
        key = (*batch.shape, upsample)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = batch.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self._autocast():  # warm up (kernel choice, allocations) off the graph
                for _ in range(2):
                    self._forward(static_in, upsample=upsample)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), self._autocast():
                static_out = self._forward(static_in, upsample=upsample).float()
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(batch)
        graph.replay()
        return static_out.clone()  # the static buffer is overwritten by the next replay

    def park(self) -> None:
        """Move the weights to the CPU (frees GPU memory while a node is inactive); captured graphs are dropped."""
        self._graphs.clear()
        self._traces.clear()
        self.chosen.clear()  # chosen again with the next capture
        self.model.to("cpu")

    def unpark(self) -> None:
        self.model.to(self.device)

    def describe(self) -> dict[str, str]:
        o = self.options
        flags = [name for name, on in (("optimized", o.optimize), ("channels-last", o.channels_last),
                                       ("graph", self._jit), ("compiled", o.compile),
                                       ("cuda-graphs", o.cuda_graphs)) if on]
        described = {"backend": "torch", "optimisations": ", ".join(flags) or "none"}
        if self.chosen:
            described["cpu_precision"] = "; ".join(dict.fromkeys(self.chosen.values()))
        if self._flushed is not None:
            described["denormals"] = "flushed to zero" if self._flushed else (
                f"kept ({fp_mode_cpu.KEEP_ENV}=1)" if os.environ.get(fp_mode_cpu.KEEP_ENV) == "1"
                else "kept (the flush needs an x86 CPU and a C++ compiler)")
        return described
