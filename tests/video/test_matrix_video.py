"""Every registered method on videos, on every tiny tower pair, with both temporal aggregators.

The same contract as the image matrix (``tests/strategies/test_matrix.py``), on a video batch: frames fold
into the image tower's batch, losses see one embedding per video, the method trains exactly what it declares,
the temporal module is counted in its own group, and evaluation (the method's own, APEX's ensemble included)
gives one normalised embedding per video.
"""

import pytest
import torch
from video_helpers import clips, video_batch

from pefttune.data.sources.synthetic_video import clip_captions
from pefttune.module import DualEncoderModule
from pefttune.strategies.registry import get_method, methods
from pefttune.testing import TINY_TOWER_PAIRS
from pefttune.towers.temporal import MeanPooling, SequenceTransformer

METHODS = [spec.name for spec in methods()]
TEMPORAL = {"meanP": MeanPooling, "seqTransf": lambda: SequenceTransformer(num_layers=1)}


@pytest.mark.parametrize("temporal", sorted(TEMPORAL))
@pytest.mark.parametrize("pair", sorted(TINY_TOWER_PAIRS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_and_evaluates_on_video(method, pair, temporal):
    torch.manual_seed(0)
    image, text = TINY_TOWER_PAIRS[pair]()
    model = DualEncoderModule(
        image, text, get_method(method).build_for_tests(), temporal=TEMPORAL[temporal]()
    )
    clip_list = clips("train", 3, num_frames=3)
    batch = video_batch(model, clip_list)
    batch["frame_mask"][2, 2] = False  # one clip shorter than T
    batch["frame_indices"][2, 2] = -1

    model.train()
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no trainable parameter received gradient"
    assert with_grad <= trainable, f"frozen parameters received gradient: {sorted(with_grad - trainable)[:5]}"

    report = model.parameter_report()
    temporal_count = sum(p.numel() for p in model.temporal.parameters())
    assert report["trainable_by_group"]["temporal"] == temporal_count
    assert sum(report["trainable_by_group"].values()) == report["trainable_params"]
    if temporal_count:
        assert {n for n in with_grad if n.startswith("temporal.")} == {
            f"temporal.{n}" for n, _ in model.temporal.named_parameters()
        }
    assert {f"temporal.{n}" for n, _ in model.temporal.named_parameters()} <= set(
        model.strategy.adapter_state_keys(model)
    )

    model.eval()
    model.strategy.on_evaluation_start(model, [clip_captions(c)[0] for c in clip_list])
    with torch.no_grad():
        images, texts = model.evaluation_embeddings(batch)
    assert images.shape == (3, model.image_tower.embed_dim) == texts.shape
    norms = images.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # A padded frame's pixels do not matter at evaluation either.
    changed = dict(batch, pixel_values=batch["pixel_values"].clone())
    changed["pixel_values"][2, 2] = 5.0
    with torch.no_grad():
        assert torch.allclose(model.evaluation_embeddings(changed)[0], images, atol=1e-5)
