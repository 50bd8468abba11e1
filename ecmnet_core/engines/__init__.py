"""Inference engines: what runs the network inside a :class:`ecmnet_core.inference.Segmenter`.

* ``torch`` (:class:`TorchEngine`): the PyTorch model with batch-norm folding, channels-last, autocast on CUDA and
  optional ``torch.compile`` / CUDA graphs;
* ``onnxruntime`` (:class:`OnnxRuntimeEngine`): an exported ONNX file (given, or exported from the checkpoint once
  and cached) on ONNX Runtime's CPU, CUDA or TensorRT execution provider.

Every engine takes a normalised (B, 3, h, w) float32 batch and returns (B, K, h, w) float32 logits.
"""

from __future__ import annotations

from ecmnet_core.engines.onnx_engine import OnnxRuntimeEngine, onnx_model_for
from ecmnet_core.engines.torch_engine import DTYPE_CHOICES, DTYPES, TorchEngine, TorchEngineOptions

ENGINES = ("torch", "onnxruntime")

__all__ = ["DTYPES", "DTYPE_CHOICES", "ENGINES", "OnnxRuntimeEngine", "TorchEngine", "TorchEngineOptions",
           "onnx_model_for"]
