"""Gradient (activation) checkpointing: every trainable parameter gets the gradient it gets without it.

A known silent failure: with reentrant checkpointing, a block whose input does not require grad (a frozen
backbone) returns outputs without a graph, so the adapters, LoRA weights or norms inside it get no gradient.
The towers use non-reentrant checkpointing; these tests compare every gradient, for every strategy on every
tiny tower pair, and check that the blocks really were recomputed.
"""

from __future__ import annotations

import pytest
import torch

from pefttune.module import DualEncoderModule
from pefttune.strategies import APEX, CrossModalAdapter, DueT, FullFineTune, LiT, LoRA
from pefttune.testing import TINY_TOWER_PAIRS
from pefttune.towers import (
    CLIPImageTower,
    CLIPTextTower,
    HFTextTower,
    OpenCLIPImageTower,
    OpenCLIPTextTower,
    SiglipImageTower,
    SiglipTextTower,
    TimmImageTower,
)

METHODS = {
    "full": FullFineTune,
    "lit": LiT,
    "duet": lambda: DueT(width=16),
    "cma": lambda: CrossModalAdapter(bottleneck=4, shared_dim=4),
    "lora": lambda: LoRA(dropout=0.0),
    "apex": APEX,
}


def _batch(image, text, size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    tokens = text.tokenize(
        [f"a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green", "pink"])]
    )
    return {
        "pixel_values": torch.randn(size, 3, image.image_size, image.image_size, generator=generator),
        "image_ids": torch.arange(size),
        "text_ids": torch.arange(size),
        **tokens,
    }


def _perturb(module: DualEncoderModule) -> None:
    """Move trainable tensors off their initial values (LoRA's B starts at zero), identically in both runs."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _count_block_runs(module: DualEncoderModule) -> dict[str, list[int]]:
    """Count forward runs of a module inside every block (recomputation runs it a second time)."""
    counts: dict[str, list[int]] = {}
    for tower in (module.image_tower, module.text_tower):
        for block in tower.blocks():
            inner = block.mlp_output if block.is_transformer else next(block.module.children())
            runs = counts.setdefault(f"{tower.modality}:{block.name}", [0])
            inner.register_forward_pre_hook(lambda *_, runs=runs: runs.__setitem__(0, runs[0] + 1))
    return counts


def _gradients(pair: str, method: str, checkpointing: bool):
    torch.manual_seed(0)
    image, text = TINY_TOWER_PAIRS[pair]()
    if checkpointing:
        image.set_gradient_checkpointing(True)
        text.set_gradient_checkpointing(True)
    torch.manual_seed(1)
    module = DualEncoderModule(image, text, METHODS[method]())
    _perturb(module)
    counts = _count_block_runs(module)
    module.train()
    batch = _batch(module.image_tower, module.text_tower)
    torch.manual_seed(2)  # dropout and stochastic layers draw the same numbers in both runs
    image_embeds, text_embeds = module(batch)
    loss = module.loss(
        image_embeds,
        text_embeds,
        module.logit_scale_value,
        module.logit_bias,
        batch["image_ids"],
        batch["text_ids"],
    )
    loss.backward()
    gradients = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return module, gradients, counts


@pytest.mark.parametrize("pair", sorted(TINY_TOWER_PAIRS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpointing_gives_every_trainable_parameter_the_same_gradient(pair, method):
    _, plain, _ = _gradients(pair, method, checkpointing=False)
    module, checkpointed, counts = _gradients(pair, method, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    missing = sorted(n for n, g in plain.items() if g is None)
    lost = sorted(n for n, g in checkpointed.items() if g is None and plain[n] is not None)
    assert not lost, f"checkpointing lost the gradients of {lost[:5]}"
    assert len(missing) < len(plain), "nothing received a gradient"
    for name, gradient in plain.items():
        if gradient is not None:
            torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-5, msg=name)
    # Every block holding a trainable parameter was really recomputed in the backward pass (blocks before
    # the first trainable one save nothing for backward, so nothing of theirs is recomputed).
    recomputed = 0
    for tower in (module.image_tower, module.text_tower):
        for block in tower.blocks():
            runs = counts[f"{tower.modality}:{block.name}"][0]
            assert runs in (1, 2), f"{block.name} ran {runs} times"
            if any(p.requires_grad for p in block.module.parameters()):
                assert runs == 2, f"{tower.modality} {block.name} was not recomputed"
            recomputed += runs == 2
    assert recomputed > 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: TimmImageTower("test_vit", pretrained=False, image_size=32, gradient_checkpointing=True),
        lambda: HFTextTower("pefttune/tiny-bert", pretrained=False, gradient_checkpointing=True),
        lambda: CLIPImageTower("pefttune/tiny-clip", pretrained=False, gradient_checkpointing=True),
        lambda: CLIPTextTower("pefttune/tiny-clip", pretrained=False, gradient_checkpointing=True),
        lambda: SiglipImageTower("pefttune/tiny-siglip", pretrained=False, gradient_checkpointing=True),
        lambda: SiglipTextTower(
            "pefttune/tiny-siglip", pretrained=False, max_length=16, gradient_checkpointing=True
        ),
        lambda: OpenCLIPImageTower("pefttune-tiny-openclip", gradient_checkpointing=True),
        lambda: OpenCLIPTextTower("pefttune-tiny-openclip", gradient_checkpointing=True),
        lambda: OpenCLIPImageTower("pefttune-tiny-openclip-timm", gradient_checkpointing=True),
    ],
    ids=[
        "timm",
        "bert",
        "clip-image",
        "clip-text",
        "siglip-image",
        "siglip-text",
        "oc-image",
        "oc-text",
        "oc-timm",
    ],
)
def test_every_tower_kind_takes_the_gradient_checkpointing_argument(build):
    tower = build()
    assert tower.gradient_checkpointing
    tower.set_gradient_checkpointing(False)
    assert not tower.gradient_checkpointing


def test_reentrant_timm_checkpointing_is_refused(monkeypatch):
    import timm.layers

    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    with pytest.raises(ValueError, match="reentrant"):
        TimmImageTower("test_vit", pretrained=False, image_size=32, gradient_checkpointing=True)


def _unit_runs_and_saved_elements(pair: str, checkpointing: bool) -> tuple[list[int], int]:
    """DueT on a tiny pair: forward runs of every image unit, and tensor elements saved outside checkpoints."""
    torch.manual_seed(0)
    image, text = TINY_TOWER_PAIRS[pair]()
    if checkpointing:
        image.set_gradient_checkpointing(True)
        text.set_gradient_checkpointing(True)
    module = DualEncoderModule(image, text, DueT(width=64))
    module.train()
    units = [m for n, m in module.image_tower.named_modules() if n.endswith("duet_gau")]
    runs = [0] * len(units)
    for index, unit in enumerate(units):
        unit.register_forward_pre_hook(lambda *_, i=index: runs.__setitem__(i, runs[i] + 1))
    parameters = {p.data_ptr() for p in module.parameters()}
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Non-reentrant checkpointing keeps its own hooks inside the checkpointed blocks: what arrives here
        # is kept until the backward pass.
        if tensor.data_ptr() not in parameters:
            saved[0] += tensor.numel()
        return tensor

    pixels = torch.randn(4, 3, module.image_tower.image_size, module.image_tower.image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        embeds = module.image_tower(pixels)
    embeds.sum().backward()
    return runs, saved[0]


@pytest.mark.parametrize("pair", sorted(TINY_TOWER_PAIRS))
def test_duet_units_are_recomputed_with_their_checkpointed_blocks(pair):
    """Units after each block (forward hooks) are checkpointed with it, on every tower kind.

    transformers checkpoints a layer's forward only, leaving module hooks outside; without
    CheckpointWithOutputTransforms, DueT's units kept their activations on Hugging Face towers.
    """
    plain_runs, plain_saved = _unit_runs_and_saved_elements(pair, checkpointing=False)
    runs, saved = _unit_runs_and_saved_elements(pair, checkpointing=True)
    assert plain_runs and set(plain_runs) == {1}
    assert set(runs) == {2}, f"every unit runs again in the backward pass: {runs}"
    # Checkpointing keeps a small part of what the units and blocks save without it.
    assert saved < 0.5 * plain_saved, (saved, plain_saved)
