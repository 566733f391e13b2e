"""Zero-shot classification evaluation: the classification data module, the base-to-new protocol and the
module's accuracy, on tiny offline towers."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pefttune.cli import main
from pefttune.data.classification import (
    ClassificationDataModule,
    class_prompts,
    sample_shots,
    split_base_new,
    strip_prompt_prefix,
)
from pefttune.data.datasets import load_image
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.records import DataFormatError, ErrorPolicy
from pefttune.data.sources import ImageFolder, Karpathy, Synthetic, Table
from pefttune.evaluation import ZeroShotMetric
from pefttune.metrics.zeroshot import ZeroShotAccuracy, harmonic_mean
from pefttune.module import DualEncoderModule
from pefttune.strategies import FullFineTune
from pefttune.testing import tiny_bert, tiny_tower_config, tiny_vit

REPO = Path(__file__).resolve().parents[1]
BASE_TO_NEW = REPO / "configs" / "zeroshot" / "base_to_new_synthetic.yaml"
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}
# The generated scenes' 36 colour-shape classes (as ClassificationDataModule's default source: none held out).
TINY_SCENES = dict(num_train=288, num_val=24, num_test=72, image_size=32, held_out_fraction=0.0)
TINY_SYNTHETIC = dict(source=Synthetic(**TINY_SCENES))


def _tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[hash(t) % 97 + 1, len(t)] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)


PREPROCESSING = Preprocessing(_to_tensor, _to_tensor, _tokenize, True)


def _save(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)


def _trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


# -- readers ---------------------------------------------------------------------------------------------


def test_image_folder_reader_and_data_module(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        for name, colour in COLOURS.items():
            for i in range(count):
                _save(tmp_path / split / name / f"{i}.png", colour)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    (tmp_path / "train" / "cat" / "readme.md").write_text("not an image")

    records = ImageFolder(str(tmp_path / "train")).records("train", ErrorPolicy())
    assert [r.label for r in records] == ["cat"] * 3 + ["dog"] * 3 + ["owl"] * 3
    assert records[0].image_id == "cat/0.png" and records[0].split == "train"

    dm = ClassificationDataModule(
        source=ImageFolder(str(tmp_path / "train")),
        test_source=ImageFolder(str(tmp_path / "test")),
        val_split=None,
        batch_size=3,
    )
    dm.attach_preprocessing(PREPROCESSING)
    dm.setup("fit")
    assert dm.all_classes == ["cat", "dog", "owl"]
    (loader,) = dm.test_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "labels", "image_ids"}
    assert batch["labels"].tolist() == [0, 0, 1] and batch["image_ids"].tolist() == [0, 1, 2]
    # The label is the folder: a cat image is red.
    assert batch["pixel_values"][0, 0].mean() > 0.7 and batch["pixel_values"][0, 1].mean() < 0.2
    assert dm.val_dataloader() == []


def test_image_folder_without_a_validation_folder_says_how_to_fix_it(tmp_path):
    _save(tmp_path / "a" / "0.png", (1, 2, 3))
    dm = ClassificationDataModule(source=ImageFolder(str(tmp_path)))
    with pytest.raises(DataFormatError, match="set val_source"):
        dm.setup("fit")


def test_csv_reader_with_path_and_label_columns(tmp_path):
    rows = []
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        for name, colour in COLOURS.items():
            for i in range(count):
                path = f"img/{split}_{name}_{i}.png"
                _save(tmp_path / path, colour)
                rows.append({"path": path, "species": name, "part": split})
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "species", "part"])
        writer.writeheader()
        writer.writerows(rows)
    dm = ClassificationDataModule(
        source=Table(
            str(tmp_path / "labels.csv"),
            format="csv",
            image_column="path",
            caption_column="species",
            label_column="species",
            split_column="part",
        ),
        batch_size=2,
    )
    dm.attach_preprocessing(PREPROCESSING)
    dm.setup("test")
    assert dm.all_classes == ["cat", "dog", "owl"]
    assert [r.label for r in dm.labelled_records("train")] == ["cat", "cat", "dog", "dog", "owl", "owl"]
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["labels"].tolist() == [0, 1]


def test_karpathy_class_key(tmp_path):
    images = []
    for index, (name, colour) in enumerate(COLOURS.items()):
        for split in ("train", "val", "test"):
            filename = f"{name}_{split}.png"
            _save(tmp_path / filename, colour)
            images.append(
                {
                    "filename": filename,
                    "split": split,
                    "imgid": f"{index}-{split}",
                    "class": name,
                    "sentences": [{"raw": f"a picture of a {name}"}],
                }
            )
    (tmp_path / "captions.json").write_text(json.dumps({"images": images}))
    dm = ClassificationDataModule(
        source=Karpathy(str(tmp_path / "captions.json")), batch_size=3, drop_last=False
    )
    dm.attach_preprocessing(PREPROCESSING)
    dm.setup("fit")
    assert dm.all_classes == ["cat", "dog", "owl"]
    batch = next(iter(dm.train_dataloader()))
    # Training texts are class prompts, not the captions; text ids are class indices.
    assert sorted(batch["text_ids"].tolist()) == [0, 1, 2]
    assert dm.training_texts() == ["a photo of a cat.", "a photo of a dog.", "a photo of a owl."]


def test_unlabelled_images_raise_or_are_skipped(tmp_path):
    images = [
        {"filename": "a.png", "split": "train", "class": "cat", "sentences": [{"raw": "x"}]},
        {"filename": "b.png", "split": "train", "sentences": [{"raw": "y"}]},
    ]
    for image in images:
        _save(tmp_path / image["filename"], (9, 9, 9))
    (tmp_path / "captions.json").write_text(json.dumps({"images": images}))
    options = dict(source=Karpathy(str(tmp_path / "captions.json")), val_split=None, test_split=None)
    with pytest.raises(DataFormatError, match="no class label"):
        ClassificationDataModule(**options).setup("fit")
    dm = ClassificationDataModule(**options, on_error="skip")
    dm.setup("fit")
    assert [r.image_id for r in dm.labelled_records("train")] == ["a.png"] and dm.skip_report.total == 1


# -- classes, shots, prompts -----------------------------------------------------------------------------


def test_base_new_split_is_the_first_half_of_sorted_names():
    assert split_base_new(["d", "b", "a", "c"]) == (["a", "b"], ["c", "d"])
    assert split_base_new(["e", "d", "c", "b", "a"]) == (["a", "b", "c"], ["d", "e"])  # ceil(C / 2) base
    dm = ClassificationDataModule(split_classes="base_to_new", **TINY_SYNTHETIC)
    dm.setup("fit")
    assert len(dm.all_classes) == 36 and dm.all_classes == sorted(dm.all_classes)
    assert dm.base_classes == dm.all_classes[:18] and dm.new_classes == dm.all_classes[18:]
    assert dm.training_classes == dm.base_classes
    assert {r.label for r in dm.training_records()} <= set(dm.base_classes)
    assert [g.name for g in dm.evaluation_groups("validate")] == ["base"]
    assert [(g.name, g.class_names) for g in dm.evaluation_groups("test")] == [
        ("base", dm.base_classes),
        ("new", dm.new_classes),
    ]


def test_k_shot_sampling_is_exact_and_deterministic_per_seed():
    labels = ["a"] * 10 + ["b"] * 6 + ["c"] * 8 + [None]
    first = sample_shots(labels, ["a", "b"], 4, seed=1)
    assert first == sample_shots(labels, ["a", "b"], 4, seed=1)
    assert Counter(labels[i] for i in first) == {"a": 4, "b": 4}
    assert first != sample_shots(labels, ["a", "b"], 4, seed=2)
    # A class's draw does not depend on the other classes.
    assert [i for i in first if labels[i] == "a"] == sample_shots(labels, ["a"], 4, seed=1)
    with pytest.raises(DataFormatError, match=r"'b' \(6\)"):
        sample_shots(labels, ["a", "b"], 7, seed=0)

    def drawn(seed: int) -> list[str]:
        dm = ClassificationDataModule(split_classes="base", shots=2, seed=seed, **TINY_SYNTHETIC)
        dm.setup("fit")
        return [r.image_id for r in dm.training_records()]

    assert drawn(0) == drawn(0) and drawn(0) != drawn(1)
    dm = ClassificationDataModule(split_classes="base", shots=2, **TINY_SYNTHETIC)
    dm.setup("fit")
    assert Counter(r.label for r in dm.training_records()) == dict.fromkeys(dm.base_classes, 2)


def test_prompt_templates_and_prefix_stripping():
    assert class_prompts(["sea_lion", "cat"], ["a photo of a {}.", "art of the {}"]) == [
        ["a photo of a sea lion.", "art of the sea lion"],
        ["a photo of a cat.", "art of the cat"],
    ]
    assert class_prompts(["sea_lion"], ["{}"], underscores_as_spaces=False) == [["sea_lion"]]
    assert strip_prompt_prefix("a photo of a {}.", "a photo") == "of a {}."
    assert strip_prompt_prefix("A Photo of a {}.", "a photo") == "of a {}."
    assert strip_prompt_prefix("a photograph of a {}.", "a photo") == "a photograph of a {}."
    assert strip_prompt_prefix("art of the {}", "a photo") == "art of the {}"
    assert class_prompts(["cat"], ["a photo of a {}.", "a {}"], prefix="a photo") == [["of a cat.", "a cat"]]
    for bad in ([], ["no placeholder"], ["two {} {}"], ["{0} and {}"]):
        with pytest.raises(ValueError):
            ClassificationDataModule(templates=bad)


# -- the metric ------------------------------------------------------------------------------------------


def test_metric_removes_distributed_padding_duplicates():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])  # correct, correct, wrong, wrong (ties go to class 0)
    metric, summed = ZeroShotMetric(), ZeroShotAccuracy()
    metric.update(logits, labels, torch.arange(4))
    summed.update(logits, labels)
    assert float(metric.compute()[0]) == float(summed.compute()) == 50.0
    # A DistributedSampler pads with repeats of the first samples: the sum counts them, the metric does not.
    metric.update(logits[:2], labels[:2], torch.arange(2))
    summed.update(logits[:2], labels[:2])
    assert float(metric.compute()[0]) == 50.0 and float(summed.compute()) == pytest.approx(100 * 4 / 6)
    # Groups are separate: the same image id in another group is another sample.
    metric.update(logits[2:3], labels[2:3], torch.tensor([0]), group=1)
    assert {k: float(v) for k, v in metric.compute().items()} == {0: 50.0, 1: 0.0}
    with pytest.raises(ValueError, match="labels must lie"):
        metric.update(logits, torch.tensor([0, 1, 2, 0]), torch.arange(4))


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


# -- the module ------------------------------------------------------------------------------------------

FOUR_CLASSES = ["blue circle", "green square", "red star", "white cross"]


def test_module_accuracy_equals_a_hand_computation():
    templates = ["a photo of a {}.", "a drawing of the {}"]
    dm = ClassificationDataModule(
        source=Synthetic(num_test=200, image_size=32, held_out_fraction=0.0),
        classes=FOUR_CLASSES,
        templates=templates,
        val_split=None,
    )
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    trainer = _trainer()
    results = trainer.test(model, datamodule=dm, verbose=False)[0]
    predicted = torch.cat([out["logits"] for out in trainer.predict(model, datamodule=dm)]).argmax(1)

    records, labels = dm._evaluation_selection("test", dm.evaluation_groups("test")[0])
    transform = model.image_tower.image_transform(train=False)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([transform(load_image(r.image)) for r in records])
        images = F.normalize(model.image_tower(pixels), dim=-1)
        classes = []
        for name in FOUR_CLASSES:
            tokens = model.text_tower.tokenize([t.format(name) for t in templates])
            per_template = F.normalize(model.text_tower(**tokens), dim=-1)
            classes.append(F.normalize(per_template.mean(0), dim=0))
        by_hand = (images @ torch.stack(classes).T).argmax(1)
    labels = torch.tensor(labels)
    assert torch.equal(predicted, by_hand)
    assert len(set(by_hand.tolist())) > 1  # a non-trivial prediction
    assert results["test/acc"] == pytest.approx(100.0 * (by_hand == labels).double().mean().item(), abs=1e-4)


class _PromptedStrategy(FullFineTune):
    """Stands in for a strategy whose learned text context plays "a photo" (as APEX's does)."""

    text_prompt_prefix = "a photo"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def on_evaluation_start(self, module, texts):
        self.seen.append(list(texts))


def test_base_to_new_on_the_module_with_prefix_stripping():
    strategy = _PromptedStrategy()
    model = DualEncoderModule(tiny_vit(), tiny_bert(), strategy)
    dm = ClassificationDataModule(
        split_classes="base_to_new",
        templates=["a photo of a {}.", "a {} shape"],
        batch_size=8,
        **TINY_SYNTHETIC,
    )
    trainer = _trainer(limit_train_batches=2)
    trainer.fit(model, datamodule=dm)
    assert dm.prompt_prefix == "a photo"
    item = dm.train_dataloader().dataset[0]
    assert item["caption"] in (
        f"of a {dm.base_classes[item['text_id']]}.",
        f"a {dm.base_classes[item['text_id']]} shape",
    )
    assert trainer.callback_metrics.keys() >= {"val/acc_base"}

    strategy.seen.clear()
    results = trainer.test(model, datamodule=dm, verbose=False)[0]
    # The strategy is prepared for each class group with that group's (stripped) prompts.
    base, new = strategy.seen
    assert base[:2] == [f"of a {dm.base_classes[0]}.", f"a {dm.base_classes[0]} shape"]
    assert len(base) == 2 * 18 and all(p.split(" ")[-2] != "photo" for p in base)
    assert new[0] == f"of a {dm.new_classes[0]}." and len(new) == 2 * 18
    assert results["test/acc_hm"] == pytest.approx(
        harmonic_mean(results["test/acc_base"], results["test/acc_new"])
    )


def test_retrieval_data_still_takes_the_retrieval_path():
    from pefttune.data import ImageTextDataModule

    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    dm = ImageTextDataModule(
        source=Synthetic(num_train=8, num_val=8, num_test=8, image_size=32), batch_size=8
    )
    results = _trainer(limit_train_batches=0).test(model, datamodule=dm, verbose=False)[0]
    assert "test/rsum" in results and not any(key.startswith("test/acc") for key in results)


def test_classification_batch_without_class_groups_is_refused():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    batch = {
        "pixel_values": torch.zeros(2, 3, 32, 32),
        "labels": torch.zeros(2, dtype=torch.long),
        "image_ids": torch.arange(2),
    }
    with pytest.raises(RuntimeError, match="evaluation_groups"):
        model.validation_step(batch, 0)


# -- end to end through the CLI --------------------------------------------------------------------------


def test_base_to_new_config_fits_and_tests_through_main(tmp_path):
    towers = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path)},
            },
        },
        "model": {
            "class_path": "pefttune.module.DualEncoderModule",
            "init_args": {
                **tiny_tower_config(),
                "strategy": {"class_path": "pefttune.strategies.full.FullFineTune"},
            },
        },
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(towers))
    overrides = [f"--data.init_args.source.init_args.{key}={value}" for key, value in TINY_SCENES.items()]
    main(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(BASE_TO_NEW),
            "--data.init_args.shots=2",
            "--data.init_args.batch_size=12",
            *overrides,
        ]
    )
    (metrics_file,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics_file) as handle:
        rows = list(csv.DictReader(handle))
    final = {
        key: float(value) for row in rows for key, value in row.items() if value and key.startswith("test/")
    }
    assert final.keys() == {"test/acc_base", "test/acc_new", "test/acc_hm"}
    assert all(0.0 <= value <= 100.0 for value in final.values())
    assert final["test/acc_hm"] == pytest.approx(
        harmonic_mean(final["test/acc_base"], final["test/acc_new"]), abs=1e-4
    )
    assert any(row.get("val/acc_base") for row in rows)
    assert math.isfinite(float(next(row["train/loss"] for row in rows if row.get("train/loss"))))


def test_predict_writes_embeddings_per_class_group_through_main(tmp_path):
    """``pefttune predict`` on a classification data module writes one entry per class group."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
                "model": {
                    "class_path": "pefttune.module.DualEncoderModule",
                    "init_args": {
                        **tiny_tower_config(),
                        "strategy": {"class_path": "pefttune.strategies.full.FullFineTune"},
                    },
                },
            }
        )
    )
    output = tmp_path / "out" / "embeddings.pt"
    overrides = [f"--data.init_args.source.init_args.{key}={value}" for key, value in TINY_SCENES.items()]
    main(
        [
            "predict",
            "--config",
            str(config),
            "--config",
            str(BASE_TO_NEW),
            *overrides,
            "--data.init_args.shots=2",
            "--data.init_args.batch_size=16",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=pefttune.callbacks.EmbeddingWriter",
            f"--trainer.callbacks.output_path={output}",
        ]
    )
    written = torch.load(output)
    assert set(written) == {"base", "new"}
    for group in written.values():
        ids = group["image_ids"]
        n, classes = len(ids), len(group["class_names"])
        assert n > 0 and torch.equal(ids, torch.unique(ids))  # deduplicated, sorted
        assert group["image_embeds"].shape[0] == group["labels"].shape[0] == n
        assert group["logits"].shape == (n, classes)
        assert int(group["labels"].min()) >= 0 and int(group["labels"].max()) < classes
        norms = group["image_embeds"].norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # Base and new classes are disjoint halves of the 36 classes.
    assert not set(written["base"]["class_names"]) & set(written["new"]["class_names"])
    assert len(written["base"]["class_names"]) == len(written["new"]["class_names"]) == 18


@pytest.mark.ddp
@pytest.mark.slow
def test_accuracy_under_ddp_equals_single_process():
    dm_options = dict(
        source=Synthetic(num_test=200, image_size=32, held_out_fraction=0.0),
        classes=FOUR_CLASSES,
        val_split=None,
        batch_size=4,
    )
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    single = _trainer().test(model, datamodule=ClassificationDataModule(**dm_options), verbose=False)[0]
    dm = ClassificationDataModule(**dm_options)
    dm.setup("test")
    images = len(dm._evaluation_selection("test", dm.evaluation_groups("test")[0])[0])
    # An odd count pads one repeat; strictly between 0 and 100 % it would change a sum-based accuracy.
    assert images % 2 == 1 and 0 < single["test/acc"] < 100
    distributed = _trainer(strategy="ddp_spawn", devices=2).test(model, datamodule=dm, verbose=False)[0]
    assert distributed["test/acc"] == pytest.approx(single["test/acc"], abs=1e-6)
