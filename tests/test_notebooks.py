"""The quickstart notebook runs top to bottom on a real Jupyter kernel (small settings)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_NB_SMALL", "1")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "sufficiency" in text and "supervised" in text  # the headline table was shown
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # discovery heatmaps and report plots were displayed


def test_sweep_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_NB_SMALL", "1")
    nb = nbformat.read(NOTEBOOKS / "sweep.ipynb", as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "topk-256-k4" in text and "topk-256-k32" in text and "sufficiency" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # four metrics against L0 and the controllability figure
