"""The data module under real DDP: two gloo processes (``ddp_spawn``) fed by Lightning's samplers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_fixtures import WhitespaceTokenizer, to_tensor_8px
from lightning.pytorch import LightningModule, Trainer

from pefttune.data.datamodule import ImageTextDataModule
from pefttune.data.datasets import PairDataset
from pefttune.data.preprocessing import Preprocessing
from pefttune.data.sources import Synthetic

# Spawning two processes that import torch and Lightning takes tens of seconds on a small CPU box.
pytestmark = [pytest.mark.ddp, pytest.mark.slow]


class IdRecorder(LightningModule):
    """Attaches the preprocessing in setup and writes the ids each rank sees to ``out/rank<r>.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[str, list] = {"train0": [], "train1": [], "val": []}

    def setup(self, stage: str) -> None:
        preprocessing = Preprocessing(to_tensor_8px, to_tensor_8px, WhitespaceTokenizer())
        self.trainer.datamodule.attach_preprocessing(preprocessing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pairs = zip(batch["image_ids"].tolist(), batch["caption_ids"].tolist(), strict=True)
        self.seen[f"train{self.current_epoch}"].extend(pairs)
        return (self.weight * batch["pixel_values"].mean()).sum()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.current_epoch == 0:
            self.seen["val"].append([batch["image_ids"].tolist(), batch["caption_image_ids"].tolist()])

    def on_fit_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ddp_samplers_partition_training_and_pad_evaluation_by_id(tmp_path):
    dm = ImageTextDataModule(
        source=Synthetic(num_train=24, num_val=5, num_test=2, seed=3),
        batch_size=4,
        captions_per_image="sample",
        seed=3,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(IdRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    reference = PairDataset(
        Synthetic(num_train=24, seed=3).split_records("train"), captions_per_image="sample", seed=3
    )
    for epoch in (0, 1):
        per_rank = [sorted(tuple(p) for p in rank[f"train{epoch}"]) for rank in ranks]
        assert [len(pairs) for pairs in per_rank] == [12, 12]  # 3 full batches of 4 per rank
        images = [i for pairs in per_rank for i, _ in pairs]
        assert sorted(images) == list(range(24))  # the ranks split the images, none seen twice
        reference.set_epoch(epoch)  # workers drew the captions of this epoch
        assert all(c == reference[i]["caption_id"] for pairs in per_rank for i, c in pairs)
    assert ranks[0]["train0"] != ranks[0]["train1"]

    val_images = [i for rank in ranks for image_ids, _ in rank["val"] for i in image_ids]
    assert len(val_images) == 6 and sorted(set(val_images)) == [0, 1, 2, 3, 4]  # 5 images padded to 6
    for rank in ranks:
        for image_ids, caption_image_ids in rank["val"]:
            assert sorted(set(caption_image_ids)) == sorted(set(image_ids))
