"""pefttune: train and compare parameter-efficient adaptation methods on image-text dual encoders.

The path of the data: :mod:`pefttune.data` (records, readers, data modules) -> :mod:`pefttune.towers`
(image and text encoders behind one structural interface) -> :mod:`pefttune.strategies` (the adaptation
methods) -> :class:`DualEncoderModule` with :mod:`pefttune.losses` -> :mod:`pefttune.metrics` ->
:mod:`pefttune.benchmark` (sweeps).
"""

from pefttune.module import DualEncoderModule

__version__ = "0.1.0"

__all__ = ["DualEncoderModule", "__version__"]
