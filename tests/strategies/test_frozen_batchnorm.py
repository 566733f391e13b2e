"""Frozen BatchNorm statistics: the shared hooks, and their survival of Lightning's ``sync_batchnorm``."""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable
from unittest import mock

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from pefttune.data import ImageTextDataModule
from pefttune.data.sources import Synthetic
from pefttune.layers.frozen_batchnorm import (
    FROZEN_BATCHNORM_RECORD,
    freeze_batchnorm_statistics,
    has_frozen_batchnorm_statistics,
    refreeze_batchnorm_statistics,
)
from pefttune.module import DualEncoderModule
from pefttune.strategies import APEX, AdaptationStrategy, CrossModalAdapter, DueT, LoRA
from pefttune.testing import tiny_bert, tiny_cnn

# Every strategy that keeps a frozen convolutional backbone's BatchNorms on their running statistics.
STRATEGIES: dict[str, Callable[[], AdaptationStrategy]] = {
    "duet": lambda: DueT(width=16),
    "lora": LoRA,
    "lora-head-only": lambda: LoRA(towers="text"),  # the image backbone is frozen, its new head trains
    "cma": CrossModalAdapter,
    "apex": APEX,
}


def _norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _running_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    # By name: the names survive the conversion to SyncBatchNorm and back.
    return {k: v.clone() for k, v in module.state_dict().items() if ".running_" in k or "num_batches" in k}


def _trainer(**kwargs: object) -> L.Trainer:
    options: dict[str, object] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return L.Trainer(**options)


# -- the shared hooks ----------------------------------------------------------------------------------------
def test_freezing_is_idempotent_recorded_and_picklable():
    tower = tiny_cnn()
    norms = _norms(tower.model)
    assert norms
    assert freeze_batchnorm_statistics(tower.model) == len(norms)
    assert freeze_batchnorm_statistics(tower.model) == 0  # never twice on one layer
    assert freeze_batchnorm_statistics(tower) == 0  # nor through a parent module
    assert all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in norms)
    assert getattr(tower.model, FROZEN_BATCHNORM_RECORD) is True
    assert getattr(tower, FROZEN_BATCHNORM_RECORD) is True
    for clone in (copy.deepcopy(tower), pickle.loads(pickle.dumps(tower))):
        assert all(has_frozen_batchnorm_statistics(m) for m in _norms(clone))
        assert refreeze_batchnorm_statistics(clone) == 0


def test_frozen_layers_keep_their_statistics_and_report_the_requested_mode():
    tower = tiny_cnn()
    freeze_batchnorm_statistics(tower.model)
    before = _running_statistics(tower)
    tower.train()
    with torch.no_grad():
        trained_mode = tower(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert all(m.training for m in _norms(tower))
    for name, value in _running_statistics(tower).items():
        assert torch.equal(value, before[name]), name
    tower.eval()
    with torch.no_grad():
        eval_mode = tower(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(trained_mode, eval_mode)


def test_refreezing_finds_the_record_after_the_layers_are_replaced():
    tower = tiny_cnn()
    freeze_batchnorm_statistics(tower.model)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(tower)
    assert converted is tower  # non-BatchNorm modules, and the record on them, are kept
    norms = _norms(tower)
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert not any(has_frozen_batchnorm_statistics(m) for m in norms)  # the conversion dropped the hooks
    assert refreeze_batchnorm_statistics(tower) == len(norms)
    assert all(has_frozen_batchnorm_statistics(m) for m in norms)
    assert refreeze_batchnorm_statistics(tower) == 0


def test_refreezing_leaves_unrecorded_modules_alone():
    # DueT(freeze_norm_statistics=False): BatchNorm statistics are meant to train, conversion or not.
    module = DualEncoderModule(tiny_cnn(), tiny_bert(), strategy=DueT(width=16, freeze_norm_statistics=False))
    nn.SyncBatchNorm.convert_sync_batchnorm(module)
    assert refreeze_batchnorm_statistics(module) == 0
    assert not any(has_frozen_batchnorm_statistics(m) for m in _norms(module))


# -- the LightningModule after Lightning's SyncBatchNorm conversion -------------------------------------------
@pytest.mark.parametrize("make_strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_on_fit_start_refreezes_batchnorm_replaced_by_sync_batchnorm(make_strategy):
    module = DualEncoderModule(tiny_cnn(), tiny_bert(), strategy=make_strategy())
    assert all(has_frozen_batchnorm_statistics(m) for m in _norms(module.image_tower.model))
    # What Lightning's DDP and FSDP strategies do with trainer.sync_batchnorm=true, before on_fit_start.
    assert nn.SyncBatchNorm.convert_sync_batchnorm(module) is module
    norms = _norms(module.image_tower.model)
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    module.trainer = _trainer()
    module.on_fit_start()
    # Without a process group, a training-mode SyncBatchNorm falls back to plain batch normalisation,
    # which would update the running statistics if the hooks were missing.
    before = _running_statistics(module)
    module.train()
    with torch.no_grad():
        module.image_tower(torch.randn(4, 3, 32, 32))
    for name, value in _running_statistics(module).items():
        assert torch.equal(value, before[name]), name
    assert all(m.training for m in norms)
    assert all(has_frozen_batchnorm_statistics(m) for m in norms)


class _SyncBatchNormAndBack(TorchSyncBatchNorm):
    """Lightning's SyncBatchNorm conversion, then straight back to plain BatchNorm layers.

    Both steps build new layers without the hooks, as ``sync_batchnorm=True`` does; DDP refuses
    SyncBatchNorm layers on CPU, but plain ones run.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return self.revert(super().apply(model))


@pytest.mark.ddp
def test_ddp_fit_with_sync_batchnorm_keeps_statistics_frozen(tmp_path):
    # One gloo process, in this process: Lightning's DDP setup replaces the BatchNorm layers before
    # on_fit_start, as with sync_batchnorm=True on GPUs.
    torch.manual_seed(0)
    module = DualEncoderModule(tiny_cnn(), tiny_bert(), strategy=DueT(width=16))
    original_norms = _norms(module.image_tower.model)
    before = _running_statistics(module)
    datamodule = ImageTextDataModule(
        source=Synthetic(num_train=16, num_val=8, num_test=8, image_size=32), batch_size=8
    )
    trainer = _trainer(
        strategy="ddp",
        devices=1,
        sync_batchnorm=True,
        plugins=[_SyncBatchNormAndBack()],
        max_epochs=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    # Lightning's launcher exports the rendezvous variables (MASTER_PORT, LOCAL_RANK, ...) to this process.
    with mock.patch.dict(os.environ):
        try:
            trainer.fit(module, datamodule=datamodule)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    assert trainer.global_step > 0
    norms = _norms(module.image_tower.model)
    assert len(norms) == len(original_norms)
    assert not any(new is old for new, old in zip(norms, original_norms, strict=True))  # replaced
    after = _running_statistics(module)
    assert after.keys() == before.keys() and before
    for name, value in after.items():
        assert torch.equal(value, before[name]), name
