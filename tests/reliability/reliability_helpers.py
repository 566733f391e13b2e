"""Shared pieces of the reliability tests: one row per strategy, tiny towers, tiny synthetic data."""

from __future__ import annotations

import functools
from collections.abc import Callable

import lightning as L
import torch

from pefttune.data import ImageTextDataModule
from pefttune.data.sources import Synthetic
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
    """The tiny synthetic data module; ``num_*``/``image_size`` go to the source, the rest to the module."""
    sizes = {
        key: kwargs.pop(key) for key in ("num_train", "num_val", "num_test", "image_size") if key in kwargs
    }
    options: dict[str, object] = dict(
        source=Synthetic(**{"num_train": 16, "num_val": 8, "num_test": 8, "image_size": 32, **sizes}),
        batch_size=4,
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


# The same rows as class_path specs, for runs through the ``pefttune`` command.
CLI_STRATEGIES: dict[str, tuple[str, dict]] = {
    "full": ("vit+bert", {"class_path": "pefttune.strategies.FullFineTune"}),
    "lit": ("vit+bert", {"class_path": "pefttune.strategies.LiT"}),
    "duet": ("vit+bert", {"class_path": "pefttune.strategies.duet.DueT", "init_args": {"width": 16}}),
    "cma": (
        "clip",
        {
            "class_path": "pefttune.strategies.cross_modal_adapter.CrossModalAdapter",
            "init_args": {"bottleneck": 4, "shared_dim": 4},
        },
    ),
    "lora": ("clip", {"class_path": "pefttune.strategies.lora.LoRA", "init_args": {"r": 2, "dropout": 0.25}}),
    "apex": (
        "clip",
        {
            "class_path": "pefttune.strategies.apex.APEX",
            "init_args": {"visual_prompt_depth": 2, "bank_size": 16},
        },
    ),
}


def tiny_clip_config() -> dict[str, dict]:
    """``pefttune.testing.tiny_clip()`` as class_path specs."""
    return {
        "image_tower": {
            "class_path": "pefttune.towers.CLIPImageTower",
            "init_args": {"model_name": "pefttune/tiny-clip", "pretrained": False},
        },
        "text_tower": {
            "class_path": "pefttune.towers.CLIPTextTower",
            "init_args": {"model_name": "pefttune/tiny-clip", "pretrained": False, "max_length": 16},
        },
    }


def cli_config(root, name: str = "duet", epochs: int = 3, callbacks: list | None = None, **sections) -> dict:
    """A fit config of a row on tiny towers and 8 synthetic pairs (2 steps per epoch), logging under root."""
    from pefttune.testing import tiny_tower_config

    pair, strategy = CLI_STRATEGIES[name]
    towers = tiny_clip_config() if pair == "clip" else tiny_tower_config()
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "deterministic": True,
            "log_every_n_steps": 1,
            "default_root_dir": str(root),
            "callbacks": callbacks or [],
        },
        "model": {
            "class_path": "pefttune.module.DualEncoderModule",
            "init_args": {
                **towers,
                "strategy": strategy,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            },
        },
        "data": {
            "class_path": "pefttune.data.ImageTextDataModule",
            "init_args": {
                "source": {
                    "class_path": "pefttune.data.sources.Synthetic",
                    "init_args": {"num_train": 8, "num_val": 8, "num_test": 8, "image_size": 32},
                },
                "batch_size": 4,
                "max_train_samples": 8,
            },
        },
    }
    for key, value in sections.items():
        config[key] = value
    return config


def write_config(path, config: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return str(path)


class StoppedError(RuntimeError):
    """Raised by :class:`StopAtStep`."""


class StopAtStep(L.Callback):
    """Fails the run like a killed job once ``step`` optimizer steps are done (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise StoppedError(f"stopped at step {trainer.global_step}")
