"""DueT: gated adapter units, what trains, the loss and temperature, and every option on tiny towers."""

import copy
import math

import pytest
import torch
from torch import nn

from pefttune.layers.gated_adapter import GatedAdapterUnit, gated_adapter_units
from pefttune.losses import MultiPositiveInfoNCELoss
from pefttune.module import DualEncoderModule
from pefttune.strategies.base import _NORM_TYPES
from pefttune.strategies.duet import DueT, select_blocks
from pefttune.testing import tiny_bert, tiny_clip, tiny_cnn, tiny_vit
from pefttune.towers import ImageTower, TextTower

CAPTIONS = ["a red circle", "two small blue squares on the left", "a star", "a large green cross at the top"]


def _batch(image_tower: ImageTower, text_tower: TextTower, size: int = 4) -> dict[str, torch.Tensor]:
    tokens = text_tower.tokenize(CAPTIONS[:size])
    return {
        "pixel_values": torch.randn(size, 3, image_tower.image_size, image_tower.image_size),
        **tokens,
        # Rows 0 and 2 show the same image: the multi-positive loss has something to do.
        "image_ids": torch.tensor([7, 8, 7, 9][:size]),
        "text_ids": torch.arange(size),
    }


def _build(image_tower: ImageTower, text_tower: TextTower, **options: object) -> DualEncoderModule:
    return DualEncoderModule(image_tower, text_tower, strategy=DueT(**{"width": 16, **options}))


def _loss(module: DualEncoderModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    image_embeds, text_embeds = module(batch)
    return module.loss(
        image_embeds,
        text_embeds,
        module.logit_scale_value,
        module.logit_bias,
        image_ids=batch["image_ids"],
        text_ids=batch["text_ids"],
    )


def _optimizer(module: DualEncoderModule, lr: float) -> torch.optim.Optimizer:
    groups = module.strategy.parameter_groups(module)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=lr)


def _units(module: nn.Module) -> list[GatedAdapterUnit]:
    return [unit for _, unit in gated_adapter_units(module)]


def _backbone_norm_names(module: DualEncoderModule) -> set[str]:
    names = set()
    for tower_name in ("image_tower", "text_tower"):
        tower = getattr(module, tower_name)
        for name, submodule in tower.model.named_modules():
            if isinstance(submodule, _NORM_TYPES) and ".duet_gau." not in f".{name}.":
                names |= {f"{tower_name}.model.{name}.{p}" for p, _ in submodule.named_parameters()}
    return names


# -- the unit ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_unit_is_a_convex_mix_with_a_raw_scalar_gate(norm):
    unit = GatedAdapterUnit(width=8, hidden=12, norm=norm)
    assert isinstance(unit.alpha, nn.Parameter) and unit.alpha.item() == pytest.approx(0.02)
    with torch.no_grad():
        unit.alpha.fill_(0.3)
        nn.init.normal_(unit.norm.weight)
    hidden = torch.randn(2, 5, 8)
    ffn, ln = unit.ffn, unit.norm
    branch = ffn(ln(hidden)) if norm == "pre" else ln(ffn(hidden))
    torch.testing.assert_close(unit(hidden), 0.3 * branch + 0.7 * hidden)
    # No squashing: a gate above 1 extrapolates instead of saturating.
    with torch.no_grad():
        unit.alpha.fill_(1.5)
    torch.testing.assert_close(unit(hidden), 1.5 * branch - 0.5 * hidden)


def test_unit_on_a_feature_map_acts_per_position_over_channels():
    unit = GatedAdapterUnit(width=6, hidden=10, layout="map")
    feature_map = torch.randn(2, 6, 3, 4)
    tokens_unit = GatedAdapterUnit(width=6, hidden=10, layout="tokens")
    tokens_unit.load_state_dict(unit.state_dict())
    expected = tokens_unit(feature_map.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 6, 3, 4)
    output = unit(feature_map)
    assert output.is_contiguous()
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("layout", ["tokens", "map"])
def test_sigmoid_gates_start_at_alpha_init_and_follow_their_inputs(layout):
    shape = (3, 5, 8) if layout == "tokens" else (3, 8, 2, 2)
    hidden = torch.randn(shape)
    for gate in ("sentence", "token"):
        unit = GatedAdapterUnit(width=8, hidden=4, gate=gate, alpha_init=0.1, layout=layout)
        channels_last = hidden if layout == "tokens" else hidden.permute(0, 2, 3, 1)
        torch.testing.assert_close(
            unit.gate_value(channels_last), torch.full((), 0.1).expand_as(unit.gate_value(channels_last))
        )
        with torch.no_grad():
            nn.init.normal_(unit.gate.weight)
        values = unit.gate_value(channels_last)
        if gate == "token":
            assert values.shape == (*channels_last.shape[:-1], 1)
            assert values.flatten(1).std(1).min() > 0  # one gate per token or position
        else:
            assert values.shape == (3,) + (1,) * (channels_last.ndim - 1)
            pooled = channels_last[:, 0] if layout == "tokens" else channels_last.flatten(1, 2).mean(1)
            torch.testing.assert_close(values.flatten(), torch.sigmoid(unit.gate(pooled)).flatten())


def test_gate_none_replaces_the_block_output():
    unit = GatedAdapterUnit(width=8, hidden=4, gate="none")
    hidden = torch.randn(2, 3, 8)
    assert not hasattr(unit, "alpha")
    torch.testing.assert_close(unit(hidden), unit.ffn(unit.norm(hidden)))


def test_fixed_alpha_is_a_buffer():
    unit = GatedAdapterUnit(width=8, hidden=4, learn_alpha=False)
    assert "alpha" in dict(unit.named_buffers()) and "alpha" not in dict(unit.named_parameters())


@pytest.mark.parametrize(
    "options",
    [
        {"width": 0, "hidden": 4},
        {"width": 4, "hidden": 4, "gate": "tanh"},
        {"width": 4, "hidden": 4, "norm": "x"},
        {"width": 4, "hidden": 4, "gate": "sentence", "alpha_init": 0.0},
    ],
)
def test_unit_rejects_bad_options(options):
    with pytest.raises(ValueError):
        GatedAdapterUnit(**options)


# -- placement and exactness ---------------------------------------------------------------------------------
def test_one_unit_after_every_block_of_both_towers_with_the_right_norm(tower_pair):
    image_tower, text_tower = tower_pair
    module = _build(image_tower, text_tower)
    for tower in (image_tower, text_tower):
        for block in tower.blocks():
            unit = block.module.duet_gau
            assert isinstance(unit, GatedAdapterUnit)
            assert (unit.width, unit.hidden, unit.layout) == (block.width, 16, block.layout)
            assert unit.norm_placement == ("post" if block.norm_position == "post" else "pre")
    assert len(_units(module)) == len(image_tower.blocks()) + len(text_tower.blocks())
    assert {u.norm_placement for u in _units(text_tower)} == (
        {"post"} if text_tower.blocks()[0].norm_position == "post" else {"pre"}
    )


def test_alpha_zero_gives_back_the_frozen_towers_exactly(tower_pair):
    image_tower, text_tower = tower_pair
    frozen_image, frozen_text = copy.deepcopy(image_tower).eval(), copy.deepcopy(text_tower).eval()
    module = _build(image_tower, text_tower).eval()
    batch = _batch(image_tower, text_tower)
    adapted = module(batch)
    reference = torch.nn.functional.normalize(frozen_image(batch["pixel_values"]), dim=-1)
    assert not torch.equal(adapted[0], reference)  # alpha = 0.02 does change the output
    for unit in _units(module):
        with torch.no_grad():
            unit.alpha.zero_()
    images, texts = module(batch)
    assert torch.equal(images, reference)
    assert torch.equal(
        texts,
        torch.nn.functional.normalize(frozen_text(batch["input_ids"], batch["attention_mask"]), dim=-1),
    )
    # In training mode too for the image tower: no dropout there, and BatchNorms keep their statistics.
    module.train()
    assert torch.equal(module.encode_images(batch["pixel_values"]), reference)


# -- what trains ---------------------------------------------------------------------------------------------
def test_trainable_set_is_exactly_units_norms_and_heads(tower_pair):
    image_tower, text_tower = tower_pair
    module = _build(image_tower, text_tower)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    units = {n for n, _ in module.named_parameters() if ".duet_gau." in n}
    norms = _backbone_norm_names(module)
    heads = {
        n
        for n, _ in module.named_parameters()
        if n.startswith(("image_tower.projection.", "text_tower.projection."))
    }
    assert units and norms and heads
    assert trainable == units | norms | heads
    assert "logit_scale" not in trainable
    sizes = dict(module.named_parameters())
    counts = module.strategy.trainable_by_group(module)
    assert counts == {
        "method": sum(sizes[n].numel() for n in units),
        "backbone": sum(sizes[n].numel() for n in norms),
        "head": sum(sizes[n].numel() for n in heads),
        "temperature": 0,
        "temporal": 0,
    }


def test_only_the_declared_parameters_receive_gradients(tower_pair):
    image_tower, text_tower = tower_pair
    module = _build(image_tower, text_tower).train()
    batch = _batch(image_tower, text_tower)
    _loss(module, batch).backward()
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name
    for unit in _units(module):
        assert unit.alpha.grad.abs() > 0
        assert unit.ffn[0].weight.grad.abs().sum() > 0


def test_unit_parameter_count_follows_the_paper_formula():
    module = _build(tiny_vit(), tiny_bert(), width=40)
    expected = 0
    for tower in (module.image_tower, module.text_tower):
        for block in tower.blocks():
            d, m = block.width, 40
            expected += 2 * d * m + m + d + 2 * d + 1  # FFN weights and biases, the unit's LN, alpha
    assert module.strategy.trainable_by_group(module)["method"] == expected


def test_adapter_checkpoint_keeps_units_norms_and_heads_only():
    module = _build(tiny_vit(), tiny_bert())
    keys = set(module.strategy.adapter_state_keys(module))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable <= keys
    assert not any(".attn.qkv." in k or ".attention.self.query." in k for k in keys)


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [({"gate": "sentence"}, {"gate": "token"}), ({"unit_norm": "post"}, {"unit_norm": "pre"})],
)
def test_adapter_checkpoint_refuses_a_model_with_other_unit_options(saved, loaded, tmp_path):
    # Sentence and token gates, or pre- and post-FFN unit norms, have identical tensors: only the recorded
    # arguments tell them apart, so a checkpoint must carry them.
    from pefttune.checkpointing import AdapterMismatchError, load_adapter, save_adapter

    source = _build(tiny_vit(), tiny_bert(), **saved)
    checkpoint = save_adapter(source, tmp_path / "adapter.pt")
    assert checkpoint["strategy"]["init_args"]["width"] == 16
    load_adapter(_build(tiny_vit(), tiny_bert(), **saved), tmp_path / "adapter.pt")
    with pytest.raises(AdapterMismatchError, match="arguments"):
        load_adapter(_build(tiny_vit(), tiny_bert(), **loaded), tmp_path / "adapter.pt")


# -- loss and temperature ------------------------------------------------------------------------------------
def test_loss_is_multi_positive_summed_at_a_fixed_temperature_of_one_over_64():
    module = _build(tiny_vit(), tiny_bert())
    assert isinstance(module.loss, MultiPositiveInfoNCELoss)
    assert module.loss.reduction_over_directions == "sum"
    assert module.logit_scale_value.item() == pytest.approx(64.0)
    assert not module.logit_scale.requires_grad
    assert module.strategy.trainable_by_group(module)["temperature"] == 0
    assert all(not g["name"].startswith("temperature") for g in module.strategy.parameter_groups(module))


def test_alpha_gets_no_weight_decay():
    module = _build(tiny_vit(), tiny_bert())
    groups = module.strategy.parameter_groups(module)
    decayed = {n for g in groups if "weight_decay" not in g for n in g["param_names"]}
    assert decayed and not any(n.endswith(".alpha") or "norm" in n.lower() for n in decayed)


# -- the convolutional tower's BatchNorms --------------------------------------------------------------------
@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_statistics_stay_frozen_unless_asked(freeze):
    module = _build(tiny_cnn(), tiny_bert(), freeze_norm_statistics=freeze)
    norms = [m for m in module.image_tower.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.weight.requires_grad and m.bias.requires_grad for m in norms)
    before = [m.running_mean.clone() for m in norms]
    module.train()  # a Lightning-style train() on the whole model
    module.encode_images(torch.randn(4, 3, 32, 32))
    unchanged = all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    assert unchanged is freeze


# -- options -------------------------------------------------------------------------------------------------
OPTIONS = [
    {"width": 96},
    {"image_layers": "last:1", "text_layers": [0]},
    {"image_layers": "none", "text_layers": "all"},
    {"image_layers": [-1, 0], "text_layers": "none"},
    {"gate": "sentence"},
    {"gate": "token"},
    {"gate": "none"},
    {"alpha_init": 1.0},
    {"alpha_init": 0.02, "learn_alpha": False},
    {"unit_norm": "pre"},
    {"unit_norm": "post"},
]


# Every option on ViT + BERT; the ones that depend on the block layout also on the CNN and on CLIP.
LAYOUT_OPTIONS = [{"gate": "sentence"}, {"gate": "token"}, {"image_layers": "last:1", "text_layers": [0]}]
CASES = [("vit+bert", o) for o in OPTIONS] + [(p, o) for p in ("cnn+bert", "clip") for o in LAYOUT_OPTIONS]


@pytest.mark.parametrize(
    ("pair", "options"), CASES, ids=[f"{p}-" + ",".join(f"{k}={v}" for k, v in o.items()) for p, o in CASES]
)
def test_every_option_builds_and_trains_a_step(pair, options):
    image_tower, text_tower = {
        "vit+bert": lambda: (tiny_vit(), tiny_bert()),
        "cnn+bert": lambda: (tiny_cnn(), tiny_bert()),
        "clip": tiny_clip,
    }[pair]()
    module = _build(image_tower, text_tower, **options).train()
    units = _units(module)
    selected = {
        "image": select_blocks(image_tower.blocks(), options.get("image_layers", "all")),
        "text": select_blocks(text_tower.blocks(), options.get("text_layers", "all")),
    }
    assert len(units) == len(selected["image"]) + len(selected["text"])
    for unit in units:
        assert unit.hidden == options.get("width", 16) and unit.gate_type == options.get("gate", "scalar")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers() if n.endswith(".alpha")}
    optimizer = _optimizer(module, lr=1e-2)
    loss = _loss(module, _batch(image_tower, text_tower))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for name, parameter in module.named_parameters():
        assert torch.equal(parameter, before[name]) is (not parameter.requires_grad), name
    for name, buffer in buffers.items():
        assert torch.equal(buffer, dict(module.named_buffers())[name])


def test_layer_selection_forms():
    blocks = tiny_vit().blocks()  # 6 blocks
    assert [b.index for b in select_blocks(blocks, "all")] == list(range(6))
    assert select_blocks(blocks, "none") == []
    assert [b.index for b in select_blocks(blocks, "last:2")] == [4, 5]
    assert [b.index for b in select_blocks(blocks, "last:9")] == list(range(6))
    assert [b.index for b in select_blocks(blocks, [3, -1, 0])] == [0, 3, 5]
    for bad in ("first:2", "last:0", "last:", "4-12"):
        with pytest.raises(ValueError):
            select_blocks(blocks, bad)
    with pytest.raises(ValueError, match="outside"):
        select_blocks(blocks, [6])
    with pytest.raises(ValueError):
        DueT(image_layers="some")


def test_strategy_rejects_bad_options_and_double_application():
    with pytest.raises(ValueError):
        DueT(width=0)
    with pytest.raises(ValueError):
        DueT(gate="tanh")
    with pytest.raises(ValueError):
        DueT(unit_norm="middle")
    strategy = DueT(width=8)
    image_tower, text_tower = tiny_vit(), tiny_bert()
    strategy.attach(image_tower, text_tower)
    with pytest.raises(RuntimeError):
        strategy.attach(image_tower, text_tower)


def test_a_training_step_moves_alpha_and_lowers_the_loss_on_a_fixed_batch():
    module = _build(tiny_vit(), tiny_bert(), width=32).train()
    batch = _batch(module.image_tower, module.text_tower)
    optimizer = _optimizer(module, lr=1e-3)
    module.eval()  # no dropout: the same batch gives the same loss before and after
    losses = []
    for _ in range(3):
        loss = _loss(module, batch)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]
    assert any(not math.isclose(u.alpha.item(), 0.02) for u in _units(module))


def test_bf16_autocast_keeps_the_hidden_dtype():
    unit = GatedAdapterUnit(width=8, hidden=16)
    hidden = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit(hidden).dtype == torch.bfloat16
    assert unit(torch.randn(2, 3, 8)).dtype == torch.float32


@pytest.mark.slow
def test_paper_setting_has_the_papers_parameter_counts():
    from pefttune.cli import build_model_from_config
    from pefttune.towers import architecture_only

    with architecture_only():
        module = build_model_from_config("configs/paper/duet_vitb16_bert.yaml")
    counts = module.strategy.trainable_by_group(module)
    assert counts["method"] == 113_375_256  # 24 x (2 x 768 x 3072 + 3072 + 768 + 2 x 768 + 1)
    layer_norms = sum(
        p.numel()
        for tower in (module.image_tower, module.text_tower)
        for name, m in tower.model.named_modules()
        if isinstance(m, nn.LayerNorm) and "duet_gau" not in name
        for p in m.parameters()
    )
    assert counts["backbone"] == layer_norms == 76_800
    assert counts["head"] == 2 * 768 * 512
