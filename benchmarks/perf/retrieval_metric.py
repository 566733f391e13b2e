"""Speed and memory of ``pefttune.metrics.RetrievalMetrics`` versus torchmetrics ``RetrievalHitRate``.

Both sides start from the same L2-normalised embeddings (``--images`` images, ``--captions-per-image``
captions each, width ``--dim``; captions are noisy copies of their image so that the recalls are not
trivial) and end with R@1, R@5 and R@10 in both directions (image->text and text->image).

* **pefttune**: ``RetrievalMetrics.update(...)`` with all embeddings, then ``compute()`` (which also
  de-duplicates by id, ranks in chunks of ``--chunk-size`` queries, and computes median/mean ranks).
* **torchmetrics**: per direction, the dense score matrix is computed (torchmetrics needs one score per
  query-candidate pair, so building it is part of its cost), flattened with the relevance targets and
  the query ``indexes``, and fed to a ``MetricCollection`` of ``RetrievalHitRate(top_k=k)`` for
  k = 1, 5, 10 with ``compute_groups=True`` so the three metrics share one copy of the state (the
  cheapest way to get three cut-offs out of torchmetrics). The first direction is freed before the
  second starts, so the two never coexist in memory.

**How it is measured.** Every measurement runs in a fresh Python process (this script re-invoked with
``--worker``), so peak memory readings cannot leak from one measurement into another. Inside it: the
inputs are generated, a tiny untimed warm-up call initialises lazy state (BLAS threads, kernels), then
the timed section runs once. Its wall time (``time.perf_counter``) and the CPU time of the process
(``time.process_time``, all threads) are recorded: on a busy machine wall time grows with other load
while CPU time grows much less, so both are shown. Peak memory is the process's peak resident set size,
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which the kernel tracks for the whole process, including
memory allocated by C++ code that ``tracemalloc`` cannot see. It is read just before the timed section
(the *baseline*: interpreter, torch, torchmetrics, the inputs) and at the end; the table shows both the
absolute peak and the increase over the baseline (what the metric itself needed). The reported time is
the median over repeats. At full COCO-5k scale torchmetrics needs minutes (on an idle 2-core machine;
much longer on a loaded one) and about 12 GB per run, so by default it runs once (``--tm-repeats``)
while pefttune runs ``--repeats`` times; the table states how many runs each median covers. Both
implementations' R@K are printed, and the script fails if they differ by more than float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

KS = (1, 5, 10)
# Noise added to a caption's copy of its image embedding, relative to the size of one coordinate.
CAPTION_NOISE = 7.0


def make_inputs(images: int, captions_per_image: int, dim: int, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    image_embeds = F.normalize(torch.randn(images, dim, generator=g), dim=1)
    owner = torch.arange(images).repeat_interleave(captions_per_image)
    noise = torch.randn(owner.numel(), dim, generator=g) * (CAPTION_NOISE / dim**0.5)
    text_embeds = F.normalize(image_embeds[owner] + noise, dim=1)
    return {
        "image_embeds": image_embeds,
        "image_ids": torch.arange(images),
        "text_embeds": text_embeds,
        "text_ids": torch.arange(owner.numel()),
        "text_image_ids": owner,
    }


def run_pefttune(inputs: dict, chunk_size: int) -> dict[str, float]:
    from pefttune.metrics import RetrievalMetrics

    metric = RetrievalMetrics(ks=KS, chunk_size=chunk_size)
    metric.update(
        inputs["image_embeds"],
        inputs["image_ids"],
        inputs["text_embeds"],
        inputs["text_ids"],
        inputs["text_image_ids"],
    )
    result = metric.compute()
    return {f"{d}_R@{k}": float(result[f"{d}_R@{k}"]) for d in ("i2t", "t2i") for k in KS}


def run_torchmetrics(inputs: dict) -> dict[str, float]:
    import torch
    from torchmetrics import MetricCollection
    from torchmetrics.retrieval import RetrievalHitRate

    images, texts, owner = inputs["image_embeds"], inputs["text_embeds"], inputs["text_image_ids"]
    n_img, n_txt = images.shape[0], texts.shape[0]
    out = {}
    for direction in ("i2t", "t2i"):
        if direction == "i2t":
            scores = images @ texts.T
            target = owner[None, :] == torch.arange(n_img)[:, None]
        else:
            scores = texts @ images.T
            target = owner[:, None] == torch.arange(n_img)[None, :]
        indexes = torch.arange(scores.shape[0])[:, None].expand_as(scores)
        collection = MetricCollection({f"R@{k}": RetrievalHitRate(top_k=k) for k in KS}, compute_groups=True)
        collection.update(scores.flatten(), target.flatten(), indexes=indexes.flatten())
        values = collection.compute()
        out.update({f"{direction}_R@{k}": 100.0 * float(values[f"R@{k}"]) for k in KS})
        del scores, target, indexes, collection, values
    assert n_txt == owner.numel()
    return out


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    import torch

    # The machine is shared: if memory runs out, the kernel should kill this benchmark, not a neighbour.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)

    def run(inputs: dict) -> dict[str, float]:
        return (
            run_pefttune(inputs, args.chunk_size) if args.worker == "pefttune" else run_torchmetrics(inputs)
        )

    run(make_inputs(8, 2, 16, seed=1))  # warm-up, untimed
    inputs = make_inputs(args.images, args.captions_per_image, args.dim, args.seed)
    baseline = peak_rss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    recalls = run(inputs)
    report = {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        "recalls": recalls,
    }
    print(json.dumps(report))


def measure(impl: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--images",
        str(args.images),
        "--captions-per-image",
        str(args.captions_per_image),
        "--dim",
        str(args.dim),
        "--chunk-size",
        str(args.chunk_size),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = " (killed: most likely out of memory)" if done.returncode == -9 else ""
        print(f"  {impl} worker failed with exit code {done.returncode}{why}\n{done.stderr[-2000:]}")
        return None
    run = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {impl}: {run['seconds']:.2f} s wall, {run['cpu_seconds']:.2f} s CPU, "
        f"peak RSS {run['peak_mb']:.0f} MB",
        flush=True,
    )
    return run


def measure_all(impl: str, repeats: int, args: argparse.Namespace) -> dict | None:
    runs = [run for run in (measure(impl, args) for _ in range(repeats)) if run is not None]
    return summarise(impl, runs) if runs else None


def summarise(impl: str, runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    return {
        "impl": impl,
        "runs": len(runs),
        "median_s": statistics.median(seconds),
        "median_cpu_s": statistics.median(r["cpu_seconds"] for r in runs),
        "all_s": seconds,
        "peak_mb": max(r["peak_mb"] for r in runs),
        "increase_mb": max(r["peak_mb"] - r["baseline_mb"] for r in runs),
        "recalls": runs[0]["recalls"],
    }


def available_memory_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="runs of pefttune (median reported)")
    parser.add_argument(
        "--tm-repeats",
        type=int,
        default=None,
        help="runs of torchmetrics; default: --repeats up to 20M scores per direction, else 1",
    )
    parser.add_argument("--chunk-size", type=int, default=512, help="pefttune ranking chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="small size (1000 images) for a smoke run")
    parser.add_argument("--skip-torchmetrics", action="store_true")
    parser.add_argument("--worker", choices=["pefttune", "torchmetrics"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.images = 1000
    n_txt = args.images * args.captions_per_image
    scores = args.images * n_txt
    tm_repeats = args.tm_repeats or (args.repeats if scores <= 20_000_000 else 1)

    print(
        f"{args.images} images x {args.captions_per_image} captions = {n_txt} captions, width {args.dim}: "
        f"{scores / 1e6:.1f}M scores per direction; R@{','.join(map(str, KS))} in both directions"
    )
    results = [measure_all("pefttune", args.repeats, args)]
    if not args.skip_torchmetrics:
        # Measured at 5000 x 25000: about 12 GB, i.e. roughly 100 bytes per score of one direction.
        needed, available = scores * 100 / 2**20, available_memory_mb()
        if available is not None and available < needed:
            print(f"  warning: torchmetrics may need ~{needed:.0f} MB, only {available:.0f} MB available")
        results.append(measure_all("torchmetrics", tm_repeats, args))
    failed = [impl for impl, r in zip(("pefttune", "torchmetrics"), results, strict=False) if r is None]
    results = [r for r in results if r is not None]

    header = f"{'implementation':<14} {'runs':>4} {'median wall s':>14} {'median CPU s':>13}"
    print(f"\n{header} {'peak RSS MB':>12} {'increase MB':>12}  wall times (s)")
    for r in results:
        times = ", ".join(f"{s:.2f}" for s in r["all_s"])
        print(
            f"{r['impl']:<14} {r['runs']:>4} {r['median_s']:>14.2f} {r['median_cpu_s']:>13.2f} "
            f"{r['peak_mb']:>12.0f} {r['increase_mb']:>12.0f}  {times}"
        )
    print("\nR@K (%):")
    for r in results:
        print(f"  {r['impl']:<14} " + "  ".join(f"{k}={v:.2f}" for k, v in r["recalls"].items()))
    if failed:
        raise SystemExit(f"no successful run of: {', '.join(failed)}")
    if len(results) == 2:
        ours, theirs = results
        worst = max(abs(ours["recalls"][k] - theirs["recalls"][k]) for k in ours["recalls"])
        print(f"  largest R@K difference: {worst:.2g} points")
        if worst > 1e-3:
            raise SystemExit("pefttune and torchmetrics disagree on R@K")
        print("\nratios (torchmetrics / pefttune):")
        print(f"  wall time:             {theirs['median_s'] / ours['median_s']:.0f}x faster")
        print(f"  CPU time:              {theirs['median_cpu_s'] / ours['median_cpu_s']:.0f}x less")
        print(f"  peak RSS:              {theirs['peak_mb'] / ours['peak_mb']:.1f}x less")
        print(f"  increase over baseline:{theirs['increase_mb'] / ours['increase_mb']:.1f}x less")


if __name__ == "__main__":
    main()
