"""Where a training step's memory goes, per method: parameters, gradients, optimizer state, activations.

``method_costs.py`` measures each method's training memory as a peak resident set size, which on a CPU
also counts what the allocator keeps after tensors are freed. This script counts tensors instead: one
training step (forward, loss, backward, optimizer step, after one untimed step so that the optimizer
state exists) runs under torch's memory profiler, which tags every tensor as a parameter, gradient,
optimizer state, input, activation (saved for the backward pass), autograd detail (gradients of
activations in the backward pass) or temporary. At the step's peak of live tensor bytes it prints how much
of each there is. Tensor bytes are the same on a GPU (``torch.cuda.max_memory_allocated`` adds only the
caching allocator's rounding), so the ratios carry over to GPUs; use ``gpu.py`` for GPU peaks.

*Training memory* is the peak minus the parameters and the batch (what training needs beyond holding the
model and data, as in ``method_costs.py``); its ratio to full fine-tuning's is issue 15's memory target
(LoRA, CMA, APEX and DueT at most 0.35x with checkpointing on).

    python benchmarks/perf/memory_breakdown.py --gradient-checkpointing --image-size 224 --batch-size 32
    python benchmarks/perf/memory_breakdown.py --towers clip-vitb16 --gradient-checkpointing --batch-size 32
    python benchmarks/perf/memory_breakdown.py --tiny --methods full,lora      # smoke: tiny random towers

Each method runs in a fresh process (this script re-invoked with ``--worker``). ``--towers clip-vitb16``
replaces both towers by CLIP ViT-B/16's (architecture only: random weights, nothing downloaded) at 224 px
and 32-token captions, the setting of ``gpu.py``. The memory profiler is torch's own
(``torch.profiler.profile(profile_memory=True)`` and its memory timeline), which torch marks as deprecated
in favour of CUDA memory snapshots; it is the one tool that categorises CPU tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import (
    REPO,
    build_model,
    machine_line,
    make_optimizer,
    method_config,
    method_names,
    training_batches,
)

CLIP = "openai/clip-vit-base-patch16"
TARGET = 0.35
TARGET_METHODS = ("lora", "cma", "apex", "duet")
#: Reported columns: the memory profiler's categories, grouped.
GROUPS = {
    "parameters": ("PARAMETER",),
    "batch": ("INPUT",),
    "gradients": ("GRADIENT",),
    "optimizer state": ("OPTIMIZER_STATE",),
    "saved activations": ("ACTIVATION",),
    "backward buffers": ("AUTOGRAD_DETAIL", "TEMPORARY", None),
}


def _clip_model(config: str, gradient_checkpointing: bool):
    from pefttune.cli import build_model_from_config
    from pefttune.towers import architecture_only

    towers = {
        "image_tower": {
            "class_path": "pefttune.towers.CLIPImageTower",
            "init_args": {"model_name": CLIP, "gradient_checkpointing": gradient_checkpointing},
        },
        "text_tower": {
            "class_path": "pefttune.towers.CLIPTextTower",
            "init_args": {
                "model_name": CLIP,
                "max_length": 77,
                "gradient_checkpointing": gradient_checkpointing,
            },
        },
    }
    overrides = [f"--model.init_args.{name}={json.dumps(spec)}" for name, spec in towers.items()]
    with architecture_only():
        return build_model_from_config(str(REPO / config), overrides)


def _random_batch(model, batch_size: int, tokens: int = 32) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = int(model.text_tower.model.config.vocab_size)
    size = model.image_tower.image_size
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": torch.randint(1, vocab - 1, (batch_size, tokens), generator=generator),
        "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long),
        "image_ids": torch.arange(batch_size),
        "caption_ids": torch.arange(batch_size),
        "text_ids": torch.arange(batch_size),
    }


def peak_by_category(step) -> dict[str, int]:
    """Run ``step()`` under torch's memory profiler; the live CPU tensor bytes by category at their peak."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline
    except ImportError as err:  # the profiler's memory timeline is private and may move
        raise SystemExit(f"this torch has no memory profile timeline ({err}); use torch 2.1-2.14") from err

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline("cpu")
    sizes = np.asarray(sizes)
    peak = sizes[sizes.sum(axis=1).argmax()]
    # Column 0 is unused; category c is column _CATEGORY_TO_INDEX[c] + 1 (None: not categorised).
    return {
        (category.name if category is not None else "UNCATEGORISED"): int(peak[index + 1])
        for category, index in _CATEGORY_TO_INDEX.items()
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    config = method_config(args.worker)
    if args.towers == "clip-vitb16":
        model = _clip_model(config, args.gradient_checkpointing)
        batch = _random_batch(model, args.batch_size)
    else:
        model = build_model(
            config,
            None if args.tiny else args.image_size,
            tiny=args.tiny,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        batch = training_batches(model, args.batch_size, count=1, seed=0)[0]
    for tower in ("image_tower", "text_tower"):
        if getattr(model, tower).gradient_checkpointing != args.gradient_checkpointing:
            raise RuntimeError(
                f"{args.worker}: {tower} ignored gradient_checkpointing={args.gradient_checkpointing}"
            )
    optimizer = make_optimizer(model)

    def step() -> None:
        loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in every step after the first
    categories = peak_by_category(step)
    report = model.parameter_report()
    print(json.dumps({"method": args.worker, "trainable": report["trainable_params"], "bytes": categories}))


def _group(categories: dict[str, int]) -> dict[str, float]:
    mb = {}
    for name, members in GROUPS.items():
        keys = [m if m is not None else "UNCATEGORISED" for m in members]
        mb[name] = sum(categories.get(key, 0) for key in keys) / 2**20
    return mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(method_names()), help="registered method names")
    parser.add_argument("--towers", choices=("offline", "clip-vitb16"), default="offline")
    parser.add_argument("--image-size", type=int, default=64, help="offline towers only (CLIP: 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in both towers, every method")
    parser.add_argument("--tiny", action="store_true", help="the tiny random test towers (a smoke test)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(machine_line())
    towers = (
        "tiny test towers"
        if args.tiny
        else (
            "CLIP ViT-B/16 (architecture only), 224 px"
            if args.towers == "clip-vitb16"
            else f"offline towers (EfficientNet-Lite0, MiniLM), {args.image_size} px"
        )
    )
    print(
        f"{towers}, batch {args.batch_size}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    rows = []
    for method in args.methods.split(","):
        method_config(method)  # an unknown name fails here, naming the registered ones
        command = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--towers",
            args.towers,
            "--image-size",
            str(args.image_size),
            "--batch-size",
            str(args.batch_size),
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
            *(["--tiny"] if args.tiny else []),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{method}: FAILED\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["mb"] = _group(row["bytes"])
        row["training_mb"] = sum(row["mb"].values()) - row["mb"]["parameters"] - row["mb"]["batch"]
        rows.append(row)
        print(f"  measured {method}: training memory {row['training_mb']:.0f} MB", flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    print()
    print("MB at the step's peak of live tensors:")
    print()
    print("| method | trainable params | " + " | ".join(GROUPS) + " | training memory | vs full |")
    print("|---|---|" + "---|" * len(GROUPS) + "---|---|")
    for r in rows:
        ratio = f"{r['training_mb'] / full['training_mb']:.2f}x" if full else "n/a"
        cells = " | ".join(f"{r['mb'][name]:.0f}" for name in GROUPS)
        print(f"| {r['method']} | {r['trainable']:,} | {cells} | {r['training_mb']:.0f} | {ratio} |")
    if full is not None and args.gradient_checkpointing:
        print()
        print(f"target (issue 15, checkpointing on): training memory <= {TARGET}x full fine-tuning")
        for r in rows:
            if r["method"] in TARGET_METHODS:
                ratio = r["training_mb"] / full["training_mb"]
                print(f"  {r['method']}: {ratio:.2f}x: {'met' if ratio <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
