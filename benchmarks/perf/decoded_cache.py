"""Decoded-image cache: training epochs with and without ``image_cache_dir`` (UCM suite at 96 px).

Two trainings of one method's shipped config (default LiT: its locked image tower's features are cached
from the second epoch on, so loading images is most of what is left) on the UCM-Captions training split
as ``benchmarks/ucm.yaml`` sets it up (96 px, batch 32, one caption drawn per image per epoch), from the
same seed: one whose data module decodes every JPEG every epoch, one with
``ImageTextDataModule(image_cache_dir=...)`` (a fresh temporary folder, so its first epoch fills the
cache). Epochs alternate between the two, so that a change in the machine's load hits both alike. Each
epoch is a plain loop of ``training_step``, ``backward`` and the optimizer step; the time spent waiting
for the loader is recorded too. Then both data modules' training loaders are iterated alone (no model),
alternating, to give the loading speed-up itself.

Printed: epoch times, the speed-up of the epochs after the first (median, without over with the cache;
target >= 1.5x), the loader-only speed-up, and whether both trainings saw identical batches (they must:
the cache returns bitwise the transform's output).

    python benchmarks/perf/decoded_cache.py --data-root ../shared/data/ucm_captions          # LiT, 3 epochs
    python benchmarks/perf/decoded_cache.py --data-root ../shared/data/ucm_captions --method full
    python benchmarks/perf/decoded_cache.py --smoke       # generated JPEGs and tiny towers: seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, TrainingSide, machine_line, make_optimizer, median, method_config, print_epoch_table


def generated_dataset(folder: Path, count: int) -> dict:
    """``count`` random-texture JPEGs (160 px, as UCM's) with a Karpathy JSON; data-module options."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.jpg", quality=90)
        split = "train" if i < count * 8 // 10 else "val"
        sentences = [{"raw": f"texture {i % 7} variant {j}"} for j in range(5)]
        images.append({"filename": f"{i}.jpg", "split": split, "sentences": sentences})
    (folder / "captions.json").write_text(json.dumps({"images": images}), encoding="utf-8")
    return {"path": str(folder / "captions.json"), "image_root": str(folder / "images")}


class Side(TrainingSide):
    """One training: its model, optimizer and data module, and what was measured."""

    def __init__(self, args: argparse.Namespace, data_options: dict, cache_dir: str | None) -> None:
        import torch

        from pefttune.cli import build_model_from_config
        from pefttune.data import ImageTextDataModule, Karpathy
        from pefttune.testing import tiny_tower_config

        torch.manual_seed(0)
        overrides = []
        if args.smoke:
            overrides += [f"--model.init_args.{k}={json.dumps(v)}" for k, v in tiny_tower_config().items()]
        else:
            overrides.append(f"--model.init_args.image_tower.init_args.image_size={args.image_size}")
        model = build_model_from_config(str(REPO / method_config(args.method)), overrides)
        model.train()
        self.data = ImageTextDataModule(
            source=Karpathy(**data_options),
            batch_size=args.batch_size,
            captions_per_image="sample",
            test_split=None,
            num_workers=args.workers,
            seed=0,
            image_cache_dir=cache_dir,
        )
        self.data.attach_preprocessing(model.preprocessing)
        self.data.setup("fit")
        self.loader = self.data.train_dataloader()
        self.loading: list[float] = []
        self.checksums: list[float] = []
        super().__init__(model, make_optimizer(model))

    def batches(self):
        return self.loader

    def inspect_batch(self, batch) -> None:
        """Checksum the pixels: both sides must train on the same images."""
        self.checksums.append(float(batch["pixel_values"].double().sum()))

    def load_only(self) -> None:
        start = time.perf_counter()
        for _ in self.loader:
            pass
        self.loading.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="UCM-Captions folder (captions.json, images/)")
    parser.add_argument("--method", default="lit", help="a shipped config: configs/<method>.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (the suite uses 0)")
    parser.add_argument("--loader-rounds", type=int, default=2, help="loader-only passes per side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="64 generated JPEGs, tiny towers, 2 epochs")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.epochs, args.batch_size, args.loader_rounds = 2, 16, 1
    elif not args.data_root:
        parser.error("--data-root is required (or --smoke)")
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="pefttune-decoded-cache-") as tmp:
        if args.smoke:
            data_options = generated_dataset(Path(tmp) / "data", 64)
            what = "64 generated 160 px JPEGs, tiny towers"
        else:
            root = Path(args.data_root)
            data_options = {"path": str(root / "captions.json"), "image_root": str(root / "images")}
            what = f"UCM-Captions training split ({root}), {args.image_size} px"
        print(
            f"{args.method} ({method_config(args.method)}) on {what}, batch {args.batch_size}, "
            f"{args.epochs} epochs, {args.workers} loader workers"
        )
        plain = Side(args, data_options, cache_dir=None)
        cached = Side(args, data_options, cache_dir=str(Path(tmp) / "cache"))
        for _ in range(args.epochs):
            plain.epoch()
            cached.epoch()
        for _ in range(args.loader_rounds):
            plain.load_only()
            cached.load_only()
        cache = cached.loader.dataset.image_cache
    print_epoch_table({"decode every epoch": plain, "decoded-image cache": cached}, digits=2)
    later = median(plain.epochs[1:]) / median(cached.epochs[1:])
    print(f"speed-up of training epochs after the first: {later:.2f}x (target >= 1.5x)")
    print(
        f"loader alone (one pass over the training split, median of {args.loader_rounds}): "
        f"{median(plain.loading):.2f} s decoding, {median(cached.loading):.2f} s from the cache: "
        f"{median(plain.loading) / median(cached.loading):.2f}x"
    )
    print(
        f"cache: {cache.filled} of {len(cache)} images stored in {cache.path} (main process: "
        f"{cache.stats.hits} hits, {cache.stats.misses} misses, {cache.stats.uncacheable} uncacheable)"
    )
    same = plain.checksums == cached.checksums
    print(f"identical batches in both trainings: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
