"""README.md's Python examples run, so they cannot rot.

Every ```python block is executed in order, in one namespace (later blocks use what earlier
ones made), in a fresh working directory, on the embedded SmolLM2 with the README's own
small settings. A block that cannot run offline or quickly (NDIF, a placeholder path, a long
job) says so right before it: ``<!-- skip-test: reason -->``. The test prints the blocks it
executed and skipped (``pytest -s``) and writes the list to ``readme_blocks.txt`` in its
working directory.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!--\s*skip-test:\s*(.+?)\s*-->")


def python_blocks(text: str) -> list[dict]:
    """Each ```python block: its first line number, code, and skip reason (or None)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(before)
            blocks.append({"line": start + 1, "code": "\n".join(lines[start:end]),
                           "skip": skip.group(1) if skip else None})
            i = end
        i += 1
    return blocks


def test_every_skip_marker_has_a_reason_and_precedes_a_block():
    text = README.read_text()
    markers = [m for m in re.finditer(r"<!--\s*skip-test\b.*?-->", text)]
    assert all(SKIP.fullmatch(m.group(0)) for m in markers), "skip-test: REASON"
    assert len(markers) == sum(b["skip"] is not None for b in python_blocks(text))


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import matplotlib
    matplotlib.use("Agg")  # the README's figures are drawn, not shown

    blocks = python_blocks(README.read_text())
    namespace: dict = {"__name__": "__readme__"}
    executed, skipped = [], []
    for block in blocks:
        first = block["code"].splitlines()[0]
        if block["skip"]:
            skipped.append(f"README.md:{block['line']} {first!r}: skipped ({block['skip']})")
            continue
        try:
            exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README.md block at line {block['line']} failed: "
                                 f"{type(err).__name__}: {err}") from err
        executed.append(f"README.md:{block['line']} {first!r}: executed")
    listing = "\n".join(executed + skipped)
    print("\n" + listing)
    (tmp_path / "readme_blocks.txt").write_text(listing + "\n")
    assert len(executed) >= 4, listing
