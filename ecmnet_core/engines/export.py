"""ONNX export of an ECMNet for one fixed input resolution.

The graph takes the model's own input, a normalised RGB tensor (1, 3, H, W) float32 (``(bgr - mean) / std``,
channel-flipped, see ``ecmnet_core.data.transforms.normalize_image``), and returns logits (1, K, H, W).

The selective scan has no ONNX operator: while exporting, ``selective_scan_fn`` writes it as element-wise terms
for all L = ceil(H/16) * ceil(W/16) steps followed by one ONNX ``Scan`` over time
(:func:`ecmnet_core.ops.selective_scan.selective_scan_export`), so the graph does not grow with L (about 8,600
nodes at 360x480). The FFM's adaptive pooling is written as matrix products while exporting. Export one file per
resolution. The CUDA kernels and the compiled CPU kernel are never part of an exported graph.

Exported files carry the model config, class names, palette, mean/std and input size as ONNX metadata
(:func:`checkpoint_metadata`), so ``Segmenter(InferenceConfig(checkpoint="model.onnx", backend="onnxruntime"))``
and the node run them without the ``.pt`` file.

The legacy TorchScript exporter (``dynamo=False``) is used: the torch.export-based one needs ``onnxscript``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ecmnet_core.checkpoint import Checkpoint, CheckpointError
from ecmnet_core.ops.selective_scan import RECURRENCE_OP

DEFAULT_OPSET = 17
#: Stored in every exported file; bump when the graph or metadata layout changes (invalidates cached exports).
ONNX_FORMAT = "ecmnet-onnx/4"
_INSTALL_HINT = "install the ONNX extras: pip install 'ecmnet_ros[onnx]' (onnx, onnxruntime)"


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote."""

    path: Path
    input_size: tuple[int, int]
    opset: int
    scan_length: int
    nodes: int
    file_bytes: int
    op_counts: dict[str, int] = field(default_factory=dict)


def _check_size(input_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"input_size must be (H, W), got {input_size!r}") from exc
    if h < 16 or w < 16:
        raise ValueError(f"input_size {h}x{w} is too small: both sides must be >= 16 (the network's total stride)")
    return h, w


def lower_recurrence(proto) -> int:
    """Rewrite every ``ecmnet::Recurrence`` placeholder of ``proto`` (in place) into a standard ONNX ``Scan``.

    The placeholder takes (h0, dA, dBu, C) with dA, dBu (L, B, G, Dg, N) and C (L, B, G, N, 1) and returns
    y (L, B, G, Dg, 1); the Scan carries h through time with the body h = dA_t * h + dBu_t, y_t = h @ C_t.
    Returns the number of nodes rewritten.
    """
    from onnx import TensorProto, helper

    domain, op_type = RECURRENCE_OP
    rewritten = 0
    for index, node in enumerate(list(proto.graph.node)):
        if node.domain != domain or node.op_type != op_type:
            continue
        tag = f"recurrence{rewritten}"
        names = {k: f"{tag}_{k}" for k in ("h_in", "dA_t", "dBu_t", "C_t", "decayed", "h_out", "y_t")}
        body = helper.make_graph(
            [helper.make_node("Mul", [names["dA_t"], names["h_in"]], [names["decayed"]]),
             helper.make_node("Add", [names["decayed"], names["dBu_t"]], [names["h_out"]]),
             helper.make_node("MatMul", [names["h_out"], names["C_t"]], [names["y_t"]])],
            f"{tag}_body",
            [helper.make_tensor_value_info(names[k], TensorProto.FLOAT, None)
             for k in ("h_in", "dA_t", "dBu_t", "C_t")],
            [helper.make_tensor_value_info(names[k], TensorProto.FLOAT, None) for k in ("h_out", "y_t")])
        scan = helper.make_node("Scan", list(node.input), [f"{tag}_h_last", node.output[0]], name=f"{tag}_scan",
                                num_scan_inputs=3, body=body)
        proto.graph.node.remove(node)
        proto.graph.node.insert(index, scan)
        rewritten += 1
    if rewritten:
        keep = [o for o in proto.opset_import if o.domain != domain]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
    return rewritten


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int], opset: int = DEFAULT_OPSET,
                *, input_name: str = "image", output_name: str = "logits",
                metadata: dict[str, str] | None = None, upsample: bool = True) -> ExportInfo:
    """Export ``model`` (eval mode, on CPU, batch 1) for ``input_size`` = (H, W) to ``path``.

    ``upsample=False`` (an ECMNet) ends the graph with the classifier at the network's 1/2 resolution instead of the
    logits at the input size: what the onnxruntime backend runs, whose labels are then resampled to each image's
    size in one step as the torch engine's are. The caller's model is not modified (a CPU copy is exported).
    ``metadata`` is stored as the ONNX model's ``metadata_props`` (e.g. class names, mean/std). Needs the onnx
    package (the scan is rewritten into a Scan).
    """
    h, w = _check_size(input_size)
    if opset < 13:
        raise ValueError(f"opset {opset} is too old: the graph needs opset >= 13")
    try:
        import onnx
    except ImportError as exc:
        raise ValueError(f"exporting needs the onnx package; {_INSTALL_HINT}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).to("cpu").eval()
    if not upsample:
        if not hasattr(net, "classify_before_upsample"):
            raise ValueError(f"upsample=False needs an ECMNet, not a {type(net).__name__}")
        net = FixedUpsample(net, upsample=False)
    x = torch.zeros(1, 3, h, w)
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about shape comparisons (resize_to, FFM pooling): sizes are fixed per export
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=[output_name], do_constant_folding=True,
                          custom_opsets={RECURRENCE_OP[0]: 1})
    proto = onnx.load(str(path))
    lower_recurrence(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    counts = Counter(node.op_type for node in proto.graph.node)
    return ExportInfo(path=path, input_size=(h, w), opset=opset,
                      scan_length=math.ceil(h / 16) * math.ceil(w / 16), nodes=sum(counts.values()),
                      file_bytes=path.stat().st_size, op_counts=dict(counts.most_common()))


class FixedUpsample(nn.Module):
    """An ECMNet with its ``upsample`` argument fixed, so that a captured or exported graph takes the input alone
    (ONNX export here, ``torch.export`` in :func:`ecmnet_core.engines.torch_engine.capture`)."""

    def __init__(self, model: nn.Module, upsample: bool) -> None:
        super().__init__()
        self.model, self.upsample = model, upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, upsample=self.upsample)


def checkpoint_metadata(ckpt: Checkpoint, input_size: tuple[int, int]) -> dict[str, str]:
    """What an exported file carries so that it runs without the checkpoint: classes, colours, normalisation."""
    return {
        "format": ONNX_FORMAT,
        "model_config": json.dumps(ckpt.model_config.to_dict()),
        "class_names": json.dumps(list(ckpt.class_names)),
        "palette_rgb": json.dumps([list(map(int, c)) for c in ckpt.palette]),
        "mean_bgr": json.dumps([float(v) for v in ckpt.mean]),
        "std_bgr": json.dumps([float(v) for v in ckpt.std]),
        "ignore_index": str(int(ckpt.ignore_index)),
        "input_size": json.dumps([int(v) for v in input_size]),
        "dataset": ckpt.dataset,
        "random_weights": "true" if ckpt.metadata.get("random_weights") else "false",
        "input": "normalised RGB NCHW float32: (bgr - mean_bgr) / std_bgr, channels flipped to RGB",
    }


def export_checkpoint(ckpt: Checkpoint, path: str | os.PathLike, input_size: tuple[int, int] | None = None,
                      opset: int = DEFAULT_OPSET, upsample: bool = True) -> ExportInfo:
    """Export a checkpoint's model with its metadata; ``input_size`` None uses the checkpoint's (else 360x480);
    ``upsample`` as in :func:`export_onnx`."""
    size = _check_size(input_size or (tuple(ckpt.input_size) if ckpt.input_size else (360, 480)))
    return export_onnx(ckpt.build_model(scan_backend="torch"), path, size, opset,
                       metadata=checkpoint_metadata(ckpt, size), upsample=upsample)


def read_onnx_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The metadata of an exported file as a :class:`Checkpoint` without weights (they live in the graph).

    Raises CheckpointError naming the file when it is missing, not ONNX, or lacks the ecmnet metadata.
    """
    from ecmnet_core.model import ModelConfig

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model {path} does not exist")
    try:
        import onnx
    except ImportError as exc:
        raise CheckpointError(f"reading {path} needs the onnx package; {_INSTALL_HINT}") from exc
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CheckpointError(f"{path} is not a readable ONNX model: {exc}") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    needed = ("class_names", "palette_rgb", "mean_bgr", "std_bgr", "input_size", "model_config")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks the ecmnet metadata {', '.join(missing)}: export it with "
                              "'ecmnet-core export' (which stores class names, colours and normalisation)")
    try:
        config = ModelConfig.from_dict(json.loads(meta["model_config"]))
        return Checkpoint(model_config=config, state_dict={}, class_names=json.loads(meta["class_names"]),
                          palette=json.loads(meta["palette_rgb"]), mean=json.loads(meta["mean_bgr"]),
                          std=json.loads(meta["std_bgr"]), ignore_index=int(meta.get("ignore_index", 255)),
                          input_size=json.loads(meta["input_size"]), dataset=meta.get("dataset", ""),
                          metadata={"onnx_file": str(path), "random_weights": meta.get("random_weights") == "true"})
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: malformed ecmnet metadata ({exc})") from exc


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file with onnxruntime (CPU) on ``x`` (1, 3, H, W); returns the logits as a tensor."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeError(f"running an ONNX file needs onnxruntime; {_INSTALL_HINT}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().cpu().float().numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


def verify_onnx(path: str | os.PathLike, model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's (eval, CPU) logits for ``x``."""
    net = copy.deepcopy(model).to("cpu").eval()
    with torch.no_grad():
        expected = net(x.cpu().float())
    return float((run_onnx(path, x) - expected).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# command line (``ecmnet-core export``, or ``python -m ecmnet_core.engines.export``)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to export (default: the packaged CamVid model unless --model is given)")
    parser.add_argument("--model", default=None, help="export this variant with random weights instead")
    parser.add_argument("--classes", type=int, default=11, help="classes of a --model export (default 11)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input height and width (default: the checkpoint's input size, else 360 480)")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch on a random input")


def run(args: argparse.Namespace) -> int:
    from ecmnet_core.checkpoint import load_checkpoint, random_checkpoint

    size = tuple(args.size) if args.size else None
    try:
        if args.model and not args.checkpoint:
            ckpt = random_checkpoint(args.model, args.classes)
        else:
            ckpt = load_checkpoint(args.checkpoint)
        info = export_checkpoint(ckpt, args.out, size, args.opset)
    except (CheckpointError, ValueError) as exc:
        raise SystemExit(f"export: {exc}") from exc
    print(f"wrote {info.path} ({info.file_bytes / 1e6:.1f} MB): input 1x3x{info.input_size[0]}x{info.input_size[1]}, "
          f"opset {info.opset}, {info.nodes} nodes (scan: one Scan over L = {info.scan_length} steps); carries class "
          "names, palette, mean/std and input size")
    if args.verify:
        x = torch.randn(1, 3, *info.input_size, generator=torch.Generator().manual_seed(0))
        model = ckpt.build_model(scan_backend="torch")
        print(f"onnxruntime vs PyTorch: max |difference| of logits = {verify_onnx(info.path, model, x):.2e}")
        if ckpt.metadata.get("random_weights"):
            print("  (random weights with identity BatchNorm statistics are numerically chaotic: even PyTorch fp32 vs "
                  "fp64 differ by ~1e-2 there; with calibrated BatchNorm statistics the difference is ~3e-4 of the "
                  "logit range)")
    return 0


if __name__ == "__main__":
    import sys

    _parser = argparse.ArgumentParser(prog="python -m ecmnet_core.engines.export", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
