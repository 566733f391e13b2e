"""Aggregation math (mean, Student-t 95% CI), CSV and Markdown output, plots; suite parsing."""

import csv
import io
import json
import math
import statistics

import pytest
import torch

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


def test_shipped_suites_name_every_registered_method_and_apex_without_ensemble():
    from pathlib import Path

    from pefttune.strategies.registry import methods

    root = Path(__file__).resolve().parents[2]
    for name in ("offline", "ucm"):
        suite = Suite.from_file(root / "benchmarks" / f"{name}.yaml")
        assert set(suite.methods) == {m.name for m in methods()} | {"apex_no_ensemble"}
        off = suite.methods["apex_no_ensemble"]["overrides"]
        assert off == {"model.init_args.strategy.init_args.retrieval_ensemble": "off"}
        for run in suite.runs(seeds=[0]):
            for config in run.configs:
                assert (root / config).exists(), config


# -- paired comparisons --------------------------------------------------------------------------------


def _queries(i2t_ahead, t2i_ahead, captions_per_image=2, i2t_tied=None, t2i_tied=None):
    """Hand-made per-query outcomes: image ids 0..N-1, captions 10*image + j."""
    from pefttune.metrics import QueryOutcomes, RankedQueries

    n = len(i2t_ahead)
    owners = torch.arange(n).repeat_interleave(captions_per_image)
    captions = owners * 10 + torch.arange(captions_per_image).repeat(n)
    i2t_tied = torch.zeros(n, dtype=torch.long) if i2t_tied is None else torch.tensor(i2t_tied)
    t2i_tied = torch.zeros(len(t2i_ahead), dtype=torch.long) if t2i_tied is None else torch.tensor(t2i_tied)
    return RankedQueries(
        image_ids=torch.arange(n),
        caption_ids=captions,
        caption_image_ids=owners,
        i2t=QueryOutcomes(torch.tensor(i2t_ahead), i2t_tied, torch.ones(n, dtype=torch.long)),
        t2i=QueryOutcomes(torch.tensor(t2i_ahead), t2i_tied, torch.ones(len(t2i_ahead), dtype=torch.long)),
    )


def test_mean_ci_uses_scipy_t_quantiles():
    from scipy import stats as scipy_stats

    values = [3.0, 4.5, 7.25, 1.0]
    summary = mean_ci(values, level=0.9)
    expected = scipy_stats.t.ppf(0.95, 3) * statistics.stdev(values) / 2
    assert summary.ci == pytest.approx(expected, rel=1e-12)


def test_paired_seed_difference_matches_a_paired_t_test():
    from scipy import stats as scipy_stats

    from pefttune.benchmark.stats import paired_seed_difference

    method = {0: 300.0, 1: 312.0, 2: 305.0, 7: 1.0}
    reference = {0: 310.0, 1: 315.0, 2: 318.0}
    difference = paired_seed_difference(method, reference)
    diffs = [-10.0, -3.0, -13.0]
    low, high = scipy_stats.ttest_rel([300, 312, 305], [310, 315, 318]).confidence_interval(0.95)
    assert difference.n == 3 and difference.estimate == pytest.approx(statistics.fmean(diffs))
    assert (difference.low, difference.high) == pytest.approx((low, high), rel=1e-10)
    assert difference.excludes_zero is False  # three seeds of a 9-point gap with this spread: not separable
    one = paired_seed_difference({0: 1.0}, {0: 3.0})
    assert one.estimate == -2.0 and not one.has_interval and one.excludes_zero is None
    assert paired_seed_difference({0: 1.0}, {1: 1.0}) is None


def test_paired_bootstrap_rsum_estimates_the_difference_and_separates_a_clear_gap():
    from pefttune.benchmark.stats import paired_bootstrap_rsum
    from pefttune.metrics import metrics_from_outcomes

    g = torch.Generator().manual_seed(0)
    n = 60
    good = _queries(
        torch.randint(0, 2, (n,), generator=g).tolist(), torch.randint(0, 3, (2 * n,), generator=g).tolist()
    )
    bad = _queries(
        torch.randint(3, 20, (n,), generator=g).tolist(), torch.randint(4, 30, (2 * n,), generator=g).tolist()
    )
    difference = paired_bootstrap_rsum([(bad, good)], resamples=500)
    rsum = {
        name: metrics_from_outcomes(q.i2t, q.t2i, (1, 5, 10))["rsum"]
        for name, q in (("good", good), ("bad", bad))
    }
    assert difference.estimate == pytest.approx(rsum["bad"] - rsum["good"])
    assert difference.n == n and difference.low < difference.estimate < difference.high
    assert difference.excludes_zero is True and difference.high < 0
    # The same model against itself: no difference in any resample.
    same = paired_bootstrap_rsum([(good, good)], resamples=200)
    assert same.estimate == 0.0 and same.low == 0.0 and same.high == 0.0
    # Reproducible with its seed.
    assert paired_bootstrap_rsum([(bad, good)], resamples=500) == difference


def test_paired_bootstrap_rsum_shares_the_resample_between_methods():
    """Two models that differ on one query only: paired resampling keeps the interval tight."""
    from pefttune.benchmark.stats import paired_bootstrap_rsum

    n = 100
    base = [0] * n
    a = _queries(base, [0] * (2 * n))
    b = _queries([50, *base[1:]], [0] * (2 * n))
    difference = paired_bootstrap_rsum([(b, a)], ks=(1,), resamples=1000)
    # One image query of 100 misses: R@1 i2t drops by 1 point.
    assert difference.estimate == pytest.approx(-1.0)
    assert -4.0 < difference.low <= -1.0 and difference.high == 0.0


def test_paired_bootstrap_rsum_uses_the_tie_rule_and_averages_seeds():
    from pefttune.benchmark.stats import paired_bootstrap_rsum

    tied = _queries([0, 0], [0, 0, 0, 0], i2t_tied=[1, 1], t2i_tied=[0, 0, 0, 0])
    clean = _queries([0, 0], [0, 0, 0, 0])
    # Expected rule: each image's best caption shares the top with one other caption, half a hit at K=1.
    assert paired_bootstrap_rsum([(tied, clean)], ks=(1,), resamples=50).estimate == pytest.approx(-50.0)
    assert paired_bootstrap_rsum([(tied, clean)], ks=(1,), ties="optimistic", resamples=50).estimate == 0.0
    assert (
        paired_bootstrap_rsum([(tied, clean)], ks=(1,), ties="pessimistic", resamples=50).estimate == -100.0
    )
    both = paired_bootstrap_rsum([(tied, clean), (clean, clean)], ks=(1,), resamples=50)
    assert both.estimate == pytest.approx(-25.0)


def test_paired_bootstrap_rsum_refuses_different_test_sets():
    from pefttune.benchmark.stats import paired_bootstrap_rsum

    with pytest.raises(ValueError, match="different test queries"):
        paired_bootstrap_rsum([(_queries([0, 1], [0] * 4), _queries([0, 1, 2], [0] * 6))], where="ucm: x")
    with pytest.raises(ValueError, match="no pair"):
        paired_bootstrap_rsum([])


def _write_runs(tmp_path, runs):
    folder = tmp_path / "results"
    folder.mkdir()
    for result, queries in runs:
        slug = f"{result['dataset']}__{result['method']}__seed{result['seed']}"
        result = dict(result, run_id=f"{result['dataset']}/{result['method']}/seed{result['seed']}")
        (folder / f"{slug}.json").write_text(json.dumps(result))
        if queries is not None:
            queries.save(folder / f"{slug}.ranks.npz")


def test_reports_compare_every_method_with_the_best(tmp_path):
    from pefttune.metrics import metrics_from_outcomes

    g = torch.Generator().manual_seed(1)
    n = 40
    runs = []
    for seed in (0, 1, 2):
        strong = _queries(
            torch.randint(0, 2, (n,), generator=g).tolist(),
            torch.randint(0, 2, (2 * n,), generator=g).tolist(),
        )
        close = _queries(
            torch.randint(0, 2, (n,), generator=g).tolist(),
            torch.randint(0, 2, (2 * n,), generator=g).tolist(),
        )
        weak = _queries(
            torch.randint(5, 40, (n,), generator=g).tolist(),
            torch.randint(5, 40, (2 * n,), generator=g).tolist(),
        )
        for method, queries, params in (("strong", strong, 100), ("close", close, 10), ("weak", weak, 1)):
            values = metrics_from_outcomes(queries.i2t, queries.t2i)
            extra = {f"test/{k}": v for k, v in values.items()}
            extra["test/collapsed"] = 1.0 if (method == "weak" and seed == 2) else 0.0
            runs.append((_result("synthetic", method, seed, values["rsum"], params, extra), queries))
    runs.append((_result("synthetic", "noranks", 0, 10.0, 5), None))
    _write_runs(tmp_path, runs)
    results = load_results(tmp_path)
    assert sum("_query_ranks" in r for r in results) == 9
    groups = {g.method: g for g in aggregate(results, resamples=300)}
    best = max(("strong", "close"), key=lambda m: groups[m].stats["test/rsum"].mean)
    other = "close" if best == "strong" else "strong"
    assert groups[best].comparison.is_best and groups[best].comparison.separable is None
    weak = groups["weak"].comparison
    assert weak.best == best and weak.metric == "test/rsum"
    assert weak.seeds.n == 3 and weak.queries is not None and weak.separable is True
    assert weak.queries.estimate == pytest.approx(weak.seeds.estimate)
    assert groups[other].comparison.separable is False  # two draws of the same quality
    noranks = groups["noranks"].comparison
    assert noranks.queries is None and noranks.seeds.n == 1 and noranks.separable is None
    write_reports(tmp_path)
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text()))}
    assert rows[best]["separable_from_best"] == "best" and rows["weak"]["separable_from_best"] == "yes"
    assert rows[other]["separable_from_best"] == "no" and rows["noranks"]["separable_from_best"] == "unknown"
    assert rows["weak"]["collapsed_seeds"] == "1"
    assert float(rows["weak"]["vs_best_queries_ci95_high"]) < 0
    markdown = (tmp_path / "results.md").read_text()
    assert "Δ RSUM vs best" in markdown and "≈ best" in markdown and "**best**" in markdown
    weak_row = next(line for line in markdown.splitlines() if line.startswith("| weak"))
    assert "collapsed 1/3" in weak_row and "seeds [" in weak_row and "queries [" in weak_row


def test_results_without_ranks_fall_back_to_the_run_folder(tmp_path):
    queries = _queries([0, 1], [0, 0, 1, 1])
    result = dict(_result("d", "m", 0, 1.0, 1), run_id="d/m/seed0")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "d__m__seed0.json").write_text(json.dumps(result))
    queries.save(tmp_path / "runs" / "d" / "m" / "seed0" / "recorder.ranks.npz")
    (loaded,) = load_results(tmp_path)
    assert loaded["_query_ranks"].endswith("recorder.ranks.npz")
