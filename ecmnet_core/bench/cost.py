"""``info``: parameters and compute cost of an ECMNet configuration, in the paper's convention and in full.

Two counts, both for one image (batch 1):

* **paper convention** (``gmac_paper``): pip ptflops' module hooks, configured like the old ptflops copy in the
  authors' repository that produced the paper's "8.27 G": nn.Conv*/ConvTranspose (bias included), BatchNorm
  (2 per element), (P)ReLU/ReLU6 and pooling modules. Functional ops (interpolate, matmul/bmm/einsum, softmax,
  SiLU/GELU, sigmoid) are not patched, LayerNorm/GroupNorm/GELU modules are ignored, and nn.Linear uses the old
  ``batch * in.shape[1] * out.shape[1]`` formula, which is ~0 on channels-last 4-D inputs. The selective scan
  is free. So DDA's attention products and the SS2D core cost nothing here, exactly as in the paper.
* **full count** (``gmac_full``, ``gflops_full = 2 * gmac_full``): fvcore (1 per multiply-accumulate: conv,
  linear, einsum, bmm/matmul, norms, interpolation, adaptive pooling) with every :class:`SelectiveScan` replaced
  by a stub that fvcore counts as 0, plus the scan's analytic cost ``SelectiveScan.flops`` (VMamba's
  9*B*L*D*N + B*D*L) from a forward hook, plus DDA's attention products (``DDA.attention_macs``) only if fvcore
  did not see them.

Residual against the spec's vendored-ptflops 8.466 GMac (19 classes, 512x1024): pip ptflops gives 8.473 GMac.
The +0.007 G are max-pool input elements in down1/down2 (6.29 M, which the convention counts but the spec's run
evidently did not) and the old counter's transposed-conv bias bug (it multiplies by H*H instead of H*W: 1.38 M
fewer there). Neither is reproduced on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ecmnet_core.model import DDA, VARIANTS, SelectiveScan, build_model
from ecmnet_core.model.attention import set_attention_backend
from ecmnet_core.model.ecmnet import ModelConfig

#: The paper's published cost (19 classes, 1x3x512x1024, GMac counted with its ptflops copy).
PAPER_PARAMS = 0.87e6
PAPER_GMAC = 8.27
PAPER_SETTING = {"classes": 19, "input_size": (512, 1024)}

_INSTALL_HINT = "install the cost extras: pip install 'ecmnet_ros[cost]' (ptflops, fvcore)"


@dataclass
class FullCount:
    """The full multiply-accumulate count of one forward pass and where it comes from (all in MACs)."""

    fvcore_macs: int
    by_operator: dict[str, int]
    by_stage: dict[str, int]
    attention_macs: int
    attention_added: int  # the part of attention_macs fvcore did not see (0 when its bmm count covers it)
    scan_macs: int
    scan_calls: list[dict] = field(default_factory=list)

    @property
    def attention_in_fvcore(self) -> bool:
        return self.attention_added == 0

    @property
    def total_macs(self) -> int:
        return self.fvcore_macs + self.scan_macs + self.attention_added


@dataclass
class CostReport:
    """What ``info`` prints; ``to_dict`` is the ``--json`` object."""

    model: str
    classes: int
    input_size: tuple[int, int]
    params: int
    gmac_paper: float
    gmac_full: float | None = None
    gflops_full: float | None = None
    scan_gmac: float | None = None
    scan_gflops: float | None = None
    attention_gmac: float | None = None
    attention_in_fvcore: bool | None = None
    fvcore_gmac: float | None = None
    fvcore_by_operator_gmac: dict[str, float] = field(default_factory=dict)
    full_by_stage_gmac: dict[str, float] = field(default_factory=dict)
    scan_calls: list[dict] = field(default_factory=list)
    counters: dict[str, str] = field(default_factory=dict)
    paper: dict[str, float] | None = None

    def to_dict(self) -> dict:
        out = _rounded(asdict(self))
        out["input_size"] = list(self.input_size)
        return out


def _rounded(value, digits: int = 6):
    """Floats rounded for printing (GMac to the kMac); containers recursively."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def count_parameters(model: nn.Module) -> int:
    """All parameters, as the paper counts them (``sum(p.numel())``)."""
    return sum(p.numel() for p in model.parameters())


def _stub_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor) -> Tensor:
    """Shape-correct stand-in for the scan: uses every input (so tracing keeps the ops that make them) but only
    through elementwise ops and sums, which fvcore does not count."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    mixed = (B * C).sum(2).repeat_interleave(dim // groups, dim=1)  # (batch, dim, L)
    return u * D[:, None] + 0 * (delta + delta_bias[:, None] + A.sum(1)[:, None] + mixed)


@contextlib.contextmanager
def stubbed_scans(model: nn.Module) -> Iterator[list[dict]]:
    """Replace every :class:`SelectiveScan` in ``model`` by :func:`_stub_scan` and record each call's shape.

    Yields a list that fills with ``{"module", "batch", "dim", "length", "d_state", "macs"}`` per scan call,
    where ``macs`` is :meth:`SelectiveScan.flops`. The original forwards are restored on exit.
    """
    calls: list[dict] = []
    handles = []

    def recorder(name: str):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            u, a = inputs[0], inputs[2]
            shape = torch.Size(int(s) for s in u.shape)  # sizes are tensors while tracing
            n_state = int(a.shape[1])
            calls.append({"module": name, "batch": shape[0], "dim": shape[1], "length": shape[2],
                          "d_state": n_state, "macs": SelectiveScan.flops(shape, n_state)})
        return record

    scans = [(n, m) for n, m in model.named_modules() if isinstance(m, SelectiveScan)]
    try:
        for name, m in scans:
            m.forward = _stub_scan  # instance attribute shadows the class method
            handles.append(m.register_forward_hook(recorder(name)))
        yield calls
    finally:
        for h in handles:
            h.remove()
        for _, m in scans:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[dict]]:
    """Record ``{"module", "macs"}`` (``DDA.attention_macs``) for every DDA call while the context is open."""
    calls: list[dict] = []

    def recorder(name: str):
        def record(module: DDA, inputs: tuple, output: Tensor) -> None:
            shape = torch.Size(int(s) for s in inputs[0].shape)  # sizes are tensors while tracing
            calls.append({"module": name, "macs": module.attention_macs(shape)})
        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if isinstance(m, DDA)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _old_ptflops_linear_hook(module: nn.Linear, inputs: tuple, output: Tensor) -> None:
    """The old ptflops Linear rule (batch * in.shape[1] * out.shape[1]): ~0 for (B, H, W, C) inputs."""
    x = inputs[0]
    module.__flops__ += int(x.shape[0] * x.shape[1] * output.shape[1])


def _custom_hooks() -> dict:
    """The old counter's Linear rule; our subclasses counted as the modules they are (ptflops matches exact types):
    the export-friendly PReLU as nn.PReLU, DepthwiseConv2d as nn.Conv2d."""
    from ptflops.pytorch_ops import MODULES_MAPPING

    from ecmnet_core.model.layers import DepthwiseConv2d, PReLU

    return {nn.Linear: _old_ptflops_linear_hook, PReLU: MODULES_MAPPING[nn.PReLU],
            DepthwiseConv2d: MODULES_MAPPING[nn.Conv2d]}


def paper_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one (1, 3, H, W) forward pass in the paper's ptflops convention."""
    try:
        from ptflops import get_model_complexity_info
    except ImportError as exc:
        raise RuntimeError(f"the paper-convention count needs ptflops; {_INSTALL_HINT}") from exc
    ignored = [nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GELU,
               nn.MultiheadAttention]
    log = io.StringIO()
    was_training = model.training
    try:
        with torch.no_grad(), stubbed_scans(model):
            macs, _ = get_model_complexity_info(
                model, (3, *input_size), as_strings=False, print_per_layer_stat=False, ost=log, verbose=False,
                backend="pytorch", ignore_modules=ignored, custom_modules_hooks=_custom_hooks(),
                backend_specific_config={"count_functional": False},
            )
    finally:
        model.train(was_training)
        for attr in ("start_flops_count", "stop_flops_count", "reset_flops_count", "compute_average_flops_cost",
                     "__batch_counter__"):  # what ptflops binds onto the model
            model.__dict__.pop(attr, None)
    if macs is None:
        raise RuntimeError(f"ptflops failed on input 1x3x{input_size[0]}x{input_size[1]}: {log.getvalue().strip()}")
    return int(macs)


def full_macs(model: nn.Module, input_size: tuple[int, int]) -> FullCount:
    """fvcore MACs with stubbed scans, plus the analytic scan cost, plus DDA attention if fvcore missed it."""
    try:
        with warnings.catch_warnings():  # fvcore's import uses the deprecated torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            from fvcore.nn import FlopCountAnalysis
    except ImportError as exc:
        raise RuntimeError(f"the full count needs fvcore; {_INSTALL_HINT}") from exc
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, *input_size, device=device)
    scan_names = {name for name, m in model.named_modules() if isinstance(m, SelectiveScan)}
    dda_names = {name for name, m in model.named_modules() if isinstance(m, DDA)}
    saved_backends = {m: m.backend for m in model.modules() if isinstance(m, DDA)}
    try:
        # fvcore counts the PyTorch attention (a trace would otherwise record the CPU kernel's opaque custom op)
        set_attention_backend(model, "torch")
        # one traced forward: fvcore's graph, and the hooks' scan and attention shapes
        with (torch.no_grad(), stubbed_scans(model) as scan_calls, recorded_attention(model) as attention_calls,
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")  # TracerWarnings about shape comparisons in resize_to / FFM
            analysis = FlopCountAnalysis(model, (x,))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(analysis.total())
            by_module = analysis.by_module()
            by_module_op = analysis.by_module_and_operator()
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
    finally:
        model.train(was_training)
        for module, backend in saved_backends.items():
            module.backend = backend
    # the stub is elementwise-only, but take out whatever fvcore may still have attributed to the scans
    stub_seen = sum(int(by_module.get(name, 0)) for name in scan_names)
    total -= stub_seen
    attention = sum(c["macs"] for c in attention_calls)
    seen_attention = sum(int(v) for name in dda_names for op, v in by_module_op.get(name, {}).items()
                         if op in ("bmm", "matmul", "einsum"))
    # fvcore counts DDA's bmm products; if a future version or formulation hides them, add what it missed
    attention_added = 0 if seen_attention >= 0.99 * attention else attention - seen_attention
    by_stage = {name: int(by_module.get(name, 0)) for name, _ in model.named_children()}
    top_level = total + stub_seen - sum(by_stage.values())  # ops in ECMNet.forward itself (resizes)
    if top_level:
        by_stage["(top level)"] = top_level
    if attention_added:
        for call in attention_calls:
            by_stage[call["module"].split(".")[0]] += call["macs"] * attention_added // attention
    for name in scan_names:
        by_stage[name.split(".")[0]] -= int(by_module.get(name, 0))
    for call in scan_calls:
        by_stage[call["module"].split(".")[0]] += call["macs"]
    scan_macs = sum(c["macs"] for c in scan_calls)
    return FullCount(fvcore_macs=total, by_operator=by_operator, by_stage=by_stage, attention_macs=attention,
                     attention_added=attention_added, scan_macs=scan_macs, scan_calls=scan_calls)


def _counter_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ptflops", "fvcore"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def measure(model: str | ModelConfig = "ecmnet", num_classes: int = 19, input_size: tuple[int, int] = (512, 1024),
            full: bool = True) -> CostReport:
    """Parameters, paper-convention GMac and (``full``) the full count of one configuration."""
    h, w = (int(v) for v in input_size)
    if h < 16 or w < 16:
        raise ValueError(f"input size {h}x{w} is too small: both sides must be >= 16 (total stride 16)")
    net = build_model(model, num_classes).eval()
    name = net.config.name
    gmac = 1e-9
    report = CostReport(model=name, classes=net.config.num_classes, input_size=(h, w), params=count_parameters(net),
                        gmac_paper=paper_macs(net, (h, w)) * gmac, counters=_counter_versions())
    if full:
        fc = full_macs(net, (h, w))
        report.gmac_full = fc.total_macs * gmac
        report.gflops_full = 2 * report.gmac_full
        report.scan_gmac = fc.scan_macs * gmac
        report.scan_gflops = 2 * report.scan_gmac
        report.attention_gmac = fc.attention_macs * gmac
        report.attention_in_fvcore = fc.attention_in_fvcore
        report.fvcore_gmac = fc.fvcore_macs * gmac
        report.fvcore_by_operator_gmac = {k: v * gmac for k, v in sorted(fc.by_operator.items(), key=lambda kv: -kv[1])}
        report.full_by_stage_gmac = {k: v * gmac for k, v in fc.by_stage.items()}
        report.scan_calls = fc.scan_calls
    if name == "ecmnet" and report.classes == PAPER_SETTING["classes"] and (h, w) == PAPER_SETTING["input_size"]:
        report.paper = {"params": PAPER_PARAMS, "gmac": PAPER_GMAC,
                        "params_diff_pct": 100 * (report.params / PAPER_PARAMS - 1),
                        "gmac_diff_pct": 100 * (report.gmac_paper / PAPER_GMAC - 1)}
    return report


def variant_table(num_classes: int = 19, input_size: tuple[int, int] = (512, 1024)) -> list[dict]:
    """Parameters and paper-convention GMac of the four ablation configurations (paper Table 1)."""
    rows = []
    for name, switches in VARIANTS.items():
        r = measure(name, num_classes, input_size, full=False)
        rows.append({"model": name, **switches, "params": r.params, "gmac_paper": r.gmac_paper})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ecmnet", choices=list(VARIANTS), help="model variant (default ecmnet)")
    parser.add_argument("--classes", type=int, default=19, help="number of classes (default 19, the paper's count)")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"),
                        help="input height and width (default 512 1024, the paper's FLOPs setting)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--all-variants", action="store_true",
                        help="parameters and paper GMac of the four ablation variants instead")
    parser.add_argument("--paper-only", action="store_true", help="skip the full (fvcore + scan) count; faster")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is fastest on a busy machine)")


def _format_text(r: CostReport) -> str:
    h, w = r.input_size
    lines = [f"ECMNet variant {r.model!r}, {r.classes} classes, input 1x3x{h}x{w}",
             f"  parameters                      {r.params:>13,}   ({r.params / 1e6:.3f} M)"]
    if r.paper:
        lines[-1] += f"   paper 0.87 M: {r.paper['params_diff_pct']:+.2f} %"
    lines.append(f"  GMac, paper convention          {r.gmac_paper:>13.3f}   (ptflops {r.counters.get('ptflops')}: "
                 "conv/deconv/BN/PReLU/ReLU6/pooling modules; no attention, no scan)")
    if r.paper:
        lines[-1] += f"\n{'':36}paper 8.27 GMac: {r.paper['gmac_diff_pct']:+.2f} %"
    if r.gmac_full is not None:
        lines += [
            f"  GMAC, full count                {r.gmac_full:>13.3f}",
            f"  GFLOPs, full count (2 x MAC)    {r.gflops_full:>13.3f}",
            f"    fvcore {r.counters.get('fvcore')} (scan stubbed out) {r.fvcore_gmac:>9.3f} GMAC: "
            + ", ".join(f"{k} {v:.3f}" for k, v in r.fvcore_by_operator_gmac.items()),
            f"    DDA attention products      {r.attention_gmac:>13.3f} GMAC   "
            + ("(already inside fvcore's bmm count)" if r.attention_in_fvcore else "(added: fvcore missed them)"),
            f"    selective scan (analytic)   {r.scan_gmac:>13.3f} GMAC = {r.scan_gflops:.3f} GFLOPs   "
            "(9*B*L*D*N + B*D*L, added)",
        ]
        for c in r.scan_calls:
            lines.append(f"      scan call: B={c['batch']} D={c['dim']} L={c['length']} N={c['d_state']}")
        lines.append("    by stage (full GMAC): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in r.full_by_stage_gmac.items() if v > 0))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    size = tuple(args.size)
    if args.classes < 1:
        raise SystemExit(f"info: --classes must be >= 1, got {args.classes}")
    if min(size) < 16:
        raise SystemExit(f"info: --size {size[0]} {size[1]}: both sides must be >= 16 (the network's stride)")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"info: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.all_variants:
        rows = variant_table(args.classes, size)
        if args.json:
            print(json.dumps({"classes": args.classes, "input_size": list(size), "variants": rows}))
        else:
            print(f"ablation variants, {args.classes} classes, input 1x3x{size[0]}x{size[1]}")
            print(f"  {'model':<12} {'lines':>5} {'msau':>5} {'ffm':>5} {'params':>10} {'GMac (paper)':>13}")
            for row in rows:
                print(f"  {row['model']:<12} {row['long_connections']!s:>5} {row['msau']!s:>5} {row['ffm']!s:>5} "
                      f"{row['params']:>10,} {row['gmac_paper']:>13.3f}")
        return 0
    report = measure(args.model, args.classes, size, full=not args.paper_only)
    print(json.dumps(report.to_dict()) if args.json else _format_text(report))
    return 0
