"""The reliability guarantees on video: exact resume (random frame offsets included) and DDP evaluation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from reliability_helpers import StopAtStep, StoppedError, build_model, trainer

from pefttune.callbacks import ExactResume
from pefttune.data import ImageTextDataModule
from pefttune.data.sources.synthetic_video import SyntheticVideos


def _videos(**sizes: int) -> ImageTextDataModule:
    """Generated clips of 6 frames, 3 sampled per clip (random segment offsets in training)."""
    counts = {"num_train": 8, "num_val": 4, "num_test": 4, **sizes}
    return ImageTextDataModule(
        source=SyntheticVideos(num_frames=6, image_size=32, seed=0, **counts),
        num_frames=3,
        captions_per_image="sample",  # one caption per clip and epoch: 8 clips / batch 4 = 2 steps
        batch_size=4,
        eval_batch_size=2,
    )


class _SeenFrames(Callback):
    """The frames each training step used (which clip, which frame indices)."""

    def __init__(self) -> None:
        self.frames: list[tuple[list[int], list[list[int]]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.frames.append((batch["image_ids"].tolist(), batch["frame_indices"].tolist()))


def _fit(name: str, directory, ckpt_path=None, crash_at=None, seen=None):
    L.seed_everything(123)
    model = build_model(name)
    callbacks: list[Callback] = [
        ExactResume(),
        ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=1),
    ]
    if crash_at is not None:
        callbacks.insert(0, StopAtStep(crash_at))
    if seen is not None:
        callbacks.insert(0, seen)
    run = trainer(max_epochs=2, callbacks=callbacks)  # 8 clips / batch 4: 2 steps per epoch
    run.fit(model, datamodule=_videos(), ckpt_path=ckpt_path)
    return model, run


@pytest.mark.parametrize("name", ["cma", "full", "duet", "lit", "lora", "apex"])
def test_a_video_run_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(name, tmp_path):
    reference_seen, resumed_seen = _SeenFrames(), _SeenFrames()
    reference, _ = _fit(name, tmp_path / "reference", seen=reference_seen)
    with pytest.raises(StoppedError):
        _fit(name, tmp_path / "run", crash_at=3, seen=resumed_seen)
    last = tmp_path / "run" / "last.ckpt"
    resumed, run = _fit(name, tmp_path / "run", ckpt_path=str(last), seen=resumed_seen)

    assert run.global_step == 4
    # Step 3 ran twice (before the crash, its checkpoint not yet written, and after the resume): with the
    # same clips and the same random frame offsets.
    kept = resumed_seen.frames[:2] + resumed_seen.frames[3:]
    assert kept == reference_seen.frames
    assert resumed_seen.frames[2] == resumed_seen.frames[3]
    # Training draws frame offsets at random: the two epochs saw different frames of the same clips.
    assert (
        reference_seen.frames[0][1] != reference_seen.frames[2][1]
        or reference_seen.frames[0][0] != (reference_seen.frames[2][0])
    )
    expected, actual = reference.state_dict(), resumed.state_dict()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different[:5]
    # LiT resumes with the locked tower's cached frame features of its checkpoint: recomputed in other
    # batches their last bits differ, and the text tower would end off the uninterrupted one.
    saved = torch.load(last, weights_only=True).get(ExactResume.CHECKPOINT_KEY)
    if name == "lit":
        assert saved["keys"].shape[1] == 2 and len(saved["keys"]) == len(saved["features"]) > 0
    else:
        assert saved is None


@pytest.mark.ddp
def test_two_process_video_validation_equals_one_process_on_an_odd_set(tmp_path):
    # 7 clips over 2 ranks: the distributed sampler repeats one, which the metric must drop by id.
    model = build_model("cma")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    single = trainer().validate(model, datamodule=_videos(num_val=7), verbose=False)[0]

    distributed_model = build_model("cma")
    distributed_model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    run = trainer(strategy="ddp_spawn", devices=2)
    distributed = run.validate(distributed_model, datamodule=_videos(num_val=7), verbose=False)[0]
    assert single.keys() == distributed.keys() and single
    assert single == pytest.approx(distributed, abs=1e-6)
