"""The strategy side of the contracts: attach vs nn.Module.apply, hooks' declared inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pefttune.module import DualEncoderModule
from pefttune.strategies import CrossModalAdapter, DueT
from pefttune.testing import tiny_bert, tiny_vit


def test_module_apply_reaches_every_submodule_including_the_strategys() -> None:
    model = DualEncoderModule(tiny_vit(), tiny_bert(), CrossModalAdapter(bottleneck=2, shared_dim=2))
    visited: list[nn.Module] = []
    returned = model.apply(visited.append)
    assert returned is model
    assert model.strategy in visited and model.strategy.cma_shared_up in visited
    assert len(visited) == len(list(model.modules()))


def test_module_apply_can_reinitialise_the_method_weights() -> None:
    model = DualEncoderModule(tiny_vit(), tiny_bert(), CrossModalAdapter(bottleneck=2, shared_dim=2))

    def zero(module: nn.Module) -> None:
        with torch.no_grad():
            for parameter in module.parameters(recurse=False):
                parameter.zero_()

    model.apply(zero)
    shared = list(model.strategy.parameters())
    assert shared and all(torch.count_nonzero(p) == 0 for p in shared)


def test_the_old_apply_with_two_towers_still_attaches_with_a_warning() -> None:
    strategy = DueT(width=8)
    image_tower, text_tower = tiny_vit(), tiny_bert()
    with pytest.warns(DeprecationWarning, match=r"use attach\(image_tower, text_tower\)"):
        strategy.apply(image_tower, text_tower)
    assert any(p.requires_grad for n, p in image_tower.named_parameters() if "duet_" in n)
    with pytest.raises(RuntimeError, match="already attached"):
        strategy.attach(image_tower, text_tower)
