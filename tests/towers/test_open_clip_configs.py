"""The open_clip variants of the paper configs reproduce the papers' trainable parameter counts.

Built architecture-only (``pefttune inspect --no-weights``): nothing is downloaded.
"""

from pathlib import Path

import pytest

from pefttune.cli import inspect_main

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"

COUNTS = {
    # Cross-Modal Adapter on ViT-B/32, CLIP-LoRA and APEX on ViT-B/16: as their Hugging Face configs.
    "cma_openclip_vitb32.yaml": 519_168,
    "lora_openclip_vitb16.yaml": 184_320,
    "apex_openclip_vitb16.yaml": 282_112,
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(COUNTS))
def test_open_clip_paper_config_reproduces_the_published_count(config):
    report = inspect_main(["--config", str(PAPER / config), "--no-weights"])
    assert report["trainable_params"] == COUNTS[config]
    assert report["trainable_by_group"] == {
        "method": COUNTS[config],
        "backbone": 0,
        "head": 0,
        "temperature": 0,
        "temporal": 0,
    }


@pytest.mark.parametrize("config", sorted(COUNTS))
def test_open_clip_paper_config_differs_from_its_hugging_face_twin_only_in_the_towers(config):
    ours = (PAPER / config).read_text().splitlines()
    twin = (PAPER / config.replace("openclip", "clip")).read_text().splitlines()
    strip = [line for line in ours if not line.startswith("#")]
    differing = {line.strip() for line in strip} - {line.strip() for line in twin}
    assert differing <= {
        "class_path: pefttune.towers.OpenCLIPImageTower",
        "class_path: pefttune.towers.OpenCLIPTextTower",
        "model_name: ViT-B-32",
        "model_name: ViT-B-16",
        "pretrained: openai   # open_clip tag, or a checkpoint file path",
        f"default_root_dir: runs/paper/{config.removesuffix('.yaml')}",
    }, differing
