"""The perf scripts' smoke modes run end to end (slow: each starts several Python processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pefttune.cli import build_model_from_config
from pefttune.testing import tiny_tower_config

REPO = Path(__file__).resolve().parents[1]
PERF = REPO / "benchmarks" / "perf"


def _run(script: str, *arguments: str, timeout: float = 1200) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(PERF / script), *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        cwd=PERF,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_perf_options_are_config_keys():
    import json

    overrides = [f"--model.init_args.{k}={json.dumps(v)}" for k, v in tiny_tower_config().items()]
    overrides += [
        "--model.init_args.grad_cache_chunk_size=4",
        '--model.init_args.compile_towers={"backend": "aot_eager"}',
        "--model.init_args.channels_last=true",
        "--model.init_args.fused_optimizer=false",
    ]
    model = build_model_from_config(str(REPO / "configs/lora.yaml"), overrides)
    assert model.grad_cache_chunk_size == 4 and model.compile_towers == {"backend": "aot_eager"}
    assert model.channels_last and model.fused_optimizer is False


@pytest.mark.slow
def test_decoded_cache_smoke():
    out = _run("decoded_cache.py", "--smoke", "--threads", "1")
    assert "identical batches in both trainings: True" in out and "speed-up of training epochs" in out


@pytest.mark.slow
def test_largest_batch_smoke():
    out = _run(
        "largest_batch.py",
        "--tiny",
        "--methods",
        "full",
        "--variants",
        "plain,gradcache",
        "--start",
        "4",
        "--max-batch",
        "8",
        "--chunk",
        "4",
        "--budget-mb",
        "2000",
        "--threads",
        "1",
    )
    assert "| full | >= 8 | >= 8 |" in out


@pytest.mark.slow
def test_peer_openclip_smoke():
    pytest.importorskip("open_clip_train")
    pytest.importorskip("pandas")  # open_clip_train's CSV dataset needs it
    out = _run("peer_openclip.py", "--smoke")
    assert "| full |" in out and "| lit |" in out


@pytest.mark.slow
def test_method_costs_with_gradient_checkpointing_smoke():
    # The worker refuses to measure unless both towers report checkpointing on.
    out = _run(
        "method_costs.py",
        "--tiny",
        "--gradient-checkpointing",
        "--methods",
        "full,lora",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "4",
        "--threads",
        "1",
    )
    assert "gradient checkpointing on" in out and "| full |" in out and "| lora |" in out
    assert "lora: " in out and "x full: " in out and "cma: not measured" in out


@pytest.mark.slow
def test_memory_breakdown_smoke():
    # Tiny towers: the profiler categorises the step's tensors, full's ratio is 1, an adapter's below it.
    out = _run("memory_breakdown.py", "--tiny", "--methods", "full,lora", "--gradient-checkpointing")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["full"].rstrip().endswith("| 1.00x |")
    lora_ratio = float(rows["lora"].split("|")[-2].strip().rstrip("x"))
    assert 0 < lora_ratio < 1
    assert "optimizer state" in rows["method"] and "lora: " in out


def test_fused_optimizer_smoke():
    out = _run("fused_optimizer.py", "--tiny", "--methods", "full,lit", "--steps", "1", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith(("| full ", "| lit "))]
    assert len(rows) == 2, out
    for row in rows:
        difference = float(row.rstrip(" |").rsplit("|", 1)[1])
        assert difference < 1e-5, row  # fused and unfused updates agree
