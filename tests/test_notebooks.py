"""Run the notebooks in FAST mode (what CI can afford) and check that they reach their sanity checks.

Executed with nbclient (what nbmake uses) so that plain ``pytest`` runs them without the ``--nbmake`` flag;
each notebook is its own test, so ``pytest -n 2`` runs the two side by side.
"""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["erf.ipynb", "compare_modalities.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("UNIPERC_FAST", "1")  # inherited by the kernel
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "ok\n" in printed  # the notebook's own sanity-check cell passed
    assert "FAST=True" in printed


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_stored_without_outputs_and_with_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "UNIPERC_FAST" in params[0].source and "FAST =" in params[0].source
