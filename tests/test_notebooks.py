"""The notebooks run top to bottom on a real Jupyter kernel: the quickstart notebook on the
session's quickstart run (``tests/conftest.py``: every stage is read back, as after
``sage quickstart``), the sweep notebook at small settings."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def execute(name: str, tmp_path, timeout: int) -> tuple[str, int]:
    """Run a notebook; its text/plain output and its image count."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    return text, len([o for o in outputs if "image/png" in o.get("data", {})])


def test_quickstart_notebook_executes_on_the_quickstart_run(quickstart, tmp_path,
                                                             monkeypatch):
    """Its run cell finds every stage of the quickstart done (the run it shows is the real
    quickstart's, not a few-step stand-in) and every later cell reads it back."""
    import json

    monkeypatch.setenv("SAGE_NB_RUN_DIR", str(quickstart.run_dir))
    before = json.loads((quickstart.run_dir / "manifest.json").read_text())
    text, images = execute("quickstart.ipynb", tmp_path, timeout=900)
    assert "sufficiency" in text and "supervised" in text  # the headline table was shown
    assert "topk-1024@sites" in text  # both SAE sets of the quickstart
    assert images >= 2  # discovery heatmaps and report plots were displayed
    assert json.loads((quickstart.run_dir / "manifest.json").read_text()) == before


def test_sweep_notebook_executes_from_the_quickstart_run(quickstart, tmp_path, monkeypatch):
    """Two few-step SAEs (k = 4 and 32) swept from a copy of the quickstart's run: its
    task, discovery and ceiling are read back, not computed again; only the sweep's SAEs
    are trained and scored."""
    import json

    monkeypatch.setenv("SAGE_NB_SMALL", "1")
    monkeypatch.setenv("SAGE_NB_RUN_DIR", str(quickstart.run_dir))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the notebook copies the run
    text, images = execute("sweep.ipynb", tmp_path, timeout=1800)
    assert "topk-256-k4" in text and "topk-256-k32" in text and "sufficiency" in text
    assert "topk-1024" not in text.replace("topk-1024@sites", "")  # the sweep's SAEs only
    assert images >= 5  # four metrics against L0 and the controllability figure
    (sweep,) = tmp_path.glob("*/sweep")
    mine, theirs = (json.loads((d / "manifest.json").read_text())
                    for d in (sweep, quickstart.run_dir))
    assert [mine[s] for s in ("task", "discovery")] == [theirs[s] for s in ("task", "discovery")]
    index = lambda d: json.loads((d / "evaluation" / "index.json").read_text())  # noqa: E731
    shared = "evaluation/shared.nc"
    assert index(sweep)[shared] == index(quickstart.run_dir)[shared]  # the ceiling, read back
