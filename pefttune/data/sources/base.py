"""What a data source is: the base class every format implements.

A *source* reads one data set in one format into :class:`~pefttune.data.records.ImageCaptionRecord` lists (one
record per image or video, with all of its captions). It is chosen in a config by its class path::

    data:
      class_path: pefttune.data.ImageTextDataModule
      init_args:
        source:
          class_path: pefttune.data.sources.Karpathy
          init_args: {path: data/coco/dataset_coco.json, image_root: data/coco}

Adding a format is one subclass of :class:`Source` implementing :meth:`Source.read` and
:meth:`Source.describe`. Validation (ids, captions, existing files), split selection, duplicates, limits
and loading are the data module's, the same for every source. A source that can also stream its training
split (WebDataset shards) derives from :class:`StreamingSource`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from pefttune.data.records import ErrorPolicy, ImageCaptionRecord, validate_records

if TYPE_CHECKING:
    from torch.utils.data import IterableDataset


class Source(ABC):
    """A data set in one format.

    Subclasses implement :meth:`read` (raw records; problems go through the given
    :class:`~pefttune.data.records.ErrorPolicy`) and :meth:`describe`. :meth:`records` adds the common
    validation and is what the data module calls.

    Attributes:
        check_files: Whether validation checks that image paths exist (one ``stat`` each). Sources whose
            images are not files (generated, in tar shards) ignore it.
    """

    check_files: bool = True

    @abstractmethod
    def read(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """Every record of the source, not yet validated.

        Args:
            split: The split given to records whose format names none (a COCO file, a folder, a table without
                a split column): the data module passes the training split's name for its ``source`` and the
                evaluated split's name for a separate ``val_source``/``test_source``. Formats that carry their
                own split field (Karpathy JSON, a table with a split column, generated data) may ignore it.
            policy: Raise, or count and skip, each bad record or caption (``policy.fail(reason, message)``,
                the message naming the file, the record and what was expected).

        Returns:
            The records of all splits the source holds, in a stable order.
        """

    @abstractmethod
    def describe(self) -> str:
        """A short name of the source for messages: its file, folder or shard pattern."""

    def records(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """:meth:`read`, then the common validation (non-empty ids and captions, unique ids, existing files).

        Args:
            split: See :meth:`read`.
            policy: The error policy; skipped items are counted in ``policy.report``.

        Returns:
            The valid records, captions stripped.
        """
        return validate_records(
            self.read(split, policy),
            source=self.describe(),
            on_error=policy.on_error,
            report=policy.report,
            check_files=self.check_files,
        )

    def class_names(self) -> list[str] | None:
        """A fixed class vocabulary if the source defines one (generated data); None: the labels found."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class StreamingSource(Source):
    """A source that can also stream its training split instead of listing it (WebDataset shards).

    The data module calls :meth:`training_stream` for the training split when :attr:`streaming` is True, and
    :meth:`Source.records` for everything else (evaluation splits are indexed as a whole). The stream's
    ``len()`` is its number of items per epoch on this rank (the schedule needs the number of steps).
    """

    streaming: bool = True

    def prepare_stream(self, split: str, policy: ErrorPolicy, captions_per_image: str) -> None:
        """Check (and, where needed, count) the training split at setup, so problems show before training."""

    @abstractmethod
    def training_stream(self, **options: Any) -> IterableDataset:
        """An iterable dataset of training items (see :class:`~pefttune.data.datasets.PairDataset` items).

        Args:
            **options: What the data module hands over: ``split``, ``captions_per_image``, ``transform``,
                ``seed``, ``batch_size``, ``drop_last``, ``num_workers``, ``on_error``, ``rank``,
                ``world_size``, ``max_items``, ``load_item`` (loads and transforms a record's image or
                frames).
        """


__all__ = ["Source", "StreamingSource"]
