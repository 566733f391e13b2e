"""Peak training memory and step time of every method against full fine-tuning (perf item 4).

Each registered method's offline config (``pefttune.strategies.registry``: the offline default towers, real
weights) is built at one image size and trained on the same fixed batches of the generated scenes with the
same batch size, each method with its own optimizer. Every method runs in a fresh Python process (this script
re-invoked with ``--worker``), so one method's memory cannot leak into another's reading. Inside it:

* the model is built (its modules in the train/eval modes its strategy set, as Lightning leaves them)
  and the batches are preprocessed; the resident set size then is the *baseline*;
* ``--warmup`` training steps (forward, loss, backward, optimizer step) are run untimed, then ``--steps``
  timed ones; the step time is their median;
* the *training memory* is the peak resident set size (``ru_maxrss``, which includes memory allocated by
  C++ code) minus the baseline: what training needed beyond holding the model and the data.

The table lists both per method and their ratio to full fine-tuning, measured in the same run.

``--gradient-checkpointing`` turns on both towers' gradient checkpointing for every method (full
fine-tuning included, so the ratios compare like with like) and checks issue 15's target: the training
memory of LoRA, CMA, APEX and DueT at most 0.35x full fine-tuning's at the same batch size.

    python benchmarks/perf/method_costs.py                      # 64 px, batch 32, 6 timed steps
    python benchmarks/perf/method_costs.py --image-size 96 --batch-size 64

``--video`` measures a video step instead: each method's video config (``configs/video/<method>.yaml``,
mean pooling over time) on batches of generated moving-shape clips with ``--frames`` frames each (the image
tower runs on batch x frames images per step); the table adds frames per second (batch x frames / step time).

    python benchmarks/perf/method_costs.py --video              # 64 px, batch 32 clips x 4 frames
    python benchmarks/perf/method_costs.py --video --frames 8 --batch-size 16
    python benchmarks/perf/method_costs.py --gradient-checkpointing --image-size 224 --batch-size 64
    python benchmarks/perf/method_costs.py --tiny --steps 1 --warmup 0   # smoke: tiny random towers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import (
    REPO,
    TOWERS,
    build_model,
    current_rss_mb,
    machine_line,
    make_optimizer,
    median,
    method_config,
    method_names,
    peak_rss_mb,
    training_batches,
)

#: Issue 15: with checkpointing on, these methods' training memory is at most this fraction of full's.
MEMORY_TARGET = 0.35
TARGET_METHODS = ("lora", "cma", "apex", "duet")


def video_config(name: str) -> str:
    """A registered method's video config, ``configs/video/<name>.yaml`` (relative to the repository root)."""
    path = f"configs/video/{name}.yaml"
    if not (REPO / path).is_file():
        raise FileNotFoundError(f"method {name!r} has no video config: {REPO / path} does not exist")
    return path


def video_batches(model, batch_size: int, frames: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` training batches of generated clips (``frames`` sampled per clip) for ``model``'s towers."""
    from pefttune.data import ImageTextDataModule
    from pefttune.data.sources.synthetic_video import SyntheticVideos

    size = model.image_tower.image_size
    source = SyntheticVideos(
        num_train=batch_size * count, num_val=0, num_test=0, num_frames=2 * frames, image_size=size, seed=seed
    )
    data = ImageTextDataModule(
        source=source,
        val_split=None,
        test_split=None,
        batch_size=batch_size,
        num_frames=frames,
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


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = video_config(args.worker) if args.video else method_config(args.worker)
    model = build_model(
        config,
        None if args.tiny else args.image_size,
        tiny=args.tiny,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    for tower in TOWERS:
        # A tower that ignored the switch would make the comparison meaningless: fail loudly.
        enabled = getattr(model, tower).gradient_checkpointing
        if enabled != args.gradient_checkpointing:
            raise RuntimeError(f"{args.worker}: {tower}.gradient_checkpointing is {enabled}")
    if args.video:
        batches = video_batches(model, args.batch_size, args.frames, count=2, seed=0)
    else:
        batches = training_batches(model, args.batch_size, count=2, seed=0)
    optimizer = make_optimizer(model)
    baseline = current_rss_mb()
    times = []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss = model.training_step(batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
    report = model.parameter_report()
    print(
        json.dumps(
            {
                "method": args.worker,
                "trainable": report["trainable_params"],
                "total": report["total_params"],
                "step_s": median(times),
                "frames_per_s": args.batch_size * args.frames / median(times) if args.video else None,
                "step_times": times,
                "baseline_mb": baseline,
                "peak_mb": peak_rss_mb(),
                "train_mb": peak_rss_mb() - baseline,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(method_names()), help="registered method names")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--video", action="store_true", help="a video step (configs/video, generated clips)")
    parser.add_argument("--frames", type=int, default=4, help="--video: frames per clip")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the towers' activations in the backward pass (every method, full included) and "
        f"check the target: {', '.join(TARGET_METHODS)} at most {MEMORY_TARGET}x full's training memory",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny random test towers (a smoke test; not a measurement)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(machine_line())
    what = f"batch {args.batch_size}"
    if args.video:
        what = f"video, batch {args.batch_size} clips x {args.frames} frames"
    print(
        f"{'tiny towers' if args.tiny else f'image size {args.image_size}'}, {what}, "
        f"median of {args.steps} steps after {args.warmup} untimed, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    methods = args.methods.split(",")
    for method in methods:
        # An unknown name (or a method without a video config) fails here, naming what exists.
        if args.video:
            video_config(method)
        else:
            method_config(method)
    rows = []
    for method in methods:
        command = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--image-size",
            str(args.image_size),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
            "--frames",
            str(args.frames),
            *(["--video"] if args.video else []),
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
            *(["--tiny"] if args.tiny else []),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{method}: FAILED\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"  measured {method}: {rows[-1]['step_s']:.3f} s/step, +{rows[-1]['train_mb']:.0f} MB",
            flush=True,
        )
    full = next((r for r in rows if r["method"] == "full"), None)
    print()
    frames_column = " frames/s |" if args.video else ""
    print(
        f"| method | trainable params | step time (s) | vs full |{frames_column} training memory (MB) "
        "| vs full | peak RSS (MB) |"
    )
    print("|---|---|---|---|" + ("---|" if args.video else "") + "---|---|---|")
    for r in rows:
        time_ratio = f"{r['step_s'] / full['step_s']:.2f}x" if full else "n/a"
        mem_ratio = f"{r['train_mb'] / full['train_mb']:.2f}x" if full else "n/a"
        frames = f" {r['frames_per_s']:.1f} |" if args.video else ""
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {time_ratio} |{frames} "
            f"{r['train_mb']:.0f} | {mem_ratio} | {r['peak_mb']:.0f} |"
        )
    if args.gradient_checkpointing:
        print()
        print(f"target (issue 15, checkpointing on): training memory <= {MEMORY_TARGET}x full fine-tuning")
        for method in TARGET_METHODS:
            row = next((r for r in rows if r["method"] == method), None)
            if row is None or full is None or full["train_mb"] <= 0:
                print(f"  {method}: not measured (needs {method} and full in --methods)")
                continue
            ratio = row["train_mb"] / full["train_mb"]
            print(f"  {method}: {ratio:.2f}x full: {'met' if ratio <= MEMORY_TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
