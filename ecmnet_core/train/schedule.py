"""Warm-up poly learning-rate schedule, stepped once per iteration (LETNet/ECMNet ``WarmupPolyLR``)."""

from __future__ import annotations

import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def warmup_poly_factor(iteration: int, total: int, warmup: int = 500, warmup_ratio: float = 1.0 / 3.0,
                       power: float = 0.9) -> float:
    """The multiplier of the base learning rate at ``iteration`` (0-based) of a ``total``-iteration run.

    ``iteration <= warmup``: linear from ``warmup_ratio`` to 1; afterwards ``(1 - (i - warmup) / (total - warmup))
    ** power``, reaching 0 at ``total``.
    """
    if total <= warmup:
        raise ValueError(f"schedule: {total} total iterations do not exceed the {warmup} warm-up iterations")
    if iteration <= warmup:
        return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup if warmup > 0 else 1.0
    progress = min(1.0, (iteration - warmup) / (total - warmup))
    return (1.0 - progress) ** power


def effective_warmup(warmup: int, total: int) -> int:
    """The warm-up length actually used: the configured one, shortened to a tenth of runs too short for it."""
    if total > 2 * warmup:
        return warmup
    short = max(0, total // 10)
    warnings.warn(f"schedule: warm-up of {warmup} iterations does not fit a {total}-iteration run; "
                  f"using {short}", stacklevel=2)
    return short


class WarmupPolyLR(LRScheduler):
    """Per-iteration warm-up poly schedule; ``last_epoch`` counts iterations. ``min_lr`` floors every group.

    Call :meth:`step` after every optimiser step. Its ``state_dict`` holds only numbers, so it resumes exactly.
    """

    def __init__(self, optimizer: Optimizer, total_iters: int, warmup_iters: int = 500,
                 warmup_ratio: float = 1.0 / 3.0, power: float = 0.9, min_lr: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.power = float(power)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        return warmup_poly_factor(iteration, self.total_iters, self.warmup_iters, self.warmup_ratio, self.power)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch)
        return [max(self.min_lr, base * f) for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the iteration count and re-apply its learning rates, whatever was loaded before."""
        super().load_state_dict(state_dict)
        f = self.factor(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = max(self.min_lr, base * f)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
