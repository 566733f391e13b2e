"""Retrieval pictures: marking logic, PNG output, the TensorBoard callback and the command."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from pefttune.data import ImageTextDataModule
from pefttune.metrics.functional import topk_retrieval
from pefttune.module import DualEncoderModule
from pefttune.strategies.lit import LiT
from pefttune.testing import tiny_bert, tiny_tower_config, tiny_vit
from pefttune.visualize import (
    CORRECT_COLOR,
    WRONG_COLOR,
    RetrievalExamples,
    RetrievalPictureLogger,
    collect_retrieval_examples,
    image_to_text_figure,
    main,
    mark_correct,
    pick_queries,
    retrieval_figure,
    save_figure,
    text_to_image_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_hot(rows: list[int], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    out[torch.arange(len(rows)), torch.tensor(rows)] = 1.0
    return out


def _hand_made() -> RetrievalExamples:
    """Three images (ids 10, 11, 12), two captions each; caption embeddings are chosen by hand.

    Image i is the unit vector e_i. Captions of image 10 point at e_0 (correct), captions of image 11 point
    at e_2 (the wrong image, 12), captions of image 12 are between e_2 and e_1 leaning to e_2 (correct first).
    """
    image_embeds = torch.eye(3)
    text_embeds = torch.stack(
        [
            torch.tensor([1.0, 0.1, 0.0]),
            torch.tensor([0.9, 0.0, 0.2]),
            torch.tensor([0.0, 0.0, 1.0]),
            torch.tensor([0.1, 0.0, 1.0]),
            torch.tensor([0.0, 0.6, 0.8]),
            torch.tensor([0.0, 0.5, 0.9]),
        ]
    )
    text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")]
    return RetrievalExamples(
        image_embeds=image_embeds,
        image_ids=torch.tensor([10, 11, 12]),
        images=images,
        text_embeds=text_embeds,
        caption_image_ids=torch.tensor([10, 10, 11, 11, 12, 12]),
        captions=["red one", "a red thing", "green one", "a green thing", "blue one", "a blue thing"],
    )


def test_mark_correct_text_to_image_on_hand_made_similarity() -> None:
    ex = _hand_made()
    _, indices = topk_retrieval(ex.text_embeds, ex.image_embeds, 2)
    marks = mark_correct(indices, ex.caption_image_ids, ex.image_ids)
    # Top-1 of each caption: image rows 0, 0, 2, 2, 2, 2 -> correct, correct, wrong, wrong, correct, correct.
    assert indices[:, 0].tolist() == [0, 0, 2, 2, 2, 2]
    assert marks[:, 0].tolist() == [True, True, False, False, True, True]
    # Second place of the green captions is image 0 (red) for the one with a 0.1 red component: still wrong.
    assert marks[3, 1].item() is False
    # The blue captions' second choice is the green image: wrong.
    assert marks[4, 1].item() is False


def test_mark_correct_image_to_text_uses_every_caption_of_the_image() -> None:
    ex = _hand_made()
    _, indices = topk_retrieval(ex.image_embeds, ex.text_embeds, 3)
    marks = mark_correct(indices, ex.image_ids, ex.caption_image_ids)
    # Image 10 (e_0): its two captions lead, then nothing else points at e_0 more than 0.1.
    assert marks[0, :2].tolist() == [True, True]
    # Image 11 (e_1): the most e_1-like captions are the blue ones, so its top-2 are wrong.
    assert marks[1, :2].tolist() == [False, False]
    # Image 12 (e_2): captions 2 and 3 (green, pointing at e_2) rank above its own: wrong, wrong, then right.
    assert marks[2].tolist() == [False, False, True]


def test_mark_correct_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N_q"):
        mark_correct(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="gallery"):
        mark_correct(torch.tensor([[5]]), torch.tensor([0]), torch.tensor([0, 1]))


def _edge_colors(fig) -> list[str]:
    from matplotlib.colors import to_hex

    colors = []
    for axis in fig.axes:
        if axis.images:
            colors.append(to_hex(axis.spines["left"].get_edgecolor()))
    return colors


def test_text_to_image_figure_frames_correct_images_green(tmp_path) -> None:
    ex = _hand_made()
    fig = text_to_image_figure(
        ex.text_embeds,
        ex.caption_image_ids,
        ex.captions,
        ex.image_embeds,
        ex.image_ids,
        ex.images,
        queries=[0, 2],
        k=2,
    )
    # Row 0 (red caption): red image correct, then a wrong one. Row 1 (green caption): blue wrong, then ...
    colors = _edge_colors(fig)
    assert colors[0] == CORRECT_COLOR and colors[1] == WRONG_COLOR
    assert colors[2] == WRONG_COLOR
    path = save_figure(fig, tmp_path / "sub" / "t2i.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC


def test_image_to_text_figure_marks_captions() -> None:
    ex = _hand_made()
    fig = image_to_text_figure(
        ex.image_embeds,
        ex.image_ids,
        ex.images,
        ex.text_embeds,
        ex.caption_image_ids,
        ex.captions,
        queries=[2],
        k=3,
    )
    lines = [t.get_text() for axis in fig.axes for t in axis.texts]
    assert [line[0] for line in lines] == ["✗", "✗", "✓"]
    assert "blue" in lines[2]


def test_figure_checks_queries_and_alignment() -> None:
    ex = _hand_made()
    with pytest.raises(ValueError, match="out of range"):
        text_to_image_figure(
            ex.text_embeds,
            ex.caption_image_ids,
            ex.captions,
            ex.image_embeds,
            ex.image_ids,
            ex.images,
            queries=[6],
        )
    with pytest.raises(ValueError, match="images for"):
        text_to_image_figure(
            ex.text_embeds,
            ex.caption_image_ids,
            ex.captions,
            ex.image_embeds,
            ex.image_ids,
            ex.images[:2],
        )


def test_pick_queries_distinct_images_and_own_captions() -> None:
    ex = _hand_made()
    image_rows, caption_rows = pick_queries(ex, num_queries=5, seed=3)
    assert len(image_rows) == 3 and len(set(image_rows)) == 3
    assert len(caption_rows) == 3
    first_rows, first_captions = pick_queries(ex, num_queries=2, seed=None)
    assert first_rows == [0, 1] and first_captions == [0, 2]


def test_retrieval_figure_png_with_tensor_images(tmp_path) -> None:
    ex = _hand_made()
    ex.images = [torch.randn(3, 8, 8) for _ in range(3)]  # normalised model inputs are stretched to [0, 1]
    fig = retrieval_figure(ex, num_queries=2, k=5)
    path = save_figure(fig, tmp_path / "both.png")
    assert os.path.getsize(path) > 1000
    image = np.asarray(Image.open(path))
    assert image.ndim == 3 and image.shape[0] > 100


def _tiny_model() -> DualEncoderModule:
    return DualEncoderModule(tiny_vit(), tiny_bert(), strategy=LiT())


def _tiny_data(**kwargs) -> ImageTextDataModule:
    options = dict(
        source="synthetic",
        batch_size=8,
        synthetic_train=16,
        synthetic_val=8,
        synthetic_test=8,
        synthetic_image_size=32,
    )
    options.update(kwargs)
    return ImageTextDataModule(**options)


def test_collect_examples_uses_records_in_loader_order() -> None:
    model = _tiny_model().eval()
    data = _tiny_data(eval_batch_size=3)
    data.attach_preprocessing(model.preprocessing)
    data.setup("validate")
    records = data.records("val")
    ex = collect_retrieval_examples(model, data.val_dataloader(), max_images=5, records=records)
    assert ex.image_embeds.shape[0] == 5 and len(ex.images) == 5
    assert ex.image_ids.tolist() == [0, 1, 2, 3, 4]
    assert ex.captions == [c for r in records[:5] for c in r.captions]
    assert ex.caption_image_ids.tolist() == [i for i, r in enumerate(records[:5]) for _ in r.captions]
    assert ex.text_embeds.shape[0] == len(ex.captions)
    assert torch.allclose(ex.image_embeds.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_callback_logs_figure_to_tensorboard(tmp_path) -> None:
    seed_everything(0, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = RetrievalPictureLogger(num_queries=2, k=3, max_images=6)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_tiny_model(), datamodule=_tiny_data())
    assert callback.logged_steps == [1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "val/retrieval" in events.Tags()["images"]
    assert events.Images("val/retrieval")[0].height > 100


def test_command_writes_png_from_checkpoint(tmp_path) -> None:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "pefttune.module.DualEncoderModule",
            "init_args": {
                **tiny_tower_config(),
                "strategy": {"class_path": "pefttune.strategies.lit.LiT"},
            },
        },
        "data": {
            "class_path": "pefttune.data.ImageTextDataModule",
            "init_args": {
                "source": "synthetic",
                "synthetic_train": 8,
                "synthetic_val": 4,
                "synthetic_test": 6,
                "synthetic_image_size": 32,
                "batch_size": 4,
            },
        },
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    from pefttune.cli import build_model_from_config

    trained = build_model_from_config(str(config_path))
    with torch.no_grad():
        trained.text_tower.projection.weight.mul_(-1.0)  # weights differing from a fresh build
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    out = tmp_path / "pictures" / "retrieval.png"
    path = main(
        [
            "--config",
            str(config_path),
            "--ckpt_path",
            str(ckpt),
            "--output",
            str(out),
            "--num_queries",
            "2",
            "--k",
            "3",
        ]
    )
    assert path == str(out)
    with open(out, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"unexpected.weight": torch.zeros(1)}}, bad)
    with pytest.raises(RuntimeError, match=r"bad.ckpt: none of its weights belongs to this model"):
        main(["--config", str(config_path), "--ckpt_path", str(bad), "--output", str(tmp_path / "x.png")])
