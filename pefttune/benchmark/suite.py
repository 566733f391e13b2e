"""Benchmark suites: which datasets, methods and seeds to run, each run a shipped config plus a small diff.

A suite is a YAML file::

    name: offline
    output: runs/benchmarks/offline      # results, logs and tables go here (``--output`` overrides)
    seeds: [0, 1, 2]
    variables:                           # defaults of {name} placeholders; ``--var name=value`` overrides
      data_root: ../shared/data/ucm_captions
    overrides:                           # every run (LightningCLI dotted keys)
      trainer.max_epochs: 2
      seed_everything: "{seed}"
    datasets:
      ucm:
        configs: []                      # extra config files composed after the method's config
        overrides:
          data.init_args.source: "{data_root}/captions.json"
    methods:
      full:
        config: configs/full.yaml
        overrides:
          data.init_args.batch_size: 32
      ucm_one_caption:
        trained_in: ucm                  # test the models trained in ucm's runs, with these overrides
        overrides:
          data.init_args.eval_captions: one
    forgetting: configs/forgetting/x.yaml  # optional: a second data set evaluated before and after

``methods`` names registered methods (:mod:`pefttune.strategies.registry`) or others: an entry of a
registered method may leave out ``config`` (its offline config is used); a list of names is short for entries
without overrides. The entry ``builtin`` (or ``methods: builtin`` alone) stands for every registered method
with its offline config, so a newly registered method joins every such suite; other entries add variants
or replace a registered method's entry::

Methods:
      builtin:                           # full, lit, duet, cma, lora, apex, ...
      apex_no_ensemble:
        config: configs/apex.yaml
        trained_as: apex                 # test apex's trained models (same dataset and seed)
        overrides: {model.init_args.strategy.init_args.retrieval_ensemble: "off"}

Any method may name its own ``config``.

A dataset with ``trained_in: <other dataset>`` trains nothing: each of its runs tests the best weights of
the other dataset's run with the same method and seed (``pefttune test --adapter_path``), composed with its
own overrides. It is for evaluation protocols of one training (all captions vs one caption per video):
the models compared are then the same models, and the suite trains half as many. Its overrides should
change only evaluation; the training side of its results (parameters, cost, curves) is the other run's.
A method with ``trained_as: <other method>`` does the same across methods: its runs test the other
method's trained models (same dataset and seed) with its own config and overrides, for variants that
differ only in evaluation (APEX with and without its retrieval ensemble). Both may combine.

The overrides of a run are, in order, the suite's, the dataset's, the method's and those given with
``pefttune sweep --set KEY=VALUE`` (later keys win).
String values are formatted with the variables plus ``seed``, ``dataset`` and ``method``; a value that is
exactly one placeholder (``"{seed}"``) keeps the type of what it stands for. When no override sets
``seed_everything``, the run's seed is passed as ``--seed_everything``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_PLACEHOLDER = re.compile(r"^\{(\w+)\}$")


class SuiteError(ValueError):
    """A suite file is malformed or a placeholder has no value."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a method's config on a dataset with a seed.

    Attributes:
        dataset: The dataset's name in the suite.
        method: The method's name in the suite.
        seed: The seed (``seed_everything``).
        configs: Config files in composition order (the method's first).
        overrides: Resolved dotted overrides, in order.
        forgetting: A config file (``data:`` section) of a second data set to evaluate before and after
            adaptation (:mod:`pefttune.benchmark.forgetting`), or None.
        trained_in: The dataset whose run (same method and seed) trains the model this run only tests,
            or None.
        trained_as: The method whose run (same dataset and seed) trains the model this run only tests,
            or None. With neither, the run trains its own model.
    """

    dataset: str
    method: str
    seed: int
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]
    forgetting: str | None = None
    trained_in: str | None = None
    trained_as: str | None = None

    @property
    def run_id(self) -> str:
        """``dataset/method/seed<seed>``: unique within a suite, used for folder and file names."""
        return f"{self.dataset}/{self.method}/seed{self.seed}"

    @property
    def training_run_id(self) -> str:
        """The id of the run that trains this run's model (its own, without ``trained_in``/``trained_as``)."""
        return f"{self.trained_in or self.dataset}/{self.trained_as or self.method}/seed{self.seed}"

    @property
    def tests_another_training(self) -> bool:
        """Whether the run only tests a model another run trains."""
        return self.trained_in is not None or self.trained_as is not None

    @property
    def slug(self) -> str:
        """The run id as one file name."""
        return self.run_id.replace("/", "__")

    def override_config(self) -> dict[str, Any]:
        """The overrides as one nested config (``a.b.c: v`` -> ``{a: {b: {c: v}}}``).

        The sweep passes it as the last ``--config`` rather than as dotted command-line arguments:
        jsonargparse merges a config's ``init_args`` into the earlier config's class, and parses YAML
        values (``null`` included) the same way as in the shipped configs.
        """
        nested: dict[str, Any] = {}
        for key, value in self.overrides:
            node = nested
            parts = key.split(".")
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise SuiteError(
                        f"{self.run_id}: override {key!r} goes inside {part!r}, which is a value"
                    )
                node = child
            if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
                raise SuiteError(f"{self.run_id}: override {key!r} replaces keys set by other overrides")
            node[parts[-1]] = value
        return nested

    def cli_args(self, override_file: str) -> list[str]:
        """The ``pefttune fit`` config arguments: the run's configs, then ``override_file``.

        ``override_file`` holds :meth:`override_config`.
        """
        args: list[str] = []
        for config in (*self.configs, override_file):
            args += ["--config", config]
        return args


def _substitute(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.match(value)
        if whole and whole.group(1) in variables:
            return variables[whole.group(1)]
        try:
            return value.format(**variables)
        except KeyError as err:
            raise SuiteError(f"{where}: no value for placeholder {{{err.args[0]}}} (pass --var)") from None
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _methods(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """The suite's ``methods``: a mapping, a list of names or ``builtin`` (see the module docstring)."""
    from pefttune.strategies.registry import available_strategies, get_method, methods

    if raw == "builtin":
        raw = {"builtin": None}
    elif isinstance(raw, list):
        if not all(isinstance(name, str) for name in raw):
            raise SuiteError(f"{where}: methods must list method names, got {raw!r}")
        raw = dict.fromkeys(raw)
    elif isinstance(raw, str):
        raise SuiteError(f"{where}: methods must be a mapping, a list of names or 'builtin', got {raw!r}")
    entries: dict[str, Any] = {}
    for name, spec in _mapping(raw, f"{where}: methods").items():
        if name != "builtin":
            entries[name] = spec
        elif spec:
            raise SuiteError(
                f"{where}: methods.builtin takes no settings (it stands for every registered method)"
            )
        else:
            entries.update({entry.name: {} for entry in methods() if entry.name not in entries})
    if not entries:
        raise SuiteError(f"{where}: no methods")
    registered = available_strategies()
    for name, spec in entries.items():
        spec = _mapping(spec, f"{where}: methods.{name}")
        if "config" not in spec:
            if name not in registered:
                raise SuiteError(
                    f"{where}: methods.{name} has no 'config' and is not a registered method "
                    f"({', '.join(registered)})"
                )
            spec["config"] = get_method(name).config
        spec["overrides"] = _mapping(spec.get("overrides"), f"{where}: methods.{name}.overrides")
        unknown = set(spec) - {"config", "overrides", "trained_as"}
        if unknown:
            raise SuiteError(f"{where}: methods.{name} has unknown keys {sorted(unknown)}")
        entries[name] = spec
    _check_training_references(entries, "trained_as", f"{where}: methods", "method")
    return entries


def _check_training_references(entries: Mapping[str, Any], key: str, where: str, kind: str) -> None:
    """Each entry's ``key`` (``trained_in``/``trained_as``) names another entry that trains itself."""
    for name, spec in entries.items():
        source = spec.get(key)
        if source is None:
            continue
        if source not in entries or source == name:
            raise SuiteError(
                f"{where}.{name}.{key} must name another {kind} of the suite "
                f"({sorted(set(entries) - {name})}), got {source!r}"
            )
        if entries[source].get(key) is not None:
            raise SuiteError(
                f"{where}.{name}.{key} names {source!r}, which trains nothing itself "
                f"({key} {entries[source][key]!r}); name the {kind} that trains"
            )


@dataclass
class Suite:
    """A parsed suite file (see the module docstring for the format).

    Attributes:
        name: The suite's name.
        datasets: Dataset name -> ``{"configs": [...], "overrides": {...}}`` (and ``"trained_in"``).
        methods: Method name -> ``{"config": path, "overrides": {...}}`` (and ``"trained_as"``).
        seeds: The seeds every (dataset, method) pair runs with.
        overrides: Overrides of every run.
        variables: Placeholder values.
        output: Default output folder.
        path: The file it was read from.
        extra_overrides: Applied after everything else (``pefttune sweep --set``).
        forgetting: Config file of a second data set evaluated before and after adaptation, or None.
    """

    name: str
    datasets: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    path: str | None = None
    extra_overrides: dict[str, Any] = field(default_factory=dict)
    forgetting: str | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Suite:
        """Read and check a suite file."""
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
        return cls.from_dict(raw, path=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str | None = None) -> Suite:
        """Check a suite given as a dict."""
        where = path or "suite"
        known = {"name", "output", "seeds", "variables", "overrides", "datasets", "methods", "forgetting"}
        unknown = set(raw) - known
        if unknown:
            raise SuiteError(f"{where}: unknown keys {sorted(unknown)}")
        methods = _methods(raw.get("methods"), where)
        datasets = _mapping(raw.get("datasets"), f"{where}: datasets") or {"default": {}}
        for name, spec in datasets.items():
            spec = _mapping(spec, f"{where}: datasets.{name}")
            unknown = set(spec) - {"configs", "overrides", "trained_in"}
            if unknown:
                raise SuiteError(f"{where}: datasets.{name} has unknown keys {sorted(unknown)}")
            spec["configs"] = list(spec.get("configs") or [])
            spec["overrides"] = _mapping(spec.get("overrides"), f"{where}: datasets.{name}.overrides")
            datasets[name] = spec
        _check_training_references(datasets, "trained_in", f"{where}: datasets", "dataset")
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise SuiteError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        return cls(
            name=str(raw.get("name") or Path(where).stem),
            datasets=datasets,
            methods=methods,
            seeds=list(seeds),
            overrides=_mapping(raw.get("overrides"), f"{where}: overrides"),
            variables=_mapping(raw.get("variables"), f"{where}: variables"),
            output=raw.get("output"),
            path=path,
            forgetting=None if raw.get("forgetting") is None else str(raw["forgetting"]),
        )

    def runs(
        self,
        variables: Mapping[str, Any] | None = None,
        methods: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[RunSpec]:
        """Every run of the suite (dataset-major, then method, then seed), optionally a subset.

        Args:
            variables: Placeholder values overriding the suite's defaults.
            methods: Only these methods (suite order kept).
            datasets: Only these datasets.
            seeds: These seeds instead of the suite's.
        """
        for kind, wanted, known in (("method", methods, self.methods), ("dataset", datasets, self.datasets)):
            missing = sorted(set(wanted or ()) - set(known))
            if missing:
                raise SuiteError(f"unknown {kind}(s) {missing}; the suite has {sorted(known)}")
        values = {**self.variables, **(variables or {})}
        runs = []
        for dataset, dspec in self.datasets.items():
            if datasets and dataset not in datasets:
                continue
            for method, mspec in self.methods.items():
                if methods and method not in methods:
                    continue
                for seed in seeds if seeds is not None else self.seeds:
                    context = {**values, "seed": seed, "dataset": dataset, "method": method}
                    where = f"{self.path or 'suite'} ({dataset}/{method})"
                    merged: dict[str, Any] = {}
                    layers = (self.overrides, dspec["overrides"], mspec["overrides"], self.extra_overrides)
                    for layer in layers:
                        merged.update(layer)
                    merged.setdefault("seed_everything", seed)
                    resolved = tuple((k, _substitute(v, context, where)) for k, v in merged.items())
                    configs = (mspec["config"], *dspec["configs"])
                    configs = tuple(str(_substitute(c, context, where)) for c in configs)
                    forgetting = (
                        None if self.forgetting is None else str(_substitute(self.forgetting, context, where))
                    )
                    runs.append(
                        RunSpec(
                            dataset,
                            method,
                            int(seed),
                            configs,
                            resolved,
                            forgetting,
                            trained_in=dspec.get("trained_in"),
                            trained_as=mspec.get("trained_as"),
                        )
                    )
        return runs
