"""Data sources: one class per format, chosen in a config by ``class_path`` (see :mod:`.base`).

Images: :class:`Synthetic` (generated, no files), :class:`Karpathy`, :class:`Coco`, :class:`Table`
(CSV/TSV, JSON Lines, JSON list), :class:`WebDataset` (tar shards; also frames or clips), :class:`ImageFolder`
(classification). Video: :class:`SyntheticVideos` (generated moving shapes, no files), :class:`MSRVTT`
(videodatainfo JSON, CLIP4Clip split files), :class:`VideoTable` (CSV/JSONL of videos or frame folders),
:class:`WebDataset`.
"""

from pefttune.data.sources.base import Source, StreamingSource
from pefttune.data.sources.coco import Coco
from pefttune.data.sources.image_folder import ImageFolder
from pefttune.data.sources.karpathy import Karpathy
from pefttune.data.sources.msrvtt import MSRVTT
from pefttune.data.sources.synthetic import Synthetic
from pefttune.data.sources.synthetic_video import SyntheticVideos
from pefttune.data.sources.table import Table, VideoTable
from pefttune.data.sources.webdataset import WebDataset

__all__ = [
    "MSRVTT",
    "Coco",
    "ImageFolder",
    "Karpathy",
    "Source",
    "StreamingSource",
    "Synthetic",
    "SyntheticVideos",
    "Table",
    "VideoTable",
    "WebDataset",
]
