"""pefttune: train and compare parameter-efficient adaptation methods on image-text dual encoders.

The path of the data: :mod:`pefttune.data` (records, readers, data modules) -> :mod:`pefttune.towers`
(image and text encoders behind one structural interface) -> :mod:`pefttune.strategies` (the adaptation
methods) -> :class:`DualEncoderModule` with :mod:`pefttune.losses` -> :mod:`pefttune.metrics` ->
:mod:`pefttune.benchmark` (sweeps).

``import pefttune`` is cheap: the names below are imported on first use (PEP 562), so ``pefttune
--version`` or a script that needs only :mod:`pefttune.metrics` does not load Lightning, transformers and
timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it.
_LAZY = {"DualEncoderModule": "pefttune.module"}

__all__ = ["DualEncoderModule", "__version__"]

if TYPE_CHECKING:
    from pefttune.module import DualEncoderModule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pefttune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
