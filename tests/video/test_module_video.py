"""DualEncoderModule on videos: frames folded into the batch, one embedding per video, cache per frame."""

import pytest
import torch
import torch.nn.functional as F
from video_helpers import clips, pixels, video_batch

from pefttune.module import DualEncoderModule
from pefttune.strategies import APEX, FullFineTune, LiT
from pefttune.testing import tiny_bert, tiny_cnn, tiny_vit
from pefttune.towers.temporal import MeanPooling, SequenceTransformer


def _model(strategy=None, temporal=None, image=None):
    torch.manual_seed(0)
    return DualEncoderModule(image or tiny_cnn(), tiny_bert(), strategy or FullFineTune(), temporal=temporal)


def test_video_frames_are_folded_into_the_batch_and_aggregated_per_video():
    model = _model(temporal=SequenceTransformer(num_layers=1)).eval()
    values = pixels(model.image_tower, clips("train", 3))  # [3, 4, C, H, W]
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    with torch.no_grad():
        videos = model.embed_images(values, mask)
        frames = torch.stack([model.image_tower(values[b]) for b in range(3)])  # each clip on its own
        expected = model.temporal(frames, mask)
    assert videos.shape == (3, model.image_tower.embed_dim)
    assert torch.allclose(videos, expected, atol=1e-5)
    normalised = model.encode_images(values, mask)
    assert torch.allclose(normalised, F.normalize(expected, dim=-1), atol=1e-5)


def test_a_one_frame_video_under_mean_pooling_is_the_image():
    model = _model(temporal=MeanPooling()).eval()
    values = pixels(model.image_tower, clips("val", 2))[:, :1]  # [2, 1, C, H, W]
    with torch.no_grad():
        assert torch.allclose(model.encode_images(values), model.encode_images(values[:, 0]), atol=1e-6)


def test_images_are_unchanged_and_refuse_a_frame_mask():
    model = _model().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_images(images), F.normalize(model.image_tower(images), dim=-1))
    with pytest.raises(ValueError, match="frame_mask belongs to videos"):
        model.encode_images(images, torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        model.encode_images(torch.randn(3, 32, 32))


def test_training_and_evaluation_steps_see_one_embedding_per_video():
    model = _model(temporal=SequenceTransformer(num_layers=1))
    batch = video_batch(model, clips("train", 4))
    batch["frame_mask"][1, 2:] = False
    batch["frame_indices"][1, 2:] = -1
    model.train()
    loss = model.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in model.temporal.parameters())
    model.eval()
    with torch.no_grad():
        images, texts = model.evaluation_embeddings(batch)
        predicted = model.predict_step(batch, 0)
    assert images.shape == texts.shape == (4, model.image_tower.embed_dim)
    assert predicted["image_embeds"].shape[0] == 4
    model.test_retrieval.update(
        images, batch["image_ids"], texts, batch["caption_ids"], batch["caption_image_ids"]
    )
    results = model.test_retrieval.compute()
    assert {"t2i_R@1", "i2t_R@1", "t2i_median_rank", "t2i_mean_rank"} <= set(results)


def _locked_model(temporal):
    # LiT locks the image tower; the tiny CNN's training transform is deterministic, so features cache.
    model = _model(LiT(), temporal)
    assert model._can_cache_image_features()
    return model


@pytest.mark.parametrize("temporal", [MeanPooling, lambda: SequenceTransformer(num_layers=1)])
def test_locked_cache_per_frame_equals_recomputation(temporal):
    model = _locked_model(temporal())
    model.train()
    batch = video_batch(model, clips("train", 3), ids=[10, 11, 12])
    batch["frame_mask"][2, 3:] = False
    batch["frame_indices"][2, 3:] = -1
    first = model._training_image_embeddings(batch)
    # One entry per real frame, keyed by (video id, frame index); padded frames are never stored.
    assert set(model._image_feature_cache) == {(i, t) for i in (10, 11, 12) for t in range(4)} - {(12, 3)}
    recomputed = model.encode_images(batch["pixel_values"], batch["frame_mask"])
    assert torch.allclose(first, recomputed, atol=1e-6)
    # Served from the cache: the tower is not called again, and the result is the same.
    calls = []
    handle = model.image_tower.register_forward_hook(lambda *args: calls.append(1))
    second = model._training_image_embeddings(batch)
    handle.remove()
    assert not calls
    assert torch.allclose(first, second)
    # The aggregator still trains on cached features.
    if any(True for _ in model.temporal.parameters()):
        second.sum().backward()
        assert all(p.grad is not None for p in model.temporal.parameters())


def test_locked_cache_fetches_only_frames_it_has_not_seen():
    model = _locked_model(MeanPooling())
    batch = video_batch(model, clips("train", 2), ids=[0, 1])
    model._training_image_embeddings(batch)
    # Another sampling of the same clip (training offsets differ per epoch): frames 4..7 of a longer clip.
    later = dict(batch, frame_indices=batch["frame_indices"] + 4)
    later["pixel_values"] = batch["pixel_values"].flip(1)
    seen = []
    handle = model.image_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    embeddings = model._training_image_embeddings(later)
    handle.remove()
    assert seen == [8]  # the 8 new (video, frame) pairs, in one call
    assert len(model._image_feature_cache) == 16
    assert torch.allclose(embeddings, model.encode_images(later["pixel_values"]), atol=1e-6)


def test_locked_cache_needs_frame_indices_and_new_weights_clear_it():
    model = _locked_model(MeanPooling())
    batch = video_batch(model, clips("train", 2))
    without = {k: v for k, v in batch.items() if k != "frame_indices"}
    with pytest.raises(KeyError, match="frame_indices"):
        model._training_image_embeddings(without)
    model._training_image_embeddings(batch)
    assert model._image_feature_cache
    model.load_state_dict(model.state_dict())
    assert not model._image_feature_cache


def test_apex_ensemble_on_video_goes_through_the_temporal_aggregator():
    torch.manual_seed(0)
    model = DualEncoderModule(tiny_vit(), tiny_bert(), APEX(), temporal=SequenceTransformer(num_layers=1))
    model.eval()
    batch = video_batch(model, clips("test", 3))
    model.strategy.on_evaluation_start(model, ["a red circle grows", "a blue square shrinks"])
    # The image-side weight is the mean text weight; set one strictly between 0 and 1 so both branches count.
    alpha = model.strategy._image_alpha = 0.3
    with torch.no_grad():
        ensemble = model.strategy.evaluation_image_embeddings(
            model, batch["pixel_values"], batch["frame_mask"]
        )
        prompted = model.embed_images(batch["pixel_values"], batch["frame_mask"])
        with model.strategy.components(visual="off"):
            frozen = model.embed_images(batch["pixel_values"], batch["frame_mask"])
    expected = F.normalize(alpha * prompted + (1 - alpha) * frozen, dim=-1)
    assert ensemble.shape == (3, model.image_tower.embed_dim)
    assert torch.allclose(ensemble, expected, atol=1e-5)


@pytest.mark.parametrize("strategy", [FullFineTune, LiT])
def test_grad_cache_on_video_gives_the_full_batch_gradients(strategy):
    def build(chunk):
        torch.manual_seed(0)
        model = DualEncoderModule(
            tiny_vit(), tiny_bert(), strategy(), temporal=SequenceTransformer(num_layers=1)
        )
        model.grad_cache_chunk_size = chunk
        for module in model.modules():  # dropout would differ between the two runs
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for tower in (model.text_tower,):
            tower.model.config.attention_probs_dropout_prob = 0.0
        return model.train()

    def step(model, batch):
        model.zero_grad(set_to_none=True)
        loss = model.training_step(batch, 0)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, cached = build(None), build(2)
    batch = video_batch(plain, clips("train", 4, num_frames=3))
    batch["frame_mask"][3, 2] = False
    batch["frame_indices"][3, 2] = -1
    expected, got = step(plain, batch), step(cached, batch)
    assert got.keys() == expected.keys() and any(n.startswith("temporal.") for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
