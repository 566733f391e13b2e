"""Shared pieces of the reliability tests: one row per strategy, tiny towers, tiny synthetic data."""

from __future__ import annotations

import functools
from collections.abc import Callable

import lightning as L
import torch

from pefttune.data import ImageTextDataModule
from pefttune.module import DualEncoderModule
from pefttune.strategies import FullFineTune, LiT
from pefttune.strategies.apex import APEX
from pefttune.strategies.cross_modal_adapter import CrossModalAdapter
from pefttune.strategies.duet import DueT
from pefttune.strategies.lora import LoRA
from pefttune.testing import TINY_TOWER_PAIRS

# name -> (tower pair from pefttune.testing, strategy factory). Adding a method is one row.
STRATEGIES: dict[str, tuple[str, Callable[[], object]]] = {
    "full": ("vit+bert", FullFineTune),
    "lit": ("vit+bert", LiT),
    "duet": ("vit+bert", lambda: DueT(width=16)),
    "cma": ("clip", lambda: CrossModalAdapter(bottleneck=4, shared_dim=4)),
    "lora": ("clip", lambda: LoRA(r=2, dropout=0.25)),
    "apex": ("clip", lambda: APEX(visual_prompt_depth=2, bank_size=16)),
}


def build_model(name: str, seed: int = 0, pair: str | None = None, lr: float = 1e-2) -> DualEncoderModule:
    """The row's model on tiny random towers, identical for identical seeds."""
    default_pair, factory = STRATEGIES[name]
    torch.manual_seed(seed)
    image_tower, text_tower = TINY_TOWER_PAIRS[pair or default_pair]()
    return DualEncoderModule(
        image_tower,
        text_tower,
        strategy=factory(),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),  # picklable for ddp_spawn
    )


def datamodule(**kwargs: object) -> ImageTextDataModule:
    options: dict[str, object] = dict(
        synthetic_train=16, synthetic_val=8, synthetic_test=8, synthetic_image_size=32, batch_size=4
    )
    options.update(kwargs)
    return ImageTextDataModule(**options)


def trainer(**kwargs: object) -> L.Trainer:
    options: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)
