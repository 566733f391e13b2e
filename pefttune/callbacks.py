"""Callbacks that ship with pefttune."""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from pefttune.checkpointing import export_peft_adapters, remove_stale_temporary_files, save_adapter
from pefttune.data.contracts import ClassificationData


class EmbeddingWriter(BasePredictionWriter):
    """Write the image and text embeddings of ``pefttune predict`` to a file.

    Retrieval: the file holds one dict of tensors: ``image_embeds`` [N, D] and ``image_ids`` [N],
    ``text_embeds`` [T, D], ``caption_ids`` [T] and ``caption_image_ids`` [T], deduplicated by id (a
    distributed sampler repeats a few samples) and sorted by id.

    Classification (batches with ``labels``, e.g. from
    :class:`~pefttune.data.ClassificationDataModule`): one dataloader per class group, and the same images
    may appear in several groups, so the file holds one dict per group, keyed by the group's name
    (``"all"``, or ``"base"`` and ``"new"``): ``image_ids`` [N], ``image_embeds`` [N, D], ``labels`` [N]
    (indices into the group's classes), ``logits`` [N, C] (cosine scores against the group's class
    embeddings) and ``class_names`` (the group's C classes), deduplicated by id and sorted by id.

    Under DDP each rank writes ``<stem>.rank<R>.pt``.

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
        loaders = _flatten_dataloaders(predictions)
        batches = [p for group in loaders for p in group]
        if not batches:
            return
        if "labels" in batches[0]:
            result: dict[str, Any] = _classification_result(trainer, loaders)
        else:
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


def _classification_result(
    trainer: Trainer, loaders: list[list[dict[str, torch.Tensor]]]
) -> dict[str, dict[str, Any]]:
    """One entry per class group: its image ids repeat across groups, so groups are kept apart."""
    datamodule = trainer.datamodule
    if isinstance(datamodule, ClassificationData):
        groups = datamodule.evaluation_groups("predict")
        names = [group.name for group in groups]
        class_names: list[list[str] | None] = [list(group.class_names) for group in groups]
    else:
        # Dataloaders given to ``predict`` directly: no group names to read, so number them.
        names = [f"group{index}" for index in range(len(loaders))]
        class_names = [None] * len(loaders)
    if len(names) != len(loaders):
        raise RuntimeError(
            f"the data module names {len(names)} predict class groups ({names}) but {len(loaders)} "
            "dataloaders were predicted"
        )
    result: dict[str, dict[str, Any]] = {}
    for name, classes, batches in zip(names, class_names, loaders, strict=True):
        if not batches:
            continue
        keys = ("image_ids", "image_embeds", "labels", "logits")
        ids, embeds, labels, logits = _unique_by(*(torch.cat([b[key] for b in batches]) for key in keys))
        entry: dict[str, Any] = {"image_ids": ids, "image_embeds": embeds, "labels": labels, "logits": logits}
        if classes is not None:
            entry["class_names"] = classes
        result[name] = entry
    return result


def _unique_by(ids: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    first = torch.full((len(unique),), len(ids), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids)), reduce="amin")
    return (unique, *(v[first] for v in values))


@runtime_checkable
class KeepsLockedImageFeatures(Protocol):
    """A module that caches a locked image tower's features (:class:`~pefttune.module.DualEncoderModule`)."""

    def locked_image_features_state(self) -> dict[str, torch.Tensor]:
        """The cached features as tensors (empty when there are none)."""
        ...

    def load_locked_image_features_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the cache with a saved state."""
        ...


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
    at its first step. The states of ``torch`` (the CPU generator and, once CUDA is in use, every CUDA
    device's), ``numpy`` and ``random`` are saved with every checkpoint
    and put back when training starts again (after Lightning has prepared the resumed epoch's dataloader,
    whose shuffle uses its own seeded generator).

    Exact for a single process: the loader draws its first resumed batch only after the states are back
    (Lightning 2.6 fetches a sized loader's batch when its step starts), so main-process augmentation draws
    as in the uninterrupted run. Under DDP only rank 0's states are saved (Lightning writes rank 0's
    checkpoint) and every rank gets them back, so per-rank dropout differs after a resume.

    Part 3, the locked image tower's feature cache (LiT). Its features are saved with every checkpoint
    and put back, instead of being recomputed after the resume: a tower's output for one image depends
    in its last bits on which other images share its batch, and the resumed run would compute them in
    other batches (on video, where random frame offsets decide which frames are new, always). This makes
    checkpoints larger by the cache: N x D x 4 bytes (e.g. 9,000 videos x 12 frames x 512 floats = 221 MB).
    Under DDP the saved cache is rank 0's and every rank gets it back, as with the generator states: other
    ranks then use rank 0's bits for images both had met, and compute the rest again.

    Args:
        random_states: save and restore the generators (part 2).
        loader_position: give the training loader its saved position back (part 1).
        locked_image_features: save and restore the locked image tower's feature cache (part 3); without
            it a resumed run recomputes them and ends within float rounding of the uninterrupted one.
    """

    #: Where part 3 lives in a checkpoint.
    CHECKPOINT_KEY = "pefttune_locked_image_features"

    def __init__(
        self, random_states: bool = True, loader_position: bool = True, locked_image_features: bool = True
    ) -> None:
        self.random_states = random_states
        self.loader_position = loader_position
        self.locked_image_features = locked_image_features
        self._pending: dict[str, Any] | None = None
        self._pending_features: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The generators' states, as tensors and plain values (what ``weights_only`` loading reads)."""
        if not self.random_states:
            return {}
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
            # Every device's generator (dropout on the GPU draws from them). Only once CUDA is in use:
            # asking earlier would start a CUDA context in a CPU run on a GPU machine.
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
        }

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remember the stage: only a resumed fit takes states from a checkpoint."""
        self._stage = stage

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the states; they are applied when training starts (loading happens earlier).

        Ignored outside ``fit`` (Lightning 2.6 also restores callbacks when testing a checkpoint): a later
        fit would otherwise start from the tested checkpoint's generator states.
        """
        if getattr(self, "_stage", "fit") == "fit":
            self._pending = dict(state_dict) if state_dict else None

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add the locked image tower's cached features (part 3) to the checkpoint."""
        if self.locked_image_features and isinstance(pl_module, KeepsLockedImageFeatures):
            state = pl_module.locked_image_features_state()
            if state:
                checkpoint[self.CHECKPOINT_KEY] = state

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Remember the cached features; the module forgets its cache when a fit starts, so they wait."""
        if getattr(self, "_stage", "fit") == "fit" and self.locked_image_features:
            self._pending_features = checkpoint.get(self.CHECKPOINT_KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the training loader its state and the generators their states back, before the first step."""
        if self.loader_position:
            _restore_training_loader_state(trainer)
        features, self._pending_features = self._pending_features, None
        if features and isinstance(pl_module, KeepsLockedImageFeatures):
            pl_module.load_locked_image_features_state(features)
        if self._pending is None or not self.random_states:
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
        _restore_cuda_states(list(state.get("cuda") or []))


def _restore_cuda_states(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        rank_zero_warn(
            f"the checkpoint holds the random generator states of {len(states)} CUDA devices, but CUDA is "
            "not available here: GPU random draws (dropout) will differ from the uninterrupted run"
        )
        return
    count = torch.cuda.device_count()
    if count != len(states):
        rank_zero_warn(
            f"the checkpoint holds the random generator states of {len(states)} CUDA devices, this machine "
            f"has {count}: the first {min(count, len(states))} are restored, GPU random draws may differ"
        )
    torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in states[:count]])


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


#: File names of the adapter-only checkpoints :class:`RunCheckpoint` writes next to the full ones.
ADAPTER_BEST = "adapter-best.safetensors"
ADAPTER_LAST = "adapter-last.safetensors"
#: Folder of the best checkpoint's LoRA adapters in peft's layout (one subfolder per tower).
PEFT_BEST = "peft-best"


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose ``last`` is always the last state, with adapter files beside it.

    Two differences from :class:`lightning.pytorch.callbacks.ModelCheckpoint`:

    * ``last.ckpt`` is written at the end of every training epoch (and when training ends), whatever the
      monitored metric did. Lightning 2.6 writes ``last`` only when a top-k checkpoint was written in the
      same step, so in a run whose metric stopped improving ``last.ckpt`` kept an old epoch and resuming
      from it silently threw the later epochs away.
    * With ``adapter_files`` (the default), every time it writes the best checkpoint it also writes
      ``adapter-best.safetensors``, and every time it writes ``last.ckpt`` it writes
      ``adapter-last.safetensors``, in the same folder and from the same weights at the same moment, so an
      adapter file always equals its full checkpoint (:mod:`pefttune.checkpointing`;
      ``pefttune validate|test|predict --adapter_path``). A LoRA model's best adapters are also written
      in peft's layout, ``peft-best/<tower>/`` (:func:`~pefttune.checkpointing.export_peft_adapters`).

    Its saved state has the state key of a plain ModelCheckpoint with the same arguments, so checkpoints of
    either resume with their best score; it also records the logger's version, so that ``pefttune fit
    --ckpt_path`` continues in the run's own folder.

    Args:
        adapter_files: write the adapter-only files next to the best and last checkpoints.
        **kwargs: the arguments of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def __init__(self, adapter_files: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapter_files = adapter_files
        self.adapter_best_path: str | None = None
        self.adapter_last_path: str | None = None
        self.logger_version: int | str | None = None
        self._last_saved_step: int | None = None

    @property
    def state_key(self) -> str:
        """The key of a plain ModelCheckpoint with the same arguments (older checkpoints resume too)."""
        return "ModelCheckpoint" + repr(
            {
                "monitor": self.monitor,
                "mode": self.mode,
                "every_n_train_steps": self._every_n_train_steps,
                "every_n_epochs": self._every_n_epochs,
                "train_time_interval": self._train_time_interval,
            }
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the folder (Lightning) and remember the logger's version for a resumed run."""
        with warnings.catch_warnings():
            if trainer.ckpt_path:
                # A resumed run continues in its own folder: that it holds checkpoints is expected.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self._stage = stage
        if stage == "fit" and trainer.is_global_zero:
            remove_stale_temporary_files(self.dirpath)
        logger = trainer.logger
        self.logger_version = logger.version if logger is not None else None

    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state, plus the logger version of the run."""
        return {**super().state_dict(), "logger_version": self.logger_version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore when resuming a fit only.

        Lightning 2.6 also restores callback states when it tests a checkpoint; after ``fit`` the test of
        the best checkpoint then reset the best and last paths to what they were at the best epoch.
        """
        if getattr(self, "_stage", "fit") == "fit":
            super().load_state_dict(state_dict)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # Lightning sets best_model_path before it writes the file that became the best.
        if self.adapter_files and filepath == self.best_model_path:
            self.adapter_best_path = self._write_adapter(trainer, ADAPTER_BEST)
            self._export_peft(trainer)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step
        if self.adapter_files:
            self.adapter_last_path = self._write_adapter(trainer, ADAPTER_LAST)

    def _write_adapter(self, trainer: Trainer, name: str) -> str | None:
        if not self.dirpath or not _is_local_file_protocol(self.dirpath):
            return None
        path = os.path.join(str(self.dirpath), name)
        if trainer.is_global_zero:
            save_adapter(trainer.lightning_module, path)  # type: ignore[arg-type]
        trainer.strategy.barrier("pefttune_adapter_checkpoint")
        return path

    def _export_peft(self, trainer: Trainer) -> None:
        from pefttune.module import DualEncoderModule
        from pefttune.strategies.lora import LoRA

        module = trainer.lightning_module
        if not (self.dirpath and isinstance(module, DualEncoderModule) and isinstance(module.strategy, LoRA)):
            return
        if trainer.is_global_zero:
            export_peft_adapters(module, os.path.join(str(self.dirpath), PEFT_BEST))
        trainer.strategy.barrier("pefttune_peft_export")

    def _save_last_if_behind(self, trainer: Trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if (
            not self.save_last
            or trainer.sanity_checking
            or bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.global_step == 0  # nothing trained yet
            or self._last_saved_step == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning's epoch-end saving, then ``last`` when it was not written at this step."""
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``last`` holds the final state (a run stopped by ``max_steps`` mid-epoch included)."""
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)


class AdapterCheckpoint(Callback):
    """Deprecated: :class:`RunCheckpoint` writes the adapter files (``adapter_files=True``, the default).

    This callback wrote ``adapter-best.pt`` before the best checkpoint was chosen (so it could hold another
    epoch's weights). It now does nothing next to a :class:`RunCheckpoint` and refuses to run without one.
    """

    def __init__(self, dirpath: str | None = None, save_best: bool = True) -> None:
        warnings.warn(
            "pefttune.callbacks.AdapterCheckpoint is deprecated: pefttune.callbacks.RunCheckpoint "
            "(the `checkpoint` section of `pefttune fit`) writes adapter-best/adapter-last.safetensors",
            DeprecationWarning,
            stacklevel=2,
        )
        self.dirpath = dirpath
        self.save_best = save_best

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse to run without a RunCheckpoint (it would write files that do not match the checkpoints)."""
        if stage == "fit" and not any(isinstance(c, RunCheckpoint) for c in trainer.callbacks):
            raise ValueError(
                "pefttune.callbacks.AdapterCheckpoint is replaced by pefttune.callbacks.RunCheckpoint("
                "adapter_files=True): use it instead of lightning's ModelCheckpoint"
            )


class CollapseDetector(Callback):
    """Warn when training has collapsed: the loss stays at chance level, ``ln(batch size)``, step after step.

    A contrastive model whose embeddings no longer depend on the input (after a learning rate far too high,
    for instance) gives every pair the same similarity, so the InfoNCE loss sits at ``ln(batch size)`` per
    direction (``2 ln(B)`` for losses summed over both directions) whatever the batch holds, and training
    goes on for hours without learning. A step counts as collapsed when its loss is within ``tolerance``
    (relative) of that level; after ``patience`` collapsed steps in a row one warning names the step, the
    loss and the chance level. (Models start near chance, so ``patience`` should cover more than the first
    steps. Sigmoid losses have no such fixed level and are not watched.)

    Args:
        patience: collapsed steps in a row before the warning.
        tolerance: relative distance to chance level still counted as collapsed.
    """

    def __init__(self, patience: int = 200, tolerance: float = 0.01) -> None:
        if patience < 1:
            raise ValueError(f"CollapseDetector: patience must be positive, got {patience}")
        self.patience = patience
        self.tolerance = tolerance
        self.warned_at: int | None = None
        self._count = 0
        self._first_step = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count steps at chance level; warn once after ``patience`` of them in a row."""
        if self.warned_at is not None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        size = _batch_size(batch)
        if not isinstance(loss, torch.Tensor) or size < 2:
            return
        value = float(loss.detach())
        chance = math.log(size)
        level = next((k for k in (1, 2) if abs(value - k * chance) <= self.tolerance * k * chance), None)
        if level is None:
            self._count = 0
            return
        if self._count == 0:
            self._first_step = trainer.global_step
        self._count += 1
        if self._count >= self.patience:
            self.warned_at = trainer.global_step
            rank_zero_warn(
                f"training has collapsed: the loss has stayed at chance level for {self._count} steps "
                f"since step {self._first_step} (now {value:.4f}; {'' if level == 1 else '2 x '}ln(batch "
                f"size {size}) = {level * chance:.4f}). The embeddings no longer depend on the input; lower "
                "the learning rate (model.init_args.optimizer.init_args.lr) and restart from an earlier "
                "checkpoint",
                category=UserWarning,
            )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("image_ids", "pixel_values", "input_ids"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.ndim:
                return int(value.shape[0])
    return 0


class ProgressLog(Callback):
    """A plain progress line every ``every_n_steps`` steps, and one after every validation.

    For logs written to a file (a batch job, ``pefttune fit ... > run.log``), where the progress bar's
    carriage returns make an unreadable line. With ``when="auto"`` it prints only when standard output is
    not a terminal (the progress bar is then the display); ``"always"`` and ``"never"`` force it.

    Args:
        every_n_steps: optimizer steps between two lines.
        when: ``"auto"``, ``"always"`` or ``"never"``.
    """

    def __init__(self, every_n_steps: int = 50, when: Literal["auto", "always", "never"] = "auto") -> None:
        if every_n_steps < 1:
            raise ValueError(f"ProgressLog: every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.when = when
        self._start = 0.0
        self._start_step = 0

    def _active(self, trainer: Trainer) -> bool:
        if self.when == "never" or not trainer.is_global_zero:
            return False
        return self.when == "always" or not sys.stdout.isatty()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock (steps per second are over this run's steps)."""
        self._start = time.monotonic()
        self._start_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Print ``epoch, step/total, loss, learning rate, steps per second`` every ``every_n_steps``."""
        step = trainer.global_step
        if not self._active(trainer) or step == 0 or step % self.every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        total = trainer.estimated_stepping_batches
        parts.append(f"step {step}/{int(total)}" if math.isfinite(total) else f"step {step}")
        if isinstance(loss, torch.Tensor):
            parts.append(f"loss {float(loss.detach()):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        elapsed = time.monotonic() - self._start
        if elapsed > 0 and step > self._start_step:
            parts.append(f"{(step - self._start_step) / elapsed:.2f} steps/s")
        print("  ".join(parts), flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the validation metrics (rounded), and the best score so far."""
        if not self._active(trainer) or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and ("R@" in k or "rsum" in k or "accuracy" in k)
        }
        if not metrics:
            return
        line = f"validation after epoch {trainer.current_epoch + 1}, step {trainer.global_step}: "
        line += "  ".join(f"{k} {v:.2f}" for k, v in ordered_metrics(metrics).items())
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_score", None)
        if isinstance(best, torch.Tensor):
            line += f"  (best {getattr(callback, 'monitor', '')} {float(best):.2f})"
        print(line, flush=True)


def ordered_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics in reading order: R@1, R@5, R@10 (per direction), then RSUM, then the rest by name."""

    def key(name: str) -> tuple[int, str, int, str]:
        stem = name.rsplit("/", 1)[-1]
        direction, _, measure = stem.rpartition("_")
        if measure.startswith("r") and measure[1:].isdigit():
            return (0, direction, int(measure[1:]), name)
        if measure.upper().startswith("R@") and measure[2:].isdigit():
            return (0, direction, int(measure[2:]), name)
        if "rsum" in stem:
            return (1, "", 0, name)
        return (2, "", 0, name)

    return {name: metrics[name] for name in sorted(metrics, key=key)}
