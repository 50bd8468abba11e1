"""Inference: from a BGR image to labels, the one path every command and the node take.

* :mod:`~ecmnet_core.inference.segmenter` - :class:`Segmenter` (load a checkpoint once, segment images),
  :class:`InferenceConfig`, :class:`SegmentationResult`;
* :mod:`~ecmnet_core.inference.pipeline` - the prediction step itself (runners, flip test-time augmentation,
  logits -> labels), shared with evaluation and training-time validation;
* :mod:`~ecmnet_core.inference.options` - the command-line options of ``eval``, ``predict`` and ``replay``.
"""

from ecmnet_core.inference.segmenter import InferenceConfig, SegmentationResult, Segmenter

__all__ = ["InferenceConfig", "SegmentationResult", "Segmenter"]
