"""Faults while checkpoints are written (issue 16, point 4): full disk, failed rename, kill -9, SIGINT.

A small tmpfs cannot be mounted in an unprivileged sandbox, so the full disk and the failed rename are
simulated (an ``OSError(ENOSPC)`` from the writer, an ``OSError`` from ``os.replace``); kill -9 and SIGINT
hit real processes.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import build_model

from pefttune.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    atomic_write,
    load_adapter,
    read_adapter,
    remove_stale_temporary_files,
    save_adapter,
)

REPO = Path(__file__).resolve().parents[2]


def _disk_full(*args, **kwargs):
    handle = args[1] if len(args) > 1 else kwargs.get("f")
    handle.write(b"PK\x03\x04 partial")  # some bytes made it before the disk filled
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_checkpoint_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(OSError, match=rf"no space left on device: {path}") as info:
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_full_disk_keeps_the_previous_adapter_file(tmp_path, monkeypatch):
    model = build_model("lora")
    path = tmp_path / "adapter-last.safetensors"
    save_adapter(model, path)
    before = path.read_bytes()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)

    real_fdopen = os.fdopen

    class _FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=rf"no space left on device: {path}"):
        save_adapter(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    load_adapter(build_model("lora"), path)  # still a whole, loadable file


def test_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda handle: handle.write(b"old"))

    def refuse(source, destination):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write(path, lambda handle: handle.write(b"new"))
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from pefttune.checkpointing import AtomicCheckpointIO

    path, marker = sys.argv[1], sys.argv[2]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1000)}}, path)
    real_fsync = os.fsync

    def slow_fsync(fd):
        # The new checkpoint's bytes are in the temporary file, not yet renamed: be killed here.
        open(marker, "w").close()
        time.sleep(120)
        real_fsync(fd)

    os.fsync = slow_fsync
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1000)}}, path)
    """
)


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests' / 'reliability'}",
        "HF_HUB_OFFLINE": "1",
    }
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, **kwargs)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended (status {process.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.2)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "writing"
    process = _python(_KILLED_WRITER, str(path), str(marker))
    _wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # The interrupted write left its temporary file; the checkpoint itself is the previous, whole one.
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 1
    # The next run in that folder clears the leftover (and nothing else).
    (tmp_path / "notes.tmp").write_text("mine")
    removed = remove_stale_temporary_files(tmp_path)
    assert len(removed) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "notes.tmp", "writing"]


_INTERRUPTED_FIT = textwrap.dedent(
    """
    import signal, sys, time
    import lightning as L
    from pefttune.cli import main

    # A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored, children inherit that, and Python
    # then installs no KeyboardInterrupt handler: Ctrl+C is what this test is about, so ask for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    class Slow(L.Callback):
        def __init__(self, marker):
            self.marker = marker

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= 3:
                open(self.marker, "w").close()
            time.sleep(0.5)

    main(sys.argv[1:])
    """
)


def test_sigint_stops_the_run_with_a_resumable_checkpoint(tmp_path):
    from reliability_helpers import cli_config, write_config

    marker = tmp_path / "running"
    config = cli_config(tmp_path / "run", "duet", epochs=50)
    config["trainer"]["callbacks"] = [{"class_path": "__main__.Slow", "init_args": {"marker": str(marker)}}]
    path = write_config(tmp_path / "config.yaml", config)
    process = _python(
        _INTERRUPTED_FIT, "fit", "--config", path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(marker, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"resume from the last checkpoint with --ckpt_path {last}" in output, output[-3000:]
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] >= 2


def test_truncated_adapter_file_is_named(tmp_path):
    model = build_model("duet")
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(path)):
        load_adapter(model, path)


def test_adapter_file_is_safetensors_with_its_arguments_as_metadata(tmp_path):
    import json

    from safetensors import safe_open

    model = build_model("lora")
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), framework="pt") as reader:
        metadata = reader.metadata()
    strategy = json.loads(metadata["strategy"])
    assert metadata["format"] == "pefttune-adapter"
    assert strategy["class_path"] == "pefttune.strategies.lora.LoRA" and strategy["init_args"]["r"] == 2


def test_version_1_adapter_files_still_load(tmp_path):
    from pefttune.checkpointing import adapter_state, strategy_description

    trained = build_model("duet", seed=1)
    old = tmp_path / "adapter-last.pt"
    torch.save(
        {
            "format_version": 1,
            "strategy": strategy_description(trained.strategy),
            "state": adapter_state(trained),
        },
        old,
    )
    fresh = build_model("duet", seed=2)
    load_adapter(fresh, old)
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in read_adapter(old)["state"].items())


def test_exact_resume_saves_and_restores_every_cuda_generator(monkeypatch):
    from pefttune.callbacks import ExactResume

    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda given: restored.extend(given))

    saved = ExactResume().state_dict()
    assert [s.tolist() for s in saved["cuda"]] == [s.tolist() for s in states]
    callback = ExactResume()
    callback.load_state_dict(saved)

    class _Trainer:
        fit_loop = None

    callback.on_train_start(_Trainer(), None)
    assert [s.tolist() for s in restored] == [s.tolist() for s in states]
