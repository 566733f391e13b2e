"""Adaptation strategies: one file per method, all subclasses of :class:`AdaptationStrategy`.

The built-in methods are listed once, in :mod:`pefttune.strategies.registry`; the contracts a strategy's
hooks receive (:class:`DualEncoder`, :class:`TrainingTexts`) are declared in :mod:`pefttune.strategies.base`.
"""

from pefttune.strategies.apex import APEX
from pefttune.strategies.base import AdaptationStrategy, DualEncoder, TemperaturePolicy, TrainingTexts
from pefttune.strategies.cross_modal_adapter import CrossModalAdapter
from pefttune.strategies.duet import DueT
from pefttune.strategies.full import FullFineTune
from pefttune.strategies.lit import LiT
from pefttune.strategies.lora import LoRA

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
