"""The declared checkpoint arguments of a strategy (AdaptationStrategy.checkpoint_arguments)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from examples.bitfit import BitFit
from pefttune.checkpointing import AdapterMismatchError, load_adapter, save_adapter
from pefttune.module import DualEncoderModule
from pefttune.strategies import APEX, CrossModalAdapter, DueT, FullFineTune, LiT, LoRA
from pefttune.strategies.base import AdaptationStrategy, constructor_arguments
from pefttune.testing import TINY_TOWER_PAIRS
from pefttune.towers.base import ImageTower, TextTower


def test_built_in_arguments_are_those_that_define_the_tensors() -> None:
    # The same keys the hand-written dicts held before the method existed: old checkpoints still match.
    assert CrossModalAdapter().checkpoint_arguments() == {
        "bottleneck": 8,
        "shared_dim": 16,
        "train_heads": False,
    }
    assert DueT(width=16, image_layers=(0, -1)).checkpoint_arguments() == {
        "width": 16,
        "image_layers": [0, -1],
        "text_layers": "all",
        "gate": "scalar",
        "learn_alpha": True,
        "unit_norm": "auto",
    }
    assert LoRA(targets=["q_proj"]).checkpoint_arguments() == {
        "r": 2,
        "alpha": 1.0,
        "dropout": 0.25,
        "rslora": True,
        "targets": ["q_proj"],
        "towers": "both",
        "train_projections": "auto",
    }
    assert set(APEX().checkpoint_arguments()) == {
        "visual_prompt_tokens",
        "visual_prompt_depth",
        "pixel_prompt_pad",
        "text_context_init",
        "text_context_length",
        "train_projections",
        "bank_size",
        "reference_prompts",
    }
    assert LiT(text_init="scratch").checkpoint_arguments() == {}
    assert FullFineTune(group_lr={"head": 1e-3}).checkpoint_arguments() == {}


def test_a_custom_strategy_gets_its_arguments_without_writing_them_down() -> None:
    assert BitFit(train_heads=False).checkpoint_arguments() == {
        "include_norm_biases": True,
        "train_heads": False,
    }


def test_a_custom_strategy_refuses_an_adapter_saved_with_other_arguments(tmp_path: Path) -> None:
    path = tmp_path / "bitfit.pt"
    save_adapter(DualEncoderModule(*TINY_TOWER_PAIRS["vit+bert"](), BitFit()), path)
    load_adapter(DualEncoderModule(*TINY_TOWER_PAIRS["vit+bert"](), BitFit()), path)
    other = DualEncoderModule(*TINY_TOWER_PAIRS["vit+bert"](), BitFit(include_norm_biases=False))
    with pytest.raises(AdapterMismatchError, match="include_norm_biases: checkpoint True, model False"):
        load_adapter(other, path)


class _Parent(AdaptationStrategy):
    init_only_arguments: ClassVar[tuple[str, ...]] = ("seed",)

    def __init__(self, size: int = 2, seed: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.size = size
        self.seed = seed

    def adapt(self, image_tower: ImageTower, text_tower: TextTower) -> None:
        image_tower.requires_grad_(True)


class _Child(_Parent):
    def __init__(self, depth: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.depth = depth


class _Forgetful(_Parent):
    def __init__(self, depth: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._depth = depth


class _Legacy(_Parent):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.init_args = {"size": self.size, "kind": ("a", "b")}


def test_arguments_follow_kwargs_up_to_the_parent_strategy() -> None:
    assert constructor_arguments(_Child) == [
        "depth",
        "size",
        "seed",
        "temperature",
        "group_lr",
        "no_decay_norms_and_biases",
    ]
    assert _Child(depth=3, size=5, seed=7, group_lr={"method": 1.0}).checkpoint_arguments() == {
        "depth": 3,
        "size": 5,
    }


def test_an_argument_kept_under_another_name_is_reported() -> None:
    with pytest.raises(TypeError, match=r"_Forgetful.__init__ takes 'depth'.*self.depth"):
        _Forgetful().checkpoint_arguments()


def test_a_hand_written_init_args_dict_still_works_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="init_args is deprecated"):
        assert _Legacy(size=4).checkpoint_arguments() == {"size": 4, "kind": ["a", "b"]}
