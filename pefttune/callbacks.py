"""Callbacks that ship with pefttune."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from pefttune.checkpointing import save_adapter


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


class ExactResume(Callback):
    """Make a resumed run exact: random generator states in checkpoints, and the training data's position.

    Part 1, the training data. Lightning stores a stateful training loader's state (pefttune's
    :class:`~pefttune.data.datasets.EpochDataLoader`: epoch and batches consumed) but hands it back only
    when it sets the loader up after restoring the loops; when the optimizer setup has asked for the number
    of steps, the loader was set up before, and the state is never given back. This callback gives it
    back when training starts, before the first batch is drawn.

    Part 2, randomness.
    Lightning restores weights, optimizer, schedule and loop counters, but not the global generators that
    dropout (and LoRA's dropout) draw from; without them a resumed run diverges from the uninterrupted one
    at its first step. The states of ``torch``, ``numpy`` and ``random`` are saved with every checkpoint
    and put back when training starts again (after Lightning has prepared the resumed epoch's dataloader,
    whose shuffle uses its own seeded generator).

    Exact for a single process: the loader draws its first resumed batch only after the states are back
    (Lightning 2.6 fetches a sized loader's batch when its step starts), so main-process augmentation draws
    as in the uninterrupted run. Under DDP only rank 0's states are saved (Lightning writes rank 0's
    checkpoint) and every rank gets them back, so per-rank dropout differs after a resume.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The generators' states, as tensors and plain values (what ``weights_only`` loading reads)."""
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        version, python_state, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {
                "name": str(name),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "python": {"version": int(version), "state": list(python_state), "gauss": gauss},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the states; they are applied when training starts (loading happens earlier)."""
        self._pending = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the training loader its state and the generators their states back, before the first step."""
        _restore_training_loader_state(trainer)
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        if "torch" in state:
            torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
        if "numpy" in state:
            saved = state["numpy"]
            keys = np.asarray(saved["keys"].numpy(), dtype=np.uint32)
            np.random.set_state(
                (saved["name"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
            )
        if "python" in state:
            saved = state["python"]
            random.setstate((saved["version"], tuple(saved["state"]), saved["gauss"]))


def _restore_training_loader_state(trainer: Trainer) -> None:
    # Lightning private API (2.4-2.6): the states read from the checkpoint wait in the fit loop until its
    # next data setup; hand them over now if it already happened.
    fit_loop = trainer.fit_loop
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    combined = getattr(fit_loop, "_combined_loader", None)
    if not states or combined is None:
        return
    stateful = [loader for loader in combined.flattened if callable(getattr(loader, "load_state_dict", None))]
    if len(stateful) != len(states):
        return
    for loader, state in zip(stateful, states, strict=True):
        loader.load_state_dict(state)
    fit_loop._combined_loader_states_to_load = []


class AdapterCheckpoint(Callback):
    """Write adapter-only checkpoints (:mod:`pefttune.checkpointing`) next to the full ones.

    Whenever the trainer's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` writes its last (and best)
    checkpoint, this writes ``adapter-last.pt`` (and ``adapter-best.pt`` when the best changed) in the same
    directory: the strategy's trained tensors only, loadable with
    :func:`pefttune.checkpointing.load_adapter` or ``pefttune validate|test|predict --adapter_path``.

    Args:
        dirpath: directory of the files; ``None`` uses the ModelCheckpoint's directory.
        save_best: also write ``adapter-best.pt`` when the ModelCheckpoint's best path changes.
    """

    def __init__(self, dirpath: str | None = None, save_best: bool = True) -> None:
        self.dirpath = dirpath
        self.save_best = save_best
        self.last_path: str | None = None
        self.best_path: str | None = None
        self._best_source = ""

    def _directory(self, trainer: Trainer) -> str | None:
        if self.dirpath is not None:
            return self.dirpath
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
        return None

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = self._directory(trainer)
        if directory is None or trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            self.last_path = os.path.join(directory, "adapter-last.pt")
            save_adapter(pl_module, self.last_path)  # type: ignore[arg-type]
            callback = trainer.checkpoint_callback
            best = getattr(callback, "best_model_path", "") or ""
            if self.save_best and best and best != self._best_source:
                self._best_source = best
                self.best_path = os.path.join(directory, "adapter-best.pt")
                save_adapter(pl_module, self.best_path)  # type: ignore[arg-type]
        trainer.strategy.barrier("pefttune_adapter_checkpoint")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After the epoch's validation and the ModelCheckpoint's save (it runs after user callbacks)."""
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The final weights, whatever the checkpoint schedule was."""
        self._write(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The best full checkpoint the adapter-best file was written for."""
        return {"best_source": self._best_source}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best checkpoint's path (so a resumed run does not rewrite adapter-best needlessly)."""
        self._best_source = str(state_dict.get("best_source", ""))
