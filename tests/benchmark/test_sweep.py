"""End to end: a tiny sweep (2 methods x 2 seeds, one process per run), resume, failure, reports."""

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from pefttune.benchmark.sweep import sweep_main
from pefttune.testing import tiny_tower_config

TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 1, "precision": "32-true", "num_sanity_val_steps": 0},
    "model": {
        "class_path": "pefttune.module.DualEncoderModule",
        "init_args": {
            **tiny_tower_config(),
            "strategy": {"class_path": "pefttune.strategies.full.FullFineTune"},
        },
    },
    "data": {
        "class_path": "pefttune.data.ImageTextDataModule",
        "init_args": {"source": {"class_path": "pefttune.data.sources.Synthetic"}, "batch_size": 8},
    },
}


def _suite(tmp: Path) -> Path:
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    suite = {
        "name": "tiny",
        "seeds": [0, 1],
        "overrides": {
            "trainer.max_steps": 2,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "data.init_args.source.init_args.num_train": 16,
            "data.init_args.source.init_args.num_val": 8,
            "data.init_args.source.init_args.num_test": 8,
            "data.init_args.source.init_args.image_size": 32,
            "data.init_args.source.init_args.seed": "{seed}",
            "data.init_args.seed": "{seed}",
        },
        "datasets": {"synthetic": {}},
        "methods": {
            "full": {"config": str(config)},
            # LiT: the locked ViT's own 64-wide features, a new 64-wide text head.
            "lit": {
                "config": str(config),
                "overrides": {
                    "model.init_args.strategy": "pefttune.strategies.lit.LiT",
                    "model.init_args.image_tower.init_args.embed_dim": None,
                    "model.init_args.text_tower.init_args.embed_dim": 64,
                },
            },
            "broken": {"config": str(config), "overrides": {"model.init_args.no_such_argument": 1}},
        },
    }
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Seed 0 of both methods, then the whole suite (seed 0 must be skipped, seed 1 run)."""
    tmp = tmp_path_factory.mktemp("sweep")
    suite, output = _suite(tmp), tmp / "out"
    common = [
        "--config",
        str(suite),
        "--output",
        str(output),
        "--methods",
        "full,lit",
        "--python",
        sys.executable,
    ]
    first = sweep_main([*common, "--seeds", "0"])
    seed0 = output / "results" / "synthetic__full__seed0.json"
    stamp = seed0.stat().st_mtime_ns
    second = sweep_main(common)
    return {"suite": suite, "output": output, "first": first, "second": second, "seed0_stamp": stamp}


def test_sweep_runs_each_run_once_and_resumes(sweep):
    assert sweep["first"] == {
        "done": ["synthetic/full/seed0", "synthetic/lit/seed0"],
        "skipped": [],
        "busy": [],
        "failed": [],
    }
    assert sweep["second"]["skipped"] == ["synthetic/full/seed0", "synthetic/lit/seed0"]
    assert sweep["second"]["done"] == ["synthetic/full/seed1", "synthetic/lit/seed1"]
    assert (sweep["output"] / "results" / "synthetic__full__seed0.json").stat().st_mtime_ns == sweep[
        "seed0_stamp"
    ]


def test_result_file_holds_metrics_parameters_cost_config_and_versions(sweep):
    results = sweep["output"] / "results"
    full = json.loads((results / "synthetic__full__seed1.json").read_text())
    lit = json.loads((results / "synthetic__lit__seed1.json").read_text())
    for result in (full, lit):
        assert result["status"] == "ok" and result["seed"] == 1
        for key in ("test/i2t_R@1", "test/t2i_R@1", "test/rsum"):
            assert 0 <= result["metrics"][key] <= (600 if key == "test/rsum" else 100)
        assert result["throughput"]["train_samples_per_s"] > 0
        assert result["throughput"]["eval_images"] == 8 and result["throughput"]["eval_captions"] == 40
        assert result["memory"]["device"] == "cpu" and result["memory"]["peak_rss_mb"] > 50
        assert result["wall_time_s"] > 0 and result["versions"]["torch"]
        assert [step for step, _ in result["curves"]["train_loss"]] == [1, 2]
        # The resolved config saved by LightningCLI, with the run's overrides applied.
        assert result["config"]["trainer"]["max_steps"] == 2
        assert result["config"]["data"]["init_args"]["seed"] == 1
        assert not list((sweep["output"] / "runs").rglob("*.ckpt"))
    assert full["parameters"]["trainable_params"] == full["parameters"]["total_params"]
    groups = lit["parameters"]["trainable_by_group"]
    assert lit["parameters"]["trainable_by_tower"]["image"] == 0
    assert groups["head"] == 32 * 64 and groups["temperature"] == 1  # a bias-free 32 -> 64 text head
    assert full["config"]["model"]["init_args"]["strategy"]["class_path"].endswith("FullFineTune")
    assert lit["config"]["model"]["init_args"]["strategy"]["class_path"].endswith("LiT")


def test_reports_aggregate_two_seeds(sweep):
    output = sweep["output"]
    with open(output / "results.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"full", "lit"}
    values = [
        json.loads((output / "results" / f"synthetic__full__seed{s}.json").read_text())["metrics"][
            "test/rsum"
        ]
        for s in (0, 1)
    ]
    assert rows["full"]["n_seeds"] == "2" and rows["full"]["seeds"] == "0 1"
    assert float(rows["full"]["test/rsum_mean"]) == pytest.approx(sum(values) / 2)
    # Two seeds: t_{0.975, 1} * |a - b| / sqrt(2) / sqrt(2) = 12.706 * |a - b| / 2.
    assert float(rows["full"]["test/rsum_ci95"]) == pytest.approx(
        12.7062 * abs(values[0] - values[1]) / 2, rel=1e-4
    )
    markdown = (output / "results.md").read_text()
    assert "| lit |" in markdown and "| full |" in markdown
    for name in ("retrieval_vs_params.png", "training_curves.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_leaves_no_result_and_exits_nonzero(sweep):
    output = sweep["output"]
    with pytest.raises(SystemExit) as exit_info:
        sweep_main(
            [
                "--config",
                str(sweep["suite"]),
                "--output",
                str(output),
                "--methods",
                "broken",
                "--seeds",
                "0",
                "--no-aggregate",
            ]
        )
    assert exit_info.value.code == 1
    assert not (output / "results" / "synthetic__broken__seed0.json").exists()
    log = (output / "runs" / "synthetic" / "broken" / "seed0" / "log.txt").read_text()
    assert "no_such_argument" in log


def test_dry_run_prints_commands_and_runs_nothing(sweep, capsys, tmp_path):
    sweep_main(["--config", str(sweep["suite"]), "--output", str(tmp_path), "--dry-run", "--methods", "lit"])
    out = capsys.readouterr().out
    assert out.count("pefttune.cli fit") == 2
    assert out.count("embed_dim: null") == 2 and "strategy: pefttune.strategies.lit.LiT" in out
    assert "seed: 1" in out and "BenchmarkRecorder" in out
    assert not (tmp_path / "results").exists()


def test_a_run_locked_by_a_live_sweep_is_left_to_it(tmp_path):
    from pefttune.benchmark.suite import RunSpec
    from pefttune.benchmark.sweep import claim_run

    run = RunSpec("d", "m", 0, ("c.yaml",), ())
    lock = claim_run(tmp_path, run)
    assert lock is not None and lock.is_locked
    assert claim_run(tmp_path, run) is None  # held (a second claim opens its own lock)
    lock.release()
    again = claim_run(tmp_path, run)
    assert again is not None
    again.release()


def test_threads_claiming_one_run_get_it_once(tmp_path):
    import threading

    from pefttune.benchmark.suite import RunSpec
    from pefttune.benchmark.sweep import claim_run

    run = RunSpec("d", "m", 0, ("c.yaml",), ())
    start = threading.Barrier(8)
    claims = []

    def claim() -> None:
        start.wait()
        claims.append(claim_run(tmp_path, run))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [lock for lock in claims if lock is not None]
    assert len(claims) == 8 and len(held) == 1
    held[0].release()


_HOLD_A_CLAIM = """
import sys
from pathlib import Path
from pefttune.benchmark.suite import RunSpec
from pefttune.benchmark.sweep import claim_run
lock = claim_run(Path(sys.argv[1]), RunSpec("d", "m", 0, ("c.yaml",), ()))
print("held" if lock is not None else "busy", flush=True)
sys.stdin.readline()
"""


def test_a_claim_of_another_process_holds_until_that_process_dies(tmp_path):
    import signal
    import subprocess
    import sys

    from pefttune.benchmark.suite import RunSpec
    from pefttune.benchmark.sweep import claim_run

    run = RunSpec("d", "m", 0, ("c.yaml",), ())
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_CLAIM, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert claim_run(tmp_path, run) is None
    finally:
        # A crash, not a clean exit: the operating system drops the lock with the process.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    lock = claim_run(tmp_path, run)
    assert lock is not None
    lock.release()


def test_a_run_finished_by_another_sweep_after_the_check_is_not_run_again(tmp_path, monkeypatch):
    from pefttune.benchmark import sweep as sweep_module
    from pefttune.benchmark.suite import Suite

    suite = Suite.from_dict({"methods": {"m": {"config": "c.yaml"}}, "seeds": [0]})
    [run] = suite.runs()
    claim = sweep_module.claim_run

    def claim_after_the_other_sweep_finished(output, claimed):
        lock = claim(output, claimed)  # creates results/
        sweep_module.result_path(output, claimed).write_text("{}")
        return lock

    def never(*args, **kwargs):
        raise AssertionError("the run was executed again")

    monkeypatch.setattr(sweep_module, "claim_run", claim_after_the_other_sweep_finished)
    monkeypatch.setattr(sweep_module, "execute_run", never)
    outcome = sweep_module.run_sweep(suite, tmp_path)
    assert outcome["skipped"] == [run.run_id] and not outcome["done"]
    relock = claim(tmp_path, run)  # the claim was released
    assert relock is not None
    relock.release()


def test_suite_methods_come_from_the_registry():
    from pefttune.benchmark.suite import Suite, SuiteError
    from pefttune.strategies.registry import methods

    builtin = Suite.from_dict({"methods": "builtin"})
    assert list(builtin.methods) == [spec.name for spec in methods()]
    assert builtin.methods["cma"]["config"] == "configs/cma.yaml"
    listed = Suite.from_dict({"methods": ["lora", "lit"]})
    assert {name: spec["config"] for name, spec in listed.methods.items()} == {
        "lora": "configs/lora.yaml",
        "lit": "configs/lit.yaml",
    }
    own = Suite.from_dict({"methods": {"lora": {"overrides": {"a": 1}}, "mine": {"config": "mine.yaml"}}})
    assert own.methods["lora"] == {"config": "configs/lora.yaml", "overrides": {"a": 1}}
    with pytest.raises(SuiteError, match=r"methods.bitfit has no 'config' and is not a registered method"):
        Suite.from_dict({"methods": ["bitfit"]})
    with pytest.raises(SuiteError, match="'builtin'"):
        Suite.from_dict({"methods": "all"})
    variants = Suite.from_dict(
        {
            "methods": {
                "lit": {"overrides": {"b": 2}},
                "builtin": None,
                "apex_no_ensemble": {"config": "configs/apex.yaml", "overrides": {"c": 3}},
            }
        }
    )
    assert list(variants.methods) == [
        "lit",
        *(s.name for s in methods() if s.name != "lit"),
        "apex_no_ensemble",
    ]
    assert variants.methods["lit"]["overrides"] == {"b": 2}
    with pytest.raises(SuiteError, match=r"methods\.builtin takes no settings"):
        Suite.from_dict({"methods": {"builtin": {"config": "x.yaml"}}})


def test_runs_trained_in_another_dataset_or_as_another_method_test_that_training_s_models(tmp_path, capsys):
    """Two caption protocols of one training, and a method variant that differs only in evaluation."""
    suite = yaml.safe_load(_suite(tmp_path).read_text())
    suite["seeds"] = [0]
    # Two epochs, so that a validation picks a best checkpoint (the one every test loads).
    suite["overrides"].update(
        {"trainer.max_steps": -1, "trainer.max_epochs": 2, "trainer.limit_train_batches": 2}
    )
    suite["datasets"] = {
        "all_captions": {},
        "one_caption": {"trained_in": "all_captions", "overrides": {"data.init_args.eval_captions": "one"}},
    }
    # A variant of full that differs only in evaluation (batch size, tie rule): full's models.
    suite["methods"]["full_eval2"] = {
        "config": suite["methods"]["full"]["config"],
        "trained_as": "full",
        "overrides": {"data.init_args.eval_batch_size": 2, "model.init_args.tie_rule": "pessimistic"},
    }
    path = tmp_path / "protocols.yaml"
    path.write_text(yaml.safe_dump(suite))
    output = tmp_path / "out"
    common = [
        "--config",
        str(path),
        "--output",
        str(output),
        "--methods",
        "full,full_eval2",
        "--no_aggregate",
    ]
    # Only the one-caption protocol asked for: it brings in the training it needs, and tests it twice.
    outcome = sweep_main([*common, "--datasets", "one_caption"])
    assert outcome["done"] == [
        "all_captions/full/seed0",
        "one_caption/full/seed0",
        "one_caption/full_eval2/seed0",
    ]
    assert not outcome["failed"]
    results = output / "results"
    trained = json.loads((results / "all_captions__full__seed0.json").read_text())
    tested = json.loads((results / "one_caption__full__seed0.json").read_text())
    variant = json.loads((results / "one_caption__full_eval2__seed0.json").read_text())
    assert "trained_by" not in trained and "best-" in trained["best_checkpoint"]
    assert trained["best_adapter"].endswith("adapter-best.safetensors")
    for result in (tested, variant):
        assert result["trained_by"] == "all_captions/full/seed0"
        assert (
            result["command"][3] == "test"
            and f"--adapter_path={trained['best_adapter']}" in result["command"]
        )
        # The test used one caption per image; the training side is the training run's.
        assert result["protocol"] == "one" and result["throughput"]["eval_captions"] == 8
        assert result["parameters"] == trained["parameters"] and result["curves"] == trained["curves"]
        assert result["wall_time_s"] == trained["wall_time_s"] and result["test_wall_time_s"] > 0
        assert result["metrics"]["val/rsum"] == trained["metrics"]["val/rsum"]
        assert (results / f"{result['run_id'].replace('/', '__')}.ranks.npz").is_file()
    assert trained["protocol"] == "all" and trained["throughput"]["eval_captions"] == 40
    # The variant's own model settings hold (the adapter is loaded into the model its config builds).
    assert variant["config"]["model"]["init_args"]["tie_rule"] == "pessimistic"
    assert variant["config"]["data"]["init_args"]["eval_batch_size"] == 2
    if tested["metrics"]["test/i2t_tied_queries"] == tested["metrics"]["test/t2i_tied_queries"] == 0:
        assert variant["metrics"]["test/rsum"] == tested["metrics"]["test/rsum"]  # same model, no ties
    # Full checkpoints are deleted after each training; the adapter files stay for later tests.
    assert not list((output / "runs").rglob("*.ckpt"))
    again = sweep_main(common)
    assert again["done"] == ["all_captions/full_eval2/seed0"]
    # An adapter deleted by hand: a clear failure naming what to delete, not a silent retraining.
    Path(trained["best_adapter"]).unlink()
    (results / "all_captions__full_eval2__seed0.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sweep_main(common)
    printed = capsys.readouterr().out
    assert "all_captions/full_eval2/seed0: FAILED" in printed and "whose adapter file" in printed
    assert f"delete {results / 'all_captions__full__seed0.json'} to train it again" in printed
    assert not (results / "all_captions__full_eval2__seed0.json").exists()


def test_trained_in_must_name_a_dataset_that_trains():
    from pefttune.benchmark.suite import Suite, SuiteError

    methods = {"m": {"config": "c.yaml"}}
    with pytest.raises(SuiteError, match=r"datasets.b.trained_in must name another dataset"):
        Suite.from_dict({"methods": methods, "datasets": {"a": {}, "b": {"trained_in": "c"}}})
    with pytest.raises(SuiteError, match=r"names 'b', which trains nothing itself"):
        Suite.from_dict(
            {"methods": methods, "datasets": {"a": {}, "b": {"trained_in": "a"}, "c": {"trained_in": "b"}}}
        )
    with pytest.raises(SuiteError, match=r"datasets.a has unknown keys \['train_in'\]"):
        Suite.from_dict({"methods": methods, "datasets": {"a": {"train_in": "b"}}})
    suite = Suite.from_dict(
        {"methods": methods, "datasets": {"a": {}, "b": {"trained_in": "a"}}, "seeds": [3]}
    )
    derived = suite.runs(datasets=["b"])[0]
    assert derived.trained_in == "a" and derived.training_run_id == "a/m/seed3"


_SWEEP_OF_A_LONG_RUN = """
import sys
from pefttune.benchmark.sweep import sweep_main
sweep_main(["--config", sys.argv[1], "--output", sys.argv[2], "--methods", "full", "--no_aggregate"])
"""


def test_stopping_a_sweep_stops_its_running_run(tmp_path):
    """SIGTERM to the sweep (a scheduler, `kill`) must not leave its `pefttune fit` training alone."""
    import signal
    import subprocess
    import time

    psutil = pytest.importorskip("psutil")
    suite = yaml.safe_load(_suite(tmp_path).read_text())
    suite["seeds"] = [0]
    suite["overrides"].update({"trainer.max_steps": 100_000, "trainer.max_epochs": 10_000})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(suite))
    output = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-c", _SWEEP_OF_A_LONG_RUN, str(path), str(output)])
    try:
        log = output / "runs" / "synthetic" / "full" / "seed0" / "log.txt"
        deadline = time.monotonic() + 120
        while not (log.is_file() and "checkpoints go to" in log.read_text()):
            assert sweep.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        [run] = psutil.Process(sweep.pid).children()
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=60) == 128 + signal.SIGTERM
        run.wait(timeout=5)  # stopped by the sweep before it exited, so this returns at once
        assert not run.is_running()
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert not (output / "results" / "synthetic__full__seed0.json").exists()


def test_trained_as_must_name_a_method_that_trains():
    from pefttune.benchmark.suite import Suite, SuiteError

    with pytest.raises(SuiteError, match=r"methods.v.trained_as must name another method"):
        Suite.from_dict(
            {"methods": {"m": {"config": "c.yaml"}, "v": {"config": "c.yaml", "trained_as": "x"}}}
        )
    with pytest.raises(SuiteError, match=r"names 'v', which trains nothing itself"):
        Suite.from_dict(
            {
                "methods": {
                    "m": {"config": "c.yaml"},
                    "v": {"config": "c.yaml", "trained_as": "m"},
                    "w": {"config": "c.yaml", "trained_as": "v"},
                }
            }
        )
    with pytest.raises(SuiteError, match=r"methods.m has unknown keys \['trained_in'\]"):
        Suite.from_dict({"methods": {"m": {"config": "c.yaml", "trained_in": "x"}}})
    suite = Suite.from_dict(
        {
            "methods": {"m": {"config": "c.yaml"}, "v": {"config": "c.yaml", "trained_as": "m"}},
            "datasets": {"a": {}, "b": {"trained_in": "a"}},
        }
    )
    runs = {run.run_id: run for run in suite.runs()}
    assert runs["a/v/seed0"].training_run_id == "a/m/seed0"
    assert runs["b/v/seed0"].training_run_id == "a/m/seed0"  # both: dataset a, method m
    assert not runs["a/m/seed0"].tests_another_training and runs["b/m/seed0"].tests_another_training
