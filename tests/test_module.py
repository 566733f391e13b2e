import math

import lightning as L
import pytest
import torch

from pefttune.data import ImageTextDataModule
from pefttune.data.sources import Synthetic
from pefttune.losses import InfoNCELoss, MultiPositiveInfoNCELoss, SigLIPLoss
from pefttune.module import DualEncoderModule, NonFiniteLossError
from pefttune.strategies import FullFineTune, LiT, TemperaturePolicy
from pefttune.testing import tiny_bert, tiny_clip, tiny_cnn, tiny_vit


def _datamodule(**kwargs):
    options = dict(source=Synthetic(num_train=16, num_val=8, num_test=8, image_size=32), batch_size=8)
    options.update(kwargs)
    return ImageTextDataModule(**options)


def _trainer(**kwargs):
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def test_towers_with_different_widths_are_rejected():
    with pytest.raises(ValueError, match="embedding widths differ"):
        DualEncoderModule(tiny_vit(embed_dim=24), tiny_bert(embed_dim=16))


def test_full_fine_tune_trains_everything_and_groups_parameters():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    assert all(p.requires_grad for p in model.parameters())
    report = model.parameter_report()
    groups = report["trainable_by_group"]
    assert groups["method"] == 0 and groups["temperature"] == 1
    assert groups["head"] == sum(p.numel() for n, p in model.named_parameters() if ".projection." in n)
    assert sum(groups.values()) == report["trainable_params"] == report["total_params"]


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    groups = model.strategy.parameter_groups(model)
    for group in groups:
        for name, parameter in zip(group["param_names"], group["params"], strict=True):
            decays = group.get("weight_decay", None) != 0.0
            if name.endswith("bias") or parameter.ndim < 2 or "logit_scale" in name or "norm" in name.lower():
                assert not decays, name
            else:
                assert decays, name
    covered = sum(p.numel() for g in groups for p in g["params"])
    assert covered == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_group_learning_rates():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(group_lr={"head": 0.5}))
    groups = model.strategy.parameter_groups(model)
    assert all(g.get("lr") == 0.5 for g in groups if g["name"].startswith("head"))
    assert all("lr" not in g for g in groups if not g["name"].startswith("head"))
    with pytest.raises(ValueError, match="unknown groups"):
        FullFineTune(group_lr={"heads": 1.0})


def test_lit_locks_the_image_tower_and_starts_at_scale_ten():
    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert all(p.requires_grad for p in model.text_tower.parameters())
    assert math.isclose(model.logit_scale_value.item(), 10.0, rel_tol=1e-6)
    model.train()
    assert not model.image_tower.training


def test_lit_from_scratch_reinitialises_the_text_tower():
    text = tiny_bert(embed_dim=64)
    before = text.model.encoder.layer[0].attention.self.query.weight.clone()
    DualEncoderModule(tiny_vit(embed_dim=None), text, LiT(text_init="scratch"))
    assert not torch.equal(before, text.model.encoder.layer[0].attention.self.query.weight)


def test_clip_towers_take_the_checkpoint_logit_scale():
    image, text = tiny_clip()
    model = DualEncoderModule(image, text, FullFineTune())
    assert math.isclose(model.logit_scale_value.item(), image.pretrained_logit_scale, rel_tol=1e-5)
    fixed = DualEncoderModule(
        *tiny_clip(), FullFineTune(temperature=TemperaturePolicy(init=100.0, learnable=False))
    )
    assert not fixed.logit_scale.requires_grad and math.isclose(
        fixed.logit_scale_value.item(), 100.0, rel_tol=1e-5
    )


def test_siglip_loss_adds_a_learnable_bias_and_its_own_scale():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), loss=SigLIPLoss())
    assert model.logit_bias is not None and model.logit_bias.item() == SigLIPLoss.init_bias
    assert math.isclose(model.logit_scale_value.item(), 10.0, rel_tol=1e-6)
    assert model.strategy.trainable_by_group(model)["temperature"] == 2


def test_fit_validate_test_on_tiny_towers_and_logit_scale_clamp():
    strategy = FullFineTune(temperature=TemperaturePolicy(init=99.0, max_scale=100.0))
    model = DualEncoderModule(
        tiny_vit(), tiny_bert(), strategy, optimizer=lambda p: torch.optim.SGD(p, lr=10.0)
    )
    datamodule = _datamodule()
    trainer = _trainer(max_steps=2)
    trainer.fit(model, datamodule=datamodule)
    assert model.logit_scale_value.item() <= 100.0 + 1e-3
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    for key in ("test/i2t_R@1", "test/t2i_R@10", "test/rsum", "test/i2t_mean_R"):
        assert key in results


def test_locked_image_features_are_cached_with_identical_results():
    def run(cache: bool):
        torch.manual_seed(0)
        model = DualEncoderModule(
            tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT(), cache_locked_image_features=cache
        )
        L.seed_everything(0)
        trainer = _trainer(max_epochs=2, limit_val_batches=0)
        trainer.fit(model, datamodule=_datamodule())
        return model

    cached, recomputed = run(True), run(False)
    assert len(cached._image_feature_cache) == 16 and not recomputed._image_feature_cache
    # Identical up to float rounding: features encoded in batches of another size differ by ~1e-7, and
    # Adam turns the pure-rounding gradient of attention key biases (softmax ignores them) into ~1e-6 moves.
    for (name, a), (_, b) in zip(cached.named_parameters(), recomputed.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_cached_image_features_never_outlive_their_images_or_weights():
    torch.manual_seed(0)
    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "image_ids": torch.arange(4)}
    model._training_image_embeddings(batch)
    # New weights for the locked tower (a checkpoint, or a parent's load_state_dict): recomputed.
    other = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(
        model._training_image_embeddings(batch), model.encode_images(batch["pixel_values"])
    )
    # A later fit on another data set, whose image ids 0-3 are other images: nothing of the above is reused.
    stale = [feature.clone() for feature in model._image_feature_cache.values()]
    L.seed_everything(0)
    _trainer(max_steps=2, limit_val_batches=0).fit(model, datamodule=_datamodule())
    assert model._image_feature_cache
    for feature in model._image_feature_cache.values():
        assert not any(torch.allclose(feature, old) for old in stale)


def test_locked_image_features_state_round_trips_image_and_frame_keys():
    torch.manual_seed(0)
    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    assert model.locked_image_features_state() == {}
    for keys in ([3, 7], [(3, 0), (3, 5), (8, 2)]):  # image ids; (video id, frame index)
        model._image_feature_cache.clear()
        for key in keys:
            model._image_feature_cache[key] = torch.randn(16)
        state = model.locked_image_features_state()
        other = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
        other._image_feature_cache[99] = torch.zeros(16)  # replaced, not merged
        other.load_locked_image_features_state(state)
        assert list(other._image_feature_cache) == keys
        for key in keys:
            assert torch.equal(other._image_feature_cache[key], model._image_feature_cache[key])


def test_a_malformed_locked_image_features_state_is_named():
    model = DualEncoderModule(tiny_vit(embed_dim=None), tiny_bert(embed_dim=64), LiT())
    with pytest.raises(ValueError, match=r"keys \(3, 3\) and features \(3, 16\)"):
        model.load_locked_image_features_state(
            {"keys": torch.zeros(3, 3, dtype=torch.long), "features": torch.zeros(3, 16)}
        )


class _NaNAfterFirstLoss(InfoNCELoss):
    """NaN on the second call only (``only_once``) or on every call after the first."""

    def __init__(self, only_once: bool = False):
        super().__init__()
        self.only_once = only_once
        self.calls = 0

    def forward(self, *args, **kwargs):
        loss = super().forward(*args, **kwargs)
        self.calls += 1
        nan = self.calls == 2 if self.only_once else self.calls > 1
        return loss * float("nan") if nan else loss


def test_nonfinite_loss_stops_with_step_and_checkpoint_named():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), loss=_NaNAfterFirstLoss())
    with pytest.raises(NonFiniteLossError, match=r"global step 1 .*last good checkpoint"):
        _trainer(max_steps=3).fit(model, datamodule=_datamodule())


def test_nonfinite_loss_can_skip_the_step():
    model = DualEncoderModule(
        tiny_vit(),
        tiny_bert(),
        FullFineTune(),
        loss=_NaNAfterFirstLoss(only_once=True),
        nonfinite_loss="skip",
    )
    trainer = _trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=_datamodule())
    assert model.skipped_steps == 1 and model.loss.calls == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_multi_positive_loss_runs_on_a_cnn_tower():
    model = DualEncoderModule(tiny_cnn(), tiny_bert(), FullFineTune(), loss=MultiPositiveInfoNCELoss())
    _trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=_datamodule())
