"""The largest contrastive batch each method trains in a fixed memory budget, with and without GradCache.

For every method's shipped config (``configs/<method>.yaml``) and every variant

* ``plain``: the whole batch through the towers at once;
* ``gradcache``: ``DualEncoderModule(grad_cache_chunk_size=--chunk)`` (:mod:`pefttune.gradcache`);
* ``ckpt`` and ``gradcache+ckpt``: the same with activation (gradient) checkpointing in both towers, set
  by the config overrides ``--ckpt-override`` (default: the towers' ``gradient_checkpointing`` argument);
  if this build's towers do not take it, those variants are reported as unavailable,

the script searches the largest batch whose training step fits in ``--budget-mb``: it doubles the batch
from ``--start`` until a step no longer fits (or ``--max-batch`` is reached), then bisects down to
``--resolution`` of the largest fitting batch. Every trial is one training step (forward, loss, backward,
optimizer step) of random images and captions in a fresh Python process (this script re-invoked with
``--worker``), so that no trial's memory shows in another's.

Memory of a step: on a GPU, the peak of ``torch.cuda.max_memory_allocated`` minus what was allocated
after building the model and the batch; on a CPU, the process's peak resident set size (``ru_maxrss``)
minus its resident set size after building the model and the batch. The batch's own inputs are thus
outside the budget, the optimizer's state (allocated at the first step) inside; both are the same for
every variant of a method.

    python benchmarks/perf/largest_batch.py                                   # offline configs, 64 px
    python benchmarks/perf/largest_batch.py --budget-mb 1500 --image-size 96 --methods full,lora
    python benchmarks/perf/largest_batch.py --tiny --methods full --budget-mb 150 --max-batch 64  # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import (
    REPO,
    current_rss_mb,
    machine_line,
    make_optimizer,
    method_config,
    method_names,
    peak_rss_mb,
)

VARIANTS = ("plain", "gradcache", "ckpt", "gradcache+ckpt")


def _model(args: argparse.Namespace, checkpointing: bool):
    import json as _json

    from pefttune.cli import build_model_from_config
    from pefttune.testing import tiny_tower_config

    overrides = []
    if args.tiny:
        overrides += [
            f"--model.init_args.{name}={_json.dumps(spec)}" for name, spec in tiny_tower_config().items()
        ]
    elif args.image_size:
        overrides.append(f"--model.init_args.image_tower.init_args.image_size={args.image_size}")
    if checkpointing:
        overrides += args.ckpt_override
    return build_model_from_config(str(REPO / method_config(args.worker)), overrides)


def _batch(model, size: int, device):
    import torch

    generator = torch.Generator().manual_seed(size)
    side = int(model.image_tower.image_size)
    words = ["a", "small", "red", "house", "next", "to", "green", "trees", "and", "road", "with", "cars"]
    captions = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(size)]
    tokens = model.text_tower.tokenize(captions)
    batch = {
        "pixel_values": torch.randn(size, 3, side, side, generator=generator),
        **tokens,
        "image_ids": torch.arange(size),
        "caption_ids": torch.arange(size),
        "text_ids": torch.arange(size),
    }
    return {key: value.to(device) for key, value in batch.items()}


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    variant = args.variant
    try:
        model = _model(args, checkpointing="ckpt" in variant).to(device)
    except Exception as error:  # an unknown override key: this build has no such option
        print(json.dumps({"unavailable": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}))
        return
    model.grad_cache_chunk_size = args.chunk if "gradcache" in variant else None
    model.train()
    optimizer = make_optimizer(model)
    batch = _batch(model, args.batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = current_rss_mb()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    try:
        with autocast:
            loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        print(json.dumps({"oom": True, "memory_mb": float("inf")}))
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() / 2**20 - baseline
    else:
        used = peak_rss_mb() - baseline
    print(json.dumps({"oom": False, "memory_mb": used, "loss": float(loss.detach())}))


def trial(args: argparse.Namespace, method: str, variant: str, batch: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--variant",
        variant,
        "--batch-size",
        str(batch),
        "--chunk",
        str(args.chunk),
        "--image-size",
        str(args.image_size or 0),
        "--threads",
        str(args.threads),
    ]
    command += ["--tiny"] * args.tiny + ["--cpu"] * args.cpu + ["--bf16"] * args.bf16
    command += [f"--ckpt-override={item}" for item in args.ckpt_override]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        # A killed process (the kernel's OOM killer) counts as not fitting; anything else is an error.
        if out.returncode < 0:
            return {"oom": True, "memory_mb": float("inf")}
        raise RuntimeError(f"{method}/{variant} at batch {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(args: argparse.Namespace, method: str, variant: str) -> dict:
    """Double, then bisect, the batch size against the budget."""
    measured: dict[int, float] = {}

    def fits(batch: int) -> bool | None:
        result = trial(args, method, variant, batch)
        if "unavailable" in result:
            return None
        measured[batch] = result["memory_mb"]
        print(f"    {method:5s} {variant:15s} batch {batch:6d}: {result['memory_mb']:9.1f} MB", flush=True)
        return result["memory_mb"] <= args.budget_mb

    batch, good, bad = args.start, 0, None
    while batch <= args.max_batch:
        verdict = fits(batch)
        if verdict is None:
            return {"unavailable": True}
        if not verdict:
            bad = batch
            break
        good = batch
        batch *= 2
    if bad is not None and good:
        while bad - good > max(1, int(good * args.resolution)):
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
    return {"largest": good, "capped": bad is None, "measured": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--budget-mb", type=float, default=2000.0, help="memory a training step may use")
    parser.add_argument("--chunk", type=int, default=16, help="GradCache chunk size")
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=2048, help="stop doubling here")
    parser.add_argument("--resolution", type=float, default=0.125, help="bisect to this fraction")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="the tiny random test towers (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU runs)")
    parser.add_argument(
        "--ckpt-override",
        action="append",
        default=None,
        help="config override turning activation checkpointing on (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ckpt_override is None:
        args.ckpt_override = [
            f"--model.init_args.{tower}.init_args.gradient_checkpointing=true"
            for tower in ("image_tower", "text_tower")
        ]
    if args.worker:
        worker(args)
        return
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    print(machine_line())
    print(
        f"device {device}; budget {args.budget_mb:.0f} MB per training step "
        f"({'peak allocated' if device == 'cuda' else 'peak RSS'} above model + batch); "
        f"{'tiny towers' if args.tiny else f'{args.image_size} px'}; GradCache chunk {args.chunk}; "
        f"batches {args.start}..{args.max_batch}, bisected to {args.resolution:.0%}"
    )
    variants = args.variants.split(",")
    table = {}
    for method in args.methods.split(","):
        for variant in variants:
            table[(method, variant)] = largest_batch(args, method, variant)
    print()
    print("| method | " + " | ".join(variants) + " | gradcache / plain |")
    print("|---|" + "---|" * (len(variants) + 1))
    for method in args.methods.split(","):
        cells = []
        for variant in variants:
            result = table[(method, variant)]
            if result.get("unavailable"):
                cells.append("n/a")
            else:
                cells.append(f"{'>= ' if result['capped'] else ''}{result['largest']}")
        plain, cached = table.get((method, "plain")), table.get((method, "gradcache"))
        ratio = "n/a"
        if plain and cached and plain.get("largest") and cached.get("largest"):
            ratio = f"{'>= ' if cached['capped'] else ''}{cached['largest'] / plain['largest']:.1f}x"
        print(f"| {method} | " + " | ".join(cells) + f" | {ratio} |")
    print("(target: GradCache reaches at least 4x the batch that fits without it; '>=' = hit --max-batch)")


if __name__ == "__main__":
    main()
