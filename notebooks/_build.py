"""What the ``make_*.py`` notebook scripts share: write the notebook, executed with
``--execute`` (from the repository root, keeping the outputs) or as source only."""

import argparse
import time
from pathlib import Path

import nbformat as nbf


def write(cells: list, name: str, *, timeout: int = 3600, description: str = "") -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--execute", action="store_true",
                        help="execute it (from the repository root) and keep the outputs")
    args = parser.parse_args()
    nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    if args.execute:
        from nbclient import NotebookClient

        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(Path.cwd())}}).execute()
        print(f"executed in {time.perf_counter() - start:.0f} s")
    nbf.write(nb, Path(__file__).with_name(name))
