"""Command-line options shared by ``eval``, ``predict`` and ``replay``: how to run the model (size, device,
backend, precision, rewrites, test-time augmentation), read back into an :class:`InferenceConfig`."""

from __future__ import annotations

import argparse

from ecmnet_core.engines import DTYPE_CHOICES, ENGINES
from ecmnet_core.inference.pipeline import TTA_MODES
from ecmnet_core.inference.segmenter import InferenceConfig


def add_segmenter_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, native: bool = True) -> None:
    """How to run the model: size, device, backend, precision, rewrites (``--checkpoint`` stays per command)."""
    if native:
        size = parser.add_mutually_exclusive_group()
        size.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                          help="network input size (default: the checkpoint's input_size)")
        size.add_argument("--native", action="store_true", help="run at each image's native resolution")
    else:
        parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="network input size (default: the checkpoint's; 0 0 = native)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--backend", default="torch", choices=ENGINES,
                        help="inference backend (default torch; onnxruntime runs an .onnx checkpoint or exports the "
                             ".pt one once at the input size)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES,
                        help="fp32; fp16 (CUDA autocast); bf16 (CUDA autocast, CPU: bf16 convolutions, native on "
                             "CPUs with AVX-512 BF16); auto (CPU: the faster of fp32 and bf16 convolutions where "
                             "bf16 is native, else fp32; CUDA: fp32)")
    parser.add_argument("--fp16", action="store_true", help="same as --dtype fp16")
    parser.add_argument("--scan-backend", default=None,
                        help="selective-scan backend (mamba, triton, cpp, torch, reference; default automatic)")
    parser.add_argument("--no-optimize", action="store_true",
                        help="torch backend: no inference rewrites (BN folding, classifier before the last upsampling)")
    parser.add_argument("--compile", action="store_true", help="torch backend: torch.compile the model first")
    parser.add_argument("--no-jit", action="store_true",
                        help="torch backend on CPU: run the model eagerly, no torch.export graph")
    parser.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                        help="label pixels whose calibrated confidence is below P as 255, unknown (0..1; default 0: "
                             "off)")
    parser.add_argument("--tta", default="none", choices=TTA_MODES,
                        help="test-time augmentation: flip also runs the mirrored image and averages the logits "
                             "(about 2x the cost; default none)")


def inference_config_from_args(args: argparse.Namespace, **overrides) -> InferenceConfig:
    """The :class:`InferenceConfig` of :func:`add_segmenter_arguments`' options (plus ``overrides``)."""
    if getattr(args, "native", False):
        input_size: tuple[int, int] | None = (0, 0)
    else:
        input_size = tuple(args.input_size) if args.input_size else None
    values = dict(checkpoint=getattr(args, "checkpoint", None), device=args.device, fp16=args.fp16,
                  dtype=args.dtype, input_size=input_size, warmup=0, scan_backend=args.scan_backend,
                  backend=args.backend, optimize=not args.no_optimize, compile=args.compile, jit=not args.no_jit,
                  tta=getattr(args, "tta", "none"), min_confidence=getattr(args, "min_confidence", 0.0))
    values.update(overrides)
    return InferenceConfig(**values)
