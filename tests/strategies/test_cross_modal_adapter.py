"""Cross-Modal Adapter: placement, partial sharing across towers, frozen backbone, counts, checkpoints."""

from __future__ import annotations

import copy
import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pefttune.layers.shared_adapter import QuickGELU, SharedUpAdapter, SharedUpProjection
from pefttune.module import DualEncoderModule
from pefttune.strategies.cross_modal_adapter import CrossModalAdapter, adapter_sites, pair_blocks
from pefttune.testing import TINY_TOWER_PAIRS, tiny_bert, tiny_cnn

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CAPTIONS = ["a red circle on the left", "two blue squares", "a small green star", "a white cross at the top"]


def build(towers: tuple, **strategy_args) -> DualEncoderModule:
    image_tower, text_tower = towers
    return DualEncoderModule(image_tower, text_tower, strategy=CrossModalAdapter(**strategy_args))


def make_batch(module: DualEncoderModule, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = module.image_tower.image_size
    tokens = module.text_tower.tokenize(CAPTIONS)
    return {"pixel_values": torch.randn(len(CAPTIONS), 3, size, size, generator=generator), **tokens}


def contrastive_loss(module: DualEncoderModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    images, texts = module(batch)
    return module.loss(images, texts, module.logit_scale_value, module.logit_bias)


def expected_trainable(module: DualEncoderModule, shared_dim: int, bottleneck: int = 8) -> int:
    """Down + unique up per site (weights and biases) plus each shared slot's rows, counted by hand."""
    total = 0
    for tower in (module.image_tower, module.text_tower):
        for block in adapter_sites(tower):
            for site in block:
                rows = site.width - (shared_dim if adapter_of(site).shared is not None else 0)
                total += site.width * bottleneck + bottleneck + rows * bottleneck + rows
    return total + len(module.strategy.shared_slots) * (shared_dim * bottleneck + shared_dim)


def adapter_of(site) -> SharedUpAdapter:
    return getattr(site.host, site.attribute)


# -- the layer ------------------------------------------------------------------------------------------
def test_adapter_formula_and_shared_rows_come_last():
    torch.manual_seed(3)
    shared = SharedUpProjection(bottleneck=4, shared_dim=3)
    adapter = SharedUpAdapter(width=10, bottleneck=4, shared=shared)
    h = torch.randn(2, 5, 10)
    z = QuickGELU()(h @ adapter.down.weight.T + adapter.down.bias)
    up_weight = torch.cat([adapter.up_unique.weight, shared.weight])
    up_bias = torch.cat([adapter.up_unique.bias, shared.bias])
    torch.testing.assert_close(adapter(h), h + z @ up_weight.T + up_bias)
    # The shared projection is used by reference, not registered in the adapter.
    assert all(p is not shared.weight for p in adapter.parameters())
    assert not any("shared" in name for name, _ in adapter.named_parameters())


def test_adapter_on_feature_maps_acts_over_channels():
    adapter = SharedUpAdapter(width=6, bottleneck=2, layout="map")
    x = torch.randn(2, 6, 3, 4)
    expected = x + adapter.delta(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(adapter(x), expected)


def test_initialisation_is_small_truncated_normal_with_zero_biases():
    adapter = SharedUpAdapter(width=512, bottleneck=64, shared=SharedUpProjection(64, 16))
    for weight in (adapter.down.weight, adapter.up_unique.weight):
        assert abs(weight.std().item() - 0.01) < 1e-3  # std 0.01, not zero-init
    assert adapter.shared.weight.abs().max() > 0
    for bias in (adapter.down.bias, adapter.up_unique.bias, adapter.shared.bias):
        assert torch.count_nonzero(bias) == 0


def test_adapter_rejects_widths_without_unique_rows():
    with pytest.raises(ValueError, match="no unique channel"):
        SharedUpAdapter(width=16, bottleneck=8, shared=SharedUpProjection(8, 16))


# -- block pairing ---------------------------------------------------------------------------------------
def test_equal_depths_pair_by_index():
    assert pair_blocks(12, 12) == [(i, i) for i in range(12)]


def test_unequal_depths_pair_one_to_one_from_the_output_side():
    assert pair_blocks(24, 12) == [(2 * i + 1, i) for i in range(12)]
    assert pair_blocks(16, 6) == [(1, 0), (4, 1), (7, 2), (9, 3), (12, 4), (15, 5)]
    assert pair_blocks(6, 16) == [(t, i) for i, t in pair_blocks(16, 6)]
    for image_depth in range(1, 20):
        for text_depth in range(1, 20):
            pairs = pair_blocks(image_depth, text_depth)
            assert len(pairs) == min(image_depth, text_depth)
            assert pairs[-1] == (image_depth - 1, text_depth - 1)
            for column in (0, 1):
                indices = [pair[column] for pair in pairs]
                assert indices == sorted(set(indices)) and indices[0] >= 0


# -- placement and sharing on every tiny tower pair ---------------------------------------------------
def test_two_adapters_per_transformer_block_and_one_per_conv_block(tower_pair):
    module = build(tower_pair)
    for tower in (module.image_tower, module.text_tower):
        adapters = module.strategy.adapters(tower)
        expected = sum(2 if block.is_transformer else 1 for block in tower.blocks())
        assert len(adapters) == expected
        for block in tower.blocks():
            if block.is_transformer:
                assert isinstance(block.attention_output.cma_adapter_attn, SharedUpAdapter)
                assert isinstance(block.mlp_output.cma_adapter_mlp, SharedUpAdapter)
            else:
                assert block.module.cma_adapter_out.layout == block.layout


def test_shared_rows_are_one_tensor_registered_once(tower_pair):
    module = build(tower_pair)
    strategy = module.strategy
    assert strategy.shared_slots, "every tiny pair has blocks wider than d_s = 16"
    for slot in strategy.shared_slots:
        projection = strategy.cma_shared_up[slot.index][slot.key]
        assert adapter_of(slot.image_site).shared is projection
        assert adapter_of(slot.text_site).shared is projection
        assert tuple(projection.weight.shape) == (16, 8) and tuple(projection.bias.shape) == (16,)
    # No tensor under two names: optimizers and DDP see each parameter once.
    all_names = list(module.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in all_names}) == len(all_names)
    shared_keys = [k for k in module.state_dict() if "cma_shared_up" in k]
    assert len(shared_keys) == 2 * len(strategy.shared_slots)
    assert all(k.startswith("strategy.cma_shared_up.") for k in shared_keys)
    groups = strategy.parameter_groups(module)
    in_groups = [id(p) for group in groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups))
    grouped = sum(p.numel() for g in groups for p in g["params"])
    assert grouped == module.parameter_report()["trainable_params"]


def test_shared_rows_receive_gradient_from_both_towers(tower_pair):
    module = build(tower_pair).eval()
    batch = make_batch(module)
    generator = torch.Generator().manual_seed(2)
    image = module.image_tower(batch["pixel_values"])
    text = module.text_tower(batch["input_ids"], batch["attention_mask"])
    image_loss = (image * torch.randn(image.shape, generator=generator)).sum()
    text_loss = (text * torch.randn(text.shape, generator=generator)).sum()
    shared = list(module.strategy.cma_shared_up.parameters())
    from_image = torch.autograd.grad(image_loss, shared, retain_graph=True)
    from_text = torch.autograd.grad(text_loss, shared, retain_graph=True)
    (image_loss + text_loss).backward()
    for parameter, g_image, g_text in zip(shared, from_image, from_text, strict=True):
        assert g_image.abs().max() > 0 and g_text.abs().max() > 0
        # One tensor, one .grad: the towers' contributions add up in it.
        torch.testing.assert_close(parameter.grad, g_image + g_text)


def test_unique_parts_are_separate_per_tower(tower_pair):
    module = build(tower_pair).eval()
    strategy = module.strategy
    image_params = {id(p) for a in strategy.adapters(module.image_tower) for p in a.parameters()}
    text_params = {id(p) for a in strategy.adapters(module.text_tower) for p in a.parameters()}
    assert image_params and text_params and not image_params & text_params
    for slot in strategy.shared_slots:
        for site in (slot.image_site, slot.text_site):
            adapter = adapter_of(site)
            assert tuple(adapter.down.weight.shape) == (8, site.width)
            assert tuple(adapter.up_unique.weight.shape) == (site.width - 16, 8)
    # A loss on the text tower alone leaves every image-tower adapter without gradient.
    batch = make_batch(module)
    module.text_tower(batch["input_ids"], batch["attention_mask"]).sum().backward()
    for adapter in strategy.adapters(module.image_tower):
        assert all(p.grad is None for p in adapter.parameters())
    assert all(p.grad is not None for a in strategy.adapters(module.text_tower) for p in a.parameters())


def test_shared_dim_zero_gives_plain_unimodal_adapters(tower_pair):
    module = build(tower_pair, shared_dim=0)
    strategy = module.strategy
    assert not strategy.shared_slots
    assert not list(strategy.cma_shared_up.parameters())
    for tower in (module.image_tower, module.text_tower):
        for adapter in strategy.adapters(tower):
            assert adapter.shared is None and adapter.up_unique.out_features == adapter.width
    report = module.parameter_report()
    assert report["trainable_params"] == expected_trainable(module, shared_dim=0)
    assert report["trainable_by_group"]["method"] == report["trainable_params"]


def test_trainable_count_matches_the_formula(tower_pair):
    module = build(tower_pair)
    report = module.parameter_report()
    assert report["trainable_params"] == expected_trainable(module, shared_dim=16)
    assert report["trainable_by_group"] == {
        "method": report["trainable_params"],
        "backbone": 0,
        "head": 0,
        "temperature": 0,
        "temporal": 0,
    }


def test_backbone_heads_and_temperature_get_no_gradient_and_do_not_move(tower_pair):
    module = build(tower_pair).train()
    assert not module.logit_scale.requires_grad
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if "cma_" not in n}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    groups = module.strategy.parameter_groups(module)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=1e-2, weight_decay=0.2
    )
    contrastive_loss(module, make_batch(module)).backward()
    for name, parameter in module.named_parameters():
        if "cma_" in name:
            assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name
    optimizer.step()
    for name, parameter in module.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    for name, buffer in module.named_buffers():  # BatchNorm running statistics included
        assert torch.equal(buffer, buffers[name]), name


def test_frozen_batchnorm_keeps_its_statistics_and_reports_the_requested_mode():
    module = build((tiny_cnn(), tiny_bert())).train()
    norms = [m for m in module.image_tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    train_output = module.image_tower(make_batch(module)["pixel_values"])
    assert all(m.training for m in norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    module.eval()
    torch.testing.assert_close(module.image_tower(make_batch(module)["pixel_values"]), train_output)


def test_backbone_batchnorm_statistics_can_be_left_to_train():
    module = build((tiny_cnn(), tiny_bert()), freeze_batchnorm_statistics=False).train()
    norm = next(m for m in module.image_tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    before = norm.running_mean.clone()
    module.image_tower(make_batch(module)["pixel_values"])
    assert not torch.equal(norm.running_mean, before)


def test_initial_outputs_are_a_small_perturbation_of_the_frozen_model(tower_pair):
    image_tower, text_tower = tower_pair
    image_tower.eval(), text_tower.eval()
    pixels = torch.randn(4, 3, image_tower.image_size, image_tower.image_size)
    tokens = text_tower.tokenize(CAPTIONS)
    with torch.no_grad():
        reference = image_tower(pixels), text_tower(**tokens)
    module = build((image_tower, text_tower)).eval()
    with torch.no_grad():
        adapted = module.image_tower(pixels), module.text_tower(**tokens)
    for before, after in zip(reference, adapted, strict=True):
        relative = ((after - before).norm() / before.norm()).item()
        # Not zero-init (the adapters perturb from the start), but std-0.01 weights keep it small.
        assert 1e-6 < relative < 0.05, relative


def test_train_heads_trains_the_projections_too():
    module = build(TINY_TOWER_PAIRS["vit+bert"](), train_heads=True)
    groups = module.parameter_report()["trainable_by_group"]
    heads = module.image_tower.projection.weight.numel() + module.text_tower.projection.weight.numel()
    assert groups["head"] == heads
    assert groups["backbone"] == 0 and groups["temperature"] == 0


def test_narrow_sites_fall_back_to_unimodal_adapters():
    # tiny_cnn widths 16, 24, 32, 48, 64 against a 2-block, 32-wide BERT: blocks 1 (24) and 4 (64) pair.
    module = build((tiny_cnn(), tiny_bert()), shared_dim=24)
    strategy = module.strategy
    assert strategy.block_pairs == [(1, 0), (4, 1)]
    assert [(s.index, s.key, s.image_site.width) for s in strategy.shared_slots] == [(1, "out_mlp", 64)]
    assert len(strategy.cma_shared_up[0]) == 0
    assert adapter_of(adapter_sites(module.image_tower)[1][0]).shared is None
    assert module.parameter_report()["trainable_params"] == expected_trainable(module, shared_dim=24)


def test_temperature_is_frozen_at_the_towers_scale_or_the_configured_one():
    clip = build(TINY_TOWER_PAIRS["clip"]())
    assert clip.logit_scale_value.item() == pytest.approx(clip.image_tower.pretrained_logit_scale, rel=1e-5)
    from pefttune.strategies.base import TemperaturePolicy

    fixed = build(TINY_TOWER_PAIRS["vit+bert"](), temperature=TemperaturePolicy(init=20.0, learnable=False))
    assert fixed.logit_scale_value.item() == pytest.approx(20.0)
    assert not fixed.logit_scale.requires_grad


# -- copies and checkpoints ----------------------------------------------------------------------------
def test_deepcopy_ties_the_copy_to_its_own_shared_rows():
    module = build(TINY_TOWER_PAIRS["clip"]())
    clone = copy.deepcopy(module)
    for slot, cloned_slot in zip(module.strategy.shared_slots, clone.strategy.shared_slots, strict=True):
        projection = clone.strategy.cma_shared_up[cloned_slot.index][cloned_slot.key]
        assert projection is not module.strategy.cma_shared_up[slot.index][slot.key]
        assert adapter_of(cloned_slot.image_site).shared is projection
        assert adapter_of(cloned_slot.text_site).shared is projection
    # The clone's towers really use the clone's rows.
    with torch.no_grad():
        for p in clone.strategy.cma_shared_up.parameters():
            p.add_(1.0)
    batch = make_batch(module)
    module.eval(), clone.eval()
    with torch.no_grad():
        assert not torch.allclose(module(batch)[1], clone(batch)[1])


@pytest.mark.parametrize("name", ["clip", "cnn+bert"])
def test_adapter_only_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    source_towers = TINY_TOWER_PAIRS[name]()
    torch.manual_seed(0)
    target_towers = TINY_TOWER_PAIRS[name]()
    torch.manual_seed(1)
    source = build(source_towers)
    torch.manual_seed(2)
    target = build(target_towers)
    with torch.no_grad():  # make the saved adapter state differ from any fresh initialisation
        for parameter in source.strategy.cma_shared_up.parameters():
            parameter.add_(0.5)
    keys = source.strategy.adapter_state_keys(source)
    assert keys and all("cma_" in k for k in keys)
    trainable = {n for n, p in source.named_parameters() if p.requires_grad}
    assert trainable <= set(keys)
    torch.save({k: v for k, v in source.state_dict().items() if k in keys}, tmp_path / "adapters.pt")

    batch = make_batch(source)
    source.eval(), target.eval()
    with torch.no_grad():
        expected = source(batch)
        assert not torch.allclose(expected[0], target(batch)[0])
        missing, unexpected = target.load_state_dict(torch.load(tmp_path / "adapters.pt"), strict=False)
        assert not unexpected and not set(missing) & set(keys)
        for a, b in zip(expected, target(batch), strict=True):
            torch.testing.assert_close(a, b)
    # The loaded values reached the adapters' references, not a stale copy.
    slot = target.strategy.shared_slots[0]
    assert adapter_of(slot.text_site).shared is target.strategy.cma_shared_up[slot.index][slot.key]


def test_adapter_checkpoint_records_the_strategy_arguments(tmp_path):
    from pefttune.checkpointing import AdapterMismatchError, load_adapter, save_adapter

    checkpoint = save_adapter(build(TINY_TOWER_PAIRS["clip"]()), tmp_path / "adapter.pt")
    assert checkpoint["strategy"]["init_args"] == {"bottleneck": 8, "shared_dim": 16, "train_heads": False}
    load_adapter(build(TINY_TOWER_PAIRS["clip"](), init_std=0.02), tmp_path / "adapter.pt")
    with pytest.raises(AdapterMismatchError, match="arguments"):
        load_adapter(build(TINY_TOWER_PAIRS["clip"](), shared_dim=8), tmp_path / "adapter.pt")


# -- the shipped configs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_paper_config_trains_the_published_519168_adapter_parameters():
    from pefttune.cli import inspect_main

    report = inspect_main(["--config", str(CONFIGS / "paper" / "cma_clip_vitb32.yaml"), "--no-weights"])
    assert report["trainable_params"] == 519_168
    assert report["trainable_by_group"] == {
        "method": 519_168,
        "backbone": 0,
        "head": 0,
        "temperature": 0,
        "temporal": 0,
    }
    assert report["trainable_by_tower"] == {"image": 310_080, "text": 205_632, "other": 3_456}


@pytest.mark.slow
def test_offline_config_trains_adapters_and_heads_at_a_fixed_temperature():
    from pefttune.cli import build_model_from_config
    from pefttune.towers import architecture_only

    with architecture_only():
        module = build_model_from_config(str(CONFIGS / "cma.yaml"))
    # 16 MBConv sites + 12 MiniLM sites, 6 of each sharing 16 rows through 6 shared projections.
    assert module.parameter_report()["trainable_by_group"] == {
        "method": 108_432,
        "backbone": 0,
        "head": (1280 + 384) * 512,
        "temperature": 0,
        "temporal": 0,
    }
    assert module.logit_scale_value.item() == pytest.approx(20.0)
    assert module.strategy.block_pairs == [(1, 0), (4, 1), (7, 2), (9, 3), (12, 4), (15, 5)]


# -- DDP -----------------------------------------------------------------------------------------------
WORLD_SIZE = 2
TIMEOUT_S = 300.0  # generous: spawning and importing is slow on a shared CPU


def _ddp_case() -> tuple[DualEncoderModule, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = build(TINY_TOWER_PAIRS["clip"]()).double().eval()
    batch = make_batch(module)
    batch["pixel_values"] = batch["pixel_values"].double()
    return module, batch


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        module, batch = _ddp_case()
        half = len(CAPTIONS) // WORLD_SIZE
        local = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
        ddp = nn.parallel.DistributedDataParallel(module)
        images, texts = ddp(local)
        module.loss(images, texts, module.logit_scale_value, module.logit_bias).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_gradients_of_shared_rows_match_a_single_process(tmp_path):
    context = mp.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    module, batch = _ddp_case()
    contrastive_loss(module, batch).backward()
    reference = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert any("cma_shared_up" in n for n in reference)
    for grads in per_rank:
        assert grads.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
