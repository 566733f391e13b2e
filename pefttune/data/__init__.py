"""Captioned images and videos: records, sources (one class per format), datasets and the data modules.

The contract with the towers (the :class:`Preprocessing` and the batch layouts) is in
:mod:`pefttune.data.preprocessing`; the contract with the model (what a data module provides) in
:mod:`pefttune.data.contracts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pefttune._lazy import lazy_attributes

# name -> the module that defines it; imported on first use (PEP 562).
_LAZY = {
    "HELD_OUT_PAIRS": "pefttune.data.sources.synthetic",
    "MSRVTT": "pefttune.data.sources",
    "SKIP_REASONS": "pefttune.data.records",
    "CaptionIndex": "pefttune.data.datasets",
    "ClassificationData": "pefttune.data.contracts",
    "ClassificationDataModule": "pefttune.data.classification",
    "Coco": "pefttune.data.sources",
    "DataError": "pefttune.data.records",
    "DataFormatError": "pefttune.data.records",
    "EpochDataLoader": "pefttune.data.datasets",
    "ErrorPolicy": "pefttune.data.records",
    "EvalCollate": "pefttune.data.datasets",
    "FrameFolderVideo": "pefttune.data.video",
    "FrameSampler": "pefttune.data.video",
    "ImageCaptionRecord": "pefttune.data.records",
    "ImageFolder": "pefttune.data.sources",
    "ImageLoadError": "pefttune.data.records",
    "ImageTextDataModule": "pefttune.data.datamodule",
    "ImageWithCaptionsDataset": "pefttune.data.datasets",
    "ItemLoader": "pefttune.data.datasets",
    "Karpathy": "pefttune.data.sources",
    "PairDataset": "pefttune.data.datasets",
    "Preprocessing": "pefttune.data.preprocessing",
    "RetrievalData": "pefttune.data.contracts",
    "SkipReport": "pefttune.data.records",
    "Source": "pefttune.data.sources",
    "StreamingSource": "pefttune.data.sources",
    "Synthetic": "pefttune.data.sources",
    "Table": "pefttune.data.sources",
    "TrainCollate": "pefttune.data.datasets",
    "Video": "pefttune.data.video",
    "VideoFileVideo": "pefttune.data.video",
    "VideoLoadError": "pefttune.data.records",
    "VideoTable": "pefttune.data.sources",
    "WebDataset": "pefttune.data.sources",
    "check_images": "pefttune.data.datasets",
    "load_image": "pefttune.data.datasets",
    "normalize_caption": "pefttune.data.records",
    "select_split": "pefttune.data.records",
    "stable_id": "pefttune.data.datasets",
    "to_rgb": "pefttune.data.datasets",
    "validate_records": "pefttune.data.records",
}

if TYPE_CHECKING:
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

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

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
