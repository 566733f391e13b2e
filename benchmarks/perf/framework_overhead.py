"""Framework overhead: a training step through pefttune (Lightning) against a bare PyTorch loop (perf item 2).

Both sides train the same model object (one shipped config's towers and strategy: with two copies built
from the same seed, one per loop, the ratio came out 1.06-1.07, with one object 0.96-1.01, so the copies
themselves differed, probably by where their tensors lie in memory), on the same fixed batches
(preprocessed once, served by the same in-memory ``DataLoader``), with the same optimizer (the
strategy's parameter groups), learning-rate schedule and logit-scale clamp, and the modules in the
train/eval modes the strategy left them in (frozen BatchNorms stay in eval mode; Lightning keeps those
modes too):

* **pefttune**: ``Trainer.fit`` of the ``DualEncoderModule`` with what a real run has per step (the
  loss and logit-scale logging, a TensorBoard logger writing every ``--log-every`` steps, the schedule,
  the clamp hook); only the progress bar and checkpointing are off (neither acts per step here).
* **bare**: ``for batch in loader``: the module's towers, loss and ``backward``, ``optimizer.step``,
  ``zero_grad``, ``scheduler.step``, the clamp.

A step's time runs from the end of the previous step to the end of this one (loading, hooks and logging
included). To share out the machine's load fairly, the two alternate in blocks of ``--steps`` steps for
``--rounds`` rounds; the first step of every block is left out. The ratio is median pefttune step time
over median bare step time.

With ``--tiny`` the towers are the tiny random ViT and BERT of the tests: a step then computes so little
that the framework's fixed cost per step is as large a share as it can be, which makes the ratio an
upper bound for real towers (and measurable on a loaded machine, where real steps vary by more than 5%).

    python benchmarks/perf/framework_overhead.py --config configs/lora.yaml
    python benchmarks/perf/framework_overhead.py --config configs/lora.yaml --tiny --steps 40 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from common import TRAINING_ONLY, build_model, machine_line, make_optimizer, median, training_batches


def _loader(batches, steps):
    from torch.utils.data import DataLoader

    items = [batches[i % len(batches)] for i in range(steps)]
    return DataLoader(items, batch_size=None, shuffle=False)


def lightning_block(model, batches, steps, log_every, root):
    import lightning as L
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    times: list[float] = []

    class Timer(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            times.append(now - self.mark)
            self.mark = now

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=1,
        logger=TensorBoardLogger(root, name="overhead"),
        log_every_n_steps=log_every,
        **TRAINING_ONLY,
        callbacks=[Timer()],
    )
    trainer.fit(model, train_dataloaders=_loader(batches, steps))
    return times[1:]


def bare_block(model, optimizer, scheduler, batches, steps):
    import torch

    max_scale = model.strategy.temperature.max_scale
    times = []
    mark = time.perf_counter()
    for batch in _loader(batches, steps):
        image_embeds = model.encode_images(batch["pixel_values"])
        text_embeds = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        loss = model.loss(
            image_embeds,
            text_embeds,
            model.logit_scale_value,
            model.logit_bias,
            image_ids=batch.get("image_ids"),
            text_ids=batch.get("text_ids"),
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if model.logit_scale.requires_grad and max_scale is not None:
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(max_scale))
        now = time.perf_counter()
        times.append(now - mark)
        mark = now
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/lora.yaml")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="steps per block (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of each side")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny random towers (an upper bound)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 avoids OpenMP spin-waits on an oversubscribed machine",
    )
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    towers = "tiny random ViT + BERT" if args.tiny else f"its towers at image size {args.image_size}"
    print(
        f"{args.config} ({towers}), batch {args.batch_size}, {args.rounds} rounds x "
        f"{args.steps} steps per side"
    )
    torch.manual_seed(0)
    ours = build_model(args.config, args.image_size, args.tiny)
    # One model for both loops: each has its own optimizer state, and the computation is the same.
    bare = ours
    batches = training_batches(ours, args.batch_size, count=4)
    optimizer = make_optimizer(bare)
    scheduler = bare.lr_schedule.build(optimizer, args.steps * args.rounds)
    pefttune_times, bare_times = [], []
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            pefttune_times += lightning_block(ours, batches, args.steps, args.log_every, root)
            bare_times += bare_block(bare, optimizer, scheduler, batches, args.steps)
            print(
                f"  round {round_index + 1}: pefttune {median(pefttune_times):.3f} s, "
                f"bare {median(bare_times):.3f} s (medians so far)",
                flush=True,
            )
    ours_s, bare_s = median(pefttune_times), median(bare_times)
    print()
    print("| loop | median step (s) | steps timed | ratio to bare |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch | {bare_s:.4f} | {len(bare_times)} | 1.000 |")
    print(f"| pefttune (Lightning) | {ours_s:.4f} | {len(pefttune_times)} | {ours_s / bare_s:.3f} |")
    print(f"framework overhead ratio: {ours_s / bare_s:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
