"""The notebooks are stored without outputs and run end to end in smoke mode (tiny towers, a few steps)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_the_three_notebooks_exist() -> None:
    assert ALL == ["01_quickstart.ipynb", "02_compare_methods.ipynb", "03_custom_strategy.ipynb"]


@pytest.mark.parametrize("name", ALL)
def test_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has stored outputs (clear them before saving)"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("PEFTTUNE_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("PEFTTUNE_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return notebook


def _outputs(notebook: nbformat.NotebookNode, kind: str) -> list[dict]:
    return [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if kind in o.get("data", {})
    ]


def test_quickstart_runs_and_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    assert (tmp_path / "quickstart" / "text_to_image.png").stat().st_size > 1000
    assert len(_outputs(notebook, "image/png")) == 2  # both retrieval pictures are shown


def test_custom_strategy_runs_and_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("03_custom_strategy.ipynb", tmp_path, monkeypatch)
    tables = [o["data"]["text/markdown"] for o in _outputs(notebook, "text/markdown")]
    assert tables and all(m in tables[-1] for m in ("BitFit (ours)", "LiT", "DueT"))
    groups = [
        o["data"]["text/plain"]
        for o in _outputs(notebook, "text/plain")
        if "'method': 0" in o["data"]["text/plain"]
    ]
    assert groups, "BitFit's method group must be empty"


# 02 starts one training process per run (two runs): heavier than the in-process notebooks.
@pytest.mark.slow
def test_compare_methods_runs_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("02_compare_methods.ipynb", tmp_path, monkeypatch)
    results = sorted(p.name for p in (tmp_path / "compare" / "results").glob("*.json"))
    assert results == ["synthetic__duet__seed0.json", "synthetic__lit__seed0.json"]
    assert (tmp_path / "compare" / "results.md").read_text().count("|") > 10
    assert len(_outputs(notebook, "image/png")) == 2
