"""The registry of built-in methods and everything it drives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

import pefttune.strategies as strategies
from pefttune.strategies import registry
from pefttune.strategies.base import AdaptationStrategy
from pefttune.strategies.registry import available_strategies, get_method, methods, register_method

ROOT = Path(__file__).resolve().parents[2]


def test_every_entry_names_files_that_exist_and_a_config_of_its_own_strategy() -> None:
    for spec in methods():
        for path in (spec.config, *spec.paper_configs, spec.docs):
            assert (ROOT / path).is_file(), f"{spec.name}: {path}"
        for path in (spec.config, *spec.paper_configs):
            config = yaml.safe_load((ROOT / path).read_text())
            named = config["model"]["init_args"]["strategy"]["class_path"]
            assert named == spec.class_path, f"{path} trains {named}, registered for {spec.class_path}"
        assert spec.table_rows, f"{spec.name} has no row in the README parameter table"


def test_every_offline_config_and_every_exported_strategy_is_registered() -> None:
    registered = {spec.config for spec in methods()}
    shipped = {f"configs/{path.name}" for path in (ROOT / "configs").glob("*.yaml")}
    assert shipped == registered
    exported = {
        value
        for value in vars(strategies).values()
        if isinstance(value, type)
        and issubclass(value, AdaptationStrategy)
        and value is not AdaptationStrategy
    }
    assert exported <= {spec.strategy for spec in methods()}


def test_names_prefixes_and_classes_are_unique_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    duet = get_method("duet")
    with pytest.raises(ValueError, match="already registered"):
        register_method("duet", duet.strategy, paper="", config="")
    with pytest.raises(ValueError, match="already registered as 'duet'"):
        register_method("duet2", duet.strategy, paper="", config="")
    with pytest.raises(ValueError, match="not an AdaptationStrategy"):
        register_method("thing", dict, paper="", config="")  # type: ignore[arg-type]

    class Copy(type(duet.build())):  # type: ignore[misc]
        pass

    with pytest.raises(ValueError, match="prefix 'duet_' is already used by 'duet'"):
        register_method("copy", Copy, paper="", config="")

    class Mine(type(duet.build())):  # type: ignore[misc]
        prefix = "mine_"

    spec = register_method("mine", Mine, paper="me", config="configs/mine.yaml", test_arguments={"width": 8})
    assert get_method("mine") is spec and spec.build_for_tests().width == 8
    assert available_strategies()["mine"].endswith("Mine")


def test_unknown_names_list_the_registered_methods() -> None:
    with pytest.raises(KeyError, match="registered: full, lit, duet, cma, lora, apex"):
        get_method("bitfit")
    assert available_strategies()["lora"] == "pefttune.strategies.lora.LoRA"


def test_the_readme_strategy_table_has_a_row_per_method() -> None:
    spec = importlib.util.spec_from_file_location("gen_method_table", ROOT / "docs" / "gen_method_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.strategies_table(methods())
    assert len(lines) == 2 + len(methods())
    assert "| `DueT` | Hasegawa et al., EMNLP 2023 | `configs/duet.yaml` |" in "\n".join(lines)
