"""The optimizer update, fused against unfused, for each method's trainable parameters (perf item 9).

Each registered method's offline config is built once; its optimizer over the strategy's parameter groups is
built twice, once with ``fused=True`` (pefttune's default wherever torch has the kernels, CPUs included since
torch 2.4) and once as torch builds it by default (a loop of per-tensor kernels on a CPU), on two copies of
the same trainable parameters with the same random gradients. The two are stepped alternately, ``--steps``
timed steps each after two untimed; the script prints the median update time of each, their ratio, and the
largest difference between the parameters the two produced (the update is the same arithmetic, regrouped).

    python benchmarks/perf/fused_optimizer.py --threads 1                # every method, one thread
    python benchmarks/perf/fused_optimizer.py --methods lit,full --steps 21
    python benchmarks/perf/fused_optimizer.py --tiny --steps 1          # smoke: tiny random towers
"""

from __future__ import annotations

import argparse
import time

from common import build_model, machine_line, median, method_config, method_names


def _optimizers(model, torch):
    """Two optimizers of the model's kind over two copies of its trainable parameters (fused, unfused)."""
    from pefttune.optim import fused_variant

    groups = model.strategy.parameter_groups(model)
    sides = []
    for fused in (True, False):
        copies = [
            {
                **{k: v for k, v in group.items() if k not in ("params", "param_names")},
                "params": [torch.nn.Parameter(p.detach().clone()) for p in group["params"]],
            }
            for group in groups
        ]
        optimizer = model.optimizer_factory(copies)
        sides.append(fused_variant(optimizer) if fused else optimizer)
    return sides


def measure(name: str, steps: int, torch, tiny: bool = False) -> dict:
    """Median update times (s) of the fused and the unfused optimizer of ``name``'s config."""
    model = build_model(method_config(name), image_size=64, tiny=tiny)
    fused, unfused = _optimizers(model, torch)
    params = [[p for g in opt.param_groups for p in g["params"]] for opt in (fused, unfused)]
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    for step in range(steps + 2):
        gradients = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params[0]]
        for label, optimizer, own in (("fused", fused, params[0]), ("unfused", unfused, params[1])):
            for p, g in zip(own, gradients, strict=True):
                p.grad = g.clone()
            start = time.perf_counter()
            optimizer.step()
            if step >= 2:
                times[label].append(time.perf_counter() - start)
    difference = max((a - b).abs().max().item() for a, b in zip(*params, strict=True))
    return {
        "trainable": sum(p.numel() for p in params[0]),
        # Optimizers without a fused variant (Adadelta, APEX's) come back unfused: both sides are the same.
        "optimizer": type(fused).__name__ + ("" if fused.defaults.get("fused") else " (no fused variant)"),
        "fused_s": median(times["fused"]),
        "unfused_s": median(times["unfused"]),
        "difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random test towers (smoke test)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"median of {args.steps} updates after 2 untimed, fused and unfused alternating, same gradients")
    print()
    print(
        "| method | trainable params | optimizer | unfused (ms) | fused (ms) | fused speed-up "
        "| largest difference |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        r = measure(name, args.steps, torch, tiny=args.tiny)
        print(
            f"| {name} | {r['trainable']:,} | {r['optimizer']} | {1000 * r['unfused_s']:.1f} | "
            f"{1000 * r['fused_s']:.1f} | {r['unfused_s'] / r['fused_s']:.2f}x | {r['difference']:.1e} |"
        )


if __name__ == "__main__":
    main()
