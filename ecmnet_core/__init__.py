"""ecmnet_core: ECMNet CNN-Mamba semantic segmentation (model, data, training, evaluation, inference).

The public API, imported lazily (``import ecmnet_core`` stays cheap)::

    from ecmnet_core import Segmenter, InferenceConfig
    result = Segmenter(InferenceConfig(device="cpu")).segment(bgr_image)   # result.labels: (H, W) uint8 class ids

* :class:`Segmenter`, :class:`InferenceConfig`, :class:`SegmentationResult` - inference (``ecmnet_core.inference``);
* :class:`Checkpoint`, :func:`load_checkpoint` - the checkpoint file (``ecmnet_core.checkpoint``);
* :func:`build_model`, :class:`ModelConfig` - the network (``ecmnet_core.model``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    "Segmenter": "ecmnet_core.inference.segmenter",
    "InferenceConfig": "ecmnet_core.inference.segmenter",
    "SegmentationResult": "ecmnet_core.inference.segmenter",
    "Checkpoint": "ecmnet_core.checkpoint",
    "load_checkpoint": "ecmnet_core.checkpoint",
    "build_model": "ecmnet_core.model",
    "ModelConfig": "ecmnet_core.model",
}
__all__ = ["Checkpoint", "InferenceConfig", "ModelConfig", "SegmentationResult", "Segmenter", "__version__",
           "build_model", "load_checkpoint"]

if TYPE_CHECKING:
    from ecmnet_core.checkpoint import Checkpoint, load_checkpoint
    from ecmnet_core.inference.segmenter import InferenceConfig, SegmentationResult, Segmenter
    from ecmnet_core.model import ModelConfig, build_model


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ecmnet_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
