"""``ImageTextDataModule``: image-caption data for training and retrieval evaluation.

The data module does not know which towers it feeds. The model hands it a
:class:`~pefttune.data.preprocessing.Preprocessing` through :meth:`ImageTextDataModule.attach_preprocessing`
(from the LightningModule's ``setup``, which Lightning calls after the data module's ``setup`` and before any
dataloader is requested); the dataloaders apply its transforms and tokenizer and emit the batch layouts of
:mod:`pefttune.data.preprocessing`: the training layout for ``train_dataloader``, the evaluation layout (every
image once with all of its captions) for ``val``, ``test`` and ``predict``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pefttune.data.cache import DecodedImageCache, split_transform
from pefttune.data.datasets import (
    EpochDataLoader,
    EvalCollate,
    ImageWithCaptionsDataset,
    PairDataset,
    TrainCollate,
    WebDatasetStream,
    check_images,
)
from pefttune.data.formats import expand_shards, is_shard_pattern, missing_local_shards, read_records
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.records import DataFormatError, ImageCaptionRecord, SkipReport, select_split
from pefttune.data.synthetic import SyntheticScenes

logger = logging.getLogger(__name__)

Role = Literal["train", "val", "test"]
_STAGE_ROLES: dict[str | None, tuple[Role, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


class ImageTextDataModule(LightningDataModule):
    """Image-caption pairs from the synthetic scenes, an annotation file or WebDataset shards.

    Sources: ``"synthetic"`` (:class:`~pefttune.data.synthetic.SyntheticScenes`, no files needed), an
    annotation file (Karpathy JSON, COCO JSON, CSV/TSV, JSONL, JSON list) or a WebDataset shard pattern. A
    file holding several splits (Karpathy, or CSV/JSONL with a split column) serves all of them from
    ``source``; formats with one split per file (COCO, WebDataset) take ``val_source`` and ``test_source``.
    Training on shards streams them (:class:`~pefttune.data.datasets.WebDatasetStream`); evaluation shards are
    indexed as a whole.

    Bad input: ``on_error="raise"`` stops at the first problem with the file, record and expectation named;
    ``"skip"`` drops bad records and captions, counts them in :attr:`skip_report` and logs them at setup.
    Images are decoded only when loaded, and an unreadable image then raises whatever ``on_error`` is (see
    :mod:`pefttune.data.datasets`); set ``validate_images=True`` to decode all images at setup, so that
    ``"skip"`` also drops unreadable images.

    Under DDP, Lightning puts a ``DistributedSampler`` on the map-style loaders; its padding duplicates carry
    the ids of the originals, so retrieval metrics deduplicate them by id.

    Args:
        source: ``"synthetic"``, a path to an annotation file, or a WebDataset shard pattern
            (``"train-{0000..0099}.tar"``, several joined by ``::``).
        format: Format of the files: ``"auto"`` (by extension and content), ``"karpathy"``, ``"coco"``,
            ``"csv"``, ``"jsonl"``, ``"json_list"`` or ``"webdataset"``.
        val_source: Annotation file or shards of the validation split; None takes it from ``source``.
        test_source: Annotation file or shards of the test split; None takes it from ``source``.
        image_root: Folder relative image paths are resolved against; None means each annotation file's
            folder.
        train_split: Name of the training split.
        val_split: Name of the validation split; None disables validation.
        test_split: Name of the test split (also used by ``predict``); None disables testing.
        restval_split: Karpathy files: split the ``restval`` images join (None keeps ``"restval"``).
        image_column: CSV column / JSON key of the image path; None means ``filepath`` (CSV) or ``image``
            (JSON).
        caption_column: CSV column / JSON key of the caption; None means ``title`` (CSV) or ``caption``
            (JSON).
        group_column: CSV column / JSON key of the image id grouping several rows; None groups by image path.
        split_column: CSV column / JSON key of the split name; None puts every row in the split being read.
        label_column: CSV column / JSON key of the class name (for zero-shot classification).
        separator: CSV field separator; None picks tab for ``.tsv`` and comma otherwise, falling back to the
            other when the header lacks the columns.
        batch_size: Training batch size (per device).
        eval_batch_size: Evaluation batch size in images (each brings all of its captions); None means
            ``batch_size``.
        num_workers: DataLoader worker processes.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        drop_last: Drop the last incomplete training batch; contrastive losses want full batches.
        captions_per_image: ``"all"``: one training pair per caption. ``"sample"``: one pair per image per
            epoch with a caption drawn afresh each epoch (seeded).
        on_error: ``"raise"`` or ``"skip"`` for bad records, captions and (with ``validate_images``) images.
        validate_images: Decode every image at setup (slow for large sets) so unreadable ones fail early or,
            with ``on_error="skip"``, are dropped and reported.
        check_files: Check at setup that image files exist (one ``stat`` per image).
        samples_per_epoch: Shards only: training items per epoch over all ranks, which gives every rank the
            same number of batches (needed under DDP unless shards are equal); None means one pass.
        shuffle_buffer: Shards only: size of the streaming shuffle buffer.
        max_train_samples: Keep only the first N training items (pairs, or images with ``"sample"``) for quick
            runs; with shards, caps the items per epoch.
        max_eval_images: Keep only the first N images of each evaluation split.
        synthetic_train: Synthetic source: number of training images.
        synthetic_val: Synthetic source: number of validation images.
        synthetic_test: Synthetic source: number of test images.
        synthetic_image_size: Synthetic source: image side in pixels.
        seed: Seed of the synthetic data, the training shuffle and the caption draw.
        image_cache_dir: Keep decoded, resized images in memory-mapped uint8 files under this folder
            (:class:`~pefttune.data.cache.DecodedImageCache`), so that later epochs and later runs skip
            decoding and resizing: evaluation images always, training images when the training transform
            resizes before any random step. None (default) decodes every image every time.
    """

    def __init__(
        self,
        source: str = "synthetic",
        format: Literal["auto", "karpathy", "coco", "csv", "jsonl", "json_list", "webdataset"] = "auto",
        val_source: str | None = None,
        test_source: str | None = None,
        image_root: str | None = None,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        restval_split: str | None = "train",
        image_column: str | None = None,
        caption_column: str | None = None,
        group_column: str | None = None,
        split_column: str | None = None,
        label_column: str | None = None,
        separator: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        drop_last: bool = True,
        captions_per_image: Literal["all", "sample"] = "all",
        on_error: Literal["raise", "skip"] = "raise",
        validate_images: bool = False,
        check_files: bool = True,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        max_train_samples: int | None = None,
        max_eval_images: int | None = None,
        synthetic_train: int = 512,
        synthetic_val: int = 64,
        synthetic_test: int = 128,
        synthetic_image_size: int = 64,
        seed: int = 0,
        image_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if captions_per_image not in ("all", "sample"):
            raise ValueError(f"captions_per_image must be 'all' or 'sample', got {captions_per_image!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.save_hyperparameters(logger=False)
        self.source = source
        self.format = format
        self.sources: dict[Role, str] = {
            "train": source,
            "val": val_source if val_source is not None else source,
            "test": test_source if test_source is not None else source,
        }
        self.split_names: dict[Role, str | None] = {
            "train": train_split,
            "val": val_split,
            "test": test_split,
        }
        self.image_root = image_root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.captions_per_image = captions_per_image
        self.on_error = on_error
        self.validate_images = validate_images
        self.check_files = check_files
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.max_train_samples = max_train_samples
        self.max_eval_images = max_eval_images
        self.seed = seed
        self.image_cache_dir = image_cache_dir
        self._read_options: dict[str, Any] = {
            "image_root": image_root,
            "restval_split": restval_split,
            "image_column": image_column,
            "caption_column": caption_column,
            "group_column": group_column,
            "split_column": split_column,
            "label_column": label_column,
            "separator": separator,
        }
        self._synthetic_options = {
            "num_train": synthetic_train,
            "num_val": synthetic_val,
            "num_test": synthetic_test,
            "image_size": synthetic_image_size,
            "seed": seed,
        }
        self.preprocessing: Preprocessing | None = None
        self._report = SkipReport()
        self._logged_skips = 0
        self._synthetic: SyntheticScenes | None = None
        self._files: dict[tuple[str, str], list[ImageCaptionRecord]] = {}
        self._records: dict[Role, list[ImageCaptionRecord]] = {}

    # -----------------------------------------------------------------------------------------------------
    # Wiring

    def attach_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Set the towers' transforms and tokenizer; call before any dataloader is built.

        Args:
            preprocessing: From the model (its towers own their preprocessing).
        """
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"expected a Preprocessing, got {type(preprocessing).__name__}")
        self.preprocessing = preprocessing

    def _require_preprocessing(self) -> Preprocessing:
        if self.preprocessing is None:
            raise RuntimeError(
                "ImageTextDataModule has no preprocessing: the model must call "
                "datamodule.attach_preprocessing(preprocessing) before dataloaders are built (for example in "
                "its setup hook); the towers own the image transforms and the tokenizer"
            )
        return self.preprocessing

    @property
    def skip_report(self) -> SkipReport:
        """Everything skipped so far under ``on_error="skip"``, all sources and splits together."""
        return self._report

    @property
    def synthetic(self) -> SyntheticScenes | None:
        """The synthetic dataset when a source is ``"synthetic"``, else None."""
        if self._synthetic is None and "synthetic" in self.sources.values():
            self._synthetic = SyntheticScenes(**self._synthetic_options)
        return self._synthetic

    # -----------------------------------------------------------------------------------------------------
    # Reading

    def _is_stream(self, role: Role) -> bool:
        source = self.sources[role]
        if source == "synthetic":
            return False
        # Only the name decides for "auto": detecting a JSON layout would parse the file.
        streamed = self.format == "webdataset" or (self.format == "auto" and is_shard_pattern(source))
        return role == "train" and streamed

    def setup(self, stage: str | None = None) -> None:
        """Read the splits a stage needs (once), validate them and log anything skipped.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or None for all.
        """
        for role in _STAGE_ROLES.get(stage, _STAGE_ROLES[None]):
            if self.split_names[role] is not None:
                self._load(role)
        new_skips = self._report.total - self._logged_skips
        if new_skips:
            self._logged_skips = self._report.total
            self._report.log(logger, f"ImageTextDataModule (on_error='skip', {new_skips} new)")

    def _load(self, role: Role) -> list[ImageCaptionRecord] | None:
        if role in self._records:
            return self._records[role]
        split = self.split_names[role]
        if split is None:
            raise RuntimeError(f"the {role} split is disabled ({role}_split=None)")
        if self._is_stream(role):
            self._check_shards(self.sources[role])
            return None
        source = self.sources[role]
        if source == "synthetic":
            synthetic = self.synthetic
            assert synthetic is not None
            records = synthetic.records(split)
        else:
            # Files without their own split field give their records the split they are read for; the main
            # source is read once for all roles, so its records default to the training split.
            default_split = self.split_names["train"] if source == self.sources["train"] else split
            key = (source, str(default_split))
            if key not in self._files:
                self._files[key] = read_records(
                    source,
                    self.format,
                    split=str(default_split),
                    on_error=self.on_error,
                    report=self._report,
                    check_files=self.check_files,
                    **self._read_options,
                )
            records = self._select_split(self._files[key], role, split, source, "a file")
        self._records[role] = self._limit_and_check(records, role, split, source)
        return self._records[role]

    @staticmethod
    def _select_split(
        records: list[ImageCaptionRecord], role: Role, split: str, source: str, kind: str
    ) -> list[ImageCaptionRecord]:
        """The records of ``split``; the error for a missing split says how to point ``role`` elsewhere."""
        try:
            return select_split(records, split, source=source)
        except DataFormatError as err:
            hint = f"; set {role}_source to {kind} of that split, or {role}_split=None to disable it"
            raise DataFormatError(str(err) + (hint if role != "train" else "")) from None

    def _limit_and_check(
        self, records: list[ImageCaptionRecord], role: Role, split: str, source: str
    ) -> list[ImageCaptionRecord]:
        """Cap an evaluation split at ``max_eval_images`` and, if asked, check that its images load."""
        if role != "train" and self.max_eval_images is not None:
            records = records[: self.max_eval_images]
        if self.validate_images:
            records = check_images(records, on_error=self.on_error, report=self._report)
            if not records:
                raise DataFormatError(f"{source}: no image of split {split!r} could be loaded")
        return records

    @staticmethod
    def _check_shards(pattern: str) -> None:
        urls = expand_shards(pattern)
        missing = missing_local_shards(urls)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataFormatError(f"{pattern}: {len(missing)} of {len(urls)} shard(s) not found: {shown}")

    def records(self, role: Role) -> list[ImageCaptionRecord]:
        """The records of the training, validation or test split (read on first use).

        Args:
            role: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            The records after validation and ``max_eval_images``.

        Raises:
            RuntimeError: If the split is disabled or streamed (training on shards).
        """
        records = self._load(role)
        if records is None:
            raise RuntimeError(f"the {role} split streams from shards and has no record list")
        return records

    def class_names(self, role: Role = "test") -> list[str]:
        """Class names for zero-shot classification: all synthetic classes, or the sorted labels of a split.

        Args:
            role: Split whose labels are listed (ignored for the synthetic source, which has fixed classes).

        Returns:
            The class names.

        Raises:
            DataFormatError: If no record of the split has a label.
        """
        if self.sources[role] == "synthetic":
            synthetic = self.synthetic
            assert synthetic is not None
            return synthetic.class_names
        labels = sorted({record.label for record in self.records(role) if record.label is not None})
        if not labels:
            raise DataFormatError(
                f"{self.sources[role]}: no labels in split {self.split_names[role]!r} (set label_column)"
            )
        return labels

    def evaluation_texts(self, stage: str) -> list[str]:
        """Every caption an evaluation stage's dataloader yields, in loader order (captions of image 0, ...).

        Lets a model prepare for the texts it will encode (e.g. APEX's text bank) before the loop starts.

        Args:
            stage: ``"validate"`` (or ``"val"``), ``"test"`` or ``"predict"``.

        Returns:
            The captions, or an empty list when the stage's split is disabled.
        """
        roles: dict[str, Role] = {
            "validate": "val",
            "val": "val",
            "fit": "val",
            "test": "test",
            "predict": "test",
        }
        if stage not in roles:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(roles)}")
        role = roles[stage]
        if self.split_names[role] is None:
            return []
        return [caption for record in self.records(role) for caption in record.captions]

    # -----------------------------------------------------------------------------------------------------
    # Dataloaders

    def _current_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _rank_and_world(self) -> tuple[int | None, int | None]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)

    def _worker_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }

    def train_dataloader(self) -> DataLoader:
        """Training batches (the training layout of :mod:`pefttune.data.preprocessing`)."""
        preprocessing = self._require_preprocessing()
        collate = TrainCollate(preprocessing.tokenize)
        if self._is_stream("train"):
            self._load("train")
            rank, world_size = self._rank_and_world()
            per_epoch = self.samples_per_epoch
            if self.max_train_samples is not None:
                per_epoch = min(per_epoch or self.max_train_samples, self.max_train_samples)
            stream = WebDatasetStream(
                self.sources["train"],
                split=str(self.split_names["train"]),
                captions_per_image=self.captions_per_image,
                transform=preprocessing.train_transform,
                seed=self.seed,
                samples_per_epoch=per_epoch,
                batch_size=self.batch_size,
                shuffle_buffer=self.shuffle_buffer,
                on_error=self.on_error,
                rank=rank,
                world_size=world_size,
            )
            return EpochDataLoader(
                stream,
                batch_size=self.batch_size,
                collate_fn=collate,
                drop_last=self.drop_last,
                epoch_source=self._current_epoch,
                **self._worker_options(),
            )
        dataset = PairDataset(
            self.records("train"),
            captions_per_image=self.captions_per_image,
            transform=preprocessing.train_transform,
            seed=self.seed,
            max_items=self.max_train_samples,
        )
        self._use_image_cache(dataset, preprocessing.train_transform, training=True)
        _, world_size = self._rank_and_world()
        per_rank = len(dataset) // (world_size or 1)
        if self.drop_last and per_rank < self.batch_size:
            raise DataFormatError(
                f"{self.sources['train']}: the training split has {len(dataset)} items ({per_rank} per "
                f"rank), fewer than batch_size={self.batch_size} with drop_last=True, so no batch would be "
                "produced; lower batch_size or set drop_last=False"
            )
        return EpochDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=collate,
            drop_last=self.drop_last,
            epoch_source=self._current_epoch,
            shuffle_seed=self.seed,
            **self._worker_options(),
        )

    def _eval_dataloader(self, role: Role) -> DataLoader | list[Any]:
        if self.split_names[role] is None:
            return []  # Lightning runs no loop for an empty list of dataloaders
        preprocessing = self._require_preprocessing()
        dataset = ImageWithCaptionsDataset(self.records(role), transform=preprocessing.eval_transform)
        self._use_image_cache(dataset, preprocessing.eval_transform, training=False)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=EvalCollate(preprocessing.tokenize),
            drop_last=False,
            **self._worker_options(),
        )

    def _use_image_cache(self, dataset: Any, transform: Any, training: bool) -> None:
        """Serve ``dataset``'s images from a decoded-image cache when ``image_cache_dir`` is set."""
        if self.image_cache_dir is None:
            return
        prefix, _ = split_transform(transform)
        if training and len(prefix.transforms) == 1:
            logger.info(
                "image_cache_dir: training images are decoded every epoch (the training transform's first "
                "step after the conversion to a tensor is random, so there is nothing fixed to cache)"
            )
            return
        dataset.image_cache = DecodedImageCache(
            self.image_cache_dir, transform, [record.image for record in dataset.records]
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        """Validation batches (evaluation layout), or an empty list with ``val_split=None``."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader | list[Any]:
        """Test batches (evaluation layout), or an empty list with ``test_split=None``."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader | list[Any]:
        """Evaluation-layout batches of the test split (for embedding export)."""
        return self._eval_dataloader("test")
