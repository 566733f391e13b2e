"""``ImageTextDataModule``: image-caption (or video-caption) data for training and retrieval evaluation.

The data module reads a :class:`~pefttune.data.sources.Source` per split (one source object per format,
chosen in a config by ``class_path``) and does what is the same for every format: validation, split
selection, duplicate checks, limits, loading (images, or frames sampled from videos) and batching.

It does not know which towers it feeds. The model hands it a
:class:`~pefttune.data.preprocessing.Preprocessing` through :meth:`ImageTextDataModule.attach_preprocessing`
(from the LightningModule's ``setup``, which Lightning calls after the data module's ``setup`` and before any
dataloader is requested); the dataloaders apply its transforms and tokenizer and emit the batch layouts of
:mod:`pefttune.data.preprocessing`: the training layout for ``train_dataloader``, the evaluation layout (every
item once with its captions) for ``val``, ``test`` and ``predict``. It satisfies
:class:`~pefttune.data.contracts.RetrievalData`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pefttune.data.cache import DecodedImageCache, resizes_or_crops, split_transform
from pefttune.data.datasets import (
    EpochDataLoader,
    EvalCollate,
    ImageWithCaptionsDataset,
    ItemLoader,
    PairDataset,
    TrainCollate,
    check_images,
    evaluation_captions,
)
from pefttune.data.legacy import LEGACY_OPTIONS, legacy_source
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.records import (
    DataFormatError,
    ErrorPolicy,
    ImageCaptionRecord,
    SkipReport,
    check_duplicate_files,
    select_split,
)
from pefttune.data.sources.base import Source, StreamingSource
from pefttune.data.sources.synthetic import Synthetic
from pefttune.data.video import FrameSampler

logger = logging.getLogger(__name__)

Role = Literal["train", "val", "test"]
_STAGE_ROLES: dict[str | None, tuple[Role, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}
_EVAL_ROLE: dict[str, Role] = {
    "validate": "val",
    "val": "val",
    "fit": "val",
    "test": "test",
    "predict": "test",
}


def _plain_sources(hparams: dict[str, Any]) -> None:
    """Replace Source objects in saved hyperparameters by plain data naming their class and contents.

    Checkpoints store the data module's hyperparameters, and Lightning loads checkpoints with torch's
    ``weights_only`` unpickler, which refuses arbitrary objects: a Source given in Python (the CLI records
    ``class_path``/``init_args`` dicts instead) would make every checkpoint of the run unloadable.
    """
    for name, value in hparams.items():
        if isinstance(value, Source):
            class_path = f"{type(value).__module__}.{type(value).__qualname__}"
            hparams[name] = {"class_path": class_path, "describe": value.describe()}


class ImageTextDataModule(LightningDataModule):
    """Items with captions from a source per split: synthetic scenes, annotation files, shards, videos.

    ``source`` serves every split whose records it holds (a Karpathy file, a table with a split column, the
    synthetic scenes, MSR-VTT's annotation JSON); formats with one split per file (COCO, a folder, shards, a
    CLIP4Clip split file) take ``val_source`` / ``test_source`` for the evaluation splits. The source's
    records without a split of their own belong to ``train_split``; a separate
    ``val_source``/``test_source``'s to the split it is given for.

    Training on a :class:`~pefttune.data.sources.StreamingSource` (WebDataset shards) streams it; evaluation
    splits are always listed as a whole. Video records (a :class:`~pefttune.data.video.Video` as ``image``)
    give video batches: ``pixel_values`` [B, T, 3, H, W], ``frame_mask`` [B, T], ``frame_indices`` [B, T]
    with ``T = num_frames`` (see :mod:`pefttune.data.video` for the sampling).

    Bad input: ``on_error="raise"`` stops at the first problem with the file, record and expectation named;
    ``"skip"`` drops bad records and captions, counts them in :attr:`skip_report` and logs them at setup.
    Images are decoded only when loaded, and an unreadable image then raises whatever ``on_error`` is (see
    :mod:`pefttune.data.datasets`); set ``validate_images=True`` to decode all images (for videos: count the
    frames and decode the first) at setup, so that ``"skip"`` also drops unreadable ones. The same file under
    two ids in one split is logged as a warning in the training split and refused in evaluation splits (where
    it makes a correct retrieval count as wrong); under ``"skip"`` the later ids are dropped and counted.

    Under DDP, Lightning puts a ``DistributedSampler`` on the map-style loaders; its padding duplicates carry
    the ids of the originals, so retrieval metrics deduplicate them by id.

    Args:
        source: The data: a :class:`~pefttune.data.sources.Source` (``class_path`` + ``init_args`` in a
            config); None means :class:`~pefttune.data.sources.Synthetic` with ``seed``. Deprecated: a string
            (``"synthetic"``, an annotation file or a shard pattern) read with the deprecated options below.
        val_source: Source of the validation split; None takes it from ``source``.
        test_source: Source of the test split (also used by ``predict``); None takes it from ``source``.
        train_split: Name of the training split.
        val_split: Name of the validation split; None disables validation.
        test_split: Name of the test split; None disables testing.
        batch_size: Training batch size (per device).
        eval_batch_size: Evaluation batch size in items (each brings its captions); None means ``batch_size``.
        num_workers: DataLoader worker processes.
        persistent_workers: Keep workers alive between epochs (only with ``num_workers > 0``).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies). ``None`` (default): on
            when CUDA is available (``torch.cuda.is_available()``), off otherwise, where pinning only costs.
        drop_last: Drop the last incomplete training batch; contrastive losses want full batches.
        captions_per_image: ``"all"``: one training pair per caption (CLIP4Clip's
            ``--expand_msrvtt_sentences``). ``"sample"``: one pair per item per epoch with a caption drawn
            afresh each epoch (seeded).
        eval_captions: Evaluation caption protocol: ``"all"`` captions of each item, or ``"one"`` per item
            (MSR-VTT 1k-A: the split file's sentence, else the first caption). Results should name it.
        num_frames: ``T``, frames sampled per video (ignored for images).
        frame_sampling: ``"segments"`` (a random frame per equal segment in training, segment centres in
            evaluation) or ``"linspace"`` (evenly spaced frames, the same in training and evaluation, as
            CLIP4Clip's ``slice_framepos 2``); see :mod:`pefttune.data.video`.
        on_error: ``"raise"`` or ``"skip"`` for bad records, captions and (with ``validate_images``) images.
        validate_images: Decode every image at setup so unreadable ones fail early or are dropped.
        max_train_samples: Keep only the first N training items (pairs, or items with ``"sample"``) per epoch.
        max_eval_images: Keep only the first N items of each evaluation split.
        seed: Seed of the default synthetic data, the training shuffle, the caption draw and frame offsets.
        image_cache_dir: Keep decoded, resized images in memory-mapped uint8 files under this folder
            (:class:`~pefttune.data.cache.DecodedImageCache`), so that later epochs and later runs skip
            decoding and resizing: evaluation images always, training images when the training transform
            resizes before any random step (video frames are not cached). None (default) decodes every
            image every time.
        format: Deprecated, with a string ``source``: the file format; use a source class instead.
        image_root: Deprecated: the source's ``image_root``.
        restval_split: Deprecated: ``Karpathy(restval_split=...)``.
        image_column: Deprecated: ``Table(image_column=...)``.
        caption_column: Deprecated: ``Table(caption_column=...)``.
        group_column: Deprecated: ``Table(group_column=...)``.
        split_column: Deprecated: ``Table(split_column=...)``.
        label_column: Deprecated: ``Table(label_column=...)``.
        separator: Deprecated: ``Table(separator=...)``.
        check_files: Deprecated: the source's ``check_files``.
        samples_per_epoch: Deprecated: ``WebDataset(samples_per_epoch=...)``.
        shuffle_buffer: Deprecated: ``WebDataset(shuffle_buffer=...)``.
        synthetic_train: Deprecated: ``Synthetic(num_train=...)``.
        synthetic_val: Deprecated: ``Synthetic(num_val=...)``.
        synthetic_test: Deprecated: ``Synthetic(num_test=...)``.
        synthetic_image_size: Deprecated: ``Synthetic(image_size=...)``.
    """

    #: ``held_out_fraction`` of the default synthetic source (the classification module uses 0).
    default_held_out_fraction: float = 0.5

    def __init__(
        self,
        source: Source | str | None = None,
        val_source: Source | str | None = None,
        test_source: Source | str | None = None,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        drop_last: bool = True,
        captions_per_image: Literal["all", "sample"] = "all",
        eval_captions: Literal["all", "one"] = "all",
        num_frames: int = 8,
        frame_sampling: Literal["segments", "linspace"] = "segments",
        on_error: Literal["raise", "skip"] = "raise",
        validate_images: bool = False,
        max_train_samples: int | None = None,
        max_eval_images: int | None = None,
        seed: int = 0,
        image_cache_dir: str | None = None,
        format: str | None = None,
        image_root: str | None = None,
        restval_split: str | None = None,
        image_column: str | None = None,
        caption_column: str | None = None,
        group_column: str | None = None,
        split_column: str | None = None,
        label_column: str | None = None,
        separator: str | None = None,
        check_files: bool | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int | None = None,
        synthetic_train: int | None = None,
        synthetic_val: int | None = None,
        synthetic_test: int | None = None,
        synthetic_image_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if captions_per_image not in ("all", "sample"):
            raise ValueError(f"captions_per_image must be 'all' or 'sample', got {captions_per_image!r}")
        if eval_captions not in ("all", "one"):
            raise ValueError(f"eval_captions must be 'all' or 'one', got {eval_captions!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.save_hyperparameters(logger=False)
        _plain_sources(self.hparams)
        legacy = {
            name: value for name, value in locals().items() if name in LEGACY_OPTIONS and value is not None
        }
        self.sources: dict[Role, Source] = self._resolve_sources(
            source, val_source, test_source, legacy, seed
        )
        self.split_names: dict[Role, str | None] = {
            "train": train_split,
            "val": val_split,
            "test": test_split,
        }
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.captions_per_image = captions_per_image
        self.eval_captions = eval_captions
        self.sampler = FrameSampler(num_frames, frame_sampling)
        self.on_error = on_error
        self.validate_images = validate_images
        self.max_train_samples = max_train_samples
        self.max_eval_images = max_eval_images
        self.seed = seed
        self.image_cache_dir = image_cache_dir
        self.preprocessing: Preprocessing | None = None
        self._report = SkipReport()
        self._logged_skips = 0
        self._read: dict[tuple[int, str], list[ImageCaptionRecord]] = {}
        self._records: dict[Role, list[ImageCaptionRecord] | None] = {}

    def _resolve_sources(
        self,
        source: Source | str | None,
        val_source: Source | str | None,
        test_source: Source | str | None,
        legacy: dict[str, Any],
        seed: int,
    ) -> dict[Role, Source]:
        """One :class:`Source` per role; deprecated strings are converted (with a warning)."""
        made: dict[str, Source] = {}

        def resolve(value: Source | str | None, name: str) -> Source:
            if isinstance(value, Source):
                return value
            if value is None:  # the default: generated data, no files (legacy synthetic_* options apply)
                value = "synthetic"
                if not any(option.startswith("synthetic_") for option in legacy):
                    made.setdefault(
                        value, Synthetic(seed=seed, held_out_fraction=self.default_held_out_fraction)
                    )
            if not isinstance(value, str):
                raise TypeError(
                    f"{name} must be a Source (class_path + init_args), got {type(value).__name__}"
                )
            if value not in made:
                made[value] = legacy_source(value, name, legacy, seed, self)
            return made[value]

        if legacy and isinstance(source, Synthetic) and all(o.startswith("synthetic_") for o in legacy):
            source = legacy_source("synthetic", "source", legacy, source.seed, self, base=source)
            legacy = {}
        if legacy and not any(isinstance(value, str) for value in (source, val_source, test_source)):
            only_synthetic = all(option.startswith("synthetic_") for option in legacy) and source is None
            if not only_synthetic:
                raise ValueError(
                    f"{', '.join(sorted(legacy))}: deprecated option(s) of a string source, but the "
                    "sources are "
                    "Source objects; set them in the source's init_args instead (see docs/datasets.md)"
                )
        train = resolve(source, "source")
        return {
            "train": train,
            "val": resolve(val_source, "val_source") if val_source is not None else train,
            "test": resolve(test_source, "test_source") if test_source is not None else train,
        }

    def legacy_table_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Table options the deprecated string form adds (the classification module's differ)."""
        return {}

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
                f"{type(self).__name__} has no preprocessing: the model must call "
                "datamodule.attach_preprocessing(preprocessing) before dataloaders are built (for example in "
                "its setup hook); the towers own the image transforms and the tokenizer"
            )
        return self.preprocessing

    @property
    def skip_report(self) -> SkipReport:
        """Everything skipped so far under ``on_error="skip"``, all sources and splits together."""
        return self._report

    @property
    def num_frames(self) -> int:
        """Frames sampled per video."""
        return self.sampler.num_frames

    # -----------------------------------------------------------------------------------------------------
    # Reading

    def _is_stream(self, role: Role) -> bool:
        source = self.sources[role]
        return role == "train" and isinstance(source, StreamingSource) and source.streaming

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
            self._report.log(logger, f"{type(self).__name__} (on_error='skip', {new_skips} new)")

    def _policy(self) -> ErrorPolicy:
        return ErrorPolicy(self.on_error, self._report)

    def _load(self, role: Role) -> list[ImageCaptionRecord] | None:
        if role in self._records:
            return self._records[role]
        split = self.split_names[role]
        if split is None:
            raise RuntimeError(f"the {role} split is disabled ({role}_split=None)")
        source = self.sources[role]
        if self._is_stream(role):
            assert isinstance(source, StreamingSource)
            source.prepare_stream(split, self._policy(), self.captions_per_image)  # e.g. count the samples
            self._records[role] = None
            return None
        # Records without a split field belong to the training split when read from the main source, and to
        # the split they are read for when read from a separate val/test source.
        default_split = self.split_names["train"] if source is self.sources["train"] else split
        key = (id(source), str(default_split))
        if key not in self._read:
            self._read[key] = source.records(str(default_split), self._policy())
            skipped = self._report.total - self._logged_skips
            logger.info(
                "%s: %d item(s) read%s",
                source.describe(),
                len(self._read[key]),
                f", {skipped} problem(s) skipped" if skipped else "",
            )
        records = self._select_split(self._read[key], role, split, source)
        self._records[role] = self._limit_and_check(records, role, split, source)
        return self._records[role]

    @staticmethod
    def _select_split(
        records: list[ImageCaptionRecord], role: Role, split: str, source: Source
    ) -> list[ImageCaptionRecord]:
        """The records of ``split``; the error for a missing split says how to point ``role`` elsewhere."""
        try:
            return select_split(records, split, source=source.describe())
        except DataFormatError as err:
            hint = f"; set {role}_source to a source of that split, or {role}_split=None to disable it"
            raise DataFormatError(str(err) + (hint if role != "train" else "")) from None

    def _limit_and_check(
        self, records: list[ImageCaptionRecord], role: Role, split: str, source: Source
    ) -> list[ImageCaptionRecord]:
        """Duplicate files, ``max_eval_images`` and, if asked, a decode of every image."""
        records = check_duplicate_files(
            records, source=source.describe(), refuse=role != "train", policy=self._policy()
        )
        if role != "train" and self.max_eval_images is not None:
            records = records[: self.max_eval_images]
        if self.validate_images:
            records = check_images(records, on_error=self.on_error, report=self._report)
            if not records:
                raise DataFormatError(f"{source.describe()}: no image of split {split!r} could be loaded")
        return records

    def records(self, role: Role) -> list[ImageCaptionRecord]:
        """The records of the training, validation or test split (read on first use).

        Args:
            role: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            The records after validation, duplicate checks and ``max_eval_images``.

        Raises:
            RuntimeError: If the split is disabled or streamed (training on shards).
        """
        records = self._load(role)
        if records is None:
            raise RuntimeError(
                f"the {role} split streams from {self.sources[role].describe()} and has no record list (set "
                "streaming: false on the source to list it)"
            )
        return records

    def class_names(self, role: Role = "test") -> list[str]:
        """Class names for zero-shot classification: the source's fixed classes, or a split's labels (sorted).

        Raises:
            DataFormatError: If no record of the split has a label.
        """
        fixed = self.sources[role].class_names()
        if fixed is not None:
            return fixed
        labels = sorted({record.label for record in self.records(role) if record.label is not None})
        if not labels:
            raise DataFormatError(
                f"{self.sources[role].describe()}: no labels in split {self.split_names[role]!r} (a table "
                "source needs label_column)"
            )
        return labels

    def evaluation_texts(self, stage: str) -> list[str]:
        """Every caption an evaluation stage's dataloader yields, in loader order (captions of item 0, ...).

        Lets a model prepare for the texts it will encode (e.g. APEX's text bank) before the loop starts.

        Args:
            stage: ``"validate"`` (or ``"val"``, ``"fit"``), ``"test"`` or ``"predict"``.

        Returns:
            The captions (one per item under ``eval_captions="one"``), or an empty list when the stage's split
            is disabled.
        """
        if stage not in _EVAL_ROLE:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_EVAL_ROLE)}")
        role = _EVAL_ROLE[stage]
        if self.split_names[role] is None:
            return []
        return evaluation_captions(self.records(role), self.eval_captions)

    def training_texts(self) -> list[str]:
        """Every caption of the training split (APEX builds its bank of training-text embeddings)."""
        return [caption for record in self.records("train") for caption in record.captions]

    # -----------------------------------------------------------------------------------------------------
    # Dataloaders

    def _current_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _worker_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "pin_memory": self.pin_memory if self.pin_memory is not None else torch.cuda.is_available(),
        }

    def train_dataloader(self) -> DataLoader:
        """Training batches (the training layout of :mod:`pefttune.data.preprocessing`)."""
        preprocessing = self._require_preprocessing()
        collate = TrainCollate(preprocessing.tokenize)
        rank, world_size = self._rank_and_world()
        source = self.sources["train"]
        if self._is_stream("train"):
            assert isinstance(source, StreamingSource)
            stream = source.training_stream(
                split=str(self.split_names["train"]),
                captions_per_image=self.captions_per_image,
                load_item=ItemLoader(
                    preprocessing.train_transform, self.sampler, preprocessing.content_hashes
                ),
                seed=self.seed,
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                num_workers=self.num_workers,
                on_error=self.on_error,
                rank=rank,
                world_size=world_size,
                max_items=self.max_train_samples,
                report=self._report,
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
            sampler=self.sampler,
            content_hashes=preprocessing.content_hashes,
        )
        self._check_enough(len(dataset), world_size, source)
        self._use_image_cache(dataset, preprocessing.train_transform, training=True)
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

    def _check_enough(self, items: int, world_size: int, source: Source) -> None:
        per_rank = items // max(1, world_size)
        if self.drop_last and per_rank < self.batch_size:
            raise DataFormatError(
                f"{source.describe()}: the training split has {items} items ({per_rank} per rank), "
                "fewer than "
                f"batch_size={self.batch_size} with drop_last=True, so no batch would be produced; lower "
                "batch_size or set drop_last=False"
            )

    def _eval_dataloader(self, role: Role) -> DataLoader | list[Any]:
        if self.split_names[role] is None:
            return []  # Lightning runs no loop for an empty list of dataloaders
        preprocessing = self._require_preprocessing()
        dataset = ImageWithCaptionsDataset(
            self.records(role),
            transform=preprocessing.eval_transform,
            eval_captions=self.eval_captions,
            sampler=self.sampler,
        )
        self._use_image_cache(dataset, preprocessing.eval_transform, training=False)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=EvalCollate(preprocessing.tokenize),
            drop_last=False,
            # Its own generator: a DataLoader without one draws its workers' base seed from the global
            # generator, so every validation would shift the random stream of the training that follows
            # (dropout, augmentation), and a run resumed after a checkpoint, which skips the validation
            # that followed it, would not train as the uninterrupted run did.
            generator=torch.Generator().manual_seed(0),
            **self._worker_options(),
        )

    def _use_image_cache(self, dataset: Any, transform: Any, training: bool) -> None:
        """Serve ``dataset``'s images from a decoded-image cache when ``image_cache_dir`` is set."""
        if self.image_cache_dir is None:
            return
        prefix, _ = split_transform(transform)
        if training and not resizes_or_crops(prefix):
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
