"""Adaptation strategies: one file per method, all subclasses of :class:`AdaptationStrategy`."""

from pefttune.strategies.apex import APEX
from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy
from pefttune.strategies.cross_modal_adapter import CrossModalAdapter
from pefttune.strategies.duet import DueT
from pefttune.strategies.full import FullFineTune
from pefttune.strategies.lit import LiT
from pefttune.strategies.lora import LoRA

__all__ = [
    "APEX",
    "AdaptationStrategy",
    "CrossModalAdapter",
    "DueT",
    "FullFineTune",
    "LiT",
    "LoRA",
    "TemperaturePolicy",
]
