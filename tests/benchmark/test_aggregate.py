"""Aggregation math (mean, Student-t 95% CI), CSV and Markdown output, plots; suite parsing."""

import csv
import io
import json
import math
import statistics

import pytest

from pefttune.benchmark.aggregate import (
    aggregate,
    format_summary,
    load_results,
    to_csv,
    to_markdown,
    write_reports,
)
from pefttune.benchmark.stats import mean_ci, student_t_cdf, student_t_quantile
from pefttune.benchmark.suite import Suite, SuiteError

# Two-sided 95% critical values t_{0.975, df} from standard tables.
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452, 120: 1.9799}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE.items()))
def test_student_t_quantile_matches_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_student_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17, 1000):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)
    assert student_t_cdf(1.3, 3) == pytest.approx(stats.t.cdf(1.3, 3), rel=1e-10)


def test_mean_ci_uses_student_t_and_no_interval_for_one_seed():
    values = [40.0, 44.0, 45.0]
    summary = mean_ci(values)
    expected = 4.3027 * statistics.stdev(values) / math.sqrt(3)
    assert summary.mean == pytest.approx(43.0) and summary.n == 3
    assert summary.ci == pytest.approx(expected, rel=1e-4)
    one = mean_ci([7.5])
    assert one.mean == 7.5 and one.ci is None and one.std is None
    assert format_summary(one) == "7.5" and format_summary(summary) == f"43.0 ± {expected:.1f}"
    with pytest.raises(ValueError):
        mean_ci([])


def _result(dataset, method, seed, rsum, trainable, extra=None):
    metrics = {"test/i2t_R@1": rsum / 6, "test/t2i_R@1": rsum / 6 + 1, "test/rsum": rsum, **(extra or {})}
    return {
        "status": "ok",
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "metrics": metrics,
        "parameters": {
            "trainable_params": trainable,
            "total_params": 1000,
            "trainable_by_group": {"method": trainable - 1, "head": 0, "backbone": 0, "temperature": 1},
        },
        "throughput": {"train_samples_per_s": 10.0 + seed, "eval_images_per_s": 50.0},
        "memory": {"device": "cpu", "peak_rss_mb": 900.0, "peak_allocated_mb": None},
        "wall_time_s": 60.0,
        "curves": {
            "train_loss": [[1, 2.0], [2, 1.5 + seed / 10]],
            "val": [{"step": 2, "val/rsum": rsum - 5}],
        },
    }


@pytest.fixture
def results():
    return [
        _result("synthetic", "lora", 0, 300.0, 20),
        _result("synthetic", "lora", 1, 310.0, 20),
        _result("synthetic", "lora", 2, 320.0, 20),
        _result("synthetic", "full", 0, 350.0, 1000),
        _result("synthetic", "full", 1, 330.0, 1000),
        _result("ucm", "lora", 0, 200.0, 20, {"test/acc_base": 61.0}),
    ]


def test_groups_summarise_each_dataset_and_method(results):
    groups = aggregate(results)
    assert [(g.dataset, g.method, g.seeds) for g in groups] == [
        ("synthetic", "lora", [0, 1, 2]),  # fewest trainable parameters first
        ("synthetic", "full", [0, 1]),
        ("ucm", "lora", [0]),
    ]
    lora, full, ucm = groups
    assert lora.stats["test/rsum"].mean == pytest.approx(310.0)
    assert lora.stats["test/rsum"].ci == pytest.approx(4.3027 * 10.0 / math.sqrt(3), rel=1e-4)
    assert full.stats["test/rsum"].ci == pytest.approx(
        12.7062 * statistics.stdev([350, 330]) / math.sqrt(2), rel=1e-4
    )
    assert lora.stats["train_samples_per_s"].mean == pytest.approx(11.0)
    assert lora.stats["peak_memory_mb"].mean == 900.0 and lora.stats["method_params"].mean == 19
    assert ucm.stats["test/rsum"].ci is None and ucm.stats["test/acc_base"].mean == 61.0


def test_csv_has_mean_and_ci_columns_per_group(results):
    rows = list(csv.DictReader(io.StringIO(to_csv(aggregate(results)))))
    assert [(r["dataset"], r["method"], r["n_seeds"]) for r in rows] == [
        ("synthetic", "lora", "3"),
        ("synthetic", "full", "2"),
        ("ucm", "lora", "1"),
    ]
    assert float(rows[0]["test/rsum_mean"]) == pytest.approx(310.0)
    assert float(rows[0]["test/rsum_ci95"]) == pytest.approx(4.3027 * 10 / math.sqrt(3), rel=1e-4)
    assert rows[2]["test/rsum_ci95"] == "" and rows[2]["test/acc_base_mean"] == "61.0"
    assert rows[0]["test/acc_base_mean"] == ""
    assert float(rows[1]["trainable_params_mean"]) == 1000


def test_markdown_has_one_table_per_dataset(results):
    markdown = to_markdown(aggregate(results))
    assert markdown.count("### ") == 2
    synthetic, ucm = markdown.split("### ucm")
    assert "| lora | 20 (2.00%) |" in synthetic and "310.0 ± 24.8" in synthetic
    assert "acc base" in ucm and "acc base" not in synthetic
    header = next(line for line in synthetic.splitlines() if line.startswith("| method"))
    row = next(line for line in synthetic.splitlines() if line.startswith("| full"))
    assert header.count("|") == row.count("|")


def test_write_reports_reads_result_files_and_writes_plots(results, tmp_path):
    assert write_reports(tmp_path) == []
    folder = tmp_path / "results"
    folder.mkdir()
    for r in results:
        (folder / f"{r['dataset']}__{r['method']}__seed{r['seed']}.json").write_text(json.dumps(r))
    (folder / "unfinished.json").write_text(json.dumps({"status": "running"}))
    assert len(load_results(tmp_path)) == len(results)
    written = write_reports(tmp_path, title="unit")
    assert {p.name for p in written} == {
        "results.csv",
        "results.md",
        "retrieval_vs_params.png",
        "training_curves.png",
    }
    for path in written[2:]:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert (tmp_path / "results.md").read_text().startswith("## unit\n")


def test_suite_expands_runs_with_layered_overrides_and_placeholders():
    suite = Suite.from_dict(
        {
            "seeds": [0, 1],
            "variables": {"root": "/data"},
            "overrides": {"trainer.max_epochs": 2, "data.init_args.seed": "{seed}", "model.x": "{method}"},
            "datasets": {
                "ucm": {
                    "overrides": {"data.init_args.source": "{root}/captions.json", "trainer.max_epochs": 3}
                }
            },
            "methods": {
                "lit": {"config": "configs/lit.yaml", "overrides": {"trainer.max_epochs": 4}},
                "full": {"config": "configs/full.yaml"},
            },
        }
    )
    runs = suite.runs({"root": "/elsewhere"}, methods=["lit", "full"])
    assert [r.run_id for r in runs] == ["ucm/lit/seed0", "ucm/lit/seed1", "ucm/full/seed0", "ucm/full/seed1"]
    lit = dict(runs[1].overrides)
    assert lit["trainer.max_epochs"] == 4 and lit["data.init_args.seed"] == 1 and lit["seed_everything"] == 1
    assert lit["data.init_args.source"] == "/elsewhere/captions.json" and lit["model.x"] == "lit"
    assert dict(runs[2].overrides)["trainer.max_epochs"] == 3
    assert runs[1].cli_args("o.yaml") == ["--config", "configs/lit.yaml", "--config", "o.yaml"]
    nested = runs[1].override_config()
    assert nested["data"]["init_args"] == {"seed": 1, "source": "/elsewhere/captions.json"}
    assert nested["trainer"] == {"max_epochs": 4} and nested["model"] == {"x": "lit"}
    assert [r.seed for r in suite.runs(seeds=[7])] == [7, 7]


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"methods": {}}, "no methods"),
        ({"methods": {"a": {"overrides": {}}}}, "no 'config'"),
        ({"methods": {"a": {"config": "x"}}, "seeds": []}, "seeds"),
        ({"methods": {"a": {"config": "x"}}, "typo": 1}, "unknown keys"),
    ],
)
def test_malformed_suites_are_rejected(raw, message):
    with pytest.raises(SuiteError, match=message):
        Suite.from_dict(raw)


def test_conflicting_overrides_are_named():
    suite = Suite.from_dict({"methods": {"a": {"config": "x", "overrides": {"m.k": 1, "m.k.j": 2}}}})
    with pytest.raises(SuiteError, match=r"m\.k\.j"):
        suite.runs()[0].override_config()


def test_unknown_placeholder_and_method_are_named():
    suite = Suite.from_dict({"methods": {"a": {"config": "x", "overrides": {"k": "{data_root}/f"}}}})
    with pytest.raises(SuiteError, match="data_root"):
        suite.runs()
    with pytest.raises(SuiteError, match="unknown method"):
        suite.runs({"data_root": "/d"}, methods=["b"])


def test_shipped_suites_parse_and_name_all_six_methods():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in ("offline", "ucm"):
        suite = Suite.from_file(root / "benchmarks" / f"{name}.yaml")
        assert set(suite.methods) == {"full", "lit", "duet", "cma", "lora", "apex"}
        for run in suite.runs(seeds=[0]):
            for config in run.configs:
                assert (root / config).exists(), config
