"""Temporal aggregation: mean pooling is blind to the order of frames, CLIP4Clip's seqTransf is not."""

import pytest
import torch
import torch.nn.functional as F
from video_helpers import clips, pixels, video_batch

from pefttune.data.sources.synthetic_video import clip_captions
from pefttune.module import DualEncoderModule
from pefttune.strategies import LiT
from pefttune.strategies.base import AdaptationStrategy
from pefttune.testing import tiny_bert, tiny_cnn
from pefttune.towers import HFTextTower
from pefttune.towers.temporal import MeanPooling, SequenceTransformer, TemporalAggregator, masked_mean


def _model(temporal, strategy=None, text=None):
    torch.manual_seed(0)
    model = DualEncoderModule(tiny_cnn(), text or tiny_bert(), strategy or LiT(), temporal=temporal)
    model.eval()
    return model


def test_mean_pooling_is_the_masked_mean_of_normalised_frames():
    frames = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    pooled = MeanPooling(width=8)(frames, mask)
    unit = F.normalize(frames, dim=-1)
    assert torch.allclose(pooled[0], unit[0].mean(0), atol=1e-6)
    assert torch.allclose(pooled[1], unit[1, 0], atol=1e-6)
    assert torch.allclose(masked_mean(unit, mask), pooled)


def test_mean_pooling_gives_identical_embeddings_for_the_reversed_clip_and_seq_transf_does_not():
    forward = clips("test", 4, motions=("left to right", "grows", "appears", "top to bottom"))
    backward = [c.reversed() for c in forward]
    for clip, reverse in zip(forward, backward, strict=True):
        assert clip_captions(clip) != clip_captions(reverse)
    mean_model = _model(MeanPooling())
    values = pixels(mean_model.image_tower, forward)
    reversed_values = pixels(mean_model.image_tower, backward)
    # The generated reversed clip is exactly the frames in reverse order.
    assert torch.equal(reversed_values, values.flip(1))
    with torch.no_grad():
        mean_forward = mean_model.encode_images(values)
        mean_backward = mean_model.encode_images(reversed_values)
    assert torch.allclose(mean_forward, mean_backward, atol=1e-6)

    seq_model = _model(SequenceTransformer(num_layers=1))
    with torch.no_grad():
        seq_forward = seq_model.encode_images(values)
        seq_backward = seq_model.encode_images(reversed_values)
    difference = (seq_forward - seq_backward).norm(dim=-1)
    assert bool((difference > 1e-3).all()), difference


def test_seq_transf_starts_close_to_mean_pooling():
    frames = torch.randn(3, 6, 64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    torch.manual_seed(0)
    seq = SequenceTransformer(width=64)
    mean = MeanPooling(width=64)
    with torch.no_grad():
        cosine = F.cosine_similarity(seq(frames, mask), mean(frames, mask), dim=-1)
    assert bool((cosine > 0.95).all()), cosine
    # The residual branches start at zero: without position embeddings the module would be meanP exactly.
    with torch.no_grad():
        seq.frame_position_embeddings.weight.zero_()
        assert torch.allclose(F.normalize(seq(frames, mask), dim=-1), F.normalize(mean(frames, mask), dim=-1))


@pytest.mark.parametrize(
    "make", [lambda: MeanPooling(width=16), lambda: SequenceTransformer(num_layers=2, width=16)]
)
def test_padded_frames_do_not_change_the_embedding(make):
    torch.manual_seed(0)
    aggregator = make()
    frames = torch.randn(2, 3, 16)
    padded = torch.cat([frames, 1e3 * torch.randn(2, 2, 16)], dim=1)  # garbage in the padded slots
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    with torch.no_grad():
        assert torch.allclose(aggregator(padded, mask), aggregator(frames), atol=1e-5)


def test_padded_frames_do_not_change_the_module_embedding():
    model = _model(SequenceTransformer(num_layers=1))
    clip = clips("val", 1, num_frames=3)
    values = pixels(model.image_tower, clip)  # [1, 3, C, H, W]
    padded = torch.cat([values, torch.randn_like(values[:, :2])], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        assert torch.allclose(model.encode_images(padded, mask), model.encode_images(values), atol=1e-5)


def test_bad_input_is_refused_with_a_clear_error():
    aggregator = MeanPooling(width=4)
    with pytest.raises(ValueError, match="no real frame"):
        aggregator(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        aggregator(torch.randn(2, 4))
    with pytest.raises(ValueError, match="frame_mask"):
        aggregator(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for 4-wide"):
        aggregator.bind(8)
    with pytest.raises(RuntimeError, match="bind"):
        SequenceTransformer()(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="max_frames"):
        SequenceTransformer(width=64, max_frames=4)(torch.randn(1, 5, 64))
    with pytest.raises(ValueError, match="does not divide"):
        SequenceTransformer(width=24, num_heads=5)
    with pytest.raises(TypeError, match="TemporalAggregator"):
        DualEncoderModule(tiny_cnn(), tiny_bert(), LiT(), temporal=torch.nn.Identity())


def test_temporal_parameters_form_their_own_group_and_train_under_every_strategy():
    model = _model(SequenceTransformer(num_layers=1), strategy=LiT(group_lr={"temporal": 1e-3}))
    temporal = sum(p.numel() for p in model.temporal.parameters())
    report = model.parameter_report()
    assert report["trainable_by_group"]["temporal"] == temporal > 0
    assert sum(report["trainable_by_group"].values()) == report["trainable_params"]
    groups = model.strategy.parameter_groups(model)
    temporal_groups = [g for g in groups if g["name"].startswith("temporal")]
    assert {n for g in temporal_groups for n in g["param_names"]} == {
        f"temporal.{n}" for n, _ in model.temporal.named_parameters()
    }
    assert all(g["lr"] == 1e-3 for g in temporal_groups)
    # Weights decay; norms, biases and the position table's... 2-D table decays, biases and norms do not.
    no_decay = {n for g in temporal_groups if g["name"].endswith("no_decay") for n in g["param_names"]}
    assert "temporal.blocks.0.ln_1.weight" in no_decay and "temporal.blocks.0.mlp.c_fc.bias" in no_decay
    assert "temporal.blocks.0.mlp.c_fc.weight" not in no_decay
    # Mean pooling adds nothing.
    assert _model(MeanPooling()).parameter_report()["trainable_by_group"]["temporal"] == 0


def test_a_trainable_temporal_aggregator_is_a_subclass_away():
    class LastFrame(TemporalAggregator):
        def build(self, width):
            self.scale = torch.nn.Parameter(torch.ones(width))

        def aggregate(self, frames, frame_mask):
            last = frame_mask.long().sum(1) - 1
            return frames[torch.arange(frames.shape[0]), last] * self.scale

    model = _model(LastFrame())
    assert model.parameter_report()["trainable_by_group"]["temporal"] == model.image_tower.embed_dim
    batch = video_batch(model, clips("train", 2))
    assert model.encode_images(batch["pixel_values"], batch["frame_mask"]).shape == (
        2,
        model.image_tower.embed_dim,
    )


class _TemporalOnly(AdaptationStrategy):
    """Both towers stay frozen: only the temporal aggregator (and the temperature) can learn."""

    def adapt(self, image_tower, text_tower):
        pass


def _direction_accuracy(temporal, steps=200):
    """Train on left/right clip pairs; fraction of held-out clips scored higher with their own caption.

    The text tower is a frozen random BERT whose token embeddings are scaled up (std 3), so that captions
    differing in one word ("rightwards" / "leftwards") get clearly different embeddings; only the temporal
    module trains. The evaluated set holds every clip together with its reversal.
    """
    torch.manual_seed(0)
    text = HFTextTower("pefttune/tiny-bert", pretrained=False, embed_dim=24, max_length=16, pooling="mean")
    with torch.no_grad():
        text.token_entry.weight.normal_(std=3.0)
    model = DualEncoderModule(tiny_cnn(), text, _TemporalOnly(), temporal=temporal)
    caption = 2  # "... travels rightwards across the frame" / "... leftwards ..."
    base = clips("train", 16, motions=("left to right",))
    batches = [
        video_batch(
            model, [base[k], base[k].reversed(), base[k + 1], base[k + 1].reversed()], caption=caption
        )
        for k in range(0, len(base), 2)
    ]
    groups = model.strategy.parameter_groups(model)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=1e-2
    )
    model.train()
    for step in range(steps):
        loss = model.training_step(batches[step % len(batches)], step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = clips("test", 8, motions=("left to right",))
    held_out += [c.reversed() for c in held_out]
    with torch.no_grad():
        videos = model.encode_images(pixels(model.image_tower, held_out))
        own = model.encode_texts(**text.tokenize([clip_captions(c)[caption] for c in held_out]))
        other = model.encode_texts(**text.tokenize([clip_captions(c.reversed())[caption] for c in held_out]))
    return float(((videos * own).sum(-1) > (videos * other).sum(-1)).float().mean())


def test_seq_transf_learns_the_direction_of_motion_that_mean_pooling_cannot_see():
    # A clip and its reversal have the same mean-pooled embedding, so of each pair at most one is right.
    assert _direction_accuracy(MeanPooling()) <= 0.5
    assert _direction_accuracy(SequenceTransformer(num_layers=1)) >= 0.75
