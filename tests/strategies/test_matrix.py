"""The method x tower matrix: every registered method on every tiny tower pair (peft's TEST_CASES idea).

The rows come from :mod:`pefttune.strategies.registry` (each method's ``test_arguments``): registering a
method adds its row.
"""

import pytest
import torch

from pefttune.module import DualEncoderModule
from pefttune.strategies import FullFineTune
from pefttune.strategies.registry import get_method, methods
from pefttune.testing import TINY_TOWER_PAIRS

METHODS = [spec.name for spec in methods()]


def _towers(pair: str, method: str):
    image, text = TINY_TOWER_PAIRS[pair]()
    return image, text


def _batch(image, text, size=4):
    tokens = text.tokenize(
        [f"a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green", "pink"][:size])]
    )
    return {
        "pixel_values": torch.randn(size, 3, image.image_size, image.image_size),
        "image_ids": torch.arange(size),
        "text_ids": torch.arange(size),
        **tokens,
    }


@pytest.mark.parametrize("pair", sorted(TINY_TOWER_PAIRS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_strategy_trains_exactly_what_it_declares(method, pair):
    torch.manual_seed(0)
    model = DualEncoderModule(*_towers(pair, method), get_method(method).build_for_tests())
    torch.manual_seed(0)
    baseline = DualEncoderModule(*_towers(pair, method), FullFineTune())
    model.train()
    batch = _batch(model.image_tower, model.text_tower)
    image_embeds, text_embeds = model(batch)
    loss = model.loss(
        image_embeds,
        text_embeds,
        model.logit_scale_value,
        model.logit_bias,
        batch["image_ids"],
        batch["text_ids"],
    )
    loss.backward()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable, "a strategy must train something"
    assert with_grad <= trainable, f"frozen parameters received gradient: {sorted(with_grad - trainable)[:5]}"
    assert with_grad, "no trainable parameter received gradient"

    # Every parameter the method adds carries its prefix (adapter-only checkpoints are a name filter).
    prefix = model.strategy.prefix
    added = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in baseline.parameters())
    prefixed = sum(
        p.numel()
        for n, p in model.named_parameters()
        if prefix and any(part.startswith(prefix) for part in n.split("."))
    )
    assert added == prefixed

    report = model.parameter_report()
    assert sum(report["trainable_by_group"].values()) == report["trainable_params"]
    if prefix:
        assert report["trainable_by_group"]["method"] > 0
    keys = set(model.strategy.adapter_state_keys(model))
    assert trainable <= keys
