"""Helpers shared by the performance scripts: building a shipped config's model, fixed batches, timing."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]


def method_names() -> list[str]:
    """Every registered built-in method (:mod:`pefttune.strategies.registry`), in registration order."""
    from pefttune.strategies.registry import methods

    return [spec.name for spec in methods()]


def method_config(name: str) -> str:
    """A registered method's offline config, relative to the repository root."""
    from pefttune.strategies.registry import get_method

    return get_method(name).config


TOWERS = ("image_tower", "text_tower")


def build_model(
    config: str, image_size: int | None = None, tiny: bool = False, gradient_checkpointing: bool = False
):
    """The ``model`` section of a fit config (real offline weights), optionally at another image size.

    ``tiny`` swaps the towers for the tiny random test ViT and BERT of :mod:`pefttune.testing` (the
    config's strategy, optimizer and schedule stay). ``gradient_checkpointing`` turns on both towers'
    ``gradient_checkpointing`` argument (activations recomputed in the backward pass).
    """
    import json

    from pefttune.cli import build_model_from_config
    from pefttune.testing import tiny_tower_config

    overrides = []
    if tiny:
        overrides += [
            f"--model.init_args.{name}={json.dumps(spec)}" for name, spec in tiny_tower_config().items()
        ]
    elif image_size is not None:
        overrides.append(f"--model.init_args.image_tower.init_args.image_size={image_size}")
    if gradient_checkpointing:
        overrides += [f"--model.init_args.{tower}.init_args.gradient_checkpointing=true" for tower in TOWERS]
    return build_model_from_config(str(REPO / config), overrides)


def training_batches(
    model, batch_size: int, count: int, seed: int = 0, train_images: int = 512
) -> list[dict]:
    """``count`` training batches of the generated scenes, preprocessed for ``model``'s towers."""
    from pefttune.data import ImageTextDataModule
    from pefttune.data.sources import Synthetic

    data = ImageTextDataModule(
        source=Synthetic(num_train=max(train_images, batch_size * count), seed=seed),
        batch_size=batch_size,
        captions_per_image="sample",
        seed=seed,
    )
    data.attach_preprocessing(model.preprocessing)
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def make_optimizer(model):
    """The model's optimizer over its strategy's parameter groups (as ``configure_optimizers`` builds it)."""
    return model.build_optimizer()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def median(values) -> float:
    return statistics.median(values)


def machine_line() -> str:
    """CPU, cores, torch threads and the load average, for the record."""
    import torch

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )


#: Trainer options of a timing run: training steps only (no checkpoints, progress bar, summary or validation).
TRAINING_ONLY = {
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


class TrainingSide:
    """One side of an A/B training comparison: a model and optimizer trained epoch by epoch, timed.

    Each side keeps its own random-number stream (dropout, augmentation), restored before and saved after
    each of its epochs, so alternating the two sides' epochs changes neither side's numbers. Per epoch it
    records the wall time (``epochs``), the part of it spent waiting for the data loader (``waits``) and each
    step's loss (``losses``). A subclass builds the model and data, then calls ``TrainingSide.__init__`` and
    provides :meth:`batches`.
    """

    def __init__(self, model, optimizer) -> None:
        import torch

        self.model = model
        self.optimizer = optimizer
        self.epochs: list[float] = []
        self.waits: list[float] = []
        self.losses: list[float] = []
        self.steps = 0
        torch.manual_seed(0)
        self.rng = torch.get_rng_state()

    def batches(self):
        """The training batches of one epoch (a data loader)."""
        raise NotImplementedError

    def inspect_batch(self, batch) -> None:
        """Called with each batch before its step (timed as part of the step); records nothing by default."""

    def epoch(self) -> None:
        """One epoch of training steps (``training_step``, backward, optimizer step)."""
        import torch

        torch.set_rng_state(self.rng)
        start = mark = time.perf_counter()
        wait = 0.0
        for batch in self.batches():
            # From the end of the previous step to here: the loader producing this batch.
            wait += time.perf_counter() - mark
            self.inspect_batch(batch)
            loss = self.model.training_step(batch, self.steps)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(float(loss.detach()))
            self.steps += 1
            mark = time.perf_counter()
        self.epochs.append(time.perf_counter() - start)
        self.waits.append(wait)
        self.rng = torch.get_rng_state()


def print_epoch_table(sides: dict, digits: int) -> None:
    """A Markdown table of each side's epoch times, median epoch after the first, and loader waits.

    Args:
        sides: ``{row name: TrainingSide}``, in row order.
        digits: decimals of the per-epoch times and waits.
    """
    print()
    print("| run | epoch times (s) | median epoch after the first (s) | waiting for data (s per epoch) |")
    print("|---|---|---|---|")
    for name, side in sides.items():
        epochs = ", ".join(f"{t:.{digits}f}" for t in side.epochs)
        waits = ", ".join(f"{t:.{digits}f}" for t in side.waits)
        print(f"| {name} | {epochs} | {median(side.epochs[1:]):.2f} | {waits} |")
