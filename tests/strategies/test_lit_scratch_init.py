"""LiT with text_init: scratch re-initialises the text tower with the text model's own initialiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pefttune.strategies.lit import LiT, reinitialise_text_model
from pefttune.testing import tiny_bert, tiny_clip, tiny_vit


def _fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(value)


def test_scratch_reinitialises_bert_with_std_002() -> None:
    image, text = tiny_vit(), tiny_bert()
    assert text.model.config.initializer_range == pytest.approx(0.02)
    _fill(text.model, 1.0)  # whatever was there before must go
    LiT(text_init="scratch").apply(image, text)
    with torch.no_grad():
        linears = [m.weight for m in text.model.modules() if isinstance(m, nn.Linear)]
        weights = torch.cat([w.flatten() for w in linears])
        assert float(weights.mean()) == pytest.approx(0.0, abs=2e-3)
        assert float(weights.std()) == pytest.approx(0.02, rel=0.05)
        assert float(text.model.get_input_embeddings().weight.std()) == pytest.approx(0.02, rel=0.1)
        norms = [m for m in text.model.modules() if isinstance(m, nn.LayerNorm)]
        assert norms and all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)
        # PyTorch's own defaults would have drawn the linears far wider (Kaiming-uniform: 1/sqrt(3 fan_in)).
        assert float(weights.std()) < 0.5 / (3 * linears[0].shape[1]) ** 0.5
    assert all(p.requires_grad for p in text.parameters())


def test_scratch_follows_each_architectures_initialiser() -> None:
    """CLIP's text model has its own scheme (widths and depth set the std): same statistics as a new model."""
    image, text = tiny_clip()
    _fill(text.model, 1.0)
    LiT(text_init="scratch").apply(image, text)
    torch.manual_seed(0)
    fresh = type(text.model)(text.model.config)  # what from_config would build
    ours = dict(text.model.named_parameters())
    for name, parameter in fresh.named_parameters():
        if parameter.ndim == 2 and parameter.numel() >= 256:
            assert float(ours[name].detach().std()) == pytest.approx(
                float(parameter.detach().std()), rel=0.15
            ), name
        elif parameter.ndim == 1:
            assert torch.equal(ours[name].detach(), parameter.detach()), name  # ones and zeros


def test_pretrained_text_init_keeps_the_weights() -> None:
    image, text = tiny_vit(), tiny_bert()
    before = {n: p.detach().clone() for n, p in text.model.named_parameters()}
    LiT(text_init="pretrained").apply(image, text)
    assert all(torch.equal(p, before[n]) for n, p in text.model.named_parameters())


def test_modules_without_an_initialiser_get_the_transformer_convention() -> None:
    model = nn.Sequential(nn.Embedding(300, 64, padding_idx=0), nn.Linear(64, 128), nn.LayerNorm(128))
    _fill(model, 3.0)
    assert reinitialise_text_model(model) == "N(0, 0.02) for linear and embedding weights"
    assert float(model[1].weight.std()) == pytest.approx(0.02, rel=0.05)
    assert float(model[0].weight[1:].std()) == pytest.approx(0.02, rel=0.05)
    assert bool((model[0].weight[0] == 0).all()) and bool((model[1].bias == 0).all())
    assert bool((model[2].weight == 1).all()) and bool((model[2].bias == 0).all())
