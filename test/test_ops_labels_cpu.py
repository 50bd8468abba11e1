"""The one-pass logits-to-labels kernel (:mod:`ecmnet_core.ops.labels_cpu`) gives PyTorch's labels bit for bit
(bilinear ``F.interpolate`` + ``argmax``, first maximum on ties, also on deliberately near-tied logits), the calibrated
probability of :func:`top_probability`, the unknown mask, and ``predict_labels`` uses it on the CPU without changing
a single label."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ecmnet_core.inference.pipeline import logits_to_labels, top_probability
from ecmnet_core.ops import labels_cpu

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not labels_cpu.is_available(), reason="no C++ compiler for the CPU kernel")]


def _reference(logits: torch.Tensor, size: tuple[int, int], temperature: float = 1.0):
    up = logits if tuple(logits.shape[-2:]) == tuple(size) else F.interpolate(
        logits, size=size, mode="bilinear", align_corners=False)
    return up.argmax(1), top_probability(up, temperature)


@pytest.mark.parametrize("shape,size", [
    ((1, 11, 36, 48), (36, 48)),    # no resampling (the Segmenter at its network size)
    ((2, 11, 18, 24), (36, 48)),    # exact 2x, two images (a two-thread team with 2 threads)
    ((1, 11, 36, 48), (75, 100)),   # not a multiple: PyTorch's source-index rule
    ((1, 19, 40, 30), (17, 13)),    # downsampling, Cityscapes classes
    ((1, 5, 7, 9), (7, 20)),        # one axis identical, the other resampled
    ((1, 3, 1, 1), (5, 7)),         # one source pixel
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_labels_and_probability_match_pytorch(shape, size, layout):
    torch.manual_seed(sum(shape))
    logits = torch.randn(shape) * 3
    ref_labels, ref_prob = _reference(logits, size, 1.3)
    labels, prob = labels_cpu.labels_from_logits(logits.contiguous(memory_format=layout), size, temperature=1.3,
                                                 confidence=True)
    assert labels.dtype == torch.uint8 and labels.shape == (shape[0], *size)
    assert torch.equal(labels.long(), ref_labels)
    torch.testing.assert_close(prob, ref_prob, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(100, 130), (200, 260), (137, 211), (64, 77)])
def test_near_ties_resolve_as_pytorch_does(size):
    """Two classes about one float step apart everywhere: only bit-identical interpolation arithmetic gives the same
    labels (a plain a*w0 + b*w1 without PyTorch's FMAs mislabels ~15 % of these pixels). PyTorch's own arithmetic
    is not the same at every size (at some small sizes, e.g. 40x52 -> 26x31, its loop rounds differently), so this
    holds at the sizes checked here; real logits are never tied to the last bit, and every prediction of the
    project takes this kernel on the CPU, so eval, replay and the node agree whatever PyTorch does."""
    torch.manual_seed(7)
    logits = torch.randn(1, 11, 100, 130)
    logits[:, 1] = logits[:, 0]
    logits[:, 0] = logits[:, 0] * 1.0000001  # about one float step: above class 1 where positive, below elsewhere
    logits[:, 2:] -= 10
    ref, _ = _reference(logits, size)
    labels, _ = labels_cpu.labels_from_logits(logits, size)
    assert 0.2 < (ref == 1).float().mean() < 0.8  # the ties really go both ways
    assert torch.equal(labels.long(), ref)


def test_threshold_marks_unknown_without_a_confidence_buffer():
    torch.manual_seed(3)
    logits = torch.randn(1, 4, 10, 12)
    ref, prob = _reference(logits, (20, 24))
    labels, none = labels_cpu.labels_from_logits(logits, (20, 24), min_confidence=0.5)
    assert none is None
    expected = ref.masked_fill(prob < 0.5, 255)
    assert 0 < int((expected == 255).sum()) < expected.numel()
    assert torch.equal(labels.long(), expected)


def test_two_threads_give_the_same_labels():
    torch.manual_seed(5)
    logits = torch.randn(3, 11, 60, 80)
    one, p1 = labels_cpu.labels_from_logits(logits, (120, 160), confidence=True)
    torch.set_num_threads(2)  # the fixture restores the thread count
    two, p2 = labels_cpu.labels_from_logits(logits, (120, 160), confidence=True)
    assert torch.equal(one, two) and torch.equal(p1, p2)


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="float32 CPU logits"):
        labels_cpu.labels_from_logits(torch.zeros(1, 3, 4, 4, dtype=torch.float64), (4, 4))
    with pytest.raises(ValueError, match="0 < K <= 255"):
        labels_cpu.labels_from_logits(torch.zeros(1, 256, 2, 2), (2, 2))
    with pytest.raises(ValueError, match="output size"):
        labels_cpu.labels_from_logits(torch.zeros(1, 3, 4, 4), (0, 4))
    with pytest.raises(ValueError, match="temperature"):
        labels_cpu.labels_from_logits(torch.zeros(1, 3, 4, 4), (4, 4), temperature=0.0)


def test_pipeline_step_is_the_same_with_and_without_the_kernel(monkeypatch):
    """``logits_to_labels`` (every prediction's last step) gives the same labels, probabilities and unknown mask
    through the kernel and through PyTorch (the path CUDA tensors take)."""
    torch.manual_seed(11)
    logits = torch.randn(1, 11, 30, 40) * 2
    fast = logits_to_labels(logits, (61, 79), 1.2, 0.4, confidence=True)
    monkeypatch.setattr(labels_cpu, "fits", lambda t: False)
    slow = logits_to_labels(logits, (61, 79), 1.2, 0.4, confidence=True)
    assert fast[0].dtype == torch.uint8 and slow[0].dtype == torch.int64
    assert torch.equal(fast[0].long(), slow[0])
    torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=2e-6)
