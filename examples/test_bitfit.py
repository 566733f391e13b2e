"""Tests of the BitFit example strategy, on every tiny tower pair (the test matrix row of a new method)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from examples.bitfit import BitFit
from pefttune.data import ImageTextDataModule
from pefttune.data.sources import Synthetic
from pefttune.module import DualEncoderModule
from pefttune.testing import TINY_TOWER_PAIRS

CONFIG = Path(__file__).with_name("bitfit.yaml")


@pytest.fixture(params=sorted(TINY_TOWER_PAIRS))
def model(request: pytest.FixtureRequest) -> DualEncoderModule:
    torch.manual_seed(0)
    image_tower, text_tower = TINY_TOWER_PAIRS[request.param]()
    return DualEncoderModule(image_tower, text_tower, strategy=BitFit())


def test_only_biases_heads_and_temperature_train(model: DualEncoderModule) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = {n: model.strategy.group_of(n) for n in trainable}
    backbone = [n for n, g in groups.items() if g == "backbone"]
    assert backbone and all(n.endswith(".bias") for n in backbone)
    assert any(n.startswith("image_tower.") for n in backbone)
    assert any(n.startswith("text_tower.") for n in backbone)
    # Every bias of both bodies trains; no weight of them does.
    for name, parameter in model.named_parameters():
        in_body = name.startswith(("image_tower.model.", "text_tower.model."))
        if in_body:
            assert parameter.requires_grad == name.endswith(".bias"), name
    counts = model.strategy.trainable_by_group(model)
    assert counts["method"] == 0
    assert counts["backbone"] == sum(model.get_parameter(n).numel() for n in backbone)
    # The logit scale, plus the bias of a sigmoid loss (towers trained with it, SigLIP, prefer it).
    assert counts["temperature"] == 1 + (model.logit_bias is not None)
    heads = sum(p.numel() for n, p in model.named_parameters() if ".projection." in n and p.requires_grad)
    assert counts["head"] == heads


def test_norm_biases_can_stay_frozen() -> None:
    image_tower, text_tower = TINY_TOWER_PAIRS["vit+bert"]()
    model = DualEncoderModule(image_tower, text_tower, strategy=BitFit(include_norm_biases=False))
    for module in model.text_tower.model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert not module.bias.requires_grad
    assert any(p.requires_grad for n, p in model.text_tower.model.named_parameters() if n.endswith("bias"))


def test_training_changes_biases_only() -> None:
    seed_everything(0, verbose=False)
    image_tower, text_tower = TINY_TOWER_PAIRS["vit+bert"]()
    model = DualEncoderModule(image_tower, text_tower, strategy=BitFit())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = ImageTextDataModule(
        source=Synthetic(num_train=16, num_val=8, num_test=8, image_size=32),
        batch_size=8,
    )
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.endswith(".bias") and ".model." in n for n in changed)
    assert all(model.get_parameter(n).requires_grad for n in changed)
    assert not any(n.endswith(".weight") and ".model." in n for n in changed)


def test_config_names_this_strategy() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    strategy = config["model"]["init_args"]["strategy"]
    assert strategy["class_path"] == "examples.bitfit.BitFit"
    assert isinstance(BitFit(**strategy.get("init_args", {})), BitFit)


@pytest.mark.slow
def test_config_builds_the_offline_default() -> None:
    from pefttune.cli import build_model_from_config
    from pefttune.towers.base import architecture_only

    with architecture_only():
        model = build_model_from_config(str(CONFIG))
    counts = model.strategy.trainable_by_group(model)
    assert counts["method"] == 0 and counts["backbone"] > 0 and counts["head"] > 0
