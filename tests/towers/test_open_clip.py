"""open_clip towers: checkpoint files, preprocessing, tokenization, and ``pefttune fit`` on a checkpoint file."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from PIL import Image

from pefttune.cli import main
from pefttune.losses import InfoNCELoss, SigLIPLoss
from pefttune.module import DualEncoderModule
from pefttune.strategies import CrossModalAdapter, LoRA
from pefttune.testing import tiny_open_clip
from pefttune.towers import OpenCLIPImageTower, OpenCLIPTextTower, architecture_only
from pefttune.towers.open_clip import register_pefttune_configs

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"


def _checkpoint_file(tmp_path: Path, name: str = "pefttune-tiny-openclip") -> tuple[Path, torch.nn.Module]:
    """An open_clip checkpoint written from an architecture-only model (random weights, logit scale 30)."""
    register_pefttune_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    path = tmp_path / "my_open_clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model.eval()


def test_towers_load_a_checkpoint_file_and_encode_as_open_clip_does(tmp_path):
    path, reference = _checkpoint_file(tmp_path)
    image = OpenCLIPImageTower("pefttune-tiny-openclip", pretrained=str(path)).eval()
    text = OpenCLIPTextTower("pefttune-tiny-openclip", pretrained=str(path)).eval()
    assert image.pretrained_logit_scale == pytest.approx(30.0) == text.pretrained_logit_scale
    assert image.pretrained_logit_bias is None and image.preferred_loss() is None
    pixels = torch.randn(2, 3, 32, 32)
    captions = ["a red circle", "two small blue squares on the left"]
    tokens = text.tokenize(captions)
    with torch.no_grad():
        torch.testing.assert_close(image(pixels), reference.encode_image(pixels), rtol=0, atol=1e-5)
        # open_clip pads every caption to the context length; pefttune only to the longest caption.
        full = open_clip.get_tokenizer("pefttune-tiny-openclip")(captions)
        assert torch.equal(tokens["input_ids"], full[:, : tokens["input_ids"].shape[1]])
        torch.testing.assert_close(text(**tokens), reference.encode_text(full), rtol=0, atol=1e-5)
    # Only the tower's half is kept.
    assert not any("token_embedding" in name for name, _ in image.named_parameters())
    assert not any(name.startswith("model.conv1") for name, _ in text.named_parameters())


def test_architecture_only_reads_no_file_and_a_bad_tag_is_named(tmp_path):
    with architecture_only():
        tower = OpenCLIPImageTower("pefttune-tiny-openclip", pretrained=str(tmp_path / "missing.pt"))
    assert tower.image_size == 32
    with pytest.raises(ValueError, match="not-a-tag"):
        OpenCLIPImageTower("ViT-B-32", pretrained="not-a-tag")


def test_openai_tag_builds_quickgelu_and_openai_preprocessing_without_download():
    with architecture_only():
        image = OpenCLIPImageTower("ViT-B-32", pretrained="openai")
    activations = {type(m).__name__ for m in image.model.modules()}
    assert "QuickGELU" in activations
    assert image.preprocess_cfg["interpolation"] == "bicubic"
    transform = image.image_transform(train=False)
    assert transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    assert image.embed_dim == 512 and image.feature_width == 768


def test_siglip_style_model_pads_to_context_and_prefers_the_sigmoid_loss():
    image, text = tiny_open_clip(timm_trunk=True)
    assert text.pad_to_max_length and text.tokenize(["a cat"])["input_ids"].shape == (1, 16)
    assert image.pretrained_logit_bias == pytest.approx(-10.0)
    module = DualEncoderModule(image, text, CrossModalAdapter(bottleneck=4, shared_dim=4))
    assert isinstance(module.loss, SigLIPLoss)
    assert float(module.logit_bias) == pytest.approx(-10.0)
    assert not module.logit_bias.requires_grad  # CMA freezes the temperature, bias included
    explicit = DualEncoderModule(*tiny_open_clip(timm_trunk=True), CrossModalAdapter(), loss=InfoNCELoss())
    assert isinstance(explicit.loss, InfoNCELoss) and explicit.logit_bias is None


def test_lora_splits_multihead_attention_into_linears_with_the_same_function():
    image, text = tiny_open_clip()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = text.tokenize(["a photo of a dog", "a cat"])
    with torch.no_grad():
        before = image.eval()(pixels), text.eval()(**tokens)
    DualEncoderModule(image, text, LoRA()).eval()
    with torch.no_grad():
        after = image(pixels), text(**tokens)
    for want, got in zip(before, after, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # LoRA's B starts at zero
    names = {n for n, _ in image.named_parameters() if "lora_A" in n}
    assert any(".attn.q_proj.lora_A" in n for n in names) and any(".attn.v_proj.lora_A" in n for n in names)
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in image.model.transformer.modules())


def test_apex_context_uses_the_open_clip_tokenizer():
    from pefttune.strategies import APEX

    image, text = tiny_open_clip()
    DualEncoderModule(image, text, APEX())
    ids = text.tokenize(["of a dog"])["input_ids"][0].tolist()
    photo = text.tokenizer("a photo", add_special_tokens=False)["input_ids"]
    assert len(photo) == 2 and ids[1:3] == photo  # the context slots follow the start token


def test_fit_on_an_open_clip_checkpoint_file_by_changing_two_lines(tmp_path):
    """The documented recipe (docs/towers.md): point both ``pretrained:`` lines of a shipped config at a file.

    The test also swaps the model name (its file holds a tiny architecture), the trainer and the data for
    CPU-sized ones; a user keeps them.
    """
    path, _ = _checkpoint_file(tmp_path)
    shipped = (PAPER / "cma_openclip_vitb32.yaml").read_text()
    assert shipped.count("pretrained: openai") == 2
    config = yaml.safe_load(shipped.replace("pretrained: openai", f"pretrained: {path}"))
    towers = config["model"]["init_args"]
    for key in ("image_tower", "text_tower"):
        assert towers[key]["init_args"]["pretrained"] == str(path)
        towers[key]["init_args"]["model_name"] = "pefttune-tiny-openclip"
    towers["text_tower"]["init_args"]["max_length"] = 16
    config["trainer"] = {
        "max_steps": 1,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "enable_progress_bar": False,
        "logger": False,
        "default_root_dir": str(tmp_path),
    }
    config["data"] = {
        "class_path": "pefttune.data.ImageTextDataModule",
        "init_args": {
            "source": {
                "class_path": "pefttune.data.sources.Synthetic",
                "init_args": {"num_train": 8, "num_val": 4, "num_test": 4},
            },
            "batch_size": 4,
        },
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path), f"--checkpoint.dirpath={tmp_path}/ckpt"])
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_unsupported_open_clip_towers_are_refused_by_name():
    with architecture_only(), pytest.raises(ValueError, match="ModifiedResNet"):
        OpenCLIPImageTower("RN50")
