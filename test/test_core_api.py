"""The public API: ``from ecmnet_core import Segmenter`` and friends, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ecmnet_core


def test_public_names_resolve_to_their_homes():
    from ecmnet_core.checkpoint import Checkpoint, load_checkpoint
    from ecmnet_core.inference.segmenter import InferenceConfig, SegmentationResult, Segmenter
    from ecmnet_core.model import ModelConfig, build_model

    assert ecmnet_core.Segmenter is Segmenter and ecmnet_core.InferenceConfig is InferenceConfig
    assert ecmnet_core.SegmentationResult is SegmentationResult and ecmnet_core.Checkpoint is Checkpoint
    assert ecmnet_core.load_checkpoint is load_checkpoint and ecmnet_core.build_model is build_model
    assert ecmnet_core.ModelConfig is ModelConfig
    assert set(ecmnet_core.__all__) <= set(dir(ecmnet_core))
    with pytest.raises(AttributeError, match="no attribute 'Segmentr'"):
        ecmnet_core.Segmentr  # noqa: B018


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, ecmnet_core; print('torch' in sys.modules, 'cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]
