"""Captioned images and videos: records, sources (one class per format), datasets and the data modules.

The contract with the towers (the :class:`Preprocessing` and the batch layouts) is in
:mod:`pefttune.data.preprocessing`; the contract with the model (what a data module provides) in
:mod:`pefttune.data.contracts`.
"""

from pefttune.data.classification import ClassificationDataModule
from pefttune.data.contracts import ClassificationData, RetrievalData
from pefttune.data.datamodule import ImageTextDataModule
from pefttune.data.datasets import (
    CaptionIndex,
    EpochDataLoader,
    EvalCollate,
    ImageWithCaptionsDataset,
    ItemLoader,
    PairDataset,
    TrainCollate,
    check_images,
    load_image,
    stable_id,
    to_rgb,
)
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.records import (
    SKIP_REASONS,
    DataError,
    DataFormatError,
    ErrorPolicy,
    ImageCaptionRecord,
    ImageLoadError,
    SkipReport,
    VideoLoadError,
    normalize_caption,
    select_split,
    validate_records,
)
from pefttune.data.sources import (
    MSRVTT,
    Coco,
    ImageFolder,
    Karpathy,
    Source,
    StreamingSource,
    Synthetic,
    Table,
    VideoTable,
    WebDataset,
)
from pefttune.data.sources.synthetic import HELD_OUT_PAIRS
from pefttune.data.video import FrameFolderVideo, FrameSampler, Video, VideoFileVideo

__all__ = [
    "HELD_OUT_PAIRS",
    "MSRVTT",
    "SKIP_REASONS",
    "CaptionIndex",
    "ClassificationData",
    "ClassificationDataModule",
    "Coco",
    "DataError",
    "DataFormatError",
    "EpochDataLoader",
    "ErrorPolicy",
    "EvalCollate",
    "FrameFolderVideo",
    "FrameSampler",
    "ImageCaptionRecord",
    "ImageFolder",
    "ImageLoadError",
    "ImageTextDataModule",
    "ImageWithCaptionsDataset",
    "ItemLoader",
    "Karpathy",
    "PairDataset",
    "Preprocessing",
    "RetrievalData",
    "SkipReport",
    "Source",
    "StreamingSource",
    "Synthetic",
    "Table",
    "TrainCollate",
    "Video",
    "VideoFileVideo",
    "VideoLoadError",
    "VideoTable",
    "WebDataset",
    "check_images",
    "load_image",
    "normalize_caption",
    "select_split",
    "stable_id",
    "to_rgb",
    "validate_records",
]
