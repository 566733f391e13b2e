"""Through the ``pefttune`` command: adapter checkpoints, resume files, and clear errors for bad configs."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from pefttune.checkpointing import AdapterMismatchError, read_adapter
from pefttune.cli import cli_main, main
from pefttune.testing import tiny_tower_config


def _config(tmp_path, strategy=None, image_tower=None, **data):
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            "class_path": "pefttune.module.DualEncoderModule",
            "init_args": {
                **tiny_tower_config(),
                **({"image_tower": image_tower} if image_tower else {}),
                "strategy": strategy
                or {"class_path": "pefttune.strategies.duet.DueT", "init_args": {"width": 16}},
            },
        },
        "data": {
            "class_path": "pefttune.data.ImageTextDataModule",
            "init_args": {
                "source": {
                    "class_path": "pefttune.data.sources.Synthetic",
                    "init_args": {"num_train": 8, "num_val": 8, "num_test": 7, "image_size": 32},
                },
                "batch_size": 4,
                "max_train_samples": 8,
                **data,
            },
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _test_metrics(config, *extra):
    cli = cli_main(["test", "--config", config, *extra])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_fit_writes_adapter_checkpoints_that_test_like_the_full_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(tmp_path)
    cli_main(["fit", "--config", config, "--test_after_fit", "false"])
    directory = tmp_path / "ckpt"
    adapter, full = directory / "adapter-last.safetensors", directory / "last.ckpt"
    assert adapter.exists() and (directory / "adapter-best.safetensors").exists()
    assert os.path.getsize(adapter) < os.path.getsize(full) / 2

    saved = read_adapter(adapter)
    assert saved["strategy"]["class_path"] == "pefttune.strategies.duet.DueT"
    assert saved["state"] and all(
        "duet_" in k or "norm" in k.lower() or "projection" in k or "logit" in k for k in saved["state"]
    )

    from_full = _test_metrics(config, "--ckpt_path", str(full))
    from_adapter = _test_metrics(config, "--adapter_path", str(adapter))
    untrained = _test_metrics(config)
    assert from_adapter == from_full
    assert from_full.keys() and untrained != from_full  # the adapter carries what training changed


def test_ckpt_path_names_the_given_model_settings_its_recorded_ones_replace(tmp_path, monkeypatch):
    """Lightning rebuilds the model from a checkpoint's recorded settings: say which given ones it replaced."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(tmp_path)
    cli_main(["fit", "--config", config, "--test_after_fit", "false"])
    checkpoint = str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.warns(
        UserWarning, match=r"model\.init_args\.tie_rule: 'pessimistic' -> 'expected'.*--adapter_path"
    ):
        cli = cli_main(
            ["test", "--config", config, "--ckpt_path", checkpoint, "--model.init_args.tie_rule=pessimistic"]
        )
    assert cli.model.hparams.tie_rule == "expected"
    # Through the adapter file the given setting holds.
    adapter = str(tmp_path / "ckpt" / "adapter-last.safetensors")
    cli = cli_main(
        ["test", "--config", config, "--adapter_path", adapter, "--model.init_args.tie_rule=pessimistic"]
    )
    assert cli.model.hparams.tie_rule == "pessimistic"


def test_adapter_into_another_backbone_names_the_mismatched_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(tmp_path)
    cli_main(["fit", "--config", config, "--test_after_fit", "false"])
    cnn = {
        "class_path": "pefttune.towers.TimmImageTower",
        "init_args": {
            "model_name": "test_efficientnet",
            "pretrained": False,
            "embed_dim": 24,
            "image_size": 32,
        },
    }
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(AdapterMismatchError, match=r"does not fit this model[\s\S]*image_tower"):
        cli_main(
            [
                "validate",
                "--config",
                _config(other, image_tower=cnn),
                "--adapter_path",
                str(tmp_path / "ckpt" / "adapter-last.safetensors"),
            ]
        )


def test_unknown_strategy_name_is_a_clear_error(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, strategy={"class_path": "pefttune.strategies.NoSuchMethod"})
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config])
    err = capsys.readouterr().err
    assert "NoSuchMethod" in err and "strategy" in err


@pytest.mark.parametrize("tower", ["pefttune.towers.NoSuchTower", "no_such_vit"])
def test_unknown_tower_name_is_a_clear_error(tmp_path, monkeypatch, capsys, tower):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if tower.startswith("pefttune."):
        image_tower = {"class_path": tower}
    else:
        image_tower = {
            "class_path": "pefttune.towers.TimmImageTower",
            "init_args": {"model_name": tower, "pretrained": False},
        }
    with pytest.raises((SystemExit, RuntimeError, ValueError, KeyError)) as info:
        cli_main(["fit", "--config", _config(tmp_path, image_tower=image_tower)])
    message = str(info.value) + capsys.readouterr().err
    assert tower.rsplit(".", 1)[-1] in message


def test_wrong_type_in_yaml_names_the_key(tmp_path, capsys):
    config = _config(
        tmp_path, strategy={"class_path": "pefttune.strategies.duet.DueT", "init_args": {"width": "wide"}}
    )
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config])
    err = capsys.readouterr().err
    assert "width" in err and "wide" in err


def test_inspect_reports_parameter_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["inspect", "--config", _config(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_by_group"]["method"] > 0
