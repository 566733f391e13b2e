"""Determinism on CPU, and distributed evaluation through the Trainer equal to one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from reliability_helpers import build_model, datamodule, trainer


def _fit_and_validate(name):
    L.seed_everything(7)
    model = build_model(name)
    data = datamodule(max_train_samples=8)
    run = trainer(max_epochs=1, enable_checkpointing=False)
    run.fit(model, datamodule=data)
    return model, trainer().validate(model, datamodule=data, verbose=False)[0]


@pytest.mark.parametrize("name", ["lora", "duet"])
def test_same_seed_and_config_give_the_same_weights_and_metrics(name):
    first, first_metrics = _fit_and_validate(name)
    second, second_metrics = _fit_and_validate(name)
    assert first_metrics == second_metrics
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


@pytest.mark.ddp
def test_two_process_validation_equals_one_process_on_an_odd_set(tmp_path):
    # 7 images over 2 ranks: the distributed sampler repeats one; metrics must drop it by id.
    model = build_model("lora")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    data = datamodule(num_val=7, eval_batch_size=2)
    single = trainer().validate(model, datamodule=data, verbose=False)[0]

    distributed_model = build_model("lora")
    distributed_model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    run = trainer(strategy="ddp_spawn", devices=2)
    distributed = run.validate(
        distributed_model, datamodule=datamodule(num_val=7, eval_batch_size=2), verbose=False
    )[0]
    assert single.keys() == distributed.keys() and single
    assert single == distributed
