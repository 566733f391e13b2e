"""``BenchmarkRecorder``: a Lightning callback that writes what a benchmark run measured to one JSON file.

The sweep (:mod:`pefttune.benchmark.sweep`) adds it to every run's trainer from the command line, so the
shipped configs need not know about it. It records:

* the parameter report of the model (total, trainable, trainable by group and by tower);
* training throughput: samples per second over the training batches after the first (the first pays for
  lazy initialisation), measured from the end of one batch to the end of the next so that data loading
  counts, and the median step time;
* evaluation throughput of the test run (images and captions per second, metric computation included);
* peak memory: the process's peak resident set size on CPU, the peak allocated CUDA memory on GPU;
* the final validation and test metrics (``trainer.callback_metrics``) and training curves (the loss at
  every step, validation metrics after every validation);
* the per-query outcomes of the test retrieval (:class:`~pefttune.metrics.RankedQueries`), in
  ``<path stem>.ranks.npz`` next to the JSON file, for paired comparisons between methods
  (:mod:`pefttune.benchmark.stats`);
* with ``forgetting_data`` (a config file with a ``data:`` section), that second data set's test metrics
  before training and after the test, and their change (:mod:`pefttune.benchmark.forgetting`).

The file is rewritten after fit and after test, so it always holds everything measured so far.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from pefttune.benchmark.forgetting import ForgettingEvaluation, forgetting_metrics
from pefttune.metrics import RetrievalMetrics


def peak_rss_bytes() -> int | None:
    """The peak resident set size of this process in bytes, or None where the platform cannot tell."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None
        except ImportError:
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "pixel_values" in batch:
        return int(batch["pixel_values"].shape[0])
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    return 0


def _checkpoint_paths(trainer: Trainer) -> dict[str, str | None]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pefttune.callbacks import ADAPTER_BEST, ADAPTER_LAST, RunCheckpoint

    callback = trainer.checkpoint_callback
    paths: dict[str, str | None] = dict.fromkeys(
        ("best_checkpoint", "last_checkpoint", "best_adapter", "last_adapter")
    )
    if isinstance(callback, ModelCheckpoint):
        paths["best_checkpoint"] = callback.best_model_path or None
        paths["last_checkpoint"] = callback.last_model_path or None
    if isinstance(callback, RunCheckpoint) and callback.dirpath:
        # The adapter-only files beside them (kept when a sweep deletes the full checkpoints).
        for key, name in (("best_adapter", ADAPTER_BEST), ("last_adapter", ADAPTER_LAST)):
            file = Path(callback.dirpath) / name
            paths[key] = str(file) if file.is_file() else None
    return {key: str(Path(path).resolve()) if path else None for key, path in paths.items()}


class BenchmarkRecorder(Callback):
    """Write throughput, peak memory, parameter counts, metrics and curves of a run to ``path``.

    Args:
        path: The JSON file to write (its folder is created). Only global rank 0 writes.
        warmup_steps: Training batches left out of the throughput (lazy initialisation, allocator warm-up).
        forgetting_data: A config file whose ``data:`` section is a second data set, evaluated before
            training and after the test (``forget/before/*``, ``forget/after/*``, ``forget/change/*``).
    """

    def __init__(self, path: str, warmup_steps: int = 1, forgetting_data: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.warmup_steps = warmup_steps
        self.forgetting_data = forgetting_data
        self._forgetting: ForgettingEvaluation | None = None
        self.forgetting_before: dict[str, float] = {}
        self.forgetting_after: dict[str, float] = {}
        self.parameters: dict[str, Any] = {}
        self.train_step_times: list[float] = []
        self.train_samples = 0
        self.train_batches = 0
        self.loss_curve: list[tuple[int, float]] = []
        self.val_curve: list[dict[str, float]] = []
        self.val_metrics: dict[str, float] = {}
        self.test_metrics: dict[str, float] = {}
        self.eval_seconds = 0.0
        self.eval_images = 0
        self.eval_captions = 0
        self.fit_seconds = 0.0
        self.ranks_file: str | None = None
        self._last_mark: float | None = None
        self._fit_start = 0.0
        self._test_start = 0.0

    # -- fit ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Count parameters once the strategy has adapted the towers."""
        self._fit_start = time.perf_counter()
        from pefttune.module import DualEncoderModule

        if isinstance(pl_module, DualEncoderModule):
            self.parameters = pl_module.parameter_report()
        else:
            self.parameters = {
                "total_params": sum(p.numel() for p in pl_module.parameters()),
                "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            }
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the forgetting data set with the model before any training step."""
        if self.forgetting_data is not None and not self.forgetting_before:
            self.forgetting_before = self._forgetting_evaluation().evaluate(pl_module)  # type: ignore[arg-type]

    def _forgetting_evaluation(self) -> ForgettingEvaluation:
        if self._forgetting is None:
            assert self.forgetting_data is not None
            self._forgetting = ForgettingEvaluation.from_config(self.forgetting_data)
        return self._forgetting

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start timing the epoch's first batch (its data loading included)."""
        self._last_mark = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Time the batch (since the previous batch ended) and record its loss."""
        now = time.perf_counter()
        if self._last_mark is not None:
            if self.train_batches >= self.warmup_steps:
                self.train_step_times.append(now - self._last_mark)
                self.train_samples += _batch_size(batch) * trainer.world_size
            self.train_batches += 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = _to_float(loss.detach()) if isinstance(loss, torch.Tensor) else None
        if value is not None:
            self.loss_curve.append((int(trainer.global_step), value))
        self._last_mark = time.perf_counter()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation inside an epoch is not training time."""
        self._last_mark = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the validation metrics as a point of the curves."""
        metrics = self._metrics(trainer, "val/")
        if metrics and not trainer.sanity_checking:
            self.val_metrics = metrics
            self.val_curve.append({"step": int(trainer.global_step), **metrics})
        self._last_mark = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write what fit measured (the test adds to it)."""
        self.fit_seconds = time.perf_counter() - self._fit_start
        self._write(trainer, pl_module)

    # -- test --------------------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start timing evaluation."""
        self.eval_images = 0
        self.eval_captions = 0
        self._test_start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count the images and captions evaluated."""
        self.eval_images += _batch_size(batch)
        if isinstance(batch, dict) and "caption_ids" in batch:
            self.eval_captions += int(batch["caption_ids"].numel())

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the test metrics and evaluation throughput, then write the file."""
        # on_test_end comes after the epoch-end metric computation, so ranking is part of the time.
        self.eval_seconds = time.perf_counter() - self._test_start
        self.test_metrics = self._metrics(trainer, "test/")
        self._save_query_ranks(trainer, pl_module)
        if self.forgetting_data is not None:
            self.forgetting_after = self._forgetting_evaluation().evaluate(pl_module)  # type: ignore[arg-type]
        self._write(trainer, pl_module)

    @property
    def ranks_path(self) -> Path:
        """Where the test retrieval's per-query outcomes go (``recorder.json`` -> ``recorder.ranks.npz``)."""
        return self.path.with_name(self.path.stem + ".ranks.npz")

    def _save_query_ranks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from pefttune.module import DualEncoderModule

        metric = pl_module.test_retrieval if isinstance(pl_module, DualEncoderModule) else None
        queries = metric.last_queries if isinstance(metric, RetrievalMetrics) else None
        if queries is None or trainer.global_rank != 0:
            return
        queries.save(self.ranks_path)
        self.ranks_file = self.ranks_path.name

    # -- output ------------------------------------------------------------------------------------
    @staticmethod
    def _metrics(trainer: Trainer, prefix: str) -> dict[str, float]:
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            number = _to_float(value)
            if name.startswith(prefix) and number is not None:
                metrics[name] = number
        return metrics

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """Everything measured so far, as one JSON-serialisable dict."""
        train_time = sum(self.train_step_times)
        on_gpu = pl_module.device.type == "cuda"
        rss = peak_rss_bytes()
        return {
            "parameters": self.parameters,
            "metrics": {
                **self.val_metrics,
                **self.test_metrics,
                **forgetting_metrics(self.forgetting_before, self.forgetting_after),
            },
            "forgetting_data": self.forgetting_data,
            # The evaluation caption protocol ("all" / "one" caption per item): the metrics depend on it.
            "protocol": getattr(pl_module, "caption_protocol", None),
            "throughput": {
                "train_samples_per_s": self.train_samples / train_time if train_time > 0 else None,
                "train_step_median_s": statistics.median(self.train_step_times)
                if self.train_step_times
                else None,
                "train_steps_timed": len(self.train_step_times),
                "train_steps": int(trainer.global_step),
                "eval_images_per_s": self.eval_images / self.eval_seconds if self.eval_seconds else None,
                "eval_captions_per_s": self.eval_captions / self.eval_seconds if self.eval_seconds else None,
                "eval_images": self.eval_images,
                "eval_captions": self.eval_captions,
            },
            "memory": {
                "device": pl_module.device.type,
                "peak_rss_mb": rss / 2**20 if rss is not None else None,
                "peak_allocated_mb": torch.cuda.max_memory_allocated(pl_module.device) / 2**20
                if on_gpu
                else None,
            },
            "fit_seconds": self.fit_seconds,
            # The test used the best (else the final weights, the last checkpoint); a later test of this
            # training (pefttune sweep's trained_in / trained_as) loads the same weights from the adapter.
            **_checkpoint_paths(trainer),
            "query_ranks": self.ranks_file,
            "world_size": trainer.world_size,
            "torch_threads": torch.get_num_threads(),
            "curves": {"train_loss": self.loss_curve, "val": self.val_curve},
        }

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.summary(trainer, pl_module), indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
