"""Forgetting: a second data set evaluated before and after adaptation, in process and through a sweep."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pefttune.benchmark.forgetting import ForgettingEvaluation, forgetting_metrics, load_data_config
from pefttune.benchmark.recorder import BenchmarkRecorder
from pefttune.benchmark.suite import Suite
from pefttune.benchmark.sweep import fit_command, sweep_main
from pefttune.metrics import RankedQueries
from pefttune.module import DualEncoderModule
from pefttune.strategies.full import FullFineTune
from pefttune.testing import tiny_bert, tiny_tower_config, tiny_vit

RETRIEVAL = {
    "class_path": "pefttune.data.ImageTextDataModule",
    "init_args": {
        "source": {
            "class_path": "pefttune.data.sources.Synthetic",
            "init_args": {"num_train": 8, "num_val": 4, "num_test": 6, "image_size": 32, "seed": 5},
        },
        "batch_size": 8,
        "seed": 5,
    },
}
CLASSIFICATION = {
    "class_path": "pefttune.data.classification.ClassificationDataModule",
    "init_args": {
        "source": {
            "class_path": "pefttune.data.sources.Synthetic",
            "init_args": {
                "num_train": 256,
                "num_val": 16,
                "num_test": 32,
                "image_size": 32,
                "held_out_fraction": 0.0,
            },
        },
        "split_classes": "base_to_new",
        "shots": 1,
        "batch_size": 16,
    },
}


def _with_source(data: dict, module_seed: int | None = None, **source_args: object) -> dict:
    """A copy of a data section with some of its synthetic source's arguments (and its seed) replaced."""
    source = data["init_args"]["source"]
    source = {**source, "init_args": {**source["init_args"], **source_args}}
    seed = {} if module_seed is None else {"seed": module_seed}
    return {**data, "init_args": {**data["init_args"], "source": source, **seed}}


def _config(tmp_path: Path, data: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def test_retrieval_forgetting_uses_the_models_evaluation(tmp_path: Path) -> None:
    module = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune(), tie_rule="pessimistic")
    evaluation = ForgettingEvaluation.from_config(_config(tmp_path, RETRIEVAL, "retrieval"))
    before = evaluation.evaluate(module)
    assert 0 <= before["rsum"] <= 600 and "i2t_tied_queries" in before and "collapsed" in before
    module.train()
    again = evaluation.evaluate(module)
    assert again == before  # deterministic, and the module's modes come back
    assert all(m.training for m in module.modules())
    with torch.no_grad():
        for parameter in module.text_tower.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    after = evaluation.evaluate(module)
    metrics = forgetting_metrics(before, after)
    assert metrics["forget/change/rsum"] == pytest.approx(after["rsum"] - before["rsum"])
    assert metrics["forget/before/rsum"] == before["rsum"] and metrics["forget/after/rsum"] == after["rsum"]


def test_zero_shot_forgetting_reports_accuracies(tmp_path: Path) -> None:
    module = DualEncoderModule(tiny_vit(), tiny_bert(), FullFineTune())
    results = ForgettingEvaluation.from_config(_config(tmp_path, CLASSIFICATION, "zs")).evaluate(module)
    assert {"acc_base", "acc_new", "acc_hm"} <= set(results)
    assert all(0 <= results[k] <= 100 for k in ("acc_base", "acc_new"))


def test_forgetting_config_needs_a_data_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: {}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: a forgetting data config needs a 'data:' section"):
        load_data_config(path)


def test_suite_forgetting_reaches_the_recorder(tmp_path: Path) -> None:
    suite = Suite.from_dict(
        {
            "variables": {"root": str(tmp_path)},
            "forgetting": "{root}/second.yaml",
            "methods": {"full": {"config": "configs/full.yaml"}},
        }
    )
    (run,) = suite.runs()
    assert run.forgetting == f"{tmp_path}/second.yaml"
    command = fit_command(run, tmp_path / "run")
    recorder = json.loads(next(a for a in command if "BenchmarkRecorder" in a).split("=", 1)[1])
    assert recorder["init_args"]["forgetting_data"] == f"{tmp_path}/second.yaml"
    assert BenchmarkRecorder(str(tmp_path / "r.json"), forgetting_data="x.yaml").forgetting_data == "x.yaml"


def test_tiny_sweep_records_ranks_and_forgetting_end_to_end(tmp_path: Path) -> None:
    """One tiny run through `pefttune sweep`: per-query ranks next to the result, forgetting in the tables."""
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "precision": "32-true", "num_sanity_val_steps": 0},
        "model": {
            "class_path": "pefttune.module.DualEncoderModule",
            "init_args": {
                **tiny_tower_config(),
                "strategy": {"class_path": "pefttune.strategies.full.FullFineTune"},
            },
        },
        "data": _with_source(RETRIEVAL, seed=0, module_seed=0),
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    second = _with_source(CLASSIFICATION, num_test=16)
    _config(tmp_path, second, "second")
    suite = {
        "name": "tiny",
        "seeds": [0],
        "forgetting": str(tmp_path / "second.yaml"),
        "overrides": {
            "trainer.max_steps": 1,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
        },
        "methods": {"full": {"config": str(tmp_path / "tiny.yaml")}},
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    output = tmp_path / "out"
    outcome = sweep_main(
        ["--config", str(tmp_path / "suite.yaml"), "--output", str(output), "--python", sys.executable]
    )
    assert outcome["done"] == ["default/full/seed0"]
    result = json.loads((output / "results" / "default__full__seed0.json").read_text())
    assert result["query_ranks"] == "recorder.ranks.npz"
    queries = RankedQueries.load(output / "results" / "default__full__seed0.ranks.npz")
    assert queries.image_ids.numel() == 6 and queries.ties == "expected"
    metrics = result["metrics"]
    for name in ("acc_base", "acc_new", "acc_hm"):
        assert metrics[f"forget/change/{name}"] == pytest.approx(
            metrics[f"forget/after/{name}"] - metrics[f"forget/before/{name}"]
        )
    assert "test/collapsed" in metrics and "test/i2t_tied_queries" in metrics
    markdown = (output / "results.md").read_text()
    assert "forgetting: Δ acc hm on 2nd data set" in markdown and "**best**" in markdown
    rows = list(csv.DictReader((output / "results.csv").open()))
    assert rows[0]["separable_from_best"] == "best" and "forget/change/acc_hm_mean" in rows[0]
