"""The ONNX Runtime inference engine.

The model is an exported ONNX file: either given directly (``checkpoint: model.onnx``; its metadata carries the
classes and normalisation) or exported from the ``.pt`` checkpoint at the network input size on first use and
cached under ``$ECMNET_CACHE_DIR/onnx`` (default ``~/.cache/ecmnet/onnx``), keyed by the checkpoint's hash, the size
and the export format version. Execution providers: on CPU the CPU provider; on CUDA TensorRT (when installed, with
its engine cache next to the ONNX cache) and CUDA, with the CPU provider behind them for unsupported nodes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ecmnet_core.checkpoint import Checkpoint
from ecmnet_core.device import cache_dir
from ecmnet_core.engines.export import DEFAULT_OPSET, ONNX_FORMAT, export_checkpoint
from ecmnet_core.ops import fp_mode_cpu

_INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT), and onnx"


def onnx_cache_dir() -> Path:
    """``$ECMNET_CACHE_DIR/onnx`` (default ``~/.cache/ecmnet/onnx``), next to the compiled kernels."""
    return cache_dir("onnx")


def onnx_model_for(ckpt: Checkpoint, checkpoint_hash: str, input_size: tuple[int, int],
                   cache: Path | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """The cached export of ``ckpt`` at ``input_size`` (H, W), exported now if absent (atomically), ending at the
    network's own (1/2) resolution: the caller resamples the logits to each image's size in one step."""
    cache = cache or onnx_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    version = ONNX_FORMAT.replace("/", "-")
    stem = f"{ckpt.model_config.name}_{checkpoint_hash}_{input_size[0]}x{input_size[1]}_o{opset}_{version}"
    path = cache / f"{stem}_net-res.onnx"
    if path.is_file():
        return path
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".onnx.tmp", dir=cache)
    os.close(fd)
    try:
        export_checkpoint(ckpt, tmp, input_size, opset, upsample=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _providers(ort, device: torch.device, fp16: bool, cache: Path) -> list:
    available = ort.get_available_providers()
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    chosen: list = []
    if "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": device.index or 0, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache / "trt")}))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device.index or 0}))
    if not chosen:
        raise ValueError(f"backend onnxruntime on {device} needs onnxruntime-gpu (CUDA or TensorRT execution "
                         f"provider); this onnxruntime has {', '.join(available)}")
    return [*chosen, "CPUExecutionProvider"]


class OnnxRuntimeEngine:
    """Runs an exported ECMNet ONNX file (fixed input size, batch 1 per call) with ONNX Runtime."""

    name = "onnxruntime"
    scan_backend = "onnx-scan"

    def __init__(self, path: str | os.PathLike, device: torch.device, dtype: str = "fp32",
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ValueError(f"backend onnxruntime needs the onnxruntime package: {_INSTALL_HINT}") from exc
        dtype = "fp32" if dtype == "auto" else dtype  # no other precision to choose from here
        if dtype not in ("fp32", "fp16"):
            raise ValueError(f"backend onnxruntime supports fp32 (and fp16 through TensorRT), not {dtype}")
        if dtype == "fp16" and device.type != "cuda":
            raise ValueError("fp16 with backend onnxruntime needs a CUDA device (TensorRT)")
        self.path = Path(path)
        self.device = device
        self.dtype = dtype
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        if os.environ.get(fp_mode_cpu.KEEP_ENV) != "1":  # as the torch engine (ecmnet_core.ops.fp_mode_cpu)
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
        options.log_severity_level = 3  # warnings about unsupported TensorRT nodes are expected; errors still raise
        providers = _providers(ort, device, dtype == "fp16", self.path.parent)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self.providers = self.session.get_providers()
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_size = tuple(int(v) for v in first.shape[2:])

    def logits(self, batch: Tensor, upsample: bool = True) -> Tensor:
        """(B, 3, h, w) normalised float32 -> (B, K, h, w) float32 logits (on the CPU), as the torch engine's:
        ``upsample=False`` returns the graph's own output (the cached export's ends at the network's 1/2
        resolution; an ``ecmnet-core export`` file's at the input size), ``upsample=True`` brings it to the input
        size with the model's own final bilinear upsampling."""
        if tuple(batch.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path.name} takes {self.input_size[0]}x{self.input_size[1]} inputs, got "
                             f"{batch.shape[2]}x{batch.shape[3]}: set input_size to the exported size")
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()  # NCHW, whatever the memory format
        outs = [self.session.run(None, {self.input_name: array[i:i + 1]})[0] for i in range(array.shape[0])]
        logits = torch.from_numpy(np.concatenate(outs, axis=0))
        if upsample and logits.shape[-2:] != batch.shape[-2:]:
            logits = F.interpolate(logits, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)
        return logits

    def park(self) -> None:  # the session keeps its memory; nothing to move
        pass

    def unpark(self) -> None:
        pass

    def describe(self) -> dict[str, str]:
        return {"backend": "onnxruntime", "optimisations": f"providers {', '.join(self.providers)}",
                "onnx_file": str(self.path)}
