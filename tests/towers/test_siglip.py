"""Hugging Face SigLIP towers: each half alone, the checkpoint's scale and bias, the sigmoid loss by default."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import SiglipModel

from pefttune.losses import InfoNCELoss, SigLIPLoss
from pefttune.module import DualEncoderModule
from pefttune.strategies import CrossModalAdapter, DueT, LoRA
from pefttune.testing import tiny_siglip
from pefttune.towers import SiglipImageTower, SiglipTextTower
from pefttune.towers.hf_siglip import _siglip_config


def _pooled(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = SiglipModel(_siglip_config("pefttune/tiny-siglip"))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
        model.logit_bias.fill_(-7.0)
    path = tmp_path_factory.mktemp("siglip") / "model"
    model.save_pretrained(path)
    return str(path), model.eval()


def test_halves_load_the_checkpoint_and_encode_as_siglip_does(checkpoint):
    path, reference = checkpoint
    image = SiglipImageTower(path).eval()
    text = SiglipTextTower(path, max_length=16).eval()
    for tower in (image, text):
        assert tower.pretrained_logit_scale == pytest.approx(20.0)
        assert tower.pretrained_logit_bias == pytest.approx(-7.0)
        assert isinstance(tower.preferred_loss(), SigLIPLoss)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 1000, (2, 16))
    with torch.no_grad():
        want_image = _pooled(reference.get_image_features(pixel_values=pixels))
        torch.testing.assert_close(image(pixels), want_image, rtol=0, atol=1e-5)
        want_text = _pooled(reference.get_text_features(input_ids=ids))
        torch.testing.assert_close(text(ids, torch.ones_like(ids)), want_text, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_length=16"):
        text(ids[:, :8], torch.ones_like(ids[:, :8]))


def test_the_module_trains_with_the_sigmoid_loss_from_the_checkpoint_scale_and_bias(checkpoint):
    path, _ = checkpoint
    module = DualEncoderModule(
        SiglipImageTower(path), SiglipTextTower(path, max_length=16), CrossModalAdapter()
    )
    assert isinstance(module.loss, SigLIPLoss)
    assert float(module.logit_scale_value) == pytest.approx(20.0)
    assert float(module.logit_bias) == pytest.approx(-7.0)
    # A strategy that fixes its own scale keeps it; the bias still comes from the checkpoint.
    lora = DualEncoderModule(SiglipImageTower(path), SiglipTextTower(path, max_length=16), LoRA())
    assert float(lora.logit_scale_value) == pytest.approx(100.0)
    assert float(lora.logit_bias) == pytest.approx(-7.0)
    # A loss named in the config wins over the towers' preference.
    explicit = DualEncoderModule(*tiny_siglip(), DueT(width=8), loss=InfoNCELoss())
    assert isinstance(explicit.loss, InfoNCELoss) and explicit.logit_bias is None


def test_text_is_padded_to_max_length_with_prompt_slots_included():
    _, text = tiny_siglip()
    text.set_prompt_slots([7, 7])
    tokens = text.tokenize(["a cat", "a much longer caption about a dog on a mat"])
    assert tokens["input_ids"].shape == (2, 16)
    assert tokens["input_ids"][:, 1:3].eq(7).all()
