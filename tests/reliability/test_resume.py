"""Resume: a run stopped part-way (mid-epoch too) and resumed ends where the uninterrupted run ends."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from reliability_helpers import STRATEGIES, build_model, datamodule, trainer

from pefttune.callbacks import ExactResume
from pefttune.data.datasets import EpochDataLoader

EPOCHS = 3  # 8 pairs / batch 4: 2 steps per epoch, 6 in all
STEPS_PER_EPOCH = 2


class _CrashError(RuntimeError):
    pass


class _CrashAt(Callback):
    """Stops the run like a killed job, after ``step`` optimizer steps (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise _CrashError(f"stopped at step {trainer.global_step}")


class _SeenBatches(Callback):
    def __init__(self) -> None:
        self.image_ids: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.image_ids.append(batch["image_ids"].tolist())


def _fit(name, directory, ckpt_path=None, crash_at=None, seen=None):
    L.seed_everything(123)
    model = build_model(name)
    callbacks = [
        ExactResume(),
        ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=1),
    ]
    if crash_at is not None:
        callbacks.insert(0, _CrashAt(crash_at))
    if seen is not None:
        callbacks.insert(0, seen)
    run = trainer(max_epochs=EPOCHS, callbacks=callbacks)
    data = datamodule(max_train_samples=8)
    run.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, run, data


def _metrics(model, data):
    return trainer().validate(model, datamodule=data, verbose=False)[0]


# The default run keeps two rows (a full and an adapter method, mid-epoch); the whole matrix is slow.
_FAST = {("full", 4), ("lora", 4)}
_CASES = [
    pytest.param(
        name, crash_at, id=f"{name}-{label}", marks=() if (name, crash_at) in _FAST else pytest.mark.slow
    )
    for name in STRATEGIES
    for crash_at, label in ((4, "mid-epoch"), (3, "epoch-end"))
]


@pytest.mark.parametrize(("name", "crash_at"), _CASES)
def test_resumed_run_ends_with_the_uninterrupted_weights_and_metrics(name, crash_at, tmp_path):
    reference_seen, resumed_seen = _SeenBatches(), _SeenBatches()
    reference, _, data = _fit(name, tmp_path / "reference", seen=reference_seen)

    with pytest.raises(_CrashError):
        _fit(name, tmp_path / "run", crash_at=crash_at, seen=resumed_seen)
    last = tmp_path / "run" / "last.ckpt"
    stopped_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert stopped_at == crash_at - 1  # the crash came before that step's checkpoint
    resumed, run, resumed_data = _fit(name, tmp_path / "run", ckpt_path=str(last), seen=resumed_seen)

    assert run.global_step == EPOCHS * STEPS_PER_EPOCH
    # The resumed run replays nothing and skips nothing: the batches are those of the reference run.
    kept = resumed_seen.image_ids[:stopped_at] + resumed_seen.image_ids[crash_at:]
    assert kept == reference_seen.image_ids
    expected, actual = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different[:5]
    assert _metrics(reference, data) == _metrics(resumed, resumed_data)


def test_loader_state_skips_consumed_batches_without_loading_them():
    loads = []

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, index):
            loads.append(index)
            return index

    loader = EpochDataLoader(Items(), batch_size=3, shuffle=True, shuffle_seed=7, epoch_source=lambda: 2)
    full = [b.tolist() for b in loader]
    iterator = iter(loader)
    next(iterator)  # the batch of the step that was running when the checkpoint was written
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 1}

    resumed = EpochDataLoader(Items(), batch_size=3, shuffle=True, shuffle_seed=7, epoch_source=lambda: 2)
    resumed.load_state_dict(state)
    loads.clear()
    assert [b.tolist() for b in resumed] == full[1:]
    assert sorted(loads) == sorted(i for batch in full[1:] for i in batch)
    # Only the restored epoch is resumed; the next pass is whole again.
    assert len([b for b in resumed]) == 4


def test_loader_state_of_another_epoch_or_a_stream_is_ignored():
    dataset = list(range(8))
    loader = EpochDataLoader(dataset, batch_size=2, epoch_source=lambda: 1)
    loader.load_state_dict({"epoch": 0, "batches": 3})
    assert len(list(loader)) == 4
    assert loader.state_dict() == {"epoch": 1, "batches": 4}
