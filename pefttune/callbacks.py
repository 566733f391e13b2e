"""Callbacks that ship with pefttune."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class EmbeddingWriter(BasePredictionWriter):
    """Write the image and text embeddings of ``pefttune predict`` to a file.

    The file holds one dict of tensors: ``image_embeds`` [N, D] and ``image_ids`` [N], ``text_embeds`` [T, D],
    ``caption_ids`` [T] and ``caption_image_ids`` [T], deduplicated by id (a distributed sampler repeats a
    few samples) and sorted by id. Under DDP each rank writes ``<stem>.rank<R>.pt``.

    Args:
        output_path: the file to write; ``None`` writes ``embeddings.pt`` in the trainer's log directory.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.written: str | None = None

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any] | None,
    ) -> None:
        """Concatenate, deduplicate and save the epoch's embeddings."""
        batches = [p for group in _flatten_dataloaders(predictions) for p in group]
        if not batches:
            return
        merged = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        images = _unique_by(merged["image_ids"], merged["image_embeds"])
        texts = _unique_by(merged["caption_ids"], merged["text_embeds"], merged["caption_image_ids"])
        result = {
            "image_ids": images[0],
            "image_embeds": images[1],
            "caption_ids": texts[0],
            "text_embeds": texts[1],
            "caption_image_ids": texts[2],
        }
        path = self.output_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "embeddings.pt")
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(result, path)
        self.written = path


def _flatten_dataloaders(predictions: Sequence[Any]) -> list[list[dict[str, torch.Tensor]]]:
    if predictions and isinstance(predictions[0], dict):
        return [list(predictions)]
    return [list(group) for group in predictions]


def _unique_by(ids: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    first = torch.full((len(unique),), len(ids), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids)), reduce="amin")
    return (unique, *(v[first] for v in values))
