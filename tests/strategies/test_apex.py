"""APEX: prompts, text context, identity adapter, adaptive ensemble, the text bank and the CNN fallback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pefttune.layers.linear_adapter import LinearAdapter
from pefttune.layers.prompts import (
    AppendPromptTokens,
    PixelPaddingPrompt,
    ReplacePromptTokens,
    StripPromptTokens,
    TextContext,
)
from pefttune.losses import InfoNCELoss
from pefttune.module import DualEncoderModule
from pefttune.strategies.apex import APEX, ensemble_weights
from pefttune.testing import tiny_bert, tiny_clip, tiny_cnn, tiny_vit
from pefttune.towers import HFTextTower

TEXTS = ["a red circle on the left", "two blue squares", "a photo of a dog.", "a small white star at the top"]


def build(pair: tuple, **options) -> DualEncoderModule:
    image_tower, text_tower = pair
    return DualEncoderModule(image_tower, text_tower, strategy=APEX(**options))


def pixels(module: DualEncoderModule, batch: int = 3) -> torch.Tensor:
    size = module.image_tower.image_size
    return torch.randn(batch, 3, size, size)


def tokens(module: DualEncoderModule, texts: list[str]) -> dict[str, torch.Tensor]:
    return module.text_tower.tokenize(texts)


def perturb(module: DualEncoderModule, scale: float = 0.2) -> None:
    """Move every trainable tensor away from its initialisation, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def mean_bert() -> HFTextTower:
    """The tiny BERT with mean pooling: unlike its CLS token at random weights, it tells texts apart."""
    return HFTextTower("pefttune/tiny-bert", pretrained=False, embed_dim=24, max_length=16, pooling="mean")


ENSEMBLE_PAIRS = {
    "vit": lambda: (tiny_vit(), mean_bert()),
    "cnn": lambda: (tiny_cnn(), mean_bert()),
    "clip": tiny_clip,
}


# -- what trains ------------------------------------------------------------------------------------------
def test_trainable_parameters_are_the_method_modules(tower_pair: tuple) -> None:
    image_tower, text_tower = tower_pair
    module = build(tower_pair)
    groups = module.strategy.trainable_by_group(module)
    assert groups["backbone"] == groups["head"] == groups["temperature"] == 0
    assert not module.logit_scale.requires_grad
    d = text_tower.embed_dim
    context = 2 * text_tower.feature_width
    if image_tower.token_entry is None:
        size = image_tower.image_size
        pad = round(30 * size / 224)
        visual = 3 * (2 * pad * size + 2 * pad * (size - 2 * pad))
    else:
        blocks = image_tower.blocks()
        visual = min(12, len(blocks)) * 2 * blocks[0].width
    assert groups["method"] == visual + context + d * d + d
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(any(part.startswith("apex_") for part in name.split(".")) for name in trainable)


def test_train_projections_adds_the_heads() -> None:
    module = build((tiny_vit(), tiny_bert()), train_projections=True)
    groups = module.strategy.trainable_by_group(module)
    assert groups["head"] == 64 * 24 + 32 * 24  # test_vit width 64 and tiny BERT width 32, both to 24
    assert groups["backbone"] == 0


# -- initialisation ---------------------------------------------------------------------------------------
def test_adapter_is_the_identity_at_initialisation(tower_pair: tuple) -> None:
    module = build(tower_pair)
    adapter = module.strategy.text_adapter
    assert isinstance(adapter, LinearAdapter)
    torch.testing.assert_close(adapter.linear.weight, torch.eye(module.text_tower.embed_dim))
    torch.testing.assert_close(adapter.linear.bias, torch.zeros(module.text_tower.embed_dim))
    batch = tokens(module, TEXTS)
    module.eval()
    with torch.no_grad():
        adapted = module.text_tower(**batch)
        with module.strategy.components(text_adapter=False):
            plain = module.text_tower(**batch)
    torch.testing.assert_close(adapted, plain)


def test_text_context_starts_as_the_words_it_replaces() -> None:
    module = build((tiny_vit(), tiny_bert()))
    tokenizer = module.text_tower.tokenizer
    slot_ids = tokenizer("a photo", add_special_tokens=False)["input_ids"]
    assert module.text_tower.prompt_slot_ids == tuple(slot_ids)
    batch = tokens(module, ["of a dog."])
    assert batch["input_ids"][0, 1:3].tolist() == slot_ids
    module.eval()
    with torch.no_grad():
        learned = module.text_tower(**batch)
        with module.strategy.components(text_context=False):
            words = module.text_tower(**batch)
        # The slots with their word embeddings are the tokenized sentence "a photo of a dog.".
        with module.strategy.frozen():
            sentence = module.text_tower.tokenizer(["a photo of a dog."], return_tensors="pt")
            plain = module.text_tower(sentence["input_ids"], sentence["attention_mask"])
    torch.testing.assert_close(learned, words)
    torch.testing.assert_close(words, plain)


def test_context_length_must_match_the_init_words() -> None:
    with pytest.raises(ValueError, match="text_context_length"):
        build((tiny_vit(), tiny_bert()), text_context_init="a photo of", text_context_length=2)


def test_random_context_uses_placeholder_tokens() -> None:
    module = build((tiny_vit(), tiny_bert()), text_context_init=None, text_context_length=3)
    x_id = module.text_tower.tokenizer("X", add_special_tokens=False)["input_ids"][0]
    assert module.text_tower.prompt_slot_ids == (x_id, x_id, x_id)
    assert module.strategy.text_prompt_prefix == ""
    context = module.strategy._context_modules[0]
    assert context.vectors.shape == (3, module.text_tower.feature_width)
    assert 0.005 < float(context.vectors.detach().std()) < 0.05


def test_strip_prompt_prefix() -> None:
    strategy = APEX()
    assert strategy.text_prompt_prefix == "a photo"
    assert strategy.strip_prompt_prefix("a photo of a {}.") == "of a {}."
    assert strategy.strip_prompt_prefix("A Photo of a {}.") == "of a {}."
    assert strategy.strip_prompt_prefix("a photograph of a {}.") == "a photograph of a {}."
    assert strategy.strip_prompt_prefix("{} texture.") == "{} texture."


# -- deep visual prompts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: (tiny_vit(), tiny_bert()), tiny_clip], ids=["vit", "clip"])
def test_visual_prompts_are_appended_replaced_and_stripped(make) -> None:
    image_tower, text_tower = make()
    torch.manual_seed(0)
    images = torch.randn(2, 3, image_tower.image_size, image_tower.image_size)
    image_tower.eval()
    with torch.no_grad():
        before = image_tower(images)
    module = DualEncoderModule(image_tower, text_tower, strategy=APEX(visual_prompt_depth=2))
    blocks = image_tower.blocks()
    seen: dict[int, list[tuple[int, ...]]] = {}

    def record(index: int):
        def hook(_module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen.setdefault(index, []).append((args[0].shape[1], hidden.shape[1]))

        return hook

    handles = [b.module.register_forward_hook(record(b.index)) for b in blocks]
    module.eval()
    with torch.no_grad():
        prompted = image_tower(images)
    for handle in handles:
        handle.remove()
    entry_tokens = seen[0][0][0] - 2
    # Every block sees the 2 prompt tokens; the last block's output has them stripped.
    for index in range(len(blocks) - 1):
        assert seen[index][0] == (entry_tokens + 2, entry_tokens + 2)
    assert seen[len(blocks) - 1][0] == (entry_tokens + 2, entry_tokens)
    assert not torch.allclose(prompted, before)
    with torch.no_grad(), module.strategy.frozen():
        frozen = image_tower(images)
    torch.testing.assert_close(frozen, before)
    # Depth 2: the prompts of layer 0 (entry) and layer 1 (replaced before block 1).
    kinds = [type(m) for m in module.strategy._visual_modules]
    assert kinds == [AppendPromptTokens, ReplacePromptTokens, StripPromptTokens]


def test_replaced_prompts_get_gradients_at_every_layer() -> None:
    module = build((tiny_vit(), tiny_bert()))
    images = pixels(module)
    module.image_tower(images).sum().backward()
    prompts = [m for m in module.strategy._visual_modules if hasattr(m, "prompts")]
    assert len(prompts) == len(module.image_tower.blocks())
    for prompt in prompts:
        assert prompt.prompts.grad is not None and prompt.prompts.grad.abs().sum() > 0
        torch.testing.assert_close(prompt.prompts.std(), torch.tensor(0.02), atol=0.01, rtol=0)


# -- the ensemble weights ---------------------------------------------------------------------------------
def test_alpha_matches_hand_computed_values() -> None:
    e = torch.eye(4)
    bank = torch.stack([e[0], e[1]])
    texts = torch.stack(
        [
            e[0],  # a training text: d_nn = 0
            e[0] * math.cos(0.3) + e[2] * math.sin(0.3),  # d_nn = 1 - cos(0.3) = 0.0447 <= 0.05
            (e[0] + e[2]) / math.sqrt(2),  # cos 0.7071 and 0: d_nn 0.2929, d_avg 1 - 0.35355
            e[3],  # orthogonal to the bank: d_nn = 1, d_avg = 1
            -e[0],  # opposite: d_nn = 1, d_avg = 1 - (-1 + 0) / 2 = 1.5
        ]
    )
    alpha = ensemble_weights(texts * 3.0, bank * 0.5)  # unnormalised inputs: cosines only
    expected = torch.tensor(
        [1.0, 1.0, math.exp(-4 * (1 - 0.70710678 / 2)), math.exp(-4.0), math.exp(-4 * 1.5)]
    )
    torch.testing.assert_close(alpha, expected)
    # beta and the threshold are options.
    torch.testing.assert_close(
        ensemble_weights(texts, bank, beta=2.0, threshold=0.01)[1],
        torch.tensor(math.exp(-2 * (1 - math.cos(0.3) / 2))),
    )
    with pytest.raises(ValueError, match="at least one"):
        ensemble_weights(texts, torch.zeros(0, 4))


def test_training_texts_get_alpha_one_and_evaluate_as_the_adapted_model() -> None:
    module = build((tiny_vit(), tiny_bert()))
    perturb(module)
    module.eval()
    module.strategy.build_bank(module, TEXTS)
    assert module.strategy.bank.shape == (len(TEXTS), module.text_tower.embed_dim)
    module.strategy.on_evaluation_start(module, TEXTS)
    assert module.strategy._image_alpha == 1.0
    batch = tokens(module, TEXTS)
    images = pixels(module)
    with torch.no_grad():
        torch.testing.assert_close(
            module.strategy.evaluation_text_embeddings(module, **batch), module.encode_texts(**batch)
        )
        torch.testing.assert_close(
            module.strategy.evaluation_image_embeddings(module, images), module.encode_images(images)
        )


@pytest.mark.parametrize("pair", sorted(ENSEMBLE_PAIRS))
def test_ensemble_mixes_features_before_normalisation(pair: str) -> None:
    module = build(ENSEMBLE_PAIRS[pair](), ensemble_threshold=0.02)
    perturb(module)
    module.eval()
    strategy = module.strategy
    strategy.build_bank(module, TEXTS[:2])
    evaluated = ["a large green triangle in the centre", "a purple cross", TEXTS[0]]
    strategy.on_evaluation_start(module, evaluated)
    batch = tokens(module, evaluated)
    images = pixels(module)
    with torch.no_grad():
        frozen = strategy.frozen_text_embeddings(module, **batch)
        alpha = ensemble_weights(frozen, strategy.bank, threshold=0.02)
        assert alpha[2] == 1.0 and bool((alpha < 1).any())
        with strategy.components(text_adapter=False):
            unadapted = module.text_tower(**batch)
        adapted = module.text_tower(**batch)
        expected_text = F.normalize(alpha[:, None] * adapted + (1 - alpha[:, None]) * unadapted, dim=-1)
        mean_alpha = float(alpha.mean())
        assert strategy._image_alpha == pytest.approx(mean_alpha)
        prompted = module.image_tower(images)
        with strategy.frozen():
            plain = module.image_tower(images)
        expected_image = F.normalize(mean_alpha * prompted + (1 - mean_alpha) * plain, dim=-1)
        text_embeds = strategy.evaluation_text_embeddings(module, **batch)
        image_embeds = strategy.evaluation_image_embeddings(module, images)
    torch.testing.assert_close(text_embeds, expected_text)
    torch.testing.assert_close(image_embeds, expected_image)
    # Mixing normalised features instead would give something else.
    wrong = F.normalize(
        alpha[:, None] * F.normalize(adapted, dim=-1) + (1 - alpha[:, None]) * F.normalize(unadapted, dim=-1),
        dim=-1,
    )
    assert not torch.allclose(text_embeds, wrong, atol=1e-5)
    # A text's weight does not depend on the batch it comes in.
    single = tokens(module, evaluated[:1])
    strategy._alpha_cache.clear()
    with torch.no_grad():
        torch.testing.assert_close(strategy.text_alpha(module, **single), alpha[:1])


def test_ensemble_can_be_switched_off() -> None:
    module = build((tiny_vit(), tiny_bert()), ensemble=False)
    perturb(module)
    module.eval()
    module.strategy.build_bank(module, TEXTS[:1])
    module.strategy.on_evaluation_start(module, TEXTS[1:])
    batch = tokens(module, TEXTS[1:])
    images = pixels(module)
    with torch.no_grad():
        torch.testing.assert_close(
            module.strategy.evaluation_text_embeddings(module, **batch), module.encode_texts(**batch)
        )
        torch.testing.assert_close(
            module.strategy.evaluation_image_embeddings(module, images), module.encode_images(images)
        )


def test_random_reference_prompts_form_the_frozen_image_branch() -> None:
    module = build((tiny_vit(), mean_bert()), reference_prompts="random", ensemble_threshold=0.02)
    perturb(module)
    module.eval()
    keys = [k for k in module.state_dict() if k.endswith("apex_prompts.reference")]
    assert len(keys) == len(module.image_tower.blocks())
    assert set(keys) <= set(module.strategy.adapter_state_keys(module))
    strategy = module.strategy
    strategy.build_bank(module, TEXTS[:1])
    strategy.on_evaluation_start(module, TEXTS[1:])
    alpha = strategy._image_alpha
    assert alpha < 1
    images = pixels(module)
    with torch.no_grad():
        prompted = module.image_tower(images)
        with strategy.components(visual="reference"):
            reference = module.image_tower(images)
        with strategy.frozen():
            plain = module.image_tower(images)
        result = strategy.evaluation_image_embeddings(module, images)
    torch.testing.assert_close(result, F.normalize(alpha * prompted + (1 - alpha) * reference, dim=-1))
    assert not torch.allclose(reference, plain)
    with pytest.raises(ValueError, match="without reference"):
        build((tiny_vit(), tiny_bert())).strategy.components(visual="reference").__enter__()


# -- training ---------------------------------------------------------------------------------------------
def test_no_ensemble_during_training(monkeypatch: pytest.MonkeyPatch) -> None:
    module = build((tiny_vit(), mean_bert()), ensemble_threshold=0.02)
    perturb(module)
    strategy = module.strategy
    module.eval()
    strategy.build_bank(module, TEXTS[:1])
    strategy.on_evaluation_start(module, TEXTS[1:])
    assert strategy._image_alpha < 1
    batch = {**tokens(module, TEXTS[1:]), "pixel_values": pixels(module), "image_ids": torch.arange(3)}

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the ensemble must not run during training")

    with torch.no_grad():
        evaluated = strategy.evaluation_text_embeddings(module, batch["input_ids"], batch["attention_mask"])
    monkeypatch.setattr(strategy, "evaluation_text_embeddings", forbidden)
    monkeypatch.setattr(strategy, "evaluation_image_embeddings", forbidden)
    module.train()
    torch.manual_seed(5)  # the same dropout masks in both forward passes
    loss = module.training_step(batch, 0)
    torch.manual_seed(5)
    images = module.encode_images(batch["pixel_values"])
    texts = module.encode_texts(batch["input_ids"], batch["attention_mask"])
    expected = InfoNCELoss()(images, texts, module.logit_scale_value, None, image_ids=batch["image_ids"])
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(texts, evaluated, atol=1e-4)


def test_pixel_prompt_fallback_on_a_cnn_trains() -> None:
    module = build((tiny_cnn(), tiny_bert()))
    prompts = module.strategy._visual_modules
    assert len(prompts) == 1 and isinstance(prompts[0], PixelPaddingPrompt)
    prompt = prompts[0]
    assert prompt.pad == 4  # 30 px at 224 px, scaled to 32 px
    frozen_state = {k: v.clone() for k, v in module.state_dict().items() if "apex_" not in k}
    start = {n: p.detach().clone() for n, p in prompt.named_parameters()}
    torch.manual_seed(0)
    batch = {**tokens(module, TEXTS), "pixel_values": pixels(module, 4), "image_ids": torch.arange(4)}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.01)
    module.train()
    losses = []
    for _ in range(6):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        assert prompt.top.grad is not None and prompt.top.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, parameter in prompt.named_parameters():
        assert not torch.equal(parameter, start[name])
    # Everything else, BatchNorm running statistics included, is untouched.
    for key, value in module.state_dict().items():
        if key in frozen_state:
            assert torch.equal(value, frozen_state[key]), key
    # Only the border moves pixels.
    frame = prompt.frame()
    assert frame[:, 4:-4, 4:-4].abs().sum() == 0
    assert frame[:, :4].abs().sum() > 0 and frame[:, :, -4:].abs().sum() > 0


def test_pixel_prompt_counts_and_checks_its_input() -> None:
    prompt = PixelPaddingPrompt(224, 30)
    assert sum(p.numel() for p in prompt.parameters()) == PixelPaddingPrompt.num_parameters(224, 30) == 69_840
    with pytest.raises(ValueError, match="224x224"):
        prompt(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match="pad"):
        PixelPaddingPrompt(32, 16)


def test_text_context_module_overwrites_only_the_slots() -> None:
    context = TextContext(torch.ones(2, 4))
    embeddings = torch.zeros(3, 6, 4)
    out = context(embeddings)
    assert out[:, 1:3].eq(1).all() and out[:, 0].eq(0).all() and out[:, 3:].eq(0).all()
    context.mode = "off"
    assert torch.equal(context(embeddings), embeddings)


# -- the bank in checkpoints ------------------------------------------------------------------------------
def test_bank_survives_save_and_load(tmp_path) -> None:
    module = build((tiny_vit(), tiny_bert()))
    perturb(module)
    module.strategy.build_bank(module, TEXTS)
    assert "strategy.apex_text_bank" in module.strategy.adapter_state_keys(module)
    path = tmp_path / "model.pt"
    torch.save(module.state_dict(), path)
    fresh = build((tiny_vit(), tiny_bert()))
    assert fresh.strategy.bank.shape[0] == 0
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(fresh.strategy.bank, module.strategy.bank)
    # An adapter-only checkpoint restores the method too (a bank of another size included).
    keys = module.strategy.adapter_state_keys(module)
    adapter_only = {k: v for k, v in module.state_dict().items() if k in keys}
    other = build((tiny_vit(), tiny_bert()))
    other.strategy.build_bank(other, TEXTS[:1])
    other.load_state_dict(adapter_only, strict=False)
    torch.testing.assert_close(other.strategy.bank, module.strategy.bank)
    for key in keys:
        torch.testing.assert_close(other.state_dict()[key], module.state_dict()[key])


def test_adapter_checkpoint_carries_the_bank_and_ignores_evaluation_options(tmp_path) -> None:
    from pefttune.checkpointing import load_adapter, save_adapter

    torch.manual_seed(0)
    module = build((tiny_vit(), mean_bert()))
    perturb(module)
    module.strategy.build_bank(module, TEXTS)
    save_adapter(module, tmp_path / "apex.pt")
    # Measuring without the ensemble, or with other ensemble settings, loads the same adapter.
    torch.manual_seed(0)  # the same random backbone (real towers load the same checkpoint)
    fresh = build((tiny_vit(), mean_bert()), ensemble=False, ensemble_beta=2.0)
    load_adapter(fresh, tmp_path / "apex.pt")
    torch.testing.assert_close(fresh.strategy.bank, module.strategy.bank)
    batch = tokens(module, TEXTS)
    module.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_texts(**batch), module.encode_texts(**batch))


def test_fit_builds_the_bank_from_the_data_module(tmp_path) -> None:
    from lightning.pytorch import Trainer

    from pefttune.data import ImageTextDataModule
    from pefttune.data.sources import Synthetic

    module = build((tiny_vit(), tiny_bert()), bank_size=20)
    data = ImageTextDataModule(
        source=Synthetic(num_train=8, num_val=4, num_test=4, image_size=32),
        batch_size=8,
        test_split=None,
    )
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    bank = module.strategy.bank
    captions = {c for record in data.records("train") for c in record.captions}
    assert bank.shape == (min(20, len(captions)), module.text_tower.embed_dim)
    assert module.strategy._image_alpha is not None
    path = tmp_path / "apex.ckpt"
    trainer.save_checkpoint(path)
    restored = DualEncoderModule.load_from_checkpoint(
        path, image_tower=tiny_vit(), text_tower=tiny_bert(), strategy=APEX(bank_size=20)
    )
    torch.testing.assert_close(restored.strategy.bank, bank)


def test_base_to_new_classification_uses_the_same_hooks(tmp_path, monkeypatch) -> None:
    from lightning.pytorch import Trainer

    from pefttune.data.classification import ClassificationDataModule
    from pefttune.data.sources import Synthetic
    from pefttune.losses import MultiPositiveInfoNCELoss

    image_tower, text_tower = tiny_vit(), mean_bert()
    # Random tiny towers embed all class prompts alike; a small threshold still tells new classes apart.
    strategy = APEX(ensemble_threshold=1e-3)
    module = DualEncoderModule(image_tower, text_tower, strategy=strategy, loss=MultiPositiveInfoNCELoss())
    data = ClassificationDataModule(
        source=Synthetic(num_train=256, num_val=16, num_test=64, image_size=32, held_out_fraction=0.0),
        split_classes="base_to_new",
        shots=1,
        batch_size=6,
    )
    image_alpha: list[float] = []
    original = strategy.on_evaluation_start

    def spy(module_, texts):
        original(module_, texts)
        image_alpha.append(strategy._image_alpha)

    monkeypatch.setattr(strategy, "on_evaluation_start", spy)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    # The bank holds the training class prompts, without the words the context plays.
    assert data.prompt_prefix == "a photo"
    assert strategy.bank.shape[0] == len(data.training_texts()) == 18
    assert all(not text.startswith("a photo") for text in data.training_texts())
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    assert {"test/acc_base", "test/acc_new", "test/acc_hm"} <= set(results)
    # Base classes are the training classes: every alpha is 1, no ensemble; new classes are mixed.
    assert image_alpha[0] == 1.0
    assert image_alpha[1] < 1.0


@pytest.mark.slow
def test_paper_parameter_count_on_clip_vit_b16() -> None:
    from pefttune.cli import inspect_main

    config = Path(__file__).parents[2] / "configs" / "paper" / "apex_clip_vitb16.yaml"
    report = inspect_main(["--config", str(config), "--no-weights"])
    assert report["trainable_params"] == 282_112
    assert report["trainable_by_group"] == {
        "method": 282_112,
        "backbone": 0,
        "head": 0,
        "temperature": 0,
        "temporal": 0,
    }
