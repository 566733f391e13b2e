"""Learning-rate schedules that need the run's total number of steps."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


@dataclass
class WarmupCosine:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` times the base learning rate.

    Attributes:
        warmup: warm-up length, as a fraction of all steps (< 1) or a number of steps (>= 1).
        min_warmup_steps: at least this many warm-up steps (LiT: max(3%, 100)); capped at the total.
        min_lr_ratio: final learning rate / base learning rate (CLIP-LoRA: 1e-6 / 2e-4).
        warmup_start_ratio: learning rate at step 0 / base learning rate.
    """

    warmup: float = 0.1
    min_warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    warmup_start_ratio: float = 0.0

    def warmup_steps(self, total_steps: int) -> int:
        """Number of warm-up steps for a run of ``total_steps``."""
        steps = int(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)
        return min(max(steps, self.min_warmup_steps), max(total_steps - 1, 0))

    def factor(self, step: int, total_steps: int) -> float:
        """Learning-rate multiplier at ``step``."""
        warmup = self.warmup_steps(total_steps)
        if step < warmup:
            return self.warmup_start_ratio + (1 - self.warmup_start_ratio) * step / max(warmup, 1)
        progress = min(1.0, (step - warmup) / max(total_steps - warmup, 1))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
        """A per-step scheduler for ``optimizer``."""
        if total_steps <= 0:
            raise ValueError(f"WarmupCosine needs a positive number of steps, got {total_steps}")
        return LambdaLR(optimizer, lambda step: self.factor(step, total_steps))


@dataclass
class Constant:
    """No schedule: the optimizer's learning rate throughout."""

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
        """A scheduler that keeps the learning rate."""
        return LambdaLR(optimizer, lambda step: 1.0)


def fused_variant(optimizer: torch.optim.Optimizer, quiet: bool = False) -> torch.optim.Optimizer:
    """The same optimizer (class, parameter groups, hyper-parameters) with ``fused=True``.

    A fused optimizer updates all parameters of a device and dtype in one kernel, instead of a loop of
    small kernels (``foreach`` is then off: the two exclude each other). Optimizers whose class takes no
    ``fused`` argument, or that are fused already, are returned unchanged; so is one that already holds
    state (a step was taken), which a rebuild would lose.

    Args:
        optimizer: A freshly built optimizer.
        quiet: log a refusal (parameters on a device without fused kernels) at debug level instead of as
            a warning: for the default, where fusing is an opportunity rather than a request.

    Returns:
        A new optimizer of the same class with ``fused=True``, or ``optimizer`` itself.
    """
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    if "fused" not in accepted or optimizer.defaults.get("fused") or optimizer.state:
        return optimizer
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    defaults.update(fused=True, foreach=None)
    groups = []
    for group in optimizer.param_groups:
        # Each group carries every hyper-parameter (filled from the defaults); its fused/foreach win.
        groups.append({**group, "fused": True, "foreach": None})
    try:
        return cls(groups, **defaults)
    except (RuntimeError, ValueError) as error:  # e.g. differentiable=True, or unsupported parameters
        report = log.debug if quiet else log.warning
        report("keeping the unfused %s: fused=True was refused (%s)", cls.__name__, error)
        return optimizer
