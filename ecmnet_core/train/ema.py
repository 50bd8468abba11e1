"""Exponential moving average of a model's weights (what gets validated and released when it is on).

``ema = d * ema + (1 - d) * weights`` after every optimiser step, with ``d = min(decay, (1 + n) / (10 + n))``
for the n-th update so that early averages do not drag the random initialisation along (timm's ModelEmaV2 and
mmseg's EMAHook do the same). BatchNorm running statistics are averaged like the weights; integer buffers
(``num_batches_tracked``) are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ModelEMA:
    """The averaged copy of ``model``'s state dict, kept in fp32 on the model's device.

    Args:
        model: the model being trained (its ``state_dict`` keys are the EMA's keys).
        decay: the long-run decay; the horizon is about ``1 / (1 - decay)`` iterations.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.state.items() if v.is_floating_point()]
        self._other_keys = [k for k, v in self.state.items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s current weights (call after every optimiser step)."""
        d = self.current_decay()
        live = model.state_dict()
        ema = [self.state[k] for k in self._float_keys]
        new = [live[k].detach().float() for k in self._float_keys]
        torch._foreach_lerp_(ema, new, 1.0 - d)
        for k in self._other_keys:
            self.state[k].copy_(live[k])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (``weights_only`` safe), on the CPU."""
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().cpu().clone() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        missing = set(self.state) ^ set(weights)
        if missing:
            raise KeyError(f"EMA state does not fit the model: keys differ ({sorted(missing)[:5]})")
        for k, v in weights.items():
            self.state[k].copy_(v)
        self.updates = int(state["updates"])

    def weights(self, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The averaged state dict on the CPU, in the dtypes of ``like`` (the model's own state dict)."""
        out = {}
        for k, v in self.state.items():
            v = v.detach().cpu()
            out[k] = v.to(like[k].dtype).clone() if like is not None else v.clone()
        return out
