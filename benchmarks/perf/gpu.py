"""GPU throughput and peak memory of every method on CLIP ViT-B/16, and of a bare PyTorch loop.

Every method's shipped config (``configs/<method>.yaml``: its strategy, loss, optimizer and schedule) with
both towers replaced by CLIP ViT-B/16's (``openai/clip-vit-base-patch16``, architecture only: random
weights, nothing downloaded), trained by ``Trainer.fit`` with ``precision="bf16-mixed"`` at batch 256 of
random 224 px images and 32-token captions held in memory (copied to the GPU every step, pinned). The
module's GPU defaults are on: fused AdamW (``fused_optimizer=None`` fuses wherever torch has the kernels),
PyTorch SDPA attention in the Hugging Face towers (transformers' default). ``--compile`` adds
``compile_towers=True``, ``--grad-cache N`` GradCache chunks of N rows.

The **bare** row is a plain PyTorch loop over the same towers: Hugging Face ``CLIPModel`` (same
architecture), bf16 autocast, fused AdamW, the InfoNCE loss written out, no Lightning; put it next to the
``full`` row (full fine-tuning does the same work) for the framework's cost.

Each row runs in a fresh process (``--worker``), so peak memory (``torch.cuda.max_memory_allocated``
over the timed steps, model and optimizer state included) is its own. Samples/s counts the timed steps
after ``--warmup`` untimed ones (compilation and cuDNN/cuBLAS autotuning happen there).

    python benchmarks/perf/gpu.py                          # every method + bare, batch 256: a few minutes
    python benchmarks/perf/gpu.py --methods full,lora --steps 10

On a machine without a CUDA GPU the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import REPO, TRAINING_ONLY, machine_line, method_config, method_names

CLIP = "openai/clip-vit-base-patch16"


def _batches(batch_size: int, count: int, vocab: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator),
        "input_ids": torch.randint(1, vocab - 1, (batch_size, 32), generator=generator),
        "attention_mask": torch.ones(batch_size, 32, dtype=torch.long),
        "image_ids": torch.arange(batch_size),
        "caption_ids": torch.arange(batch_size),
        "text_ids": torch.arange(batch_size),
    }
    return [batch] * count


class _Device:
    """CUDA, or the CPU for ``--cpu-check`` (a functional check of the worker code, no measurement)."""

    def __init__(self, cpu_check: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = not cpu_check
        self.name = "cuda" if self.cuda else "cpu"

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else float("nan")


def _loader(batches: list[dict]):
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False, pin_memory=torch.cuda.is_available())


def run_method(args: argparse.Namespace) -> dict:
    import lightning as L
    from lightning.pytorch import Callback

    from pefttune.cli import build_model_from_config
    from pefttune.towers import architecture_only

    towers = {
        "image_tower": {"class_path": "pefttune.towers.CLIPImageTower", "init_args": {"model_name": CLIP}},
        "text_tower": {
            "class_path": "pefttune.towers.CLIPTextTower",
            "init_args": {"model_name": CLIP, "max_length": 77},
        },
    }
    overrides = [f"--model.init_args.{name}={json.dumps(spec)}" for name, spec in towers.items()]
    if args.compile:
        overrides.append("--model.init_args.compile_towers=true")
    if args.grad_cache:
        overrides.append(f"--model.init_args.grad_cache_chunk_size={args.grad_cache}")
    with architecture_only():
        model = build_model_from_config(str(REPO / method_config(args.worker)), overrides)
    vocab = int(model.text_tower.model.config.vocab_size)
    marks: list[float] = []
    device = _Device(args.cpu_check)

    class Timer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            device.synchronize()
            marks.append(time.perf_counter())
            if len(marks) == args.warmup:
                device.reset_peak()

    trainer = L.Trainer(
        accelerator="gpu" if device.cuda else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=args.warmup + args.steps,
        logger=False,
        **TRAINING_ONLY,
        callbacks=[Timer()],
    )
    trainer.fit(model, train_dataloaders=_loader(_batches(args.batch_size, args.warmup + args.steps, vocab)))
    timed = marks[-1] - marks[args.warmup - 1]
    return {
        "samples_per_s": args.batch_size * args.steps / timed,
        "peak_mb": device.peak_mb(),
        "trainable": model.parameter_report()["trainable_params"],
        "fused": bool(trainer.optimizers[0].defaults.get("fused")),
    }


def run_bare(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel

    from pefttune.towers.architectures import architecture_config

    where = _Device(args.cpu_check)
    device = torch.device(where.name)
    model = CLIPModel(architecture_config(CLIP)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)  # as pefttune
    batches = _batches(args.batch_size, 1, int(model.config.text_config.vocab_size))
    host = {k: v.pin_memory() if where.cuda else v for k, v in batches[0].items()}
    labels = torch.arange(args.batch_size, device=device)
    marks = []
    for step in range(args.warmup + args.steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        with torch.autocast(where.name, dtype=torch.bfloat16):
            # Written out (get_*_features' return type changed across transformers versions).
            vision = model.vision_model(pixel_values=batch["pixel_values"])
            images = model.visual_projection(vision.pooler_output)
            text = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            texts = model.text_projection(text.pooler_output)
        images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
        logits = model.logit_scale.exp() * images @ texts.T
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(max=4.6052)
        where.synchronize()
        marks.append(time.perf_counter())
        if step == args.warmup - 1:
            where.reset_peak()
    timed = marks[-1] - marks[args.warmup - 1]
    return {
        "samples_per_s": args.batch_size * args.steps / timed,
        "peak_mb": where.peak_mb(),
        "trainable": sum(p.numel() for p in model.parameters()),
        "fused": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join((*method_names(), "bare")))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="compile_towers=True (pefttune rows)")
    parser.add_argument("--grad-cache", type=int, default=0, help="GradCache chunk size (0: off)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-check", action="store_true", help=argparse.SUPPRESS)  # tests: CPU, no timing
    args = parser.parse_args()
    import torch

    if args.worker:
        result = run_bare(args) if args.worker == "bare" else run_method(args)
        print(json.dumps(result))
        return
    print(machine_line())
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: gpu.py measures GPU throughput and memory; nothing to run")
        return
    print(
        f"GPU: {torch.cuda.get_device_name(0)}; CLIP ViT-B/16 (architecture only), batch {args.batch_size}, "
        f"224 px, bf16 autocast; {args.steps} timed steps after {args.warmup}"
        + (", towers compiled" if args.compile else "")
        + (f", GradCache chunks of {args.grad_cache}" if args.grad_cache else "")
    )
    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--worker", method, "--batch-size", str(args.batch_size)]
        command += [
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--grad-cache",
            str(args.grad_cache),
        ]
        command += ["--compile"] * args.compile
        start = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"  {method}: FAILED\n{out.stderr[-2000:]}", flush=True)
            continue
        row = {"method": method, **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(
            f"  {method}: {row['samples_per_s']:.1f} samples/s, peak {row['peak_mb']:.0f} MB "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    bare = next((r for r in rows if r["method"] == "bare"), None)
    full = next((r for r in rows if r["method"] == "full"), None)
    print()
    print("| method | trainable params | samples/s | vs full | peak memory (MB) | vs full | fused AdamW |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['samples_per_s'] / full['samples_per_s']:.2f}x" if full else "n/a"
        memory = f"{r['peak_mb'] / full['peak_mb']:.2f}x" if full else "n/a"
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['samples_per_s']:.1f} | {speed} | {r['peak_mb']:.0f} "
            f"| {memory} | {r['fused']} |"
        )
    if bare and full:
        print(
            "pefttune full fine-tuning against the bare loop: "
            f"{full['samples_per_s'] / bare['samples_per_s']:.3f}x the throughput, "
            f"{full['peak_mb'] / bare['peak_mb']:.3f}x the peak memory"
        )


if __name__ == "__main__":
    main()
