"""Adaptation strategies: one file per method, all subclasses of :class:`AdaptationStrategy`.

The built-in methods are listed once, in :mod:`pefttune.strategies.registry`; the contracts a strategy's
hooks receive (:class:`DualEncoder`, :class:`TrainingTexts`) are declared in :mod:`pefttune.strategies.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefttune._lazy import lazy_attributes

# name -> the module that defines it; imported on first use (PEP 562).
_LAZY = {
    "APEX": "pefttune.strategies.apex",
    "AdaptationStrategy": "pefttune.strategies.base",
    "CrossModalAdapter": "pefttune.strategies.cross_modal_adapter",
    "DualEncoder": "pefttune.strategies.base",
    "DueT": "pefttune.strategies.duet",
    "FullFineTune": "pefttune.strategies.full",
    "LiT": "pefttune.strategies.lit",
    "LoRA": "pefttune.strategies.lora",
    "TemperaturePolicy": "pefttune.strategies.base",
    "TrainingTexts": "pefttune.strategies.base",
}

if TYPE_CHECKING:
    from pefttune.strategies.apex import APEX
    from pefttune.strategies.base import AdaptationStrategy, DualEncoder, TemperaturePolicy, TrainingTexts
    from pefttune.strategies.cross_modal_adapter import CrossModalAdapter
    from pefttune.strategies.duet import DueT
    from pefttune.strategies.full import FullFineTune
    from pefttune.strategies.lit import LiT
    from pefttune.strategies.lora import LoRA

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "APEX",
    "AdaptationStrategy",
    "CrossModalAdapter",
    "DualEncoder",
    "DueT",
    "FullFineTune",
    "LiT",
    "LoRA",
    "TemperaturePolicy",
    "TrainingTexts",
]
