"""The strategy side of the contracts: attach vs nn.Module.apply, hooks' declared inputs."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from pefttune.data import ImageTextDataModule
from pefttune.data.contracts import ClassificationData
from pefttune.data.sources import Synthetic
from pefttune.module import DualEncoderModule, training_texts
from pefttune.strategies import CrossModalAdapter, DueT, FullFineTune
from pefttune.strategies.base import AdaptationStrategy, DualEncoder, SizedImageTower, TrainingTexts
from pefttune.testing import tiny_bert, tiny_cnn, tiny_vit


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


class _Recorder(FullFineTune):
    """Full fine-tuning that records what its fit hook receives."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.received: list[tuple[object, list[str]]] = []

    def on_fit_start(self, encoder: DualEncoder, training_texts: TrainingTexts) -> None:
        self.received.append((encoder, training_texts))


class _TextRecorder(_Recorder):
    uses_training_texts: ClassVar[bool] = True


def _fit_one_step(strategy: AdaptationStrategy) -> tuple[DualEncoderModule, ImageTextDataModule]:
    model = DualEncoderModule(tiny_vit(), tiny_bert(), strategy)
    data = ImageTextDataModule(
        source=Synthetic(num_train=4, num_val=4, num_test=4, image_size=32),
        batch_size=4,
    )
    trainer = Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return model, data


def test_fit_hook_gets_the_encoder_and_the_training_texts_only_when_declared() -> None:
    quiet, _ = _fit_one_step(_Recorder())
    [(encoder, texts)] = quiet.strategy.received
    assert encoder is quiet and isinstance(encoder, DualEncoder) and len(texts) == 0

    asking, data = _fit_one_step(_TextRecorder())
    [(_, texts)] = asking.strategy.received
    expected = [caption for record in data.records("train") for caption in record.captions]
    assert list(texts) == expected and len(texts) >= 4 and texts.kind == "captions"


def test_an_override_with_the_old_fit_hook_signature_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match=r"on_fit_start\(self, encoder, training_texts\)"):

        class _Old(FullFineTune):
            def on_fit_start(self, module: object, trainer: object) -> None:
                pass


class _Texts:
    """A retrieval data module as the model sees it (RetrievalData)."""

    eval_captions = "all"

    def attach_preprocessing(self, preprocessing: object) -> None:
        pass

    def evaluation_texts(self, stage: str) -> list[str]:
        return []

    def training_texts(self) -> list[str]:
        return ["a cat", "a dog"]


class _ClassPrompts(_Texts):
    """A classification data module (ClassificationData)."""

    def evaluation_groups(self, stage: str) -> list[object]:
        return []

    def set_prompt_prefix(self, prefix: str) -> None:
        pass


class _Streaming(_Texts):
    def training_texts(self) -> list[str]:
        raise RuntimeError("the train split streams from shards and has no record list")


class _Undeclared:
    """Has the method but does not implement the contract: not asked."""

    def training_texts(self) -> list[str]:
        return ["a cat"]


def test_training_texts_come_from_the_declared_call_and_a_streamed_split_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert len(training_texts(None)) == 0
    assert len(training_texts(_Undeclared())) == 0
    assert isinstance(_ClassPrompts(), ClassificationData) and not isinstance(_Texts(), ClassificationData)
    assert training_texts(_Texts()) == TrainingTexts(("a cat", "a dog"), "captions")
    assert training_texts(_ClassPrompts()) == TrainingTexts(("a cat", "a dog"), "class_prompts")
    with caplog.at_level("WARNING"):
        assert training_texts(_Streaming()).texts == ()
    assert "streams from shards" in caplog.text
    with pytest.raises(ValueError, match="'captions' or 'class_prompts'"):
        TrainingTexts(("a",), "prompts")  # type: ignore[arg-type]


def test_a_tower_without_image_size_is_not_a_sized_image_tower() -> None:
    assert isinstance(tiny_cnn(), SizedImageTower)
    assert not isinstance(tiny_bert(), SizedImageTower)
