"""Adaptation strategies: one file per method, all subclasses of :class:`AdaptationStrategy`."""

from pefttune.strategies.base import AdaptationStrategy, TemperaturePolicy
from pefttune.strategies.full import FullFineTune
from pefttune.strategies.lit import LiT

__all__ = ["AdaptationStrategy", "FullFineTune", "LiT", "TemperaturePolicy"]
