"""GradCache gives the full-batch gradients: functional core, the module option, a Lightning fit step."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn

from pefttune.data import ImageTextDataModule, Synthetic
from pefttune.gradcache import cached_embeddings, split_batch
from pefttune.losses import InfoNCELoss, MultiPositiveInfoNCELoss, SigLIPLoss
from pefttune.module import DualEncoderModule
from pefttune.strategies import FullFineTune, LiT
from pefttune.testing import tiny_bert, tiny_cnn, tiny_vit

LOSSES = {
    "infonce": InfoNCELoss,
    "multipositive": MultiPositiveInfoNCELoss,
    "sigmoid": SigLIPLoss,
}
BATCH = 8


def without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for config in (getattr(getattr(t, "model", None), "config", None) for t in model.modules()):
        if config is not None and hasattr(config, "attention_probs_dropout_prob"):
            config.attention_probs_dropout_prob = 0.0
    return model


def make_model(loss: str = "infonce", chunk: int | None = None, dropout: bool = False, **kwargs):
    torch.manual_seed(0)
    model = DualEncoderModule(
        tiny_vit(), tiny_bert(), kwargs.pop("strategy", FullFineTune()), loss=LOSSES[loss](), **kwargs
    )
    model.grad_cache_chunk_size = chunk
    model.train()
    return model if dropout else without_dropout(model)


def make_batch(model: DualEncoderModule, size: int = BATCH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    captions = [f"a photo of object {i % 5} number {i}" for i in range(size)]
    tokens = model.text_tower.tokenize(captions)
    image_ids = torch.tensor([i % 6 for i in range(size)])  # duplicates: multi-positive has work to do
    return {
        # Equal ids, equal images (the locked tower's feature cache relies on it).
        "pixel_values": torch.randn(6, 3, 32, 32, generator=generator)[image_ids],
        **tokens,
        "image_ids": image_ids,
        "caption_ids": torch.arange(size),
        "text_ids": torch.tensor([i % 7 for i in range(size)]),
    }


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, expected, atol=1e-5, rtol=1e-5):
    assert got.keys() == expected.keys()
    nonzero = 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
        nonzero += bool(grad.abs().max() > 0)
    assert nonzero > len(expected) // 2  # the comparison is not between zeros


def step_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model.training_step(batch, 0)
    model.backward(loss)
    return float(loss.detach()), gradients(model)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("chunk", [1, 3, BATCH])
def test_module_gradients_equal_the_full_batch(loss, chunk):
    plain = make_model(loss)
    batch = make_batch(plain)
    plain_loss, expected = step_gradients(plain, batch)
    cached = make_model(loss, chunk=chunk)
    cached_loss, got = step_gradients(cached, batch)
    assert abs(cached_loss - plain_loss) < 1e-6
    # Every trainable parameter (towers, projections, temperature, SigLIP's bias) has a gradient.
    assert got.keys() == {n for n, p in cached.named_parameters() if p.requires_grad}
    assert_same_gradients(got, expected)


def test_dropout_masks_are_replayed_exactly():
    """With dropout on, the re-run of each chunk must draw the masks of its first pass."""

    def reference(seed):
        model = make_model(dropout=True)
        batch = make_batch(model)
        torch.manual_seed(seed)
        # The first pass's order: every image chunk, then every text chunk, each with its own draws.
        images = torch.cat([model.encode_images(c) for c in batch["pixel_values"].split(3)])
        texts = torch.cat(
            [
                model.encode_texts(i, m)
                for i, m in zip(batch["input_ids"].split(3), batch["attention_mask"].split(3), strict=True)
            ]
        )
        model.loss(images, texts, model.logit_scale_value).backward()
        return gradients(model)

    model = make_model(chunk=3, dropout=True)
    batch = make_batch(model)
    torch.manual_seed(5)
    model.backward(model.training_step(batch, 0))
    assert_same_gradients(gradients(model), reference(5))
    # The draws matter: another seed gives other gradients, so the equality above is the replay's doing.
    other = reference(6)
    assert any(not torch.allclose(other[n], g, atol=1e-5) for n, g in gradients(model).items())


def test_bf16_autocast_is_replayed():
    """The backward pass runs outside the caller's autocast; the re-run must enter it again."""
    model = make_model(chunk=4)
    batch = make_batch(model)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    # Reference: each chunk in its own autocast region, as the re-runs are (autocast's cast weights are
    # cached per region, so one region for all chunks would sum their bf16 gradients in bf16 first).
    images, texts = [], []
    for pixels in batch["pixel_values"].split(4):
        with bf16():
            images.append(model.encode_images(pixels))
    for ids, mask in zip(batch["input_ids"].split(4), batch["attention_mask"].split(4), strict=True):
        with bf16():
            texts.append(model.encode_texts(ids, mask))
    with bf16():
        loss = model.loss(torch.cat(images), torch.cat(texts), model.logit_scale_value)
    loss.backward()  # outside autocast, as Lightning runs it (autocast would also change the loss's backward)
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(batch, 0)
    loss.backward()
    assert_same_gradients(gradients(model), expected, atol=1e-6, rtol=1e-4)
    # Without autocast the gradients differ at bf16 resolution: the test above can tell.
    full = make_model()
    step_gradients(full, batch)
    assert any(not torch.allclose(g, expected[n], atol=1e-4) for n, g in gradients(full).items())


def test_locked_tower_and_feature_cache_with_grad_cache():
    def lit(chunk):
        torch.manual_seed(0)
        model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
        model.grad_cache_chunk_size = chunk
        return without_dropout(model.train())

    plain, cached = lit(None), lit(3)
    batch = make_batch(plain)
    _, expected = step_gradients(plain, batch)
    _, got = step_gradients(cached, batch)
    assert_same_gradients(got, expected)
    assert len(cached._image_feature_cache) == 6  # six distinct image ids, cached chunk by chunk
    assert not any(n.startswith("image_tower.") for n in got)


def test_batchnorm_running_statistics_are_updated_once():
    def cnn(chunk):
        torch.manual_seed(0)
        model = DualEncoderModule(tiny_cnn(), tiny_bert(), FullFineTune())
        model.grad_cache_chunk_size = chunk
        return without_dropout(model.train())

    plain, cached = cnn(None), cnn(BATCH)
    batch = make_batch(plain)
    _, expected = step_gradients(plain, batch)
    _, got = step_gradients(cached, batch)
    # One chunk of the whole batch: BatchNorm sees the same statistics, so even a CNN is exact.
    assert_same_gradients(got, expected)
    for (name, a), (_, b) in zip(plain.named_buffers(), cached.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


def test_functional_core_on_plain_modules():
    torch.manual_seed(0)
    image, text = nn.Linear(6, 4), nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 4))
    x, y = torch.randn(7, 6), torch.randn(7, 5)
    loss_fn = InfoNCELoss()

    def loss_of(images, texts):
        return loss_fn(nn.functional.normalize(images, dim=-1), nn.functional.normalize(texts, dim=-1), 5.0)

    loss_of(image(x), text(y)).backward()
    expected = [p.grad.clone() for p in (*image.parameters(), *text.parameters())]
    image.zero_grad(), text.zero_grad()
    images = cached_embeddings(image, x.split(2))
    texts = cached_embeddings(text, y.split(3))
    assert images.requires_grad and images.grad_fn is not None
    loss_of(images, texts).backward()
    for got, want in zip((p.grad for p in (*image.parameters(), *text.parameters())), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert not cached_embeddings(image, x.split(2)).requires_grad
    with pytest.raises(ValueError, match="at least one chunk"):
        cached_embeddings(image, [])


def test_split_batch_checks_its_input():
    chunks = split_batch({"a": torch.arange(5), "b": torch.arange(10).reshape(5, 2)}, 2)
    assert [len(c["a"]) for c in chunks] == [2, 2, 1] and chunks[2]["b"].tolist() == [[8, 9]]
    with pytest.raises(ValueError, match="same number of rows"):
        split_batch({"a": torch.arange(5), "b": torch.arange(4)}, 2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        split_batch({"a": torch.arange(5)}, 0)
    with pytest.raises(ValueError, match="grad_cache_chunk_size"):
        DualEncoderModule(tiny_vit(), tiny_bert(), grad_cache_chunk_size=0)


def _fit(chunk, optimizer=None, **trainer_options):
    # SGD: parameters move linearly with the gradients (Adam would blow float rounding up to lr-sized moves
    # in parameters whose gradient is pure rounding noise).
    optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    model = make_model("infonce", optimizer=optimizer)
    model.grad_cache_chunk_size = chunk
    data = ImageTextDataModule(
        source=Synthetic(num_train=16, num_val=4, num_test=4, image_size=32), batch_size=8
    )
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **trainer_options,
    )
    trainer.fit(model, datamodule=data)
    return model


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_clip_val": 0.01, "accumulate_grad_batches": 2}],
    ids=["plain", "clip+accumulate"],
)
def test_fit_steps_equal_the_plain_steps(options):
    plain, cached = _fit(None, **options), _fit(3, **options)
    moved = 0
    initial = make_model()
    for (name, a), (_, b), (_, start) in zip(
        plain.named_parameters(), cached.named_parameters(), initial.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        moved += not torch.equal(a, start)
    assert moved > 0


def test_grad_cache_composes_with_activation_checkpointing():
    from pefttune.towers import HFTextTower, TimmImageTower

    def model(checkpointing: bool, chunk):
        torch.manual_seed(0)
        image = TimmImageTower(
            "test_vit", pretrained=False, embed_dim=24, image_size=32, gradient_checkpointing=checkpointing
        )
        text = HFTextTower(
            "pefttune/tiny-bert",
            pretrained=False,
            embed_dim=24,
            max_length=16,
            gradient_checkpointing=checkpointing,
        )
        built = DualEncoderModule(image, text, FullFineTune(), grad_cache_chunk_size=chunk)
        return without_dropout(built.train())

    plain = model(False, None)
    batch = make_batch(plain)
    _, expected = step_gradients(plain, batch)
    _, got = step_gradients(model(True, 3), batch)
    assert_same_gradients(got, expected)
