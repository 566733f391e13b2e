"""Image-caption data: records, format readers, the synthetic dataset, datasets and the data module.

The contract with the towers (the :class:`Preprocessing` and the batch layouts) is in
:mod:`pefttune.data.preprocessing`.
"""

from pefttune.data.classification import ClassificationDataModule
from pefttune.data.datamodule import ImageTextDataModule
from pefttune.data.datasets import (
    CaptionIndex,
    EpochDataLoader,
    EvalCollate,
    ImageWithCaptionsDataset,
    PairDataset,
    TrainCollate,
    WebDatasetStream,
    check_images,
    load_image,
    stable_id,
    to_rgb,
)
from pefttune.data.formats import (
    FORMATS,
    detect_format,
    expand_shards,
    read_coco_json,
    read_csv,
    read_json_list,
    read_jsonl,
    read_karpathy_json,
    read_records,
    read_webdataset,
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
    normalize_caption,
    select_split,
    validate_records,
)
from pefttune.data.synthetic import HELD_OUT_PAIRS, SyntheticScenes

__all__ = [
    "FORMATS",
    "HELD_OUT_PAIRS",
    "SKIP_REASONS",
    "CaptionIndex",
    "ClassificationDataModule",
    "DataError",
    "DataFormatError",
    "EpochDataLoader",
    "ErrorPolicy",
    "EvalCollate",
    "ImageCaptionRecord",
    "ImageLoadError",
    "ImageTextDataModule",
    "ImageWithCaptionsDataset",
    "PairDataset",
    "Preprocessing",
    "SkipReport",
    "SyntheticScenes",
    "TrainCollate",
    "WebDatasetStream",
    "check_images",
    "detect_format",
    "expand_shards",
    "load_image",
    "normalize_caption",
    "read_coco_json",
    "read_csv",
    "read_json_list",
    "read_jsonl",
    "read_karpathy_json",
    "read_records",
    "read_webdataset",
    "select_split",
    "stable_id",
    "to_rgb",
    "validate_records",
]
