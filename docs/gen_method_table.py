"""Print the README's table: every method's trainable parameters on CLIP ViT-B/16.

Each method is built with its paper defaults on both towers of ``openai/clip-vit-base-patch16``,
architecture-only (no download), exactly as ``pefttune inspect --no-weights`` builds models::

    python docs/gen_method_table.py
"""

from __future__ import annotations

from collections.abc import Callable

from pefttune.module import DualEncoderModule
from pefttune.strategies import (
    APEX,
    AdaptationStrategy,
    CrossModalAdapter,
    DueT,
    FullFineTune,
    LiT,
    LoRA,
)
from pefttune.towers import CLIPImageTower, CLIPTextTower, architecture_only

CHECKPOINT = "openai/clip-vit-base-patch16"

METHODS: dict[str, tuple[str, Callable[[], AdaptationStrategy]]] = {
    "DueT (m = 3072)": ("duet", lambda: DueT(width=3072)),
    "DueT (m = 96)": ("duet", lambda: DueT(width=96)),
    "Cross-Modal Adapter (r = 8, d_s = 16)": ("cross_modal_adapter", CrossModalAdapter),
    "LoRA (r = 2, q/k/v)": ("lora", LoRA),
    "APEX": ("apex", APEX),
    "LiT (image tower locked)": ("lit", LiT),
    "Full fine-tuning": ("full", FullFineTune),
}


def main() -> None:
    """Build every method and print a Markdown table."""
    print("| method | trainable | % of total | method | backbone | head | temperature |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (page, factory) in METHODS.items():
        with architecture_only():
            model = DualEncoderModule(CLIPImageTower(CHECKPOINT), CLIPTextTower(CHECKPOINT), factory())
        report = model.parameter_report()
        groups = report["trainable_by_group"]
        print(
            f"| [{label}](docs/methods/{page}.md) | {report['trainable_params']:,} "
            f"| {100 * report['trainable_fraction']:.2f}% | {groups['method']:,} | {groups['backbone']:,} "
            f"| {groups['head']:,} | {groups['temperature']:,} |"
        )
    print(f"\nTotal parameters of the CLIP ViT-B/16 towers and logit scale: {report['total_params']:,}")


if __name__ == "__main__":
    main()
