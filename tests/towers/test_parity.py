"""Parity between tower sources: one CLIP's weights in Hugging Face and in open_clip give the same embeddings.

The weights are random (architecture-only, nothing downloaded), written once as a Hugging Face directory and
once, through :func:`pefttune.towers.convert.hf_clip_to_open_clip`, as an open_clip checkpoint file that the
open_clip towers load with ``pretrained=<file>``. Every strategy is then applied to both pairs with the same
seed: the adapted towers must still agree, so a result obtained with one source holds for the other.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPModel

from pefttune.module import DualEncoderModule
from pefttune.strategies import APEX, CrossModalAdapter, DueT, FullFineTune, LiT, LoRA
from pefttune.towers import CLIPImageTower, CLIPTextTower, OpenCLIPImageTower, OpenCLIPTextTower
from pefttune.towers.convert import hf_clip_to_open_clip, open_clip_to_hf_clip
from pefttune.towers.hf_clip import _clip_config

TOLERANCE = {"rtol": 0.0, "atol": 1e-5}

STRATEGIES = {
    "full": FullFineTune,
    "lit": LiT,
    "duet": lambda: DueT(width=16),
    "cma": lambda: CrossModalAdapter(bottleneck=4, shared_dim=4),
    "lora": LoRA,
    # A random text context start: the two sources' tokenizers spell "a photo" differently.
    "apex": lambda: APEX(text_context_init=None),
}


def _write_checkpoints(tmp_path, hf_name: str, seed: int = 0) -> tuple[str, str]:
    """One random CLIP as a Hugging Face directory and as an open_clip checkpoint file."""
    torch.manual_seed(seed)
    model = CLIPModel(_clip_config(hf_name))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zero-initialised or ones: make every tensor count
                parameter.add_(torch.randn_like(parameter) * 0.1)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    open_clip_file = tmp_path / "open_clip.pt"
    torch.save(hf_clip_to_open_clip(model.state_dict()), open_clip_file)
    return str(hf_dir), str(open_clip_file)


def _inputs(image_size: int, slots: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and token ids shared by both sources (start, slots, words, end-of-text, padding)."""
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, image_size, image_size, generator=generator)
    lengths = [5, 9, 7]
    ids = torch.zeros(3, max(lengths) + slots, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        words = torch.randint(300, 40_000, (length - 2,), generator=generator)
        tokens = torch.cat([torch.tensor([49406] + [400] * slots), words, torch.tensor([49407])])
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return pixels, ids, mask


def _towers(hf_dir: str, open_clip_file: str, open_clip_name: str):
    hf = (CLIPImageTower(hf_dir), CLIPTextTower(hf_dir))
    oc = (
        OpenCLIPImageTower(open_clip_name, open_clip_file),
        OpenCLIPTextTower(open_clip_name, open_clip_file),
    )
    return hf, oc


def _perturb_lora(module: DualEncoderModule) -> None:
    """Give every LoRA update a value (B starts at zero), by block and q/k/v, the same for both sources."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tower in (module.image_tower, module.text_tower):
            for block in tower.blocks():
                for layer in (block.qkv.query, block.qkv.key, block.qkv.value):
                    for weights in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                        weights.copy_(torch.randn(weights.shape, generator=generator) * 0.1)


def _embeddings(module: DualEncoderModule, pixels, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        return module.encode_images(pixels), module.encode_texts(ids, mask)


def test_conversion_round_trips_and_names_unknown_tensors():
    model = CLIPModel(_clip_config("pefttune/tiny-clip"))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    back = open_clip_to_hf_clip(hf_clip_to_open_clip(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(KeyError, match=r"extra\.weight"):
        hf_clip_to_open_clip({**state, "extra.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    return _write_checkpoints(tmp_path_factory.mktemp("parity"), "pefttune/tiny-clip")


def test_open_clip_towers_load_a_converted_checkpoint_file_and_match_hugging_face(tiny_checkpoints):
    (hf_image, hf_text), (oc_image, oc_text) = _towers(*tiny_checkpoints, "pefttune-tiny-openclip")
    assert oc_image.pretrained_logit_scale == pytest.approx(42.0) == hf_image.pretrained_logit_scale
    assert oc_text.pretrained_logit_scale == pytest.approx(42.0) == hf_text.pretrained_logit_scale
    pixels, ids, mask = _inputs(hf_image.image_size)
    for tower in (hf_image, hf_text, oc_image, oc_text):
        tower.eval()
    with torch.no_grad():
        torch.testing.assert_close(oc_image(pixels), hf_image(pixels), **TOLERANCE)
        torch.testing.assert_close(oc_text(ids, mask), hf_text(ids, mask), **TOLERANCE)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_gives_the_same_embeddings_on_both_sources(tiny_checkpoints, strategy):
    (hf_pair, oc_pair) = _towers(*tiny_checkpoints, "pefttune-tiny-openclip")
    modules = []
    for pair in (hf_pair, oc_pair):
        torch.manual_seed(11)  # the same seed for the strategy's new weights on both sources
        module = DualEncoderModule(*pair, strategy=STRATEGIES[strategy]())
        if strategy == "lora":
            _perturb_lora(module)
        modules.append(module)
    hf_module, oc_module = modules
    slots = hf_module.text_tower.num_prompt_slots
    assert slots == oc_module.text_tower.num_prompt_slots
    pixels, ids, mask = _inputs(hf_module.image_tower.image_size, slots)
    hf_images, hf_texts = _embeddings(hf_module, pixels, ids, mask)
    oc_images, oc_texts = _embeddings(oc_module, pixels, ids, mask)
    torch.testing.assert_close(oc_images, hf_images, **TOLERANCE)
    torch.testing.assert_close(oc_texts, hf_texts, **TOLERANCE)
    assert (
        hf_module.parameter_report()["trainable_params"] == oc_module.parameter_report()["trainable_params"]
    )
    assert float(hf_module.logit_scale) == pytest.approx(float(oc_module.logit_scale))
    if strategy in ("duet", "cma", "lora", "apex"):
        # The method changed the function (so the agreement above is not that of two frozen towers).
        with torch.no_grad():
            plain = CLIPImageTower(tiny_checkpoints[0]).eval()(pixels)
        assert not torch.allclose(torch.nn.functional.normalize(plain, dim=-1), hf_images, atol=1e-4)


@pytest.mark.slow
def test_real_vit_b32_shapes_match_between_sources(tmp_path):
    hf_dir, open_clip_file = _write_checkpoints(tmp_path, "openai/clip-vit-base-patch32")
    (hf_image, hf_text), (oc_image, oc_text) = _towers(hf_dir, open_clip_file, "ViT-B-32-quickgelu")
    pixels, ids, mask = _inputs(224)
    for tower in (hf_image, hf_text, oc_image, oc_text):
        tower.eval()
    with torch.no_grad():
        torch.testing.assert_close(oc_image(pixels[:2]), hf_image(pixels[:2]), **TOLERANCE)
        torch.testing.assert_close(oc_text(ids, mask), hf_text(ids, mask), **TOLERANCE)
