"""The ``pefttune`` command as a new user meets it (issue 16 points 6-7, first-run UX; issue 17 CLI)."""

from __future__ import annotations

import functools
import json
import math

import lightning as L
import pytest
import torch
from reliability_helpers import build_model, cli_config, datamodule, trainer, write_config

from pefttune.callbacks import CollapseDetector, ProgressLog, ordered_metrics
from pefttune.checkpointing import read_adapter
from pefttune.cli import SUBCOMMANDS, ConfigError, cli_main, main, resolve_config, summarise_parse_error


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# -- silent cases (point 6) ----------------------------------------------------------------------------------
def test_fit_with_adapter_path_starts_from_the_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = cli_main(
        ["fit", "--config", write_config(tmp_path / "a.yaml", cli_config(tmp_path / "a", "duet", epochs=1))]
    )
    adapter = trained.trainer.checkpoint_callback.adapter_last_path
    # A zero learning rate: what the model holds after fit is what it started from.
    config = cli_config(tmp_path / "b", "duet", epochs=1)
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.0
    cli = cli_main(["fit", "--config", write_config(tmp_path / "b.yaml", config), "--adapter_path", adapter])
    state = cli.model.state_dict()
    saved = read_adapter(adapter)["state"]
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_fit_refuses_adapter_path_with_ckpt_path(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config, "--adapter_path", "a.safetensors", "--ckpt_path", "last.ckpt"])
    assert "not both" in _last_error_line(capsys)


@pytest.mark.parametrize(
    ("option", "value", "names"),
    [
        ("--optimizer", "torch.optim.SGD", "model.init_args.optimizer"),
        ("--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "model.init_args.lr_schedule"),
    ],
)
def test_top_level_optimizer_and_scheduler_are_refused(tmp_path, capsys, option, value, names):
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    extra = ["--lr_scheduler.step_size", "1"] if option == "--lr_scheduler" else []
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config, option, value, *extra])
    line = _last_error_line(capsys)
    assert option in line and names in line


def _collapse_run(lr: float) -> CollapseDetector:
    L.seed_everything(0)
    model = build_model("full")
    model.optimizer_factory = functools.partial(torch.optim.SGD, lr=lr)
    detector = CollapseDetector(patience=15)
    trainer(max_epochs=10, enable_checkpointing=False, callbacks=[detector]).fit(
        model, datamodule=datamodule(max_train_samples=16)
    )
    return detector


def test_collapsed_training_is_reported():
    with pytest.warns(UserWarning, match=r"training has collapsed.*chance level.*ln\(batch size 4\)"):
        detector = _collapse_run(30.0)
    assert detector.warned_at is not None


def test_healthy_training_is_not_reported(recwarn):
    assert _collapse_run(1e-2).warned_at is None
    # Only the training-loss detector's warning counts here; the retrieval metric's embedding-collapse
    # diagnostic (a random tiny BERT's CLS embeddings barely differ) is a different, truthful warning.
    assert not [w for w in recwarn if "training has collapsed" in str(w.message)]


# -- messages (point 7) --------------------------------------------------------------------------------------
def test_invalid_value_names_its_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    with pytest.raises(ConfigError, match=r"model\.init_args\.image_tower\.init_args\.image_size = 0"):
        cli_main(["fit", "--config", config, "--model.init_args.image_tower.init_args.image_size", "0"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--model.init_args.image_tower.init_args.image_size", "0"])
    assert "image_size = 0" in _last_error_line(capsys)


def test_unknown_strategy_lists_the_valid_ones_on_the_last_line(tmp_path, capsys):
    config = cli_config(tmp_path / "run", "duet", epochs=1)
    config["model"]["init_args"]["strategy"] = {"class_path": "pefttune.strategies.NoSuchMethod"}
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", write_config(tmp_path / "c.yaml", config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("error: model.init_args.strategy") and "NoSuchMethod" in err[-2]
    assert "valid strategies:" in err[-1] and "pefttune.strategies.lora.LoRA" in err[-1]


def test_nested_type_error_is_summarised_in_one_line():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'pefttune.module.DualEncoderModule':
        Parser key "strategy":
          Errors:
            - Problem with given class_path 'pefttune.strategies.duet.DueT':
                Parser key "width":
                  Expected a <class 'int'>. Got value: wide
            - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>"""
    assert summarise_parse_error(message) == (
        "model.init_args.strategy.init_args.width: Expected a <class 'int'>. Got value: wide"
    )


# -- first run that talks ------------------------------------------------------------------------------------
def test_fit_says_where_everything_goes_and_prints_rounded_ordered_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    cli_main(["fit", "--config", config])
    out = capsys.readouterr().out
    folder = tmp_path / "run" / "lightning_logs" / "version_0"
    for kind in ("logs", "config", "checkpoints", "adapters"):
        assert f"pefttune: {kind:<11} go to " in out and f"pefttune: {kind:<11} went to " in out
    assert (
        f"went to {folder}/checkpoints (best by val/rsum: best-epoch=0-step=2.ckpt, last: last.ckpt)" in out
    )
    table = out[out.index("test of ") :].splitlines()[1:7]
    assert [line.split()[0] for line in table] == [
        "test/i2t_R@1",
        "test/i2t_R@5",
        "test/i2t_R@10",
        "test/t2i_R@1",
        "test/t2i_R@5",
        "test/t2i_R@10",
    ]
    assert all(len(line.split()[1].split(".")[1]) == 2 for line in table)
    hparams = (folder / "hparams.yaml").read_text()
    assert "pefttune.strategies.duet.DueT" in hparams


def test_progress_lines_for_log_files(capsys):
    L.seed_everything(0)
    model = build_model("duet")
    trainer(
        max_epochs=2, enable_checkpointing=False, callbacks=[ProgressLog(every_n_steps=2, when="always")]
    ).fit(model, datamodule=datamodule(max_train_samples=8))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "step 2/4"], ["epoch 2/2", "step 4/4"]]
    assert all("loss " in line and "lr " in line for line in lines)


def test_metrics_are_ordered_for_reading():
    metrics = {"test/rsum": 1.0, "test/t2i_R@10": 2.0, "test/i2t_R@5": 3.0, "test/i2t_R@1": 4.0, "x": 5.0}
    assert list(ordered_metrics(metrics)) == [
        "test/i2t_R@1",
        "test/i2t_R@5",
        "test/t2i_R@10",
        "test/rsum",
        "x",
    ]


def test_no_advertising_on_a_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    cli_main(["fit", "--config", config, "--test_after_fit", "false"])
    captured = capfd.readouterr()
    assert "litlogger" not in captured.out + captured.err and "Tip:" not in captured.out + captured.err


# -- one command (issue 17) ----------------------------------------------------------------------------------
def test_help_lists_every_subcommand_and_names_pefttune(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "pefttune" in out.splitlines()[2]
    for name in ("fit", "validate", "test", "predict", "inspect", "sweep", "visualize"):
        assert f"  {name} " in out
    assert set(SUBCOMMANDS) == {"fit", "validate", "test", "predict", "inspect", "sweep", "visualize"}


def test_version(capsys):
    from pefttune import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"pefttune {__version__}"


def test_print_config_shows_the_default_callbacks(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config, "--print_config"])
    out = capsys.readouterr().out
    for section in ("checkpoint:", "exact_resume:", "collapse_detector:", "progress_log:"):
        assert f"\n{section}" in out
    assert "adapter_files: true" in out and "pefttune.checkpointing.AtomicCheckpointIO" in out


def test_shipped_configs_resolve_by_name(capsys):
    assert resolve_config("duet").endswith("configs/duet.yaml")
    assert resolve_config("configs/duet.yaml") == "configs/duet.yaml" or resolve_config(
        "configs/duet.yaml"
    ).endswith("duet.yaml")
    assert resolve_config("paper/lora_clip_vitb16").endswith("paper/lora_clip_vitb16.yaml")
    assert resolve_config("no_such_config") == "no_such_config"


@pytest.mark.parametrize("flag", ["--no_weights", "--no-weights"])
def test_inspect_takes_a_shipped_name_and_both_flag_spellings(capsys, flag):
    report = main(["inspect", "--config", "paper/lora_clip_vitb16", flag, "--json"])
    assert json.loads(capsys.readouterr().out)["trainable_params"] == report["trainable_params"] == 184_320


def test_inspect_composes_configs_and_overrides_like_fit(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "lora", epochs=1))
    base = main(["inspect", "--config", config, "--json"])
    wider = main(["inspect", "--config", config, "--model.init_args.strategy.init_args.r=4", "--json"])
    assert wider["trainable_by_group"]["method"] == 2 * base["trainable_by_group"]["method"]


def test_sweep_accepts_snake_case_flags(tmp_path, capsys):
    import yaml

    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "lit", epochs=1))
    suite = {
        "name": "tiny",
        "seeds": [0],
        "datasets": {"synthetic": {}},
        "methods": {"lit": {"config": config}},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    for flag in ("--dry_run", "--dry-run"):
        main(["sweep", "--config", str(path), "--output", str(tmp_path / "out"), flag])
        assert "pefttune.cli fit" in capsys.readouterr().out


def test_chance_level_helper_matches_infonce():
    # The collapse detector's level: identical embeddings give InfoNCE = ln(B) per direction.
    from pefttune.losses import InfoNCELoss

    embeds = torch.nn.functional.normalize(torch.ones(4, 8), dim=-1)
    loss = InfoNCELoss()(embeds, embeds, torch.tensor(10.0))
    assert math.isclose(float(loss), math.log(4), rel_tol=1e-5)


def test_import_and_help_do_not_load_the_heavy_dependencies():
    import subprocess
    import sys

    code = (
        "import sys; import pefttune; from pefttune._entry import main; main(['--help']); main(['--version']); "
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'timm') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout and "visualize" in done.stdout


def test_predict_says_where_the_embeddings_went(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "c.yaml", cli_config(tmp_path / "run", "duet", epochs=1))
    cli_main(["predict", "--config", config])
    assert f"pefttune: embeddings  {tmp_path / 'run'}" in capsys.readouterr().out


def test_console_script_exits_zero_after_a_subcommand_that_returns_a_result(monkeypatch, capsys):
    """The installed ``pefttune`` script must not hand main()'s result (a CLI object, a report) to sys.exit,
    which would print it and exit with status 1 after a successful run."""
    import subprocess
    import sys as _sys

    from pefttune import _entry

    monkeypatch.setattr(_sys, "argv", ["pefttune", "inspect", "--config", "lora", "--no_weights", "--json"])
    assert _entry.main(["inspect", "--config", "lora", "--no_weights", "--json"]) is not None
    assert _entry.console_main() is None
    capsys.readouterr()
    # The script entry point as pip installs it (pyproject's [project.scripts]).
    code = "import sys; from pefttune._entry import console_main; sys.exit(console_main())"
    done = subprocess.run(
        [_sys.executable, "-c", code, "inspect", "--config", "lora", "--no_weights"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PefttuneCLI object" not in done.stdout
