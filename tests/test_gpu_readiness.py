"""GPU options checked on the CPU: fused optimizer, channels-last, torch.compile, SDPA, bf16, gpu.py."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from test_gradcache import gradients, make_batch, step_gradients, without_dropout

from pefttune.data import ImageTextDataModule, Synthetic
from pefttune.module import DualEncoderModule
from pefttune.optim import fused_variant
from pefttune.strategies import FullFineTune
from pefttune.testing import tiny_bert, tiny_clip, tiny_cnn, tiny_vit

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "gpu.py"


def _trainer(**options):
    defaults = dict(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **options})


def _data(**options):
    return ImageTextDataModule(
        source=Synthetic(num_train=16, num_val=8, num_test=4, image_size=32), batch_size=8, **options
    )


def test_fused_variant_keeps_groups_and_matches_the_unfused_step():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    plain = torch.optim.AdamW(
        [{"params": [weights[0]], "name": "a"}, {"params": [weights[1]], "lr": 0.5, "weight_decay": 0.0}],
        lr=0.1,
    )
    built = torch.optim.AdamW(
        [{"params": [copies[0]], "name": "a"}, {"params": [copies[1]], "lr": 0.5, "weight_decay": 0.0}],
        lr=0.1,
    )
    fused = fused_variant(built)
    assert fused is not built and fused.defaults["fused"] and not fused.defaults["foreach"]
    assert [g["lr"] for g in fused.param_groups] == [0.1, 0.5] and fused.param_groups[0]["name"] == "a"
    assert all(g["fused"] for g in fused.param_groups)
    for _ in range(3):
        for ws, opt in ((weights, plain), (copies, fused)):
            opt.zero_grad()
            (ws[0].sum() * 2 + (ws[1] ** 2).sum()).backward()
            opt.step()
    for a, b in zip(weights, copies, strict=True):
        torch.testing.assert_close(a, b)
    # Classes without the argument, and optimizers already fused, come back unchanged.
    rprop = torch.optim.Rprop([torch.nn.Parameter(torch.zeros(2))])
    assert fused_variant(rprop) is rprop and fused_variant(fused) is fused


@pytest.mark.parametrize("fused", [None, True, False])
def test_module_builds_a_fused_optimizer_unless_told_not_to(fused):
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), fused_optimizer=fused)
    trainer = _trainer()
    trainer.fit(model, datamodule=_data())
    # None means "where torch has the kernels": it has them for CPUs (torch >= 2.4).
    assert bool(trainer.optimizers[0].defaults.get("fused")) is (fused is not False)


def test_default_fusing_falls_back_quietly_where_the_kernels_are_missing(caplog):
    # torch refuses fused=True for a differentiable optimizer: it stays unfused.
    built = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1, differentiable=True)
    with caplog.at_level(logging.DEBUG, logger="pefttune.optim"):
        assert fused_variant(built, quiet=True) is built
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pefttune.optim"):
        assert fused_variant(built) is built
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_channels_last_gives_the_same_embeddings_and_gradients():
    def cnn(channels_last):
        torch.manual_seed(0)
        return without_dropout(
            DualEncoderModule(tiny_cnn(), tiny_bert(), FullFineTune(), channels_last=channels_last).train()
        )

    plain, last = cnn(False), cnn(True)
    convs = [m.weight for m in last.image_tower.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    batch = make_batch(plain)
    _, expected = step_gradients(plain, batch)
    _, got = step_gradients(last, batch)
    # Other convolution kernels, other rounding: compare each gradient as a whole (some are pure noise).
    for name, grad in expected.items():
        assert (got[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-5, name


def test_compiled_towers_train_like_eager_ones():
    def model(compile_towers):
        torch.manual_seed(0)
        return without_dropout(
            DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), compile_towers=compile_towers).train()
        )

    eager = model(False)
    # aot_eager traces with dynamo and AOTAutograd (the compile path) without generating C++ kernels.
    compiled = model({"backend": "aot_eager"})
    compiled.compile_towers_now()
    compiled.compile_towers_now()  # idempotent
    assert compiled._towers_compiled and compiled.image_tower._compiled_call_impl is not None
    # Parameter names (checkpoints) are unchanged by the in-place compilation.
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    batch = make_batch(eager)
    _, expected = step_gradients(eager, batch)
    _, got = step_gradients(compiled, batch)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_inductor_compiled_fit_step():
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), compile_towers=True)
    _trainer(max_steps=2).fit(model, datamodule=_data())
    assert model._towers_compiled


def test_towers_use_fused_attention():
    image, text = tiny_clip()
    for tower in (image, text, tiny_bert()):
        assert tower.model.config._attn_implementation == "sdpa", type(tower).__name__
    vit = tiny_vit()
    assert all(block.attn.fused_attn for block in vit.model.blocks)


def test_bf16_mixed_fit_with_grad_cache_and_validation():
    torch.manual_seed(0)
    model = DualEncoderModule(
        tiny_vit(),
        tiny_bert(),
        FullFineTune(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        grad_cache_chunk_size=3,
    )
    trainer = _trainer(max_steps=2, precision="bf16-mixed", limit_val_batches=1)
    trainer.fit(model, datamodule=_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    metrics = trainer.validate(model, datamodule=_data(), verbose=False)[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert metrics["val/rsum"] >= 0
    # bf16 embeddings still reach the loss as float32 (the loss disables autocast and upcasts).
    model = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), grad_cache_chunk_size=3)  # no trainer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(make_batch(model), 0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert gradients(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_gpu_script_exits_cleanly_without_a_gpu():
    env = {**os.environ, "PYTHONPATH": str(GPU_SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(GPU_SCRIPT)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA GPU" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("worker", ["bare", "full"])
def test_gpu_script_workers_run_on_the_cpu(worker):
    """The measuring code itself (CLIP ViT-B/16 architecture, bf16), one step of batch 2 on the CPU."""
    env = {**os.environ, "PYTHONPATH": str(GPU_SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(GPU_SCRIPT), "--worker", worker, "--cpu-check", "--batch-size", "2"]
    command += ["--steps", "1", "--warmup", "1"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"samples_per_s"' in out.stdout.splitlines()[-1]
