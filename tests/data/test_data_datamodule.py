from __future__ import annotations

import json
import logging

import pytest
import torch
from data_fixtures import karpathy_entry, write_image, write_karpathy, write_shards
from lightning.pytorch import LightningModule, Trainer

from pefttune.data.datamodule import ImageTextDataModule
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.records import DataFormatError, ImageLoadError
from pefttune.data.sources import Coco, Karpathy, Synthetic, WebDataset

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


def small_synthetic(**options) -> ImageTextDataModule:
    defaults = {"source": Synthetic(num_train=24, num_val=6, num_test=10), "batch_size": 8}
    return ImageTextDataModule(**{**defaults, **options})


def test_synthetic_default_end_to_end(preprocessing):
    dm = small_synthetic(eval_batch_size=4)
    dm.setup("fit")
    dm.attach_preprocessing(preprocessing)
    train = dm.train_dataloader()
    assert len(train) == 24 * 5 // 8
    batch = next(iter(train))
    assert set(batch) == TRAIN_KEYS and batch["pixel_values"].shape == (8, 3, 8, 8)
    val = list(dm.val_dataloader())
    assert [b["pixel_values"].shape[0] for b in val] == [4, 2]
    assert set(val[0]) == EVAL_KEYS and val[0]["input_ids"].shape[0] == 20
    assert torch.cat([b["image_ids"] for b in val]).tolist() == list(range(6))
    dm.setup("test")
    test = list(dm.test_dataloader())
    assert sum(b["pixel_values"].shape[0] for b in test) == 10
    assert sum(b["pixel_values"].shape[0] for b in dm.predict_dataloader()) == 10
    assert len(dm.class_names()) == 42
    assert dm.skip_report.total == 0


def test_dataloaders_require_preprocessing():
    dm = small_synthetic()
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"must call datamodule\.attach_preprocessing"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match="no preprocessing"):
        dm.val_dataloader()
    with pytest.raises(TypeError, match="expected a Preprocessing"):
        dm.attach_preprocessing(object())  # type: ignore[arg-type]


def test_limits_for_quick_runs(preprocessing):
    dm = small_synthetic(max_train_samples=16, max_eval_images=3)
    dm.attach_preprocessing(preprocessing)
    dm.setup()
    assert len(dm.train_dataloader()) == 2
    assert len(dm.records("val")) == 3 and len(dm.records("test")) == 3


def test_too_few_training_items_for_a_full_batch(preprocessing):
    dm = small_synthetic(source=Synthetic(num_train=2), captions_per_image="sample", batch_size=8)
    dm.attach_preprocessing(preprocessing)
    with pytest.raises(DataFormatError, match=r"2 items .* fewer than batch_size=8 with drop_last=True"):
        dm.train_dataloader()


def karpathy_source(tmp_path, bad: bool = False) -> Karpathy:
    images = [
        karpathy_entry(f"{i}.jpg", split, [f"caption {i}", f"another {i}"], **{"class": f"c{i % 2}"})
        for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2)
    ]
    if bad:
        images[1]["sentences"] = [{"raw": "  "}]  # a record with no usable caption
        images.append({"filename": "9.jpg", "sentences": [{"raw": "x"}]})  # no split key
    return Karpathy(str(write_karpathy(tmp_path / "dataset.json", images, image_dir=tmp_path)))


def test_karpathy_source_serves_all_splits(tmp_path, preprocessing):
    dm = ImageTextDataModule(source=karpathy_source(tmp_path), batch_size=2)
    dm.attach_preprocessing(preprocessing)
    dm.setup()
    assert [len(dm.records(role)) for role in ("train", "val", "test")] == [4, 2, 2]
    assert len(dm.train_dataloader()) == 4
    assert dm.class_names("test") == ["c0", "c1"]


def test_skip_report_is_aggregated_and_logged_at_setup(tmp_path, preprocessing, caplog):
    source = karpathy_source(tmp_path, bad=True)
    with pytest.raises(DataFormatError, match=r"images\[8\] \(image id '9\.jpg'\): missing key 'split'"):
        ImageTextDataModule(source=source, batch_size=2).setup("fit")
    dm = ImageTextDataModule(source=source, batch_size=2, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="pefttune.data.datamodule"):
        dm.setup("fit")
    assert dm.skip_report.counts == {"empty_caption": 1, "no_captions": 1, "missing_key": 1}
    assert "ImageTextDataModule" in caplog.text and "missing_key" in caplog.text
    assert len(dm.records("train")) == 3


def test_per_split_files_and_missing_split_hint(tmp_path, preprocessing):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        write_image(tmp_path / name)
    train = tmp_path / "captions_train.json"
    train.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
                "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"}],
            }
        )
    )
    val = tmp_path / "captions_val.json"
    val.write_text(
        json.dumps(
            {"images": [{"id": 3, "file_name": "3.jpg"}], "annotations": [{"image_id": 3, "caption": "x"}]}
        )
    )
    dm = ImageTextDataModule(
        source=Coco(str(train)), val_source=Coco(str(val)), test_split=None, batch_size=2
    )
    dm.attach_preprocessing(preprocessing)
    dm.setup()
    assert [r.image_id for r in dm.records("val")] == ["3"]
    assert dm.test_dataloader() == []
    missing = ImageTextDataModule(source=Coco(str(train)), batch_size=2)
    with pytest.raises(
        DataFormatError, match=r"split 'val' has no images; available splits: 'train' .*set val_source"
    ):
        missing.setup("fit")


def test_webdataset_training_streams_and_evaluation_indexes(tmp_path, preprocessing):
    write_shards(tmp_path / "train", num_shards=2, per_shard=4, captions=2)
    write_shards(tmp_path / "val", num_shards=1, per_shard=3, captions=2)
    dm = ImageTextDataModule(
        source=WebDataset(str(tmp_path / "train" / "shard-{000..001}.tar"), samples_per_epoch=12),
        val_source=WebDataset(str(tmp_path / "val" / "shard-000.tar")),
        test_split=None,
        batch_size=4,
    )
    dm.attach_preprocessing(preprocessing)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 3
    batches = list(train)
    assert len(batches) == 3 and all(set(b) == TRAIN_KEYS for b in batches)
    val = list(dm.val_dataloader())
    assert torch.cat([b["image_ids"] for b in val]).tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match=r"streams from .*set streaming: false"):
        dm.records("train")
    with pytest.raises(DataFormatError, match=r"1 of 2 shard\(s\) not found"):
        ImageTextDataModule(source=WebDataset(str(tmp_path / "train" / "shard-{001..002}.tar"))).setup("fit")


def test_validate_images_at_setup(tmp_path, preprocessing):
    source = karpathy_source(tmp_path)
    (tmp_path / "0.jpg").write_bytes(b"")  # an empty training image
    with pytest.raises(ImageLoadError, match=r"image file is empty .*0\.jpg.*images\[0\]"):
        ImageTextDataModule(source=source, validate_images=True, batch_size=2).setup("fit")
    dm = ImageTextDataModule(source=source, validate_images=True, on_error="skip", batch_size=2)
    dm.setup("fit")
    assert dm.skip_report.counts == {"unreadable_image": 1}
    assert [r.image_id for r in dm.records("train")] == ["1.jpg", "2.jpg", "3.jpg"]
    # Without validation the bad image is found when loaded, and the error names it and its record.
    dm = ImageTextDataModule(source=source, on_error="skip", batch_size=2)
    dm.attach_preprocessing(preprocessing)
    dm.setup("fit")
    with pytest.raises(ImageLoadError, match=r"0\.jpg.*images\[0\]"):
        list(dm.train_dataloader())


def test_jsonargparse_reads_the_signature_and_docstrings():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ImageTextDataModule, "data")
    config = parser.parse_args(
        [
            "--data.source",
            '{"class_path": "pefttune.data.sources.Table", "init_args": {"path": "x.tsv"}}',
            "--data.captions_per_image",
            "sample",
            "--data.val_split",
            "null",
        ]
    )
    assert (
        config.data.source.class_path == "pefttune.data.sources.Table"
        and config.data.source.init_args.path == "x.tsv"
        and config.data.captions_per_image == "sample"
        and config.data.val_split is None
    )
    assert parser.parse_args(["--data.source", "x.tsv"]).data.source == "x.tsv"  # the deprecated string form
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.on_error", "ignore"])
    assert "Drop the last incomplete training batch" in parser.format_help()


class RecordingModule(LightningModule):
    """Attaches a preprocessing in setup (as the real model does) and records the ids it is fed."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.preprocessing = preprocessing
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_ids: dict[int, list[tuple[int, int]]] = {}
        self.val_image_ids: list[int] = []

    def setup(self, stage: str) -> None:
        self.trainer.datamodule.attach_preprocessing(self.preprocessing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pairs = zip(batch["image_ids"].tolist(), batch["caption_ids"].tolist(), strict=True)
        self.train_ids.setdefault(self.current_epoch, []).extend(pairs)
        return (self.weight * batch["pixel_values"].mean()).sum()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_image_ids.extend(batch["image_ids"].tolist())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**options) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )


def test_fit_with_sampled_captions_draws_anew_each_epoch(preprocessing):
    dm = small_synthetic(captions_per_image="sample", batch_size=4)
    module = RecordingModule(preprocessing)
    trainer(max_epochs=2).fit(module, datamodule=dm)
    first, second = module.train_ids[0], module.train_ids[1]
    assert sorted(i for i, _ in first) == sorted(i for i, _ in second) == list(range(24))
    assert sorted(first) != sorted(second)  # new captions in epoch 1
    assert sorted(module.val_image_ids) == sorted(list(range(6)) * 2)


def test_fit_without_validation_split(preprocessing):
    dm = small_synthetic(val_split=None)
    module = RecordingModule(preprocessing)
    trainer(max_epochs=1, limit_train_batches=2).fit(module, datamodule=dm)
    assert len(module.train_ids[0]) == 16 and module.val_image_ids == []


def test_evaluation_texts_follow_loader_order(preprocessing):
    dm = small_synthetic(eval_batch_size=4)
    dm.attach_preprocessing(preprocessing)
    dm.setup("validate")
    texts = dm.evaluation_texts("validate")
    assert len(texts) == 30 and texts[:5] == dm.records("val")[0].captions
    assert ImageTextDataModule(test_split=None).evaluation_texts("test") == []
    with pytest.raises(ValueError, match="unknown stage"):
        dm.evaluation_texts("train")


def test_old_spellings_build_the_same_source_with_a_warning(tmp_path):
    path = karpathy_source(tmp_path).path
    with pytest.warns(
        FutureWarning,
        match=r"source=.*dataset\.json.* with format, image_root is deprecated; write "
        r"source: \{class_path: pefttune\.data\.sources\.Karpathy",
    ):
        dm = ImageTextDataModule(source=path, format="karpathy", image_root=str(tmp_path), batch_size=2)
    assert isinstance(dm.sources["train"], Karpathy) and dm.sources["train"].image_root == str(tmp_path)
    dm.setup()
    assert [len(dm.records(role)) for role in ("train", "val", "test")] == [4, 2, 2]
    with pytest.warns(FutureWarning, match="synthetic_train"):
        dm = ImageTextDataModule(synthetic_train=12, synthetic_image_size=32)
    assert dm.sources["train"].sizes["train"] == 12 and dm.sources["train"].image_size == 32
    with pytest.warns(FutureWarning):  # synthetic_* also resize a Synthetic source object
        dm = ImageTextDataModule(source=Synthetic(num_val=3, seed=4), synthetic_train=9)
    assert dm.sources["train"].sizes == {"train": 9, "val": 3, "test": 128} and dm.sources["train"].seed == 4
    with pytest.raises(
        ValueError, match=r"image_root: deprecated option.*set them in the source's init_args"
    ):
        ImageTextDataModule(source=Karpathy(path), image_root="x")
    with pytest.raises(DataFormatError, match="cannot tell the format from the name"):
        ImageTextDataModule(source=str(tmp_path / "data.parquet"))


@pytest.mark.parametrize(
    ("class_name", "init_args"),
    [
        ("Synthetic", {"num_train": 4}),
        ("Karpathy", {"path": "d.json", "image_root": "imgs"}),
        ("Coco", {"path": "c.json"}),
        ("Table", {"path": "t.tsv", "split_column": "split"}),
        ("ImageFolder", {"root": "folder"}),
        ("WebDataset", {"urls": "s-{000..009}.tar", "samples_per_epoch": 100}),
        ("MSRVTT", {"annotations": "a.json", "split_file": "MSRVTT_train.9k.csv"}),
        ("VideoTable", {"path": "v.jsonl", "video_root": "clips"}),
    ],
)
def test_every_source_is_selectable_by_class_path(class_name, init_args):
    from jsonargparse import ArgumentParser

    import pefttune.data.sources as sources

    parser = ArgumentParser()
    parser.add_class_arguments(ImageTextDataModule, "data")
    source = {"class_path": f"pefttune.data.sources.{class_name}", "init_args": init_args}
    config = parser.parse_args(["--data.source", json.dumps(source), "--data.num_frames", "12"])
    data = parser.instantiate_classes(config).data
    assert type(data.sources["train"]) is getattr(sources, class_name)
    assert data.sources["train"] is data.sources["val"] is data.sources["test"]
    assert data.num_frames == 12


@pytest.mark.parametrize(
    ("pin_memory", "cuda", "expected"),
    [(None, True, True), (None, False, False), (False, True, False), (True, False, True)],
)
def test_pin_memory_defaults_to_cuda_availability(preprocessing, monkeypatch, pin_memory, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dm = small_synthetic(pin_memory=pin_memory)
    dm.attach_preprocessing(preprocessing)
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is expected
    assert dm.val_dataloader().pin_memory is expected


def test_source_objects_are_saved_as_plain_hyperparameters(tmp_path):
    # Checkpoints hold the data module's hyperparameters and load with torch's weights_only unpickler.
    dm = small_synthetic()
    assert dm.hparams["source"] == {
        "class_path": "pefttune.data.sources.synthetic.Synthetic",
        "describe": dm.sources["train"].describe(),
    }
    torch.save(dict(dm.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["source"] == dm.hparams["source"]
