"""WebDataset tar shards: images, frame sequences or encoded clips with their captions.

Sample layout (files with the same key, consecutive in the tar; the extension is everything after the key's
first dot, as in the ``webdataset`` library):

- the visual item, one of: an image ``key.jpg|jpeg|png|webp``; the frames of a clip ``key.000.jpg``,
  ``key.001.jpg``, ... (numbered, any image extension, in time order); or an encoded clip
  ``key.mp4|webm|avi|mkv|mov`` (decoded with PyAV);
- captions: ``key.json`` with a ``captions`` list (or ``caption``: a string or a list), else ``key.txt`` (its
  whole text is one caption); an optional class name as the JSON's ``label`` or ``class``.

The sample key is the item id; keys must be unique across shards (img2dataset and ``webdataset`` writers make
it so). Patterns: brace lists and ranges (``train-{0000..0099}.tar``), several patterns joined by ``::``,
URLs and ``pipe:`` commands, expanded by the ``webdataset`` library.

Evaluation splits are indexed as a whole (:meth:`WebDataset.read`): images of local uncompressed shards stay
on disk as :class:`TarMember` references (a seek and a read when loaded); the library has no random access,
this is the part kept here. Training streams through the ``webdataset`` library's pipeline
(:meth:`WebDataset.training_stream`): shards are dealt to ranks and then to DataLoader workers, shuffled per
epoch, read once per epoch, and samples pass a shuffle buffer. Each sample is seen exactly once per epoch (on
one rank, by one worker).

Epoch length: the schedule needs the number of steps before training. It is counted at setup from the shards
(a pass over the tar headers of local shards, reading only captions), or given as ``samples_per_epoch`` (the
only way for remote shards, where counting would download everything). Each worker yields whole batches; the
few samples of an epoch that do not fill a last batch of a worker are left for that epoch (a different few
each epoch, since the order is reshuffled) and, under DDP, ranks whose shards hold more samples stop at the
smallest rank's number of batches; both are logged with their counts.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pefttune.data.epoch import SharedEpoch
from pefttune.data.records import (
    DataFormatError,
    ErrorPolicy,
    ImageCaptionRecord,
    ImageLoadError,
    ImageSource,
    OnError,
    SkipReport,
    validate_records,
)
from pefttune.data.sources.base import StreamingSource
from pefttune.data.sources.files import decode_utf8, parse_json, string_value

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "webm", "avi", "mkv", "mov")
_FRAME = re.compile(r"(\d+)\.(jpg|jpeg|png|webp)")


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Shard URLs of a pattern (braces, ranges, ``::``), expanded by ``webdataset``; a list is kept as is."""
    from webdataset.shardlists import expand_urls

    if not isinstance(pattern, str):
        return list(pattern)
    try:
        return list(expand_urls(pattern))
    except Exception as err:  # braceexpand raises on unbalanced braces
        raise DataFormatError(f"shard pattern {pattern!r}: {type(err).__name__}: {err}") from None


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file:") :] if url.startswith("file:") else url


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """The local shard paths among ``urls`` that do not exist (remote URLs and ``pipe:`` are not checked)."""
    return [url for url in urls if _is_local(url) and not os.path.isfile(_local_path(url))]


@dataclass(frozen=True)
class TarMember:
    """A lazy reference to a member of an uncompressed local tar shard (picklable for workers).

    Calling it opens the member as an image (an image source); :meth:`read` gives its bytes.

    Attributes:
        shard: Path of the tar file.
        member: Name of the member, for messages.
        offset: Byte offset of the member's data in the file.
        size: Size of the member's data in bytes.
    """

    shard: str
    member: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The member's bytes."""
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise ImageLoadError(f"{self.shard}: member {self.member!r} is truncated")
        return data

    def __call__(self) -> Image.Image:
        """Open the member's bytes as an image (decoded on ``load()``)."""
        return Image.open(io.BytesIO(self.read()))


def _is_plain_tar(path: str) -> bool:
    """Whether the file is an uncompressed tar, whose member offsets can be seeked to later."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    return len(head) == 512 and head[257:262] == b"ustar"


def _split_member_name(name: str) -> tuple[str, str] | None:
    """Split ``dir/key.ext.more`` into (``dir/key``, ``ext.more``) as ``webdataset`` does."""
    directory, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def index_shard(url: str, policy: ErrorPolicy) -> Iterator[tuple[str, dict[str, Any]]]:
    """Read a shard's samples for indexing: ``(key, {extension: bytes or TarMember})``.

    A local uncompressed tar is read in seekable mode: only headers and the small caption members are read,
    media members become :class:`TarMember` references. Other shards (compressed, remote) are read whole.

    Raises:
        DataFormatError: If the shard is missing or unreadable (under ``on_error="skip"`` it is reported as
            ``"bad_sample"`` and the samples read so far are kept).
    """
    path = _local_path(url)
    lazy = _is_local(url) and os.path.isfile(path) and _is_plain_tar(path)
    key: str | None = None
    files: dict[str, Any] = {}
    count = 0
    try:
        with _open_archive(url, path, lazy) as archive:
            for member in archive:
                parts = _split_member_name(member.name) if member.isfile() else None
                if parts is None:
                    continue  # directories and files outside the key.ext convention carry no sample
                member_key, extension = parts
                if member_key != key:
                    if key is not None:
                        count += 1
                        yield key, files
                    key, files = member_key, {}
                if lazy and _is_media(extension):
                    files[extension] = TarMember(path, member.name, member.offset_data, member.size)
                else:
                    extracted = archive.extractfile(member)
                    files[extension] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, DataFormatError):
            raise
        message = f"{url}: not a readable tar shard after {count} sample(s): {type(err).__name__}: {err}"
        policy.fail("bad_sample", message)
        return
    if key is not None:
        yield key, files


def _open_archive(url: str, path: str, lazy: bool) -> tarfile.TarFile:
    """A local plain tar in seekable mode (headers only), anything else as a stream."""
    if lazy:
        return tarfile.open(path, mode="r:")
    if _is_local(url):
        if not os.path.isfile(path):
            raise DataFormatError(f"WebDataset shard not found: {url}")
        return tarfile.open(path, mode="r:*")
    import webdataset

    return tarfile.open(fileobj=webdataset.gopen(url, "rb"), mode="r|*")


def _is_media(extension: str) -> bool:
    return extension in IMAGE_EXTENSIONS or extension in VIDEO_EXTENSIONS or bool(_FRAME.fullmatch(extension))


def _bytes_of(value: Any) -> bytes:
    return value.read() if isinstance(value, TarMember) else value


def sample_to_record(
    url: str, key: str, files: dict[str, Any], *, split: str, policy: ErrorPolicy
) -> ImageCaptionRecord | None:
    """Turn one sample into a record (image, frame list or encoded clip), or report it and return None.

    Args:
        url: The shard, for messages.
        key: The sample key (the item id).
        files: ``{extension: bytes or TarMember}``.
        split: Split of the record.
        policy: Error policy.

    Returns:
        The record (captions not yet validated), or None if the sample was skipped.
    """
    from pefttune.data.video import EncodedVideo, FrameListVideo

    where = f"{url}, sample {key!r}"
    frames = sorted(
        ((int(match.group(1)), value) for ext, value in files.items() if (match := _FRAME.fullmatch(ext))),
        key=lambda pair: pair[0],
    )
    visual: ImageSource | None
    if frames:
        visual = FrameListVideo([value for _, value in frames], name=where)
    elif video := next((ext for ext in VIDEO_EXTENSIONS if ext in files), None):
        visual = EncodedVideo(files[video], name=f"{where} .{video}")
    else:
        visual = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    if visual is None:
        found = ", ".join(f".{ext}" for ext in sorted(files)) or "nothing"
        policy.fail(
            "bad_sample",
            f"{where}: no image, frames or video (expected .jpg/.jpeg/.png/.webp, numbered frames .000.jpg "
            f"..., or .mp4/.webm/.avi/.mkv/.mov; found {found})",
        )
        return None
    captions: list[Any] = []
    label = None
    try:
        if "json" in files:
            meta = parse_json(decode_utf8(_bytes_of(files["json"]), f"{where} .json"), f"{where} .json")
            if isinstance(meta, dict):
                found_captions = meta.get("captions", meta.get("caption"))
                if found_captions is not None:
                    captions = found_captions if isinstance(found_captions, list) else [found_captions]
                label = string_value(meta.get("label", meta.get("class")))
        if not captions and "txt" in files:
            captions = [decode_utf8(_bytes_of(files["txt"]), f"{where} .txt")]
    except DataFormatError as err:
        policy.fail("bad_sample", str(err))
        return None
    if not captions:
        policy.fail(
            "no_captions",
            f"{where}: no caption (expected .txt, or .json with a 'captions' list or 'caption')",
        )
        return None
    return ImageCaptionRecord(
        image_id=key, image=visual, captions=captions, split=split, label=label, origin=where
    )


def sample_to_valid_record(
    url: str, key: str, files: dict[str, Any], *, split: str, policy: ErrorPolicy
) -> ImageCaptionRecord | None:
    """:func:`sample_to_record`, then the record's captions validated (skips reported through ``policy``).

    Counting the training items and streaming them must keep exactly the same samples, so both call this.

    Returns:
        The valid record, or None if the sample or all its captions were skipped.
    """
    record = sample_to_record(url, key, files, split=split, policy=policy)
    valid = validate_records(
        [record] if record is not None else [],
        source=url,
        on_error=policy.on_error,
        report=policy.report,
        check_files=False,
    )
    return valid[0] if valid else None


class WebDataset(StreamingSource):
    """WebDataset tar shards (see the module docstring for the sample layout, streaming and epoch length).

    A shard set holds one split: its records get the split they are read for (give evaluation shards as
    ``val_source`` / ``test_source``).

    Args:
        urls: Shard pattern (``"train-{0000..0099}.tar"``, several joined by ``::``) or a list of URLs.
        streaming: Stream the training split through the ``webdataset`` pipeline (default). False indexes it
            like an evaluation split and trains map-style (exact mid-epoch resume, any shuffle), which needs
            local uncompressed shards to stay cheap.
        samples_per_epoch: Training items (samples, or pairs with ``captions_per_image="all"``) per epoch over
            all ranks; None counts them at setup (local shards only). Set it for remote shards.
        shuffle_buffer: Size of the streaming shuffle buffer (items); 0 or 1 disables it.
    """

    check_files = False  # media are tar members, checked when the shards are read

    def __init__(
        self,
        urls: str | list[str],
        streaming: bool = True,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.urls = urls
        self.streaming = streaming
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self._counts: dict[tuple[str, str], list[int]] = {}

    def describe(self) -> str:
        """The shard pattern."""
        return self.urls if isinstance(self.urls, str) else "::".join(self.urls)

    def shard_urls(self) -> list[str]:
        """The expanded shard URLs; local shards must exist.

        Raises:
            DataFormatError: If the pattern is empty or local shards are missing (the first five are named).
        """
        urls = expand_shards(self.urls)
        if not urls:
            raise DataFormatError(f"no shards in {self.describe()!r}")
        missing = missing_local_shards(urls)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DataFormatError(
                f"{self.describe()}: {len(missing)} of {len(urls)} shard(s) not found: {shown}"
            )
        return urls

    def read(self, split: str, policy: ErrorPolicy) -> list[ImageCaptionRecord]:
        """Index every shard into records, in shard order (media of local plain tars stay on disk)."""
        records: list[ImageCaptionRecord] = []
        for url in self.shard_urls():
            for key, files in index_shard(url, policy):
                record = sample_to_record(url, key, files, split=split, policy=policy)
                if record is not None:
                    records.append(record)
        return records

    # -----------------------------------------------------------------------------------------------------
    # Streaming

    def count(self, split: str, policy: ErrorPolicy, captions_per_image: str) -> list[list[int]]:
        """Training items of each sample of each shard (0 for an unusable one), counted once.

        Problems go through ``policy`` here, once; the stream then passes over the same samples silently.

        Raises:
            DataFormatError: For remote shards (counting would download them): set ``samples_per_epoch``.
        """
        key = (split, captions_per_image)
        if key not in self._counts:
            urls = self.shard_urls()
            remote = [url for url in urls if not _is_local(url)]
            if remote:
                raise DataFormatError(
                    f"{self.describe()}: the number of training steps per epoch is needed before "
                    "training, and "
                    f"counting the samples of remote shards ({remote[0]}, ...) would download them: set "
                    "samples_per_epoch on the WebDataset source"
                )
            counts = []
            for url in urls:
                shard = []
                for sample_key, files in index_shard(url, policy):
                    record = sample_to_valid_record(url, sample_key, files, split=split, policy=policy)
                    shard.append(
                        0 if record is None else len(record.captions) if captions_per_image == "all" else 1
                    )
                counts.append(shard)
            self._counts[key] = counts
        return self._counts[key]

    def prepare_stream(self, split: str, policy: ErrorPolicy, captions_per_image: str) -> None:
        """Check that local shards exist and, without ``samples_per_epoch``, count the training items."""
        self.shard_urls()
        if self.samples_per_epoch is None:
            self.count(split, policy, captions_per_image)

    def training_stream(self, **options: Any) -> IterableDataset:
        """A :class:`WebDatasetStream` over these shards (see :meth:`StreamingSource.training_stream`)."""
        return WebDatasetStream(self, **options)


def _worker_items(shards: Sequence[Sequence[int]], readers: int) -> list[int]:
    """Items each of ``readers`` workers gets from one rank's shards (see :class:`WebDatasetStream`)."""
    if len(shards) >= readers:
        return [sum(map(sum, shards[w::readers])) for w in range(readers)]
    samples = [items for shard in shards for items in shard]
    return [sum(samples[w::readers]) for w in range(readers)]


class WebDatasetStream(SharedEpoch, IterableDataset):
    """Training items streamed from shards through the ``webdataset`` pipeline (one pass per epoch).

    Pipeline per DataLoader worker: the shard list (:class:`webdataset.SimpleShardList`) -> this rank's shards
    (every ``world_size``-th) -> this worker's shards (:func:`webdataset.split_by_worker`) -> shuffled with
    ``(seed, epoch)`` -> :func:`webdataset.tarfile_to_samples` -> records -> (record, caption) pairs ->
    :func:`webdataset.shuffle` buffer seeded with ``(seed, epoch, rank, worker)`` -> loaded items. Ranks get
    their shards before the shuffle so that each rank's share, and so the number of batches, is the same every
    epoch.

    Items are those of :class:`~pefttune.data.datasets.PairDataset`, with hashed ids
    (:func:`~pefttune.data.datasets.stable_id` of the key, of ``(key, caption position)`` and of the caption).

    Args:
        source: The :class:`WebDataset` source.
        split: Split name given to the records.
        captions_per_image: ``"all"`` (one item per caption) or ``"sample"`` (one random caption per item).
        load_item: Loads a record's image (or frames) and transforms it: ``load_item(record, rng) -> dict``.
        seed: Seed of the shard order, the buffer and the caption draw.
        batch_size: The DataLoader's batch size (workers yield whole batches).
        drop_last: Whether a last partial batch is dropped (single worker only; several workers always yield
            whole batches).
        num_workers: The DataLoader's workers (the length depends on how shards are dealt to them).
        on_error: ``"skip"`` drops and counts bad samples and undecodable images; ``"raise"`` raises.
        rank: This process's rank.
        world_size: Number of ranks.
        max_items: Cap on the items per epoch over all ranks (quick runs).
        report: Where problems found while counting at setup are recorded.
    """

    def __init__(
        self,
        source: WebDataset,
        *,
        split: str,
        captions_per_image: str,
        load_item: Callable[[ImageCaptionRecord, np.random.Generator], dict[str, Any]],
        seed: int = 0,
        batch_size: int = 1,
        drop_last: bool = True,
        num_workers: int = 0,
        on_error: OnError = "raise",
        rank: int = 0,
        world_size: int = 1,
        max_items: int | None = None,
        report: SkipReport | None = None,
    ) -> None:
        if captions_per_image not in ("all", "sample"):
            raise ValueError(f"captions_per_image must be 'all' or 'sample', got {captions_per_image!r}")
        self.source = source
        self.urls = source.shard_urls()
        self.split = split
        self.captions_per_image = captions_per_image
        self.load_item = load_item
        self.seed = seed
        self.batch_size = max(1, batch_size)
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.on_error = on_error
        self.rank = rank
        self.world_size = max(1, world_size)
        self.quotas = self._quotas(report if report is not None else SkipReport(), max_items)
        self._init_shared_epoch()  # seeds shard order, shuffle buffer and caption draw

    def _quotas(self, report: SkipReport, max_items: int | None) -> list[int]:
        """Items each worker of this rank yields per epoch; the same number of batches on every rank.

        Workers yield whole batches (so ``len(loader)`` is exact whatever ``drop_last``), except a single
        worker with ``drop_last=False``, which yields all of its rank's items.
        """
        readers, size = max(1, self.num_workers), self.batch_size
        if self.source.samples_per_epoch is not None:
            total = self.source.samples_per_epoch
            if max_items is not None:
                total = min(total, max_items)
            per_rank = total // self.world_size // size
            return [
                (per_rank // readers + (1 if w < per_rank % readers else 0)) * size for w in range(readers)
            ]
        counts = self.source.count(self.split, ErrorPolicy(self.on_error, report), self.captions_per_image)
        ranks = [
            [items // size for items in _worker_items(counts[r :: self.world_size], readers)]
            for r in range(self.world_size)
        ]
        target = min(sum(batches) for batches in ranks)
        if max_items is not None:
            target = min(target, max_items // self.world_size // size)
        mine = list(ranks[self.rank])
        while sum(mine) > target:  # trim the largest workers first, deterministically
            mine[int(np.argmax(mine))] -= 1
        items = sum(map(sum, counts[self.rank :: self.world_size]))
        if readers == 1 and not self.drop_last and self.world_size == 1 and max_items is None:
            return [items]
        left = items - sum(mine) * size
        if left:
            logger.info(
                "%s: rank %d streams %d of its %d training items per epoch in whole batches of %d; "
                "%d are left "
                "for the epoch (partial batches per worker, ranks kept equal or max_train_samples)",
                self.source.describe(),
                self.rank,
                sum(mine) * size,
                items,
                size,
                left,
            )
        if target == 0:
            raise DataFormatError(
                f"{self.source.describe()}: {items} training item(s) on rank {self.rank} make no batch of "
                f"{size} with {readers} worker(s); lower batch_size or num_workers"
            )
        return [batches * size for batches in mine]

    def __len__(self) -> int:
        return sum(self.quotas)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.quotas):
            raise RuntimeError(
                f"WebDatasetStream was sized for {len(self.quotas)} worker(s) but runs in {workers}; "
                "build it "
                "with the DataLoader's num_workers"
            )
        quota = self.quotas[worker]
        if quota <= 0:
            return
        epoch = self.epoch
        policy = ErrorPolicy(self.on_error, SkipReport())
        rank, world = self.rank, self.world_size

        def by_rank(shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for index, shard in enumerate(shards):
                if index % world == rank:
                    yield shard

        def on_shard_error(err: Exception) -> bool:
            policy.fail("bad_sample", f"{self.source.describe()}: {type(err).__name__}: {err}")
            return True

        # Workers share the rank's shards (split_by_worker); with fewer shards than workers they share its
        # samples instead (every workers-th sample, in the shards' fixed order), so that no worker idles.
        by_shard = len(self.urls[rank::world]) >= workers

        def one_pass(pass_index: int) -> Iterator[tuple[ImageCaptionRecord, int]]:
            """One pass over this worker's shards: shuffled shards, samples, pairs, shuffle buffer."""
            tag = f"{self.seed}/{epoch}/{pass_index}/{rank}/{worker}"

            def shuffled_shards(shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
                listed = list(shards)
                if by_shard:
                    random.Random(f"shards/{tag}").shuffle(listed)
                yield from listed

            def by_sample(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
                for index, sample in enumerate(samples):
                    if by_shard or index % workers == worker:
                        yield sample

            def records(samples: Iterator[dict[str, Any]]) -> Iterator[tuple[ImageCaptionRecord, int]]:
                rng = random.Random(f"captions/{tag}")
                for sample in samples:
                    url, key = sample.get("__url__", "?"), sample["__key__"]
                    files = {ext: value for ext, value in sample.items() if not ext.startswith("__")}
                    record = sample_to_valid_record(url, key, files, split=self.split, policy=policy)
                    if record is None:
                        continue
                    count = len(record.captions)
                    chosen = range(count) if self.captions_per_image == "all" else [rng.randrange(count)]
                    for position in chosen:
                        yield record, position

            buffer = max(1, self.shuffle_buffer)
            return iter(
                wds.DataPipeline(
                    wds.SimpleShardList(self.urls),
                    by_rank,
                    *([wds.split_by_worker] if by_shard else []),
                    shuffled_shards,
                    wds.tarfile_to_samples(
                        handler=on_shard_error if policy.skipping else wds.reraise_exception
                    ),
                    by_sample,
                    records,
                    wds.shuffle(buffer, initial=buffer, rng=random.Random(f"buffer/{tag}")),
                )
            )

        load_rng = np.random.default_rng([self.seed, epoch, rank, worker])
        count = 0
        try:
            # One pass covers each of the worker's items once. Only a samples_per_epoch larger than the
            # worker's share (remote shards, whose counts are unknown) needs further passes, reshuffled.
            for pass_index in itertools.count():
                before = count
                for record, position in one_pass(pass_index):
                    try:
                        item = self.load_item(record, load_rng)
                    except ImageLoadError as err:
                        policy.fail("unreadable_image", str(err), ImageLoadError)
                        continue
                    yield _pair_item(item, record, position)
                    count += 1
                    if count >= quota:
                        return
                if count == before:
                    raise DataFormatError(
                        f"{self.source.describe()}: rank {rank} worker {worker} found no usable "
                        "sample in its "
                        "shards"
                    )
                if self.source.samples_per_epoch is None:
                    return
                logger.info(
                    "%s: rank %d worker %d starts pass %d to reach samples_per_epoch",
                    self.source.describe(),
                    rank,
                    worker,
                    pass_index + 1,
                )
        finally:
            policy.report.log(logger, f"WebDataset stream rank {rank} worker {worker} epoch {epoch}")

    @property
    def shuffle_buffer(self) -> int:
        """The source's shuffle buffer size."""
        return self.source.shuffle_buffer


def _pair_item(item: dict[str, Any], record: ImageCaptionRecord, position: int) -> dict[str, Any]:
    from pefttune.data.datasets import stable_id
    from pefttune.data.records import normalize_caption

    caption = record.captions[position]
    return item | {
        "caption": caption,
        "image_id": stable_id(record.image_id),
        "caption_id": stable_id(f"{record.image_id}\x00{position}"),
        "text_id": stable_id(normalize_caption(caption)),
    }
