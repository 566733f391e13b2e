"""Data sources: one class per format, chosen in a config by ``class_path`` (see :mod:`.base`)."""

from pefttune.data.sources.base import Source, StreamingSource

__all__ = ["Source", "StreamingSource"]
