"""How a training step runs: the *baseline* (fp32, NCHW, pure-PyTorch scan and attention) or the *default* fast path.

None of the options changes the function the model computes (tests compare losses and gradients):

* ``channels_last``: model and batches in channels-last memory, which oneDNN's convolutions (and their backward)
  run much faster on the CPU than NCHW, and which the fused kernels read without copies;
* ``fused_bn_prelu``: every BNPReLU runs as one compiled kernel with its backward
  (:mod:`ecmnet_core.ops.bn_prelu_cpu`) instead of four PyTorch kernels;
* ``fused_depthwise``: the backward of dilated and 5x5/7x7 depthwise convolutions as a compiled kernel
  (:mod:`ecmnet_core.ops.depthwise_cpu`), where oneDNN's is 10-30x slower;
* ``classify_before_upsample``: the 1x1 classifier before the final bilinear upsampling (linear maps commute), so
  the classifier and its backward run at 1/2 resolution on 11 instead of 16 channels;
* ``fused_loss``: with ``classify_before_upsample``, the model leaves the final bilinear upsampling to the loss,
  which runs it fused with the cross-entropy (:mod:`ecmnet_core.ops.upsample_ce_cpu`): no full-resolution logits;
* ``fused_optimizer``: Adam/AdamW as one fused kernel over all parameters (``fused=True``) instead of about ten
  small PyTorch ops per parameter tensor (CPU PyTorch does not default to the batched implementations);
* ``scan_backend``: the selective scan's backend (None: automatic, i.e. the compiled CPU kernel with its backward);
* ``keep_freed_memory``: the process keeps freed memory for reuse (:func:`ecmnet_core.allocator.keep_freed_memory`,
  process-wide, so set by ``ecmnet-core train`` and ``bench train``, not by the library's Trainer): glibc would
  mmap every buffer over 32 MiB and fault it in again each step;
* ``attention_backend``: DDA's axial attention (None: automatic, i.e. on the CPU the compiled kernel with a compiled
  backward that rebuilds the softmax instead of keeping S x S scores,
  :mod:`ecmnet_core.ops.axial_attention_backward_cpu`).

Measured and left out of the default (``ecmnet-core bench train``, MODEL_CARD.md): bf16 autocast (no faster
than fp32 channels-last on a Zen 4 with avx512_bf16: oneDNN's bf16 convolutions do not win at these channel
counts, and the casts cost what they save; on a 2-core Xeon with AMX 3.75 against 2.59 s a batch-8 step at
360x480, the fused fp32 kernels falling back around bf16 tensors) and ``torch.compile`` of the model (about 340 s
to compile and no faster per step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

PATHS = ("default", "baseline")


@dataclass(frozen=True)
class TrainPath:
    """One way of running the training step. See the module docstring for the fields."""

    name: str = "default"
    channels_last: bool = True
    fused_bn_prelu: bool = True
    fused_depthwise: bool = True
    keep_freed_memory: bool = True
    classify_before_upsample: bool = True
    fused_loss: bool = True
    fused_optimizer: bool = True
    scan_backend: str | None = None
    attention_backend: str | None = None


def train_path(name: str, device: torch.device | str = "cpu", scan_backend: str | None = None) -> TrainPath:
    """The named path for ``device``. ``scan_backend`` (the recipe's ``model.scan_backend``) wins for ``default``.

    On CUDA the default keeps the layout PyTorch prefers there and skips the CPU kernels.
    """
    device = torch.device(device)
    if name == "baseline":
        return TrainPath("baseline", channels_last=False, fused_bn_prelu=False, fused_depthwise=False,
                         keep_freed_memory=False, classify_before_upsample=False, fused_loss=False,
                         fused_optimizer=False, scan_backend="torch", attention_backend="torch")
    if name != "default":
        raise ValueError(f"train.path must be one of {', '.join(PATHS)}, got {name!r}")
    path = TrainPath("default", scan_backend=scan_backend)
    if device.type != "cpu":
        path = replace(path, channels_last=False, fused_bn_prelu=False, fused_depthwise=False,
                       keep_freed_memory=False, fused_loss=False)
    return path


def apply_train_path(model: nn.Module, path: TrainPath) -> nn.Module:
    """Set ``model`` up for ``path`` in place (memory format and plain attributes; no weights change)."""
    from ecmnet_core.model.attention import DDA
    from ecmnet_core.model.layers import BNPReLU, DepthwiseConv2d
    from ecmnet_core.model.ss2d import SelectiveScan

    model.to(memory_format=torch.channels_last if path.channels_last else torch.contiguous_format)
    for module in model.modules():
        if isinstance(module, BNPReLU):
            module.fused = path.fused_bn_prelu
        elif isinstance(module, DepthwiseConv2d):
            module.fast = path.fused_depthwise
        elif isinstance(module, DDA):
            module.backend = path.attention_backend
        elif isinstance(module, SelectiveScan):
            module.backend = path.scan_backend
    if hasattr(model, "classify_before_upsample"):
        model.classify_before_upsample = path.classify_before_upsample
        model.upsample_in_loss = path.fused_loss
    return model


def prepare_batch(images: Tensor, path: TrainPath) -> Tensor:
    """A (B, 3, H, W) batch in the path's memory format."""
    return images.contiguous(memory_format=torch.channels_last) if path.channels_last else images


__all__ = ["PATHS", "TrainPath", "apply_train_path", "prepare_batch", "train_path"]
