"""Retrieval pictures on video (a strip of frames per hit) and the caption protocol named in results."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pefttune.data import ImageTextDataModule
from pefttune.data.sources.synthetic_video import SyntheticVideos
from pefttune.module import DualEncoderModule
from pefttune.strategies.lit import LiT
from pefttune.testing import tiny_bert, tiny_tower_config, tiny_vit
from pefttune.towers.temporal import SequenceTransformer
from pefttune.visualize import collect_retrieval_examples, frame_strip, main, retrieval_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_frame_strip_puts_frames_side_by_side_in_order():
    frames = [Image.new("RGB", (10, 8), (value, 0, 0)) for value in (10, 60, 110, 160, 210)]
    strip = frame_strip(frames, max_frames=3, gap=2)
    assert strip.size == (3 * 10 + 2 * 2, 8)
    array = np.asarray(strip)
    # First, middle and last frame, in time order.
    assert [int(array[0, x, 0]) for x in (0, 12, 24)] == [10, 110, 210]
    tensors = [torch.rand(3, 8, 6) for _ in range(2)]
    assert frame_strip(tensors, gap=0).size == (12, 8)
    with pytest.raises(ValueError, match="at least one frame"):
        frame_strip([])
    with pytest.raises(ValueError, match="max_frames"):
        frame_strip(frames, max_frames=0)


def _video_data(eval_captions="all"):
    source = SyntheticVideos(num_train=8, num_val=6, num_test=6, num_frames=6, image_size=32)
    return ImageTextDataModule(source=source, num_frames=3, batch_size=4, eval_captions=eval_captions)


@pytest.mark.parametrize("eval_captions", ["all", "one"])
def test_collected_examples_show_a_strip_per_video_and_the_evaluated_captions(eval_captions):
    torch.manual_seed(0)
    model = DualEncoderModule(
        tiny_vit(), tiny_bert(), LiT(), temporal=SequenceTransformer(num_layers=1)
    ).eval()
    data = _video_data(eval_captions)
    data.attach_preprocessing(model.preprocessing)
    data.setup("test")
    records = data.records("test")
    examples = collect_retrieval_examples(model, data.test_dataloader(), max_images=5, records=records)
    assert examples.image_embeds.shape[0] == len(examples.images) == 5
    # Captions line up with their embeddings under both protocols (5 per clip, or the eval caption alone).
    per_clip = 5 if eval_captions == "all" else 1
    assert examples.text_embeds.shape[0] == len(examples.captions) == 5 * per_clip
    if eval_captions == "one":
        assert examples.captions == [r.captions[r.eval_caption] for r in records[:5]]
    # Each "image" is a strip of the 3 sampled frames (32 px each, 2 px apart), the frames the model saw.
    assert all(image.size == (3 * 32 + 2 * 2, 32) for image in examples.images)
    figure = retrieval_figure(examples, num_queries=2, k=3)
    assert len(figure.axes) > 0


def test_visualize_command_draws_a_video_picture(tmp_path):
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "pefttune.module.DualEncoderModule",
            "init_args": {
                **tiny_tower_config(),
                "strategy": {"class_path": "pefttune.strategies.lit.LiT"},
                "temporal": {"class_path": "pefttune.towers.temporal.MeanPooling"},
            },
        },
        "data": {
            "class_path": "pefttune.data.ImageTextDataModule",
            "init_args": {
                "source": {
                    "class_path": "pefttune.data.sources.synthetic_video.SyntheticVideos",
                    "init_args": {
                        "num_train": 4,
                        "num_val": 4,
                        "num_test": 6,
                        "num_frames": 4,
                        "image_size": 32,
                    },
                },
                "num_frames": 2,
                "batch_size": 4,
            },
        },
    }
    config_path = tmp_path / "video.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "retrieval.png"
    assert main(
        ["--config", str(config_path), "--output", str(out), "--num_queries", "2", "--k", "3"]
    ) == str(out)
    with open(out, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC


@pytest.mark.parametrize("eval_captions", ["all", "one"])
def test_results_name_the_caption_protocol(eval_captions, tmp_path):
    import json
    import logging

    from lightning.pytorch import Trainer

    from pefttune.benchmark.recorder import BenchmarkRecorder

    torch.manual_seed(0)
    model = DualEncoderModule(tiny_vit(), tiny_bert(), LiT())
    results = tmp_path / "run.json"
    trainer = Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[BenchmarkRecorder(str(results))],
    )
    data = _video_data(eval_captions)
    trainer.fit(model, datamodule=data)
    # Lightning's own logger (rank_zero_info) does not propagate to the root logger: listen to it directly.
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        trainer.test(model, datamodule=data)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    assert model.caption_protocol == eval_captions
    written = json.loads(results.read_text())
    assert written["protocol"] == eval_captions
    assert "test/t2i_R@1" in written["metrics"]
    assert any(f"test retrieval under the {eval_captions!r} caption protocol" in m for m in messages)
