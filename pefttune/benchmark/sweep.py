"""``pefttune sweep``: run a benchmark suite, one process per run, then aggregate the results.

Every run is ``python -m pefttune.cli fit`` in its own process (so memory, DDP and global state start
clean) with the run's configs and overrides, its own ``--trainer.default_root_dir`` and a
:class:`~pefttune.benchmark.recorder.BenchmarkRecorder` added to the trainer's callbacks. When the process
succeeds, the recorder's measurements, the resolved config, the command, the package versions and the
machine are written to ``<output>/results/<dataset>__<method>__seed<seed>.json``. A run whose result file
exists is skipped, so an interrupted sweep resumes where it stopped; a failed run leaves no result file (it
is retried next time) and its log is kept under ``<output>/runs/<run id>/log.txt``.

A run of a dataset with ``trained_in`` or of a method with ``trained_as`` (:mod:`pefttune.benchmark.suite`)
is ``pefttune test --adapter_path`` of the best adapter-only checkpoint of the run that trains its model
(what that run tested), right after that training, in the same claim. It loads the adapter into the model
its own config builds, so its own model settings (APEX's ``retrieval_ensemble``) hold; ``--ckpt_path``
would rebuild the model from the checkpoint's recorded settings instead.

After the runs, :func:`pefttune.benchmark.aggregate.write_reports` writes ``results.csv``, ``results.md``
and the plots to ``<output>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from pefttune.benchmark.suite import RunSpec, Suite, SuiteError

RESULT_SCHEMA = 1
OVERRIDES_FILE = "overrides.yaml"
PACKAGES = ("pefttune", "torch", "torchvision", "lightning", "transformers", "timm", "peft", "torchmetrics")


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None when absent), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, accelerator and load at the time."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        info["memory_gb"] = None
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["cuda"] = None
    return info


def result_path(output: Path, run: RunSpec) -> Path:
    """Where a run's result JSON lives."""
    return output / "results" / f"{run.slug}.json"


def claim_run(output: Path, run: RunSpec) -> FileLock | None:
    """Lock the run for this process, so that sweeps started side by side on one folder split the runs.

    The lock is an operating-system file lock on ``results/<run>.lock`` (:mod:`filelock`): it is held until
    :meth:`~filelock.FileLock.release` or until the holding process ends, however it ends, so a crashed
    sweep never leaves a stale claim behind. Sweeps on several machines sharing a network folder rely on
    that filesystem's lock support (filelock falls back to a plain lock file where there is none).

    Returns:
        The held lock (release it when the run ends), or None when another sweep process or thread holds it.
    """
    path = output / "results" / f"{run.slug}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def run_dir(output: Path, run: RunSpec) -> Path:
    """The run's ``default_root_dir`` (logs, checkpoints, the saved config and the process log)."""
    return output / "runs" / run.run_id


def fit_command(
    run: RunSpec, directory: Path, python: str = sys.executable, test_adapter: str | None = None
) -> list[str]:
    """The command line of one run: ``pefttune fit`` with the recorder as an extra callback.

    The run's overrides are read from ``<directory>/overrides.yaml`` (see :func:`write_overrides`).

    Args:
        run: The run.
        directory: Its folder (:func:`run_dir`).
        python: The interpreter.
        test_adapter: Make it ``pefttune test --adapter_path test_adapter`` instead (a run that tests the
            model of another run, ``trained_in`` / ``trained_as``).
    """
    recorder: dict[str, Any] = {
        "class_path": "pefttune.benchmark.recorder.BenchmarkRecorder",
        "init_args": {"path": str(directory / "recorder.json")},
    }
    if run.forgetting is not None:
        recorder["init_args"]["forgetting_data"] = str(Path(run.forgetting).resolve())
    subcommand = ["fit"] if test_adapter is None else ["test", f"--adapter_path={test_adapter}"]
    return [
        python,
        "-m",
        "pefttune.cli",
        subcommand[0],
        *run.cli_args(str(directory / OVERRIDES_FILE)),
        *subcommand[1:],
        f"--trainer.default_root_dir={directory}",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    ]


def write_overrides(run: RunSpec, directory: Path) -> Path:
    """Write the run's overrides as the nested config its command composes last."""
    path = directory / OVERRIDES_FILE
    header = f"# {run.run_id}: overrides of {', '.join(run.configs)} (written by pefttune sweep)\n"
    path.write_text(header + yaml.safe_dump(run.override_config(), sort_keys=False), encoding="utf-8")
    return path


def _resolved_config(directory: Path) -> dict[str, Any] | None:
    # LightningCLI saves the full resolved config next to the logger's files.
    saved = sorted(directory.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    if not saved:
        return None
    with open(saved[-1], encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def execute_run(
    run: RunSpec,
    output: Path,
    python: str = sys.executable,
    keep_checkpoints: bool = False,
    suite_name: str | None = None,
    echo: bool = False,
    trained_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one configuration in a fresh process and write its result file.

    Args:
        run: The run.
        output: The sweep's output folder.
        python: The interpreter that runs ``pefttune.cli``.
        keep_checkpoints: Keep the run's checkpoints (by default they are deleted once the result is
            written: a sweep of many full fine-tunings would otherwise fill the disk).
        suite_name: Recorded in the result.
        echo: Stream the run's output to this process's stdout as well as the log file.
        trained_by: For a run with ``trained_in`` or ``trained_as``: the result of the run that trained its
            model. The run then tests that run's best adapter-only checkpoint, and its result takes the
            training side (parameters, training cost and curves, validation metrics) from it.

    Returns:
        The result dict (``status`` is ``"ok"``), also written to :func:`result_path`.

    Raises:
        RuntimeError: If the process fails, or the adapter to test is gone; the log file is named.
    """
    adapter = None
    if trained_by is not None:
        # What the training's own test used: its best weights, or its final ones when none was best.
        adapter = trained_by.get("best_adapter") or trained_by.get("last_adapter")
        if adapter is None and trained_by.get("best_checkpoint"):
            # Results of earlier versions name the checkpoints only; the adapter file lies beside them.
            from pefttune.callbacks import ADAPTER_BEST

            adapter = str(Path(trained_by["best_checkpoint"]).parent / ADAPTER_BEST)
        if not adapter or not Path(adapter).is_file():
            raise RuntimeError(
                f"run {run.run_id} tests the model trained by {trained_by['run_id']}, whose adapter file "
                f"{adapter or '(none recorded)'} is gone; delete "
                f"{result_path(output, _training_run(run))} to train it again"
            )
    directory = run_dir(output, run)
    if directory.exists():
        # Leftovers of an interrupted attempt: stale checkpoints and logger versions must not leak in.
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    write_overrides(run, directory)
    command = fit_command(run, directory, python, test_adapter=adapter)
    log_file = directory / "log.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log.write(line)
                if echo:
                    sys.stdout.write(line)
            code = process.wait()
        except BaseException:
            # The sweep is stopped (Ctrl-C, SIGTERM): stop its run too rather than leave it training alone.
            # The run's own fault handling then saves what it can; its result is not written, so the next
            # sweep runs it again.
            _stop(process)
            raise
    wall = time.perf_counter() - started
    recorded_path = directory / "recorder.json"
    if code != 0 or not recorded_path.exists():
        with open(log_file, encoding="utf-8") as handle:
            tail = "".join(handle.readlines()[-15:])
        raise RuntimeError(f"run {run.run_id} failed (exit code {code}); log: {log_file}\n{tail}")
    recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    result = {
        "schema": RESULT_SCHEMA,
        "status": "ok",
        "suite": suite_name,
        "run_id": run.run_id,
        "dataset": run.dataset,
        "method": run.method,
        "seed": run.seed,
        "configs": list(run.configs),
        "overrides": dict(run.overrides),
        "command": command,
        "wall_time_s": wall,
        **recorded,
        **(_training_side(trained_by, recorded, wall) if trained_by is not None else {}),
        "config": _resolved_config(directory),
        "versions": package_versions(),
        "machine": machine_info(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if not keep_checkpoints:
        delete_checkpoints(directory)
    path = result_path(output, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = directory / "recorder.ranks.npz"
    if ranks.exists():  # per-query test ranks, for paired comparisons (pefttune.benchmark.stats)
        shutil.copyfile(ranks, path.with_name(f"{run.slug}.ranks.npz"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    # Written last and atomically: a result file exists only for a run that finished.
    os.replace(tmp, path)
    return result


def _stop(process: subprocess.Popen[str], grace_s: float = 30.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _training_run(run: RunSpec) -> RunSpec:
    # Only its identity is used (result file, folder): the trainer's configs are the suite's.
    return RunSpec(run.trained_in or run.dataset, run.trained_as or run.method, run.seed, run.configs, ())


def _training_side(trained_by: dict[str, Any], tested: dict[str, Any], test_wall: float) -> dict[str, Any]:
    """What the result of a run that tests another run's model takes from that run."""
    throughput = {
        **{k: v for k, v in (trained_by.get("throughput") or {}).items() if k.startswith("train")},
        **{k: v for k, v in (tested.get("throughput") or {}).items() if k.startswith("eval")},
    }
    validation = {k: v for k, v in (trained_by.get("metrics") or {}).items() if k.startswith("val/")}
    return {
        "trained_by": trained_by["run_id"],
        # The cost of the model is its training's; this run's own process only tested it.
        "wall_time_s": trained_by.get("wall_time_s"),
        "test_wall_time_s": test_wall,
        "fit_seconds": trained_by.get("fit_seconds"),
        "parameters": trained_by.get("parameters"),
        "memory": trained_by.get("memory"),
        "curves": trained_by.get("curves"),
        "throughput": throughput,
        "metrics": {**validation, **(tested.get("metrics") or {})},
        **{
            key: trained_by.get(key)
            for key in ("best_checkpoint", "last_checkpoint", "best_adapter", "last_adapter")
        },
    }


def delete_checkpoints(directory: Path) -> None:
    """Delete a run's checkpoints (``*.ckpt``); adapters, logs and configs stay."""
    for checkpoint in directory.rglob("*.ckpt"):
        checkpoint.unlink()


def _read_result(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _training_groups(runs: Sequence[RunSpec], every_run: dict[str, RunSpec]) -> list[list[RunSpec]]:
    """The runs grouped by the training they use: ``[training run, runs testing its model...]``.

    A run that tests another run's model brings that run in when it was not selected (``--datasets``,
    ``--methods``): it needs the model.
    """
    groups: dict[str, list[RunSpec]] = {}
    for run in runs:
        training = every_run[run.training_run_id]
        group = groups.setdefault(training.run_id, [training])
        if run is not training and run not in group:
            group.append(run)
    return list(groups.values())


def run_sweep(
    suite: Suite,
    output: Path,
    variables: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    python: str = sys.executable,
    keep_checkpoints: bool = False,
    echo: bool = False,
    stop_on_error: bool = False,
) -> dict[str, list[str]]:
    """Run every run of ``suite`` that has no result file yet.

    Runs are grouped by the training whose model they use (:func:`_training_groups`); a group is claimed
    as a whole, so the runs that test a training's model follow it in the same process.

    Returns:
        Run ids by outcome: ``done`` (ran now), ``skipped`` (result file existed), ``busy`` (another sweep
        process is running it), ``failed``.
    """
    runs = suite.runs(variables, methods=methods, datasets=datasets, seeds=seeds)
    every_run = {run.run_id: run for run in suite.runs(variables, seeds=seeds)}
    groups = _training_groups(runs, every_run)
    total = sum(len(group) for group in groups)
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "busy": [], "failed": []}
    number = 0
    for group in groups:
        labels = {run.run_id: f"[{number + i}/{total}] {run.run_id}" for i, run in enumerate(group, 1)}
        number += len(group)
        missing = [run for run in group if not result_path(output, run).exists()]
        for run in group:
            if run not in missing:
                print(f"{labels[run.run_id]}: result exists, skipped", flush=True)
                outcome["skipped"].append(run.run_id)
        if not missing:
            continue
        lock = claim_run(output, group[0])
        if lock is None:
            for run in missing:
                print(f"{labels[run.run_id]}: being run by another sweep process, skipped", flush=True)
                outcome["busy"].append(run.run_id)
            continue
        try:
            stopped = _run_claimed_group(
                group,
                missing,
                labels,
                outcome,
                output,
                python,
                keep_checkpoints,
                suite.name,
                echo,
                stop_on_error,
            )
        finally:
            lock.release()
        if stopped:
            break
    return outcome


def _run_claimed_group(
    group: list[RunSpec],
    missing: list[RunSpec],
    labels: dict[str, str],
    outcome: dict[str, list[str]],
    output: Path,
    python: str,
    keep_checkpoints: bool,
    suite_name: str,
    echo: bool,
    stop_on_error: bool,
) -> bool:
    """Run a claimed group's missing runs (the training first), recording each in ``outcome``.

    Returns:
        Whether the sweep should stop (a run failed and ``stop_on_error``).
    """
    training = group[0]
    for run in missing:
        label = labels[run.run_id]
        if result_path(output, run).exists():
            # Another sweep finished the run between the check and the claim.
            print(f"{label}: result exists, skipped", flush=True)
            outcome["skipped"].append(run.run_id)
            continue
        trained_by = None
        if run is not training:
            if not result_path(output, training).exists():
                print(f"{label}: FAILED\nits model's training {training.run_id} failed", flush=True)
                outcome["failed"].append(run.run_id)
                continue
            trained_by = _read_result(result_path(output, training))
        print(
            f"{label}: running" + (f" (tests the model of {training.run_id})" if trained_by else ""),
            flush=True,
        )
        try:
            result = execute_run(
                run,
                output,
                python,
                keep_checkpoints=keep_checkpoints,
                suite_name=suite_name,
                echo=echo,
                trained_by=trained_by,
            )
        except RuntimeError as err:
            print(f"{label}: FAILED\n{err}", flush=True)
            outcome["failed"].append(run.run_id)
            if stop_on_error:
                return True
            continue
        rsum = (result.get("metrics") or {}).get("test/rsum")
        seconds = result.get("test_wall_time_s", result["wall_time_s"])
        print(
            f"{label}: done in {seconds:.0f} s" + (f", test RSUM {rsum:.1f}" if rsum is not None else ""),
            flush=True,
        )
        outcome["done"].append(run.run_id)
    return False


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a job scheduler, ``kill``) unwinds like Ctrl-C, so the running run is stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse_variables(pairs: Sequence[str], option: str = "--var") -> dict[str, Any]:
    variables = {}
    for pair in pairs:
        if "=" not in pair:
            raise SuiteError(f"{option} expects NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        variables[name] = yaml.safe_load(value) if value else ""
    return variables


def _split(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


def sweep_main(argv: Sequence[str]) -> dict[str, list[str]]:
    """``pefttune sweep --config SUITE [--output DIR] [--var NAME=VALUE] ...``: run a suite, then aggregate.

    Exits with status 1 when a run failed (after running and aggregating the others).
    """
    # --snake_case like the LightningCLI subcommands; the --kebab-case spellings still work.
    parser = argparse.ArgumentParser(prog="pefttune sweep", description=sweep_main.__doc__)
    parser.add_argument("--config", "-c", required=True, help="a suite file (benchmarks/*.yaml)")
    parser.add_argument("--output", "-o", help="output folder (default: the suite's 'output')")
    parser.add_argument("--var", action="append", default=[], help="NAME=VALUE for a {NAME} placeholder")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra override of every run (dotted key, YAML value), after the suite's own",
    )
    parser.add_argument("--methods", help="comma-separated subset of the suite's methods")
    parser.add_argument("--datasets", help="comma-separated subset of the suite's datasets")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the suite's")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--aggregate_only", "--aggregate-only", action="store_true", help="only rebuild tables and plots"
    )
    parser.add_argument("--no_aggregate", "--no-aggregate", action="store_true", help="skip tables and plots")
    parser.add_argument(
        "--keep_checkpoints", "--keep-checkpoints", action="store_true", help="keep each run's checkpoints"
    )
    parser.add_argument(
        "--stop_on_error", "--stop-on-error", action="store_true", help="stop at the first failed run"
    )
    parser.add_argument("--echo", action="store_true", help="stream each run's output here too")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each run (OMP_NUM_THREADS); 1 avoids OpenMP spin-waits on a busy machine",
    )
    options = parser.parse_args(list(argv))
    if options.threads is not None:
        # The runs inherit the environment; torch reads these when it starts.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(options.threads)

    suite = Suite.from_file(options.config)
    # Command-line overrides come last, so they win over the suite's, the datasets' and the methods'.
    suite.extra_overrides = _parse_variables(options.set, "--set")
    output_name = options.output or suite.output or f"runs/benchmarks/{suite.name}"
    output = Path(output_name).resolve()
    seeds = [int(s) for s in _split(options.seeds)] if options.seeds else None
    variables = _parse_variables(options.var)
    methods, datasets = _split(options.methods), _split(options.datasets)

    if options.dry_run:
        for run in suite.runs(variables, methods=methods, datasets=datasets, seeds=seeds):
            state = "exists" if result_path(output, run).exists() else "to run"
            adapter = f"<best adapter of {run.training_run_id}>" if run.tests_another_training else None
            command = fit_command(run, run_dir(output, run), options.python, test_adapter=adapter)
            overrides = yaml.safe_dump(run.override_config(), sort_keys=False)
            print(f"# {run.run_id} ({state})\n" + " ".join(command))
            print(f"# with {run_dir(output, run) / OVERRIDES_FILE}:\n" + overrides)
        return {"done": [], "skipped": [], "busy": [], "failed": []}

    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "busy": [], "failed": []}
    if not options.aggregate_only:
        with _sigterm_unwinds():
            outcome = run_sweep(
                suite,
                output,
                variables,
                methods=methods,
                datasets=datasets,
                seeds=seeds,
                python=options.python,
                keep_checkpoints=options.keep_checkpoints,
                echo=options.echo,
                stop_on_error=options.stop_on_error,
            )
        print(
            f"sweep {suite.name}: {len(outcome['done'])} ran, {len(outcome['skipped'])} skipped, "
            f"{len(outcome['busy'])} left to other sweep processes, {len(outcome['failed'])} failed",
            flush=True,
        )
    if not options.no_aggregate:
        from pefttune.benchmark.aggregate import write_reports

        written = write_reports(output, title=suite.name)
        for path in written:
            print(f"wrote {path}")
    if outcome["failed"]:
        raise SystemExit(1)
    return outcome
