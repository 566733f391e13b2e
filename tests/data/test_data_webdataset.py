"""Training on WebDataset shards through the ``webdataset`` pipeline (issue 16 point 5, issue 17)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from data_fixtures import WhitespaceTokenizer, jpeg_bytes, to_tensor_8px, write_shards, write_tar
from torch.utils.data import DataLoader

from pefttune.data.datamodule import ImageTextDataModule
from pefttune.data.datasets import ItemLoader, TrainCollate, stable_id
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.records import DataFormatError, ImageLoadError, SkipReport
from pefttune.data.sources import WebDataset


def make_stream(pattern: str, **options):
    source_options = {
        key: options.pop(key) for key in ("samples_per_epoch", "shuffle_buffer") if key in options
    }
    defaults = {"split": "train", "captions_per_image": "all", "load_item": ItemLoader(to_tensor_8px)}
    return WebDataset(pattern, **source_options).training_stream(**(defaults | options))


def stream_pairs(stream, num_workers: int = 0, batch_size: int = 1) -> list[tuple[int, int]]:
    loader = DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=TrainCollate(WhitespaceTokenizer())
    )
    return [
        (int(i), int(c))
        for batch in loader
        for i, c in zip(batch["image_ids"], batch["caption_ids"], strict=True)
    ]


def all_pairs(keys: list[str], captions: int) -> list[tuple[int, int]]:
    return sorted((stable_id(k), stable_id(f"{k}\x00{j}")) for k in keys for j in range(captions))


def test_stream_reads_every_pair_once_and_knows_its_length(tmp_path):
    keys = write_shards(tmp_path, num_shards=2, per_shard=3, captions=2)
    stream = make_stream(str(tmp_path / "shard-{000..001}.tar"), shuffle_buffer=4, drop_last=False)
    assert len(stream) == 12  # counted at construction from the shards: 6 samples x 2 captions
    assert sorted(stream_pairs(stream)) == all_pairs(keys, 2)


@pytest.mark.parametrize(
    ("num_shards", "world_size", "num_workers"), [(4, 2, 0), (4, 2, 2), (2, 2, 2), (3, 1, 2)]
)
def test_stream_splits_by_rank_and_worker_each_pair_at_most_once(
    tmp_path, num_shards, world_size, num_workers
):
    keys = write_shards(tmp_path, num_shards=num_shards, per_shard=3, captions=2)
    pattern = str(tmp_path / f"shard-{{000..{num_shards - 1:03d}}}.tar")
    per_rank = []
    for rank in range(world_size):
        stream = make_stream(pattern, rank=rank, world_size=world_size, seed=5, num_workers=num_workers)
        stream.set_epoch(1)
        per_rank.append(stream_pairs(stream, num_workers=num_workers))
        assert len(per_rank[-1]) == len(stream)
    combined = [pair for pairs in per_rank for pair in pairs]
    assert len(combined) == len(set(combined))  # no pair twice, over ranks and workers
    assert set(combined) <= set(all_pairs(keys, 2))
    assert len({len(pairs) for pairs in per_rank}) == 1  # equal batches per rank (DDP)


def test_an_epoch_covers_each_sample_once_without_duplicates_in_a_batch(tmp_path):
    """Issue 16.5: 24 samples in 3 shards, batch 8, one caption per image per epoch: 24 distinct images."""
    keys = write_shards(tmp_path, num_shards=3, per_shard=8, captions=5)
    stream = make_stream(
        str(tmp_path / "shard-{000..002}.tar"), captions_per_image="sample", batch_size=8, shuffle_buffer=16
    )
    assert len(stream) == 24
    for epoch in range(2):
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=8, collate_fn=TrainCollate(WhitespaceTokenizer()))
        batches = [batch["image_ids"].tolist() for batch in loader]
        assert len(batches) == 3
        assert all(len(set(ids)) == len(ids) for ids in batches)  # no duplicate image inside a batch
        assert sorted(i for ids in batches for i in ids) == sorted(stable_id(k) for k in keys)


def test_given_samples_per_epoch_equal_to_the_data_covers_each_sample_once(tmp_path):
    """Issue 16.5 as reported: samples_per_epoch=24 over 24 samples gave 14 distinct images."""
    keys = write_shards(tmp_path, num_shards=2, per_shard=12, captions=5)
    stream = make_stream(
        str(tmp_path / "shard-{000..001}.tar"),
        samples_per_epoch=24,
        captions_per_image="sample",
        batch_size=8,
    )
    ids = [
        int(i)
        for batch in DataLoader(stream, batch_size=8, collate_fn=TrainCollate(WhitespaceTokenizer()))
        for i in batch["image_ids"]
    ]
    assert sorted(ids) == sorted(stable_id(k) for k in keys)


def test_stream_epoch_changes_order_and_caption_draw(tmp_path):
    write_shards(tmp_path, num_shards=2, per_shard=4, captions=3)
    stream = make_stream(
        str(tmp_path / "shard-{000..001}.tar"), captions_per_image="sample", shuffle_buffer=8
    )
    stream.set_epoch(0)
    first = stream_pairs(stream)
    stream.set_epoch(1)
    second = stream_pairs(stream)
    assert len(first) == len(second) == 8  # one caption per image
    assert first != second
    stream.set_epoch(0)
    assert stream_pairs(stream) == first  # reproducible


def test_samples_per_epoch_gives_equal_whole_batches_per_rank(tmp_path):
    write_shards(tmp_path, num_shards=3, per_shard=3, captions=1)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    for rank in range(2):
        stream = make_stream(
            pattern,
            samples_per_epoch=8,
            batch_size=2,
            rank=rank,
            world_size=2,
            shuffle_buffer=0,
            num_workers=2,
        )
        assert len(stream) == 4  # 8 // 2 = 4 per rank, 2 whole batches
        loader = DataLoader(
            stream,
            batch_size=2,
            num_workers=2,
            drop_last=True,
            collate_fn=TrainCollate(WhitespaceTokenizer()),
        )
        assert len(loader) == 2 and sum(1 for _ in loader) == 2  # a short worker starts another pass


def test_one_bad_sample_is_counted_once(tmp_path, caplog):
    """Issue 16.5: one undecodable image was reported as 93 skipped items; it is one per epoch."""
    write_tar(
        tmp_path / "mixed.tar",
        [
            ("good.jpg", jpeg_bytes()),
            ("good.txt", b"fine"),
            ("bad.jpg", b"not a jpeg"),
            ("bad.txt", b"broken"),
        ],
    )
    stream = make_stream(str(tmp_path / "mixed.tar"), on_error="skip", drop_last=False)
    with caplog.at_level(logging.WARNING):
        got = stream_pairs(stream)
    assert got == [(stable_id("good"), stable_id("good\x000"))]
    assert "unreadable_image (record dropped: image cannot be opened or decoded): 1" in caplog.text
    strict = make_stream(str(tmp_path / "mixed.tar"), drop_last=False)
    with pytest.raises(ImageLoadError, match=r"mixed\.tar, sample 'bad'"):
        stream_pairs(strict)


def test_sample_without_caption_is_counted_once_at_setup(tmp_path):
    write_tar(
        tmp_path / "nocap.tar",
        [
            ("a.jpg", jpeg_bytes()),
            ("a.txt", b"one"),
            ("b.jpg", jpeg_bytes()),
            ("c.jpg", jpeg_bytes()),
            ("c.txt", b"x"),
        ],
    )
    report = SkipReport()
    stream = make_stream(str(tmp_path / "nocap.tar"), on_error="skip", drop_last=False, report=report)
    assert len(stream) == 2 and report.counts == {"no_captions": 1}
    stream_pairs(stream)
    stream_pairs(stream)
    assert report.counts == {"no_captions": 1}  # not counted again per epoch
    with pytest.raises(DataFormatError, match=r"nocap\.tar, sample 'b': no caption"):
        make_stream(str(tmp_path / "nocap.tar"))


def test_remote_shards_need_samples_per_epoch():
    with pytest.raises(DataFormatError, match="set samples_per_epoch on the WebDataset source"):
        make_stream("https://example.invalid/shard-{000..001}.tar")


def test_fit_on_shards_knows_the_number_of_steps(tmp_path):
    """Issue 16.5: without samples_per_epoch fit failed ("WarmupCosine needs a positive number of steps")."""
    write_shards(tmp_path / "train", num_shards=2, per_shard=6, captions=2)
    write_shards(tmp_path / "val", num_shards=1, per_shard=4, captions=2)
    preprocessing = Preprocessing(to_tensor_8px, to_tensor_8px, WhitespaceTokenizer())
    dm = ImageTextDataModule(
        source=WebDataset(str(tmp_path / "train" / "shard-{000..001}.tar")),
        val_source=WebDataset(str(tmp_path / "val" / "shard-000.tar")),
        test_split=None,
        batch_size=4,
        captions_per_image="sample",
    )
    dm.setup("fit")
    dm.attach_preprocessing(preprocessing)
    loader = dm.train_dataloader()
    assert len(loader) == 3  # 12 images, one caption each, batches of 4
    assert sum(1 for _ in loader) == 3
    assert len(dm.records("val")) == 4
    with pytest.raises(RuntimeError, match="streams from"):
        dm.records("train")


def test_streaming_false_indexes_training_shards(tmp_path):
    keys = write_shards(tmp_path, num_shards=2, per_shard=3, captions=2)
    dm = ImageTextDataModule(
        source=WebDataset(str(tmp_path / "shard-{000..001}.tar"), streaming=False),
        val_split=None,
        test_split=None,
        batch_size=2,
    )
    dm.setup("fit")
    assert [r.image_id for r in dm.records("train")] == keys
    assert Counter(len(r.captions) for r in dm.records("train")) == {2: 6}
