"""``ClassificationDataModule``: labelled images for zero-shot classification and the base-to-new protocol.

Sources: any :class:`~pefttune.data.sources.Source` whose records carry labels: the synthetic scenes (class =
the main object's ``"colour shape"``), an :class:`~pefttune.data.sources.ImageFolder`
(``root/<class>/**/*.jpg``), a :class:`~pefttune.data.sources.Table` with a label column (name it as the
caption column too: captions are not used), or a Karpathy JSON file whose images carry a ``class`` key
(UCM-Captions). The data module is an :class:`~pefttune.data.ImageTextDataModule` (same arguments) with the
classification arguments below; it satisfies :class:`~pefttune.data.contracts.ClassificationData`.

Classes. The class vocabulary is ``classes`` when given, else the sources' fixed classes (the synthetic
scenes: every class that can occur), else every label found in the enabled splits (sorted).
``split_classes`` chooses what is trained and evaluated:

* ``"all"``: every class, everywhere.
* ``"base"`` / ``"new"``: only the base / new classes, everywhere.
* ``"base_to_new"``: train and validate on the base classes; test the base and the new classes separately
  (two test dataloaders), as in CoOp/CoCoOp/APEX.

Base classes are the first half of the sorted vocabulary (``ceil(C / 2)`` of them, as CoOp's
``subsample_classes``), new classes the rest. With ``shots=K`` the training split keeps exactly K images
per training class, drawn per class with ``(seed, class name)``, so a class's draw does not depend on the
other classes.

Batches (see :mod:`pefttune.data.preprocessing` for the training layout):

* training: ``pixel_values``, ``input_ids``/``attention_mask`` of a prompt of the image's class (one
  template per image per epoch, drawn with ``(seed, epoch, index)`` when there are several),
  ``image_ids``, ``caption_ids`` (= ``image_ids``: one prompt per image), and ``text_ids`` = the class
  index, so that :class:`~pefttune.losses.MultiPositiveInfoNCELoss` treats images of the same class as
  positives. The default InfoNCE treats them as negatives of each other (false negatives).
* evaluation: ``pixel_values`` [B, 3, H, W], ``labels`` [B] (index into the class list of the evaluated
  group), ``image_ids`` [B] (position in the group's dataset, so DDP padding duplicates can be removed).

Prompts. A class prompt is ``template.format(name)`` (underscores of the name read as spaces by default).
A strategy that learns text context in place of leading words (APEX: ``text_prompt_prefix = "a photo"``)
hands that prefix over with :meth:`ClassificationDataModule.set_prompt_prefix`; templates starting with it
lose it (``"a photo of a {}."`` becomes ``"of a {}."``) in training and evaluation prompts alike, since the
tokenizer inserts the learned context after the start token.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pefttune.data.datamodule import ImageTextDataModule, Role
from pefttune.data.datasets import EpochDataLoader, TrainCollate, load_image
from pefttune.data.epoch import SharedEpoch
from pefttune.data.preprocessing import ImageTransform
from pefttune.data.records import DataFormatError, ErrorPolicy, ImageCaptionRecord

logger = logging.getLogger(__name__)

SplitClasses = Literal["all", "base", "new", "base_to_new"]
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_STAGE_ROLE: dict[str, Role] = {
    "fit": "val",
    "validate": "val",
    "val": "val",
    "test": "test",
    "predict": "test",
}


# ---------------------------------------------------------------------------------------------------------
# Class splits, shots and prompts


def split_base_new(class_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split classes into base (the first half of the sorted names) and new (the rest).

    Args:
        class_names: The class vocabulary (any order; duplicates count once).

    Returns:
        ``(base, new)``, each sorted; base has ``ceil(C / 2)`` classes.
    """
    names = sorted(set(class_names))
    half = math.ceil(len(names) / 2)
    return names[:half], names[half:]


def sample_shots(labels: Sequence[str | None], classes: Sequence[str], shots: int, seed: int) -> list[int]:
    """Positions of exactly ``shots`` items per class, drawn per class with ``(seed, class name)``.

    Args:
        labels: The label of each item (items of other classes or without a label are never drawn).
        classes: The classes to draw for.
        shots: K, the number of items per class.
        seed: Seed of the draw.

    Returns:
        The chosen positions, ascending.

    Raises:
        ValueError: If ``shots < 1``.
        DataFormatError: If a class has fewer than ``shots`` items (all such classes are named).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    by_class: dict[str, list[int]] = {name: [] for name in classes}
    for position, label in enumerate(labels):
        if label in by_class:
            by_class[label].append(position)
    short = {name: len(items) for name, items in by_class.items() if len(items) < shots}
    if short:
        listed = ", ".join(f"{name!r} ({count})" for name, count in sorted(short.items()))
        raise DataFormatError(
            f"{shots}-shot sampling needs {shots} training images per class; too few for {len(short)} "
            f"class(es): {listed}"
        )
    chosen: list[int] = []
    for name in classes:
        # A string seed is hashed with SHA-512 by `random`: stable across processes and PYTHONHASHSEED.
        chosen.extend(random.Random(f"shots/{seed}/{name}").sample(by_class[name], shots))
    return sorted(chosen)


def strip_prompt_prefix(template: str, prefix: str) -> str:
    """``template`` without a leading ``prefix`` (case-insensitive, whole words), else unchanged.

    ``strip_prompt_prefix("a photo of a {}.", "a photo")`` is ``"of a {}."``; ``"a photograph of {}"``
    is left alone because the prefix must end at a word boundary.
    """
    stripped = template.lstrip()
    if not prefix or not stripped.lower().startswith(prefix.lower()):
        return template
    rest = stripped[len(prefix) :]
    if rest and not rest[0].isspace():
        return template
    return rest.lstrip()


def class_prompts(
    class_names: Sequence[str],
    templates: Sequence[str],
    prefix: str = "",
    underscores_as_spaces: bool = True,
) -> list[list[str]]:
    """The prompts of each class: ``[C][T]``, template-major within a class.

    Args:
        class_names: The classes.
        templates: Templates with one ``{}`` where the class name goes.
        prefix: Leading words a learned text context plays; stripped from templates starting with them.
        underscores_as_spaces: Read ``_`` in class names as spaces (``"Forest_Fire"`` -> ``"Forest Fire"``).

    Returns:
        ``prompts[c][t]`` for class ``c`` and template ``t``.
    """
    check_templates(templates)
    stripped = [strip_prompt_prefix(template, prefix) for template in templates]
    names = [name.replace("_", " ") if underscores_as_spaces else name for name in class_names]
    return [[template.format(name) for template in stripped] for name in names]


def check_templates(templates: Sequence[str]) -> None:
    """Raise ``ValueError`` unless there is at least one template and each has exactly one ``{}``."""
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty list of strings, got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"every template needs exactly one '{{}}' for the class name, got {template!r}")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"template {template!r} cannot be formatted with a class name: {err}") from None


@dataclass(frozen=True)
class ClassGroup:
    """A set of classes evaluated together (one evaluation dataloader).

    Attributes:
        name: ``"all"``, ``"base"`` or ``"new"``; metrics are logged as ``acc`` (all) or ``acc_<name>``.
        class_names: The classes; an evaluation batch's ``labels`` index this list.
        prompts: ``prompts[c][t]``: the prompt of class ``c`` with template ``t`` (prefix already stripped).
    """

    name: str
    class_names: list[str]
    prompts: list[list[str]]

    @property
    def flat_prompts(self) -> list[str]:
        """Every prompt, class-major (class 0's templates, then class 1's, ...)."""
        return [prompt for prompts in self.prompts for prompt in prompts]


# ---------------------------------------------------------------------------------------------------------
# Datasets and collation


class ClassificationTrainDataset(SharedEpoch, Dataset):
    """Training items: an image and one prompt of its class.

    Items are those of :class:`~pefttune.data.datasets.PairDataset` (so
    :class:`~pefttune.data.datasets.TrainCollate` builds the batch): ``image``, ``caption`` (the prompt),
    ``image_id`` and ``caption_id`` (the position), ``text_id`` (the class index).

    Args:
        records: The training images.
        labels: Class index of each record.
        prompts: ``prompts[c][t]`` (see :func:`class_prompts`).
        transform: The training image transform.
        seed: Seed of the per-epoch template draw (used when there are several templates).
    """

    def __init__(
        self,
        records: Sequence[ImageCaptionRecord],
        labels: Sequence[int],
        prompts: Sequence[Sequence[str]],
        transform: ImageTransform | None = None,
        seed: int = 0,
    ) -> None:
        if len(records) != len(labels):
            raise ValueError(f"{len(records)} records but {len(labels)} labels")
        self.records = list(records)
        self.labels = [int(label) for label in labels]
        self.prompts = [list(p) for p in prompts]
        self.transform = transform
        self.seed = seed
        self._init_shared_epoch()  # the prompt-template draw's epoch, seen by persistent workers too

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, label = self.records[index], self.labels[index]
        templates = self.prompts[label]
        choice = 0
        if len(templates) > 1:
            choice = int(np.random.default_rng([self.seed, self.epoch, index]).integers(len(templates)))
        image = load_image(record.image, record=record.describe())
        return {
            "image": self.transform(image) if self.transform is not None else image,
            "caption": templates[choice],
            "image_id": index,
            "caption_id": index,
            "text_id": label,
        }


class ClassificationEvalDataset(Dataset):
    """Evaluation items: ``image``, ``label`` (class index in the group) and ``image_id`` (the position).

    Args:
        records: The evaluated images.
        labels: Class index of each record.
        transform: The evaluation image transform.
    """

    def __init__(
        self,
        records: Sequence[ImageCaptionRecord],
        labels: Sequence[int],
        transform: ImageTransform | None = None,
    ) -> None:
        if len(records) != len(labels):
            raise ValueError(f"{len(records)} records but {len(labels)} labels")
        self.records = list(records)
        self.labels = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = load_image(record.image, record=record.describe())
        return {
            "image": self.transform(image) if self.transform is not None else image,
            "label": self.labels[index],
            "image_id": index,
        }


def classification_collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Build an evaluation batch: ``pixel_values``, ``labels``, ``image_ids``."""
    images = [item["image"] for item in items]
    if not all(isinstance(image, torch.Tensor) for image in images):
        raise TypeError(
            f"the image transform must return tensors [3, H, W]; got {type(images[0]).__name__} "
            "(was a Preprocessing attached?)"
        )
    return {
        "pixel_values": torch.stack(images),
        "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------------
# The data module


class ClassificationDataModule(ImageTextDataModule):
    """Labelled images: training on class prompts and zero-shot classification (see the module docstring).

    It is an :class:`~pefttune.data.ImageTextDataModule` (same sources, splits, loaders, error policy and
    :meth:`attach_preprocessing` contract; ``pefttune fit`` accepts it as ``data``) whose batches are
    classification batches: the training layout with class prompts as texts, and evaluation batches of
    ``pixel_values``, ``labels`` and ``image_ids`` (one dataloader per class group). The default source is
    the synthetic scenes without held-out compositions (36 classes that occur in every split, so base and new
    classes come from the same distribution).

    Args:
        classes: The class vocabulary; None collects it from the data. Images of other classes are dropped.
        templates: Prompt templates, each with one ``{}``; a class embedding averages its templates.
        underscores_as_spaces: Read ``_`` in class names as spaces in prompts.
        shots: K images per training class (seeded with ``seed``); None keeps every training image.
        split_classes: ``"all"``, ``"base"``, ``"new"`` or ``"base_to_new"`` (see the module docstring).
        synthetic_held_out_fraction: Deprecated: ``Synthetic(held_out_fraction=...)``.
        **kwargs: The arguments of :class:`~pefttune.data.ImageTextDataModule` (``source``, ``val_source``,
            ``test_source``, splits, batch sizes, workers, ``on_error``, ``seed``, ...).
    """

    default_held_out_fraction = 0.0

    def __init__(
        self,
        classes: list[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        underscores_as_spaces: bool = True,
        shots: int | None = None,
        split_classes: SplitClasses = "all",
        synthetic_held_out_fraction: float | None = None,
        **kwargs: Any,
    ) -> None:
        if split_classes not in ("all", "base", "new", "base_to_new"):
            raise ValueError(f"split_classes must be all, base, new or base_to_new; got {split_classes!r}")
        if shots is not None and shots < 1:
            raise ValueError(f"shots must be >= 1 or None, got {shots}")
        if classes is not None and not classes:
            raise ValueError("classes must name at least one class (or be None)")
        check_templates(templates)
        if synthetic_held_out_fraction is not None:
            warnings.warn(
                "ClassificationDataModule: synthetic_held_out_fraction is deprecated; write source: "
                "{class_path: "
                "pefttune.data.sources.Synthetic, init_args: {held_out_fraction: "
                f"{synthetic_held_out_fraction}}}}}",
                FutureWarning,
                stacklevel=2,
            )
            self.default_held_out_fraction = synthetic_held_out_fraction  # read by the default source
        super().__init__(**kwargs)
        self.templates = list(templates)
        self.underscores_as_spaces = underscores_as_spaces
        self.shots = shots
        self.split_classes = split_classes
        self.fixed_classes = sorted(set(classes)) if classes is not None else None
        self.prompt_prefix = ""
        self._labelled: dict[Role, list[ImageCaptionRecord]] = {}
        self._vocabulary: list[str] | None = None
        self._reported_skips = 0

    def legacy_table_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The deprecated form read the label column (default ``label``) as the caption column too."""
        label = options.get("label_column") or "label"
        return {"caption_column": label, "label_column": label}

    # -----------------------------------------------------------------------------------------------------
    # Wiring

    def set_prompt_prefix(self, prefix: str) -> None:
        """Leading template words a strategy's learned text context plays (APEX: ``"a photo"``); "" for none.

        The model calls this at setup, before any dataloader is built.
        """
        self.prompt_prefix = str(prefix or "")

    # -----------------------------------------------------------------------------------------------------
    # Reading

    def _enabled_roles(self) -> list[Role]:
        return [role for role in ("train", "val", "test") if self.split_names[role] is not None]

    def setup(self, stage: str | None = None) -> None:
        """Read every enabled split (the class vocabulary spans them) and check the classes.

        Args:
            stage: Ignored: whatever the stage, all splits are read so that the classes, and so the base/new
                split, are the same in every stage.
        """
        for role in self._enabled_roles():
            self.labelled_records(role)
        vocabulary = self.all_classes
        if self.split_names["train"] is not None:
            self._training_selection()  # fails early when a shot draw is impossible
        for role in ("val", "test"):
            if self.split_names[role] is not None:
                for group in self._groups(role):
                    self._evaluation_selection(role, group)
        new_skips = self.skip_report.total - self._reported_skips
        if new_skips:
            self._reported_skips = self.skip_report.total
            self.skip_report.log(logger, f"ClassificationDataModule (on_error='skip', {new_skips} new)")
        logger.info(
            "ClassificationDataModule: %d classes (%d base, %d new), split_classes=%s, shots=%s",
            len(vocabulary),
            len(self.base_classes),
            len(self.new_classes),
            self.split_classes,
            self.shots,
        )

    def labelled_records(self, role: Role) -> list[ImageCaptionRecord]:
        """The records of a split that have a label in the vocabulary (``classes``, when given).

        Raises:
            DataFormatError: Under ``on_error="raise"``, for an image without a label.
        """
        if role in self._labelled:
            return self._labelled[role]
        policy = ErrorPolicy(self.on_error, self.skip_report)
        kept = []
        dropped = 0
        for record in self.records(role):
            if record.label is None or not str(record.label).strip():
                policy.fail(
                    "missing_key",
                    f"{record.describe()}: no class label (a Table source needs label_column; or use a "
                    "Karpathy file with 'class' keys or an ImageFolder)",
                )
            elif self.fixed_classes is not None and record.label not in self.fixed_classes:
                dropped += 1
            else:
                kept.append(record)
        if dropped:
            logger.info(
                "ClassificationDataModule: %d %s image(s) of classes not in `classes` dropped", dropped, role
            )
        if not kept:
            raise DataFormatError(
                f"{self.sources[role].describe()}: no labelled image in split {self.split_names[role]!r}"
            )
        self._labelled[role] = kept
        return kept

    # -----------------------------------------------------------------------------------------------------
    # Classes

    @property
    def all_classes(self) -> list[str]:
        """The class vocabulary, sorted (see the module docstring)."""
        if self._vocabulary is None:
            if self.fixed_classes is not None:
                self._vocabulary = list(self.fixed_classes)
            elif all(self.sources[role].class_names() is not None for role in self._enabled_roles()):
                names = {
                    name for role in self._enabled_roles() for name in self.sources[role].class_names() or []
                }
                self._vocabulary = sorted(names)
            else:
                labels = {str(r.label) for role in self._enabled_roles() for r in self.labelled_records(role)}
                self._vocabulary = sorted(labels)
        return self._vocabulary

    @property
    def base_classes(self) -> list[str]:
        """The first half of the sorted vocabulary (``ceil(C / 2)`` classes)."""
        return split_base_new(self.all_classes)[0]

    @property
    def new_classes(self) -> list[str]:
        """The second half of the sorted vocabulary."""
        return split_base_new(self.all_classes)[1]

    def _classes_named(self, name: str) -> list[str]:
        return {"all": self.all_classes, "base": self.base_classes, "new": self.new_classes}[name]

    @property
    def training_classes(self) -> list[str]:
        """The classes trained on: base for ``base_to_new``, else those of ``split_classes``."""
        return self._classes_named("base" if self.split_classes == "base_to_new" else self.split_classes)

    def _group_names(self, role: Role) -> list[str]:
        if self.split_classes == "base_to_new":
            return ["base", "new"] if role == "test" else ["base"]
        return [self.split_classes]

    def _groups(self, role: Role) -> list[ClassGroup]:
        groups = []
        for name in self._group_names(role):
            names = self._classes_named(name)
            groups.append(ClassGroup(name, list(names), self.prompts(names)))
        return groups

    def prompts(self, class_names: Sequence[str]) -> list[list[str]]:
        """``prompts[c][t]`` of the given classes with this data module's templates and prompt prefix."""
        return class_prompts(class_names, self.templates, self.prompt_prefix, self.underscores_as_spaces)

    def evaluation_groups(self, stage: str) -> list[ClassGroup]:
        """The class groups an evaluation stage's dataloaders cover, in dataloader order.

        Args:
            stage: ``"validate"`` (or ``"val"``, ``"fit"``), ``"test"`` or ``"predict"``.

        Returns:
            One :class:`ClassGroup` per dataloader (none when the stage's split is disabled).
        """
        if stage not in _STAGE_ROLE:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGE_ROLE)}")
        role = _STAGE_ROLE[stage]
        return self._groups(role) if self.split_names[role] is not None else []

    def class_names(self, role: Role = "test") -> list[str]:
        """The classes trained on (``"train"``) or evaluated on a split, all groups together."""
        if role == "train":
            return list(self.training_classes)
        return [name for group in self._group_names(role) for name in self._classes_named(group)]

    def evaluation_texts(self, stage: str) -> list[str]:
        """Every class prompt an evaluation stage encodes (all groups, class-major)."""
        return [prompt for group in self.evaluation_groups(stage) for prompt in group.flat_prompts]

    def training_texts(self) -> list[str]:
        """The prompts of the training classes (every template), as training tokenizes them.

        APEX builds its bank of frozen training-text embeddings from these.
        """
        return [prompt for prompts in self.prompts(self.training_classes) for prompt in prompts]

    # -----------------------------------------------------------------------------------------------------
    # Selections

    def _training_selection(self) -> tuple[list[ImageCaptionRecord], list[int]]:
        records = self.labelled_records("train")
        classes = self.training_classes
        index = {name: position for position, name in enumerate(classes)}
        if self.shots is not None:
            positions = sample_shots([r.label for r in records], classes, self.shots, self.seed)
        else:
            positions = [i for i, record in enumerate(records) if record.label in index]
        if not positions:
            raise DataFormatError(
                f"{self.sources['train'].describe()}: no training image of the {len(classes)} "
                "training class(es)"
            )
        chosen = [records[i] for i in positions]
        return chosen, [index[str(record.label)] for record in chosen]

    def _evaluation_selection(
        self, role: Role, group: ClassGroup
    ) -> tuple[list[ImageCaptionRecord], list[int]]:
        index = {name: position for position, name in enumerate(group.class_names)}
        chosen = [record for record in self.labelled_records(role) if record.label in index]
        if not chosen:
            raise DataFormatError(
                f"{self.sources[role].describe()}: split {self.split_names[role]!r} has no image of "
                f"the {group.name} "
                f"classes ({len(group.class_names)} classes)"
            )
        return chosen, [index[str(record.label)] for record in chosen]

    def training_records(self) -> list[ImageCaptionRecord]:
        """The training images after the class restriction and the shot draw."""
        return self._training_selection()[0]

    # -----------------------------------------------------------------------------------------------------
    # Dataloaders

    def train_dataloader(self) -> DataLoader:
        """Training batches: images with a prompt of their class (``text_ids`` = class index)."""
        preprocessing = self._require_preprocessing()
        records, labels = self._training_selection()
        dataset = ClassificationTrainDataset(
            records,
            labels,
            self.prompts(self.training_classes),
            transform=preprocessing.train_transform,
            seed=self.seed,
        )
        self._check_enough(len(dataset), self._rank_and_world()[1], self.sources["train"])
        return EpochDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=TrainCollate(preprocessing.tokenize),
            drop_last=self.drop_last,
            epoch_source=self._current_epoch,
            shuffle_seed=self.seed,
            **self._worker_options(),
        )

    def _classification_loaders(self, stage: str) -> list[DataLoader]:
        role = _STAGE_ROLE[stage]
        if self.split_names[role] is None:
            return []  # Lightning runs no loop for an empty list of dataloaders
        preprocessing = self._require_preprocessing()
        loaders = []
        for group in self._groups(role):
            records, labels = self._evaluation_selection(role, group)
            loaders.append(
                DataLoader(
                    ClassificationEvalDataset(records, labels, transform=preprocessing.eval_transform),
                    batch_size=self.eval_batch_size,
                    shuffle=False,
                    collate_fn=classification_collate,
                    drop_last=False,
                    # Not the global generator (see ImageTextDataModule's evaluation loaders).
                    generator=torch.Generator().manual_seed(0),
                    **self._worker_options(),
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        """One evaluation dataloader per validation class group (base only for ``base_to_new``)."""
        return self._classification_loaders("validate")

    def test_dataloader(self) -> list[DataLoader]:
        """One evaluation dataloader per test class group (base, then new, for ``base_to_new``)."""
        return self._classification_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """The test dataloaders (for exporting image embeddings with their labels)."""
        return self._classification_loaders("predict")


__all__ = [
    "DEFAULT_TEMPLATES",
    "ClassGroup",
    "ClassificationDataModule",
    "ClassificationEvalDataset",
    "ClassificationTrainDataset",
    "check_templates",
    "class_prompts",
    "classification_collate",
    "sample_shots",
    "split_base_new",
    "strip_prompt_prefix",
]
