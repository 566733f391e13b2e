"""APEX's ensemble with caption banks (retrieval): calibrated threshold, text-only, off, and the bank's kind."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pefttune.module import DualEncoderModule
from pefttune.strategies.apex import APEX, calibrated_threshold, ensemble_weights
from pefttune.testing import tiny_vit
from pefttune.towers import HFTextTower

TRAIN = [
    "a red circle on the left",
    "two blue squares",
    "a small white star at the top",
    "a green triangle next to a red circle",
    "three yellow dots in a row",
    "a large blue square in the centre",
    "a purple cross at the bottom",
    "two red circles and a star",
]
EVALUATED = ["a red square on the right", "one blue circle", "a white star at the bottom", TRAIN[0]]


def _module(**options: object) -> DualEncoderModule:
    text = HFTextTower("pefttune/tiny-bert", pretrained=False, embed_dim=24, max_length=16, pooling="mean")
    module = DualEncoderModule(tiny_vit(), text, strategy=APEX(**options))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def test_calibrated_threshold_is_a_quantile_of_leave_one_out_distances() -> None:
    angles = torch.tensor([0.0, 0.1, 0.3, 0.7, 1.5])
    bank = torch.stack([angles.cos(), angles.sin()], dim=1) * 3.0  # normalised inside
    # Nearest other text: 0.1, 0.1, 0.2, 0.4, 0.8 rad away.
    nearest = 1 - torch.tensor([0.1, 0.1, 0.2, 0.4, 0.8]).cos()
    assert calibrated_threshold(bank, 1.0) == pytest.approx(float(nearest.max()), rel=1e-5)
    assert calibrated_threshold(bank, 0.5) == pytest.approx(float(nearest.median()), rel=1e-5)
    with pytest.raises(ValueError, match="at least two bank rows"):
        calibrated_threshold(bank[:1])
    with pytest.raises(ValueError, match="seen_quantile"):
        calibrated_threshold(bank, 0.0)


def test_adaptive_caption_ensemble_uses_the_calibrated_threshold() -> None:
    module = _module(seen_quantile=0.9)
    strategy = module.strategy
    strategy.build_bank(module, TRAIN, kind="captions")
    assert strategy.bank_kind == "captions" and strategy.retrieval_mode == "adaptive"
    threshold = calibrated_threshold(strategy.bank, 0.9)
    assert strategy.seen_threshold == pytest.approx(threshold)
    strategy.on_evaluation_start(module, EVALUATED)
    batch = module.text_tower.tokenize(EVALUATED)
    with torch.no_grad():
        frozen = strategy.frozen_text_embeddings(module, **batch)
        expected = ensemble_weights(frozen, strategy.bank, threshold=threshold)
        assert strategy.text_alpha(module, **batch).tolist() == pytest.approx(expected.tolist())
    assert strategy._image_alpha == pytest.approx(float(expected.mean()))
    assert expected[3] == 1.0  # a training caption is seen
    # By construction at least 90% of the training captions count as seen against the rest of the bank.
    with torch.no_grad():
        rows = F.normalize(strategy.bank, dim=-1)
        cosine = rows @ rows.T
        cosine.fill_diagonal_(-2.0)
        seen = ((1 - cosine.max(dim=1).values).clamp_min(0) <= threshold).float().mean()
    assert float(seen) >= 0.9


def test_fixed_mode_keeps_apex_class_name_threshold_for_captions() -> None:
    module = _module(retrieval_ensemble="fixed", ensemble_threshold=0.05)
    module.strategy.build_bank(module, TRAIN, kind="captions")
    assert module.strategy.seen_threshold == 0.05


def test_text_only_mixes_texts_and_leaves_images_to_the_prompted_model() -> None:
    module = _module(retrieval_ensemble="text_only")
    strategy = module.strategy
    strategy.build_bank(module, TRAIN, kind="captions")
    strategy.on_evaluation_start(module, EVALUATED)
    assert strategy._image_alpha == 1.0
    batch = module.text_tower.tokenize(EVALUATED)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        alpha = strategy.text_alpha(module, **batch)
        with strategy.components(text_adapter=False):
            unadapted = module.text_tower(**batch)
        adapted = module.text_tower(**batch)
        mixed = F.normalize(alpha[:, None] * adapted + (1 - alpha[:, None]) * unadapted, dim=-1)
        torch.testing.assert_close(strategy.evaluation_text_embeddings(module, **batch), mixed)
        torch.testing.assert_close(
            strategy.evaluation_image_embeddings(module, images), module.encode_images(images)
        )


def test_off_evaluates_the_adapted_model_for_captions_but_not_for_class_prompts() -> None:
    module = _module(retrieval_ensemble="off")
    strategy = module.strategy
    strategy.build_bank(module, TRAIN, kind="captions")
    strategy.on_evaluation_start(module, EVALUATED)
    assert not strategy.ensemble_active
    batch = module.text_tower.tokenize(EVALUATED)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            strategy.evaluation_text_embeddings(module, **batch), module.encode_texts(**batch)
        )
        torch.testing.assert_close(
            strategy.evaluation_image_embeddings(module, images), module.encode_images(images)
        )
    # With class prompts APEX's own rule applies whatever retrieval_ensemble says.
    strategy.build_bank(module, TRAIN, kind="class_prompts")
    assert strategy.ensemble_active and strategy.retrieval_mode is None and strategy.seen_threshold == 0.05


def test_fit_start_records_what_the_bank_holds() -> None:
    from pefttune.strategies.base import TrainingTexts

    module = _module()
    module.strategy.on_fit_start(module, TrainingTexts(tuple(TRAIN[:4]), "captions"))
    assert module.strategy.bank_kind == "captions"
    module = _module()
    module.strategy.on_fit_start(module, TrainingTexts(("of a cat.", "of a dog."), "class_prompts"))
    assert module.strategy.bank_kind == "class_prompts"


def test_bank_kind_travels_with_the_state_and_old_states_load(caplog: pytest.LogCaptureFixture) -> None:
    module = _module()
    module.strategy.build_bank(module, TRAIN, kind="captions")
    state = module.state_dict()
    assert int(state["strategy.apex_text_bank_kind"]) == 1
    other = _module()
    other.load_state_dict(state)
    assert other.strategy.bank_kind == "captions"
    del state["strategy.apex_text_bank_kind"]
    older = _module()
    with caplog.at_level(logging.WARNING):
        older.load_state_dict(state)
    assert (
        older.strategy.bank_kind == "class_prompts" and "does not say what its text bank holds" in caplog.text
    )


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="retrieval_ensemble"):
        APEX(retrieval_ensemble="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seen_quantile"):
        APEX(seen_quantile=1.5)
    module = _module()
    with pytest.raises(ValueError, match="kind"):
        module.strategy.build_bank(module, TRAIN, kind="words")  # type: ignore[arg-type]
