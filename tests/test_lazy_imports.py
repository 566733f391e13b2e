"""Importing pefttune's packages is cheap; their names load on first use and stay visible."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["pefttune.towers", "pefttune.strategies", "pefttune.data", "pefttune.metrics"]


def test_importing_the_packages_loads_no_heavy_library():
    code = (
        "import sys, json\n"
        f"for name in {PACKAGES!r}: __import__(name)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'lightning', 'transformers', 'timm', 'peft') "
        "if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, timeout=300
    )
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("package", [*PACKAGES, "pefttune.benchmark"])
def test_every_public_name_resolves_and_is_listed(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError, match=f"{package}' has no attribute 'nope'"):
        module.nope  # noqa: B018


def test_aggregate_stays_the_function_after_its_submodule_is_imported():
    import pefttune.benchmark
    import pefttune.benchmark.aggregate

    assert callable(pefttune.benchmark.aggregate) and pefttune.benchmark.aggregate.__name__ == "aggregate"


def test_class_paths_through_the_lazy_packages():
    from jsonargparse import ArgumentParser

    from pefttune.strategies.base import AdaptationStrategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=AdaptationStrategy)
    config = parser.parse_args(['--strategy={"class_path": "pefttune.strategies.DueT"}'])
    from pefttune.strategies import DueT

    assert isinstance(parser.instantiate(config).strategy, DueT)
