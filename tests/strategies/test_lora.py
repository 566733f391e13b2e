"""LoRA through peft: targets, parity with a reference LoRA, merging, gradients and adapter checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from pefttune.checkpointing import AdapterMismatchError, load_adapter, save_adapter
from pefttune.layers.split_qkv import SplitMultiheadAttention, SplitQKV
from pefttune.losses import InfoNCELoss, SigLIPLoss
from pefttune.module import DualEncoderModule
from pefttune.strategies.base import TemperaturePolicy
from pefttune.strategies.lora import LoRA
from pefttune.testing import TINY_TOWER_PAIRS, tiny_bert, tiny_clip, tiny_cnn, tiny_vit
from pefttune.towers.base import Tower

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red square on the left", "two blue circles", "a small green triangle", "nothing at all"]


# -- helpers ---------------------------------------------------------------------------------------
def _inputs(text_tower) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return images, text_tower.tokenize(CAPTIONS)


def _embed(image_tower, text_tower, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return image_tower(images), text_tower(tokens["input_ids"], tokens["attention_mask"])


def _randomize_lora(root: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give every LoRA matrix (B included, which starts at zero) a clearly non-zero value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in root.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _lora_delta(layer: LoraLayer, scaling: float) -> torch.Tensor:
    """``s * B @ A`` written out by hand (not peft's get_delta_weight), in the base weight's shape."""
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    delta = scaling * (b.flatten(1) @ a.flatten(1))
    return delta.reshape(layer.get_base_layer().weight.shape)


def _apply_reference_lora(reference: Tower, adapted: Tower, names: list[str], scaling: float) -> None:
    """Add each LoRA update of ``adapted`` to the matching weight of the untouched copy ``reference``.

    A split q/k/v part adds to its row-third of the fused ``qkv`` weight, which is what CLIP-LoRA's
    separate q, k and v updates amount to.
    """
    with torch.no_grad():
        for name in names:
            layer = adapted.get_submodule(name)
            delta = _lora_delta(layer, scaling)
            parent_name, _, part = name.rpartition(".")
            if isinstance(adapted.get_submodule(parent_name), SplitMultiheadAttention):
                # The reference still holds nn.MultiheadAttention: q/k/v are row-thirds of in_proj_weight.
                packed = reference.get_submodule(parent_name)
                if part == "out_proj":
                    packed.out_proj.weight += delta
                else:
                    index = ("q_proj", "k_proj", "v_proj").index(part)
                    packed.in_proj_weight[index * delta.shape[0] : (index + 1) * delta.shape[0]] += delta
            elif isinstance(adapted.get_submodule(parent_name), SplitQKV):
                fused = reference.get_submodule(parent_name)
                index = "qkv".index(part)
                rows = slice(index * delta.shape[0], (index + 1) * delta.shape[0])
                fused.weight[rows] += delta
            else:
                reference.get_submodule(name).weight += delta


def _expected_lora_count(tower: Tower, r: int) -> int:
    """The LoRA size the qkv preset must give: 3 r (d_in + d) per attention block, r (c_in + c_out) per
    dense 1x1 convolution of a convolutional block."""
    total = 0
    for block in tower.blocks():
        if block.layout == "map":
            for module in block.module.modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
                    total += r * (module.in_channels + module.out_channels)
        elif block.qkv.is_packed:
            total += 3 * r * 2 * block.qkv.packed.embed_dim
        elif block.qkv.is_fused:
            fused = block.qkv.fused
            total += 3 * r * (fused.in_features + fused.out_features // 3)
        else:
            for linear in (block.qkv.query, block.qkv.key, block.qkv.value):
                total += r * (linear.in_features + linear.out_features)
    return total


def _lora_count(tower: nn.Module) -> int:
    return sum(p.numel() for n, p in tower.named_parameters() if ".lora_" in n)


def _module(pair: str, **lora_args) -> DualEncoderModule:
    torch.manual_seed(0)
    image_tower, text_tower = TINY_TOWER_PAIRS[pair]()
    return DualEncoderModule(image_tower, text_tower, strategy=LoRA(**lora_args))


def _train_steps(module: DualEncoderModule, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW(
        [
            {k: v for k, v in g.items() if k != "param_names"}
            for g in module.strategy.parameter_groups(module)
        ],
        lr=1e-2,
    )
    images, tokens = _inputs(module.text_tower)
    module.train()
    for _ in range(steps):
        image_embeds, text_embeds = module(
            {
                "pixel_values": images,
                "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"],
            }
        )
        loss = module.loss(image_embeds, text_embeds, module.logit_scale_value, module.logit_bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()


# -- the split of a fused qkv linear -----------------------------------------------------------------
def test_split_qkv_computes_the_fused_linear() -> None:
    fused = nn.Linear(16, 48)
    split = SplitQKV.from_fused(fused)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-6)
    assert [p.shape for p in split.parameters()] == [(16, 16), (16,)] * 3
    back = split.to_fused()
    torch.testing.assert_close(back.weight, fused.weight, rtol=0, atol=0)
    torch.testing.assert_close(back.bias, fused.bias, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 \\* d"):
        SplitQKV.from_fused(nn.Linear(16, 40))


def test_fused_qkv_gets_three_updates_equal_to_reference_lora() -> None:
    image_tower, text_tower = tiny_vit(), tiny_bert()
    reference = copy.deepcopy(image_tower).eval()
    widths = [block.width for block in image_tower.blocks()]
    strategy = LoRA()
    strategy.attach(image_tower, text_tower)
    image_tower.eval()
    images = torch.randn(2, 3, 32, 32)

    # Before training (B = 0) the split, adapted tower is the pretrained tower.
    with torch.no_grad():
        torch.testing.assert_close(image_tower(images), reference(images), rtol=0, atol=1e-6)
    for index, width in enumerate(widths):
        block_lora = sum(
            p.numel()
            for n, p in image_tower.named_parameters()
            if n.startswith(f"model.blocks.{index}.") and ".lora_" in n
        )
        assert block_lora == 3 * strategy.r * (width + width)
        attn = image_tower.model.blocks[index].attn
        assert isinstance(attn.qkv, SplitQKV)
        assert all(isinstance(getattr(attn.qkv, part), LoraLayer) for part in "qkv")

    _randomize_lora(image_tower)
    with torch.no_grad():
        assert not torch.allclose(image_tower(images), reference(images), atol=1e-3)
    _apply_reference_lora(reference, image_tower, strategy.target_names["image"], 1 / math.sqrt(2))
    with torch.no_grad():
        torch.testing.assert_close(image_tower(images), reference(images), rtol=1e-4, atol=1e-5)


# -- targets, counts and defaults --------------------------------------------------------------------
def test_defaults_follow_clip_lora(tower_pair) -> None:
    image_tower, text_tower = tower_pair
    expected = _expected_lora_count(image_tower, 2) + _expected_lora_count(text_tower, 2)
    module = DualEncoderModule(image_tower, text_tower, strategy=LoRA(train_projections=False))
    report = module.parameter_report()
    assert report["trainable_by_group"] == {"method": expected, "backbone": 0, "head": 0, "temperature": 0}
    assert _lora_count(module) == expected
    assert math.isclose(float(module.logit_scale_value), 100.0, rel_tol=1e-6)
    assert not module.logit_scale.requires_grad
    # SigLIP towers prefer their own sigmoid loss when the config names none.
    assert isinstance(module.loss, SigLIPLoss if image_tower.preferred_loss() else InfoNCELoss)
    layers = module.strategy.lora_layers
    assert layers
    for layer in layers:
        assert math.isclose(layer.scaling["default"], 1 / math.sqrt(2))
        assert layer.lora_dropout["default"].p == 0.25
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
        assert not any(p.requires_grad for p in layer.get_base_layer().parameters())


def test_cnn_targets_only_dense_1x1_convolutions() -> None:
    image_tower, text_tower = tiny_cnn(), tiny_bert()
    strategy = LoRA()
    strategy.attach(image_tower, text_tower)
    names = strategy.target_names["image"]
    assert names
    for name in names:
        base = image_tower.get_submodule(name).get_base_layer()
        assert isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1) and base.groups == 1
    depthwise = [n for n, m in image_tower.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and not any(n.startswith(tuple(names)) for n in depthwise)


def test_presets_and_patterns_choose_targets() -> None:
    image_tower, text_tower = tiny_clip()
    strategy = LoRA(targets="qkv+out")
    strategy.attach(image_tower, text_tower)
    suffixes = {
        name.rsplit(".", 1)[-1] for name in strategy.target_names["image"] + strategy.target_names["text"]
    }
    assert suffixes == {"q_proj", "k_proj", "v_proj", "out_proj"}

    image_tower, text_tower = tiny_vit(), tiny_bert()
    strategy = LoRA(targets="mlp")
    strategy.attach(image_tower, text_tower)
    assert {n.split(".", 3)[-1] for n in strategy.target_names["image"]} == {"mlp.fc1", "mlp.fc2"}
    assert {n.split(".", 4)[-1] for n in strategy.target_names["text"]} == {
        "intermediate.dense",
        "output.dense",
    }

    # Patterns: a dotted suffix, and a fused qkv selected by a pattern is split before peft sees it.
    image_tower, text_tower = tiny_vit(), tiny_bert()
    strategy = LoRA(targets=["model.blocks.0.attn.qkv", "attention.self.value"])
    strategy.attach(image_tower, text_tower)
    assert strategy.target_names["image"] == [f"model.blocks.0.attn.qkv.{p}" for p in "qkv"]
    assert [n.rsplit(".", 1)[-1] for n in strategy.target_names["text"]] == ["value", "value"]


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown LoRA target preset"):
        LoRA(targets="qkv+ffn")
    with pytest.raises(ValueError, match="towers"):
        LoRA(towers="vision")
    image_tower, text_tower = tiny_clip()
    with pytest.raises(ValueError, match="select no layer"):
        LoRA(targets=["no_such_layer"]).attach(image_tower, text_tower)
    image_tower, text_tower = tiny_vit(), tiny_bert()
    with pytest.raises(ValueError, match="inside the backbone"):
        LoRA(targets=["projection"]).attach(image_tower, text_tower)


def test_one_tower_only_locks_the_other() -> None:
    image_tower, text_tower = tiny_clip()
    module = DualEncoderModule(image_tower, text_tower, strategy=LoRA(towers="text"))
    assert _lora_count(module.image_tower) == 0 and module.image_tower.locked
    assert _lora_count(module.text_tower) == _expected_lora_count(text_tower, 2)
    assert not module.text_tower.locked


def test_head_only_tower_keeps_its_batchnorm_statistics() -> None:
    # towers="text" on a CNN whose new head trains: the image backbone is frozen but not locked, so it
    # runs in train mode; its BatchNorm statistics must not move (they are not in the adapter checkpoint).
    module = DualEncoderModule(tiny_cnn(), tiny_bert(), strategy=LoRA(towers="text"))
    image_tower = module.image_tower
    assert not image_tower.locked and image_tower.projection.weight.requires_grad
    buffers = {n: b.clone() for n, b in image_tower.named_buffers()}
    assert any(n.endswith("running_mean") for n in buffers)
    module.train()
    with torch.no_grad():
        image_tower(torch.randn(4, 3, 32, 32))
    for name, buffer in image_tower.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)


def test_fused_qkv_with_separate_biases_is_adapted() -> None:
    # timm's EVA adds its q/v biases with F.linear(x, self.qkv.weight, ...), bypassing the qkv module.
    from pefttune.towers import TimmImageTower

    image_tower = TimmImageTower("eva02_tiny_patch14_224", pretrained=False, embed_dim=24, image_size=28)
    reference = copy.deepcopy(image_tower).eval()
    with torch.no_grad():
        for name, parameter in image_tower.named_parameters():
            if name.endswith("q_bias") or name.endswith("v_bias"):
                parameter.normal_(std=0.1)
    reference.load_state_dict(image_tower.state_dict())
    strategy = LoRA()
    strategy.attach(image_tower, tiny_bert())
    image_tower.eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(image_tower(images), reference(images), rtol=1e-5, atol=1e-6)
    _randomize_lora(image_tower)
    _apply_reference_lora(reference, image_tower, strategy.target_names["image"], 1 / math.sqrt(2))
    with torch.no_grad():
        torch.testing.assert_close(image_tower(images), reference(images), rtol=1e-4, atol=1e-5)


def test_auto_projections_train_only_new_heads() -> None:
    vit = _module("vit+bert")
    assert vit.image_tower.projection.weight.requires_grad and vit.text_tower.projection.weight.requires_grad
    assert vit.parameter_report()["trainable_by_group"]["head"] > 0
    clip = _module("clip")
    assert clip.parameter_report()["trainable_by_group"]["head"] == 0


# -- gradients ---------------------------------------------------------------------------------------
def test_only_lora_weights_receive_gradient(tower_pair) -> None:
    image_tower, text_tower = tower_pair
    # "auto": CLIP's pretrained heads stay frozen, the tiny towers' new heads train.
    module = DualEncoderModule(image_tower, text_tower, strategy=LoRA(train_projections="auto"))
    new_heads = image_tower.pretrained_logit_scale is None
    _randomize_lora(module)  # with B = 0, A would get an all-zero (but present) gradient
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    images, tokens = _inputs(text_tower)
    module.train()
    image_embeds, text_embeds = module(
        {"pixel_values": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    )
    module.loss(image_embeds, text_embeds, module.logit_scale_value, module.logit_bias).backward()

    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    lora = {n for n in with_grad if ".lora_" in n}
    heads = {n for n in with_grad if ".projection." in n}
    assert with_grad == lora | heads
    assert bool(heads) == new_heads
    assert any(".lora_A." in n for n in with_grad) and any(".lora_B." in n for n in with_grad)
    assert all(module.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if ".lora_" in n)
    # A training forward leaves frozen state alone: BatchNorm running statistics do not move.
    for name, buffer in module.named_buffers():
        if name in buffers:
            torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)


# -- merging -----------------------------------------------------------------------------------------
def test_merge_equals_unmerged_and_unmerge_restores(tower_pair) -> None:
    image_tower, text_tower = tower_pair
    reference_towers = copy.deepcopy((image_tower, text_tower))
    strategy = LoRA()
    module = DualEncoderModule(image_tower, text_tower, strategy=strategy)
    _randomize_lora(module)
    module.eval()
    images, tokens = _inputs(text_tower)
    adapted = _embed(image_tower, text_tower, images, tokens)
    base_weights = {
        id(layer): layer.get_base_layer().weight.detach().clone() for layer in strategy.lora_layers
    }

    # The hand-written reference LoRA (W + s B A on an untouched copy) computes the same function.
    for tower, reference in zip((image_tower, text_tower), reference_towers, strict=True):
        _apply_reference_lora(reference, tower, strategy.target_names[tower.modality], 1 / math.sqrt(2))
        reference.eval()
    reference = _embed(*reference_towers, images, tokens)
    for want, got in zip(reference, adapted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    strategy.merge()
    assert strategy.merged
    merged = _embed(image_tower, text_tower, images, tokens)
    for before, after in zip(adapted, merged, strict=True):
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    changed = [
        not torch.allclose(layer.get_base_layer().weight, base_weights[id(layer)])
        for layer in strategy.lora_layers
    ]
    assert all(changed)
    for layer in strategy.lora_layers:
        torch.testing.assert_close(
            layer.get_base_layer().weight, base_weights[id(layer)] + _lora_delta(layer, 1 / math.sqrt(2))
        )

    strategy.unmerge()
    assert not strategy.merged
    for layer in strategy.lora_layers:
        torch.testing.assert_close(
            layer.get_base_layer().weight, base_weights[id(layer)], rtol=1e-5, atol=1e-6
        )
    for before, after in zip(adapted, _embed(image_tower, text_tower, images, tokens), strict=True):
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


# -- adapter-only checkpoints ------------------------------------------------------------------------
def test_adapter_checkpoint_round_trip(tower_pair, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    pair = request.node.callspec.params["tower_pair"]
    trained = _module(pair)
    _train_steps(trained)
    path = tmp_path / "adapter.pt"
    checkpoint = save_adapter(trained, path)
    assert checkpoint["strategy"]["class_path"] == "pefttune.strategies.lora.LoRA"
    assert checkpoint["strategy"]["init_args"]["r"] == 2
    assert checkpoint["state"] and all(
        ".lora_" in key or ".projection." in key for key in checkpoint["state"]
    )
    assert (
        sum(v.numel() for v in checkpoint["state"].values()) == trained.parameter_report()["trainable_params"]
    )

    fresh = _module(pair)  # same seed: the same "pretrained" backbone, untrained LoRA
    fresh.eval()
    images, tokens = _inputs(trained.text_tower)
    expected = _embed(trained.image_tower, trained.text_tower, images, tokens)
    before = _embed(fresh.image_tower, fresh.text_tower, images, tokens)
    assert not torch.allclose(before[1], expected[1], atol=1e-4)
    load_adapter(fresh, path)
    for got, want in zip(_embed(fresh.image_tower, fresh.text_tower, images, tokens), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_adapter_checkpoint_refuses_other_models(tmp_path: Path) -> None:
    path = tmp_path / "adapter.pt"
    save_adapter(_module("vit+bert"), path)

    with pytest.raises(AdapterMismatchError, match=r"(?s)missing \(\d+\).*unexpected \(\d+\)"):
        load_adapter(_module("cnn+bert"), path)
    with pytest.raises(AdapterMismatchError, match=r"(?s)r: checkpoint 2, model 4"):
        load_adapter(_module("vit+bert", r=4), path)
    narrow = DualEncoderModule(tiny_vit(embed_dim=16), tiny_bert(embed_dim=16), strategy=LoRA())
    with pytest.raises(AdapterMismatchError, match=r"(?s)shape mismatch \(2\).*projection\.weight"):
        load_adapter(narrow, path)
    merged = _module("vit+bert")
    merged.strategy.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        load_adapter(merged, path)


def test_temperature_can_be_overridden() -> None:
    image_tower, text_tower = tiny_clip()
    strategy = LoRA(temperature=TemperaturePolicy(init=None, learnable=True))
    module = DualEncoderModule(image_tower, text_tower, strategy=strategy)
    assert module.logit_scale.requires_grad
    assert module.parameter_report()["trainable_by_group"]["temperature"] == 1


# -- shipped configs ---------------------------------------------------------------------------------
def test_paper_config_tests_the_final_iterate() -> None:
    # CLIP-LoRA evaluates the last iterate, with no selection on validation (methods.md §4.2, §8).
    import yaml

    config = yaml.safe_load((REPO / "configs/paper/lora_clip_vitb16.yaml").read_text())
    assert "checkpoint" in config and config["checkpoint"]["monitor"] is None


# -- shipped configs (real towers; slow) --------------------------------------------------------------
@pytest.mark.slow
def test_paper_config_counts_184320() -> None:
    from pefttune.cli import inspect_main

    report = inspect_main(["--config", str(REPO / "configs/paper/lora_clip_vitb16.yaml"), "--no-weights"])
    assert report["trainable_params"] == 184_320
    assert report["trainable_by_group"] == {"method": 184_320, "backbone": 0, "head": 0, "temperature": 0}
    assert report["trainable_by_tower"] == {"image": 110_592, "text": 73_728, "other": 0}


@pytest.mark.slow
def test_offline_config_adapter_round_trip(tmp_path: Path) -> None:
    from pefttune.cli import build_model_from_config

    config = str(REPO / "configs/lora.yaml")
    trained = build_model_from_config(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, parameter in trained.strategy.named_trainable(trained):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    trained.eval()
    save_adapter(trained, tmp_path / "lora.pt")

    fresh = build_model_from_config(config)
    load_adapter(fresh, tmp_path / "lora.pt")
    fresh.eval()
    images = torch.randn(2, 3, 96, 96)
    tokens = trained.text_tower.tokenize(CAPTIONS[:2])
    for got, want in zip(
        _embed(fresh.image_tower, fresh.text_tower, images, tokens),
        _embed(trained.image_tower, trained.text_tower, images, tokens),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
