"""Checkpoints that never lie (issue 16, points 1-3): adapter-best, last, and resume in the run's folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from reliability_helpers import CLI_STRATEGIES, build_model, cli_config, datamodule, trainer, write_config

from pefttune.checkpointing import CheckpointError, load_checkpoint_weights, read_adapter
from pefttune.cli import cli_main
from pefttune.module import DualEncoderModule


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _fit(config_path, *extra):
    return cli_main(["fit", "--config", config_path, *extra])


def test_adapter_best_holds_the_weights_of_the_best_checkpoint(tmp_path, monkeypatch):
    # Monitoring the step in "min" mode makes epoch 0 the best for sure; the adapter file was written from
    # the weights of the epoch after the best one (or not at all after the first epoch).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = cli_config(tmp_path / "run", "duet", epochs=3)
    config["checkpoint"] = {"monitor": "step", "mode": "min"}
    cli = _fit(write_config(tmp_path / "config.yaml", config), "--test_after_fit", "false")
    callback = cli.trainer.checkpoint_callback
    assert "epoch=0" in os.path.basename(callback.best_model_path)
    best = _weights(callback.best_model_path)
    adapter = read_adapter(os.path.join(callback.dirpath, "adapter-best.safetensors"))["state"]
    assert adapter and all(torch.equal(best[key], value) for key, value in adapter.items())
    last = _weights(callback.last_model_path)
    assert any(not torch.equal(last[key], value) for key, value in adapter.items())  # training moved them
    adapter_last = read_adapter(os.path.join(callback.dirpath, "adapter-last.safetensors"))["state"]
    assert all(torch.equal(last[key], value) for key, value in adapter_last.items())


def test_last_checkpoint_is_the_last_epoch_when_the_metric_stops_improving(tmp_path, monkeypatch):
    # With a zero learning rate val/rsum never improves after epoch 0: last.ckpt stayed at epoch 0.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = cli_config(tmp_path / "run", "duet", epochs=3)
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.0
    cli = _fit(write_config(tmp_path / "config.yaml", config), "--test_after_fit", "false")
    last = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert "epoch=0" in os.path.basename(cli.trainer.checkpoint_callback.best_model_path)


def _resume_case(tmp_path, name):
    # Default folders (under the logger's version folder), monitoring the step in "min" mode: epoch 0 is the
    # best of the uninterrupted run. A resumed run that forgot the best score took a later epoch as best.
    def config(root, callbacks=None):
        result = cli_config(root, name, epochs=3, callbacks=callbacks)
        result["checkpoint"] = {"monitor": "step", "mode": "min"}
        return write_config(root.parent / f"{root.name}.yaml", result)

    reference = _fit(config(tmp_path / "reference"))
    stop = [{"class_path": "reliability_helpers.StopAtStep", "init_args": {"step": 5}}]
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        _fit(config(tmp_path / "run", stop))
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    resumed = _fit(config(tmp_path / "run"), "--ckpt_path", str(last))
    return reference, resumed


@pytest.mark.parametrize("name", list(CLI_STRATEGIES))
def test_resumed_run_reports_the_uninterrupted_result(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference, resumed = _resume_case(tmp_path, name)
    assert resumed.trainer.log_dir == str(tmp_path / "run" / "lightning_logs" / "version_0")
    assert not (tmp_path / "run" / "lightning_logs" / "version_1").exists()
    expected, actual = reference.trainer.checkpoint_callback, resumed.trainer.checkpoint_callback
    assert os.path.basename(actual.best_model_path) == os.path.basename(expected.best_model_path)
    assert float(actual.best_model_score) == float(expected.best_model_score)
    test_metrics = {
        k: float(v) for k, v in reference.trainer.callback_metrics.items() if k.startswith("test/")
    }
    assert test_metrics
    assert {k: float(v) for k, v in resumed.trainer.callback_metrics.items() if k.startswith("test/")} == (
        test_metrics
    )
    weights, resumed_weights = _weights(expected.last_model_path), _weights(actual.last_model_path)
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


def test_checkpoint_loads_without_the_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = cli_config(tmp_path / "run", "lora", epochs=1)
    cli = _fit(write_config(tmp_path / "config.yaml", config), "--test_after_fit", "false")
    path = cli.trainer.checkpoint_callback.last_model_path
    loaded = DualEncoderModule.load_from_checkpoint(path, map_location="cpu")
    assert type(loaded.strategy).__name__ == "LoRA"
    trained = cli.model.state_dict()
    assert all(torch.equal(trained[k].cpu(), v) for k, v in loaded.state_dict().items())
    hparams = (tmp_path / "run" / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "pefttune.strategies.lora.LoRA" in hparams


def test_checkpointing_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = cli_config(tmp_path / "run", "duet", epochs=1)
    cli = _fit(write_config(tmp_path / "config.yaml", config), "--trainer.enable_checkpointing", "false")
    assert cli.trainer.checkpoint_callback is None
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list(
        (tmp_path / "run").rglob("*.safetensors")
    )
    assert any(k.startswith("test/") for k in cli.trainer.callback_metrics)  # tested the final weights


def test_truncated_checkpoint_is_named_with_its_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "config.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    cli = _fit(config, "--test_after_fit", "false")
    data = Path(cli.trainer.checkpoint_callback.last_model_path).read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config, "--ckpt_path", str(truncated)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(truncated) in err and "truncated" in err
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit):
        cli_main(["test", "--config", config, "--ckpt_path", str(empty)])
    assert "empty file" in capsys.readouterr().err


def test_checkpoint_of_another_strategy_names_both(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    duet = write_config(tmp_path / "duet.yaml", cli_config(tmp_path / "duet", "duet", epochs=1))
    checkpoint = _fit(duet, "--test_after_fit", "false").trainer.checkpoint_callback.last_model_path
    for load in (
        lambda model: trainer().test(model, datamodule=datamodule(), ckpt_path=checkpoint, verbose=False),
        lambda model: load_checkpoint_weights(model, checkpoint),
    ):
        with pytest.raises(CheckpointError) as info:
            load(build_model("lit"))
        message = str(info.value)
        assert checkpoint in message
        assert (
            "saved by strategy pefttune.strategies.duet.DueT, the model uses pefttune.strategies.lit.LiT"
            in (message)
        )
        assert message.count("\n") < 40  # a short listing, not every key


def test_cli_says_when_the_checkpoint_replaces_the_configs_model(tmp_path, monkeypatch):
    # LightningCLI builds the model from the checkpoint's recorded config (--ckpt_path wins): say so.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    duet = write_config(tmp_path / "duet.yaml", cli_config(tmp_path / "duet", "duet", epochs=1))
    checkpoint = _fit(duet, "--test_after_fit", "false").trainer.checkpoint_callback.last_model_path
    lit = write_config(tmp_path / "lit.yaml", cli_config(tmp_path / "lit", "lit", epochs=1))
    with pytest.warns(UserWarning, match=r"recorded in .*strategy pefttune.strategies.duet.DueT.*LiT"):
        cli = cli_main(["test", "--config", lit, "--ckpt_path", checkpoint])
    assert type(cli.model.strategy).__name__ == "DueT"


def test_lora_adapters_load_into_bare_towers_with_peft(tmp_path, monkeypatch):
    from peft import PeftModel

    from pefttune.testing import tiny_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = cli_config(tmp_path / "run", "lora", epochs=1)
    cli = _fit(write_config(tmp_path / "config.yaml", config), "--test_after_fit", "false")
    folder = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "peft-best"
    assert {p.name for p in (folder / "image_tower").iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
    }
    best = build_model("lora")  # the same architecture; its weights come from the best checkpoint
    load_checkpoint_weights(best, cli.trainer.checkpoint_callback.best_model_path)
    best.eval()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = best.text_tower.tokenize(["a red square", "two blue circles"])
    for name, inputs in (("image_tower", {"pixel_values": pixels}), ("text_tower", dict(tokens))):
        tower = getattr(best, name)
        bare = tiny_clip()[0 if name == "image_tower" else 1]
        # The frozen backbone of the trained model, without its LoRA layers (peft's base_layer weights).
        base = {
            k.replace(".base_layer", ""): v for k, v in tower.model.state_dict().items() if "lora_" not in k
        }
        bare.model.load_state_dict(base)
        wrapped = PeftModel.from_pretrained(bare.model, str(folder / name)).eval()
        with torch.no_grad():
            expected = tower.model(**inputs).pooler_output
            actual = wrapped(**inputs).pooler_output
        assert torch.allclose(expected, actual, atol=1e-6)
        lora = [p for n, p in tower.model.named_parameters() if "lora_B" in n]
        assert any(p.abs().sum() > 0 for p in lora)  # trained: the LoRA path is not the identity


def test_every_registered_method_has_a_resume_row():
    from pefttune.strategies.registry import available_strategies

    assert set(available_strategies()) <= set(CLI_STRATEGIES)
