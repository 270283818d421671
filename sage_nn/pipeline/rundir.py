"""A run directory: its stages, the manifest that records them, and resuming.

Each stage writes its output into the run directory and records it in ``manifest.json``
with a SHA-256 of every file and a hash of the settings it depended on. A rerun skips a
stage whose record matches; a stage whose file is missing, corrupt or computed with other
settings is recomputed (and so is everything after it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common.io import sha256, write_atomic

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger("sage_nn")


MANIFEST = "manifest.json"


class RunDirectory:
    """A run directory with its manifest of finished stages."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / MANIFEST
        try:
            self.manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            self.manifest = {}
        except json.JSONDecodeError:
            log.warning("%s is corrupt: recomputing every stage", self.manifest_path)
            self.manifest = {}

    def done(self, stage: str, settings: str) -> bool:
        """Whether ``stage`` finished with these settings and its files are intact."""
        record = self.manifest.get(stage)
        if record is None or record["settings"] != settings:
            return False
        for name, digest in record["files"].items():
            path = self.path / name
            if not path.exists() or sha256(path) != digest:
                log.warning("stage %s: %s is missing or corrupt; recomputing", stage, name)
                return False
        return True

    def record(self, stage: str, settings: str, files: list[str], seconds: float) -> None:
        self.manifest[stage] = {"settings": settings, "seconds": round(seconds, 2),
                                "files": {f: sha256(self.path / f) for f in files}}
        write_atomic(self.manifest_path, json.dumps(self.manifest, indent=2))

    def forget_after(self, stage: str, order: list[str]) -> None:
        for later in order[order.index(stage) + 1:]:
            self.manifest.pop(later, None)


class Stage:
    """Run ``compute`` unless the run directory already holds its result. ``label`` names
    the run in each stage's line (a suite's tasks: ``stage task (ioi): 8.7 s``)."""

    def __init__(self, run: RunDirectory, order: list[str], label: str = ""):
        self.run, self.order = run, order
        self.label = f" ({label})" if label else ""
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, settings: str, files: list[str],
                 compute: Callable[[], None], load: Callable[[], Any]) -> Any:
        if self.run.done(name, settings):
            log.info("stage %s%s: cached", name, self.label)
            self.timings[name] = 0.0
            return load()
        self.run.forget_after(name, self.order)
        start = time.perf_counter()
        compute()
        seconds = time.perf_counter() - start
        self.run.record(name, settings, files, seconds)
        self.timings[name] = seconds
        log.info("stage %s%s: %.1f s", name, self.label, seconds)
        return load()


STAGES = ["task", "discovery", "saes", "evaluation", "report"]

#: A remote run's log of every request it sent (one JSON object a line, appended).
REQUESTS = "requests.jsonl"


def log_requests(root: Path, stage: str, requests: list, placements: list) -> None:
    """Append a stage's remote requests (:class:`~sage_nn.model.remote.Request`) and where
    its reads encoded each SAE to the run directory's request log, and say them in one
    line."""
    if not requests:
        return
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    lines = [json.dumps({"type": "request", "time": when, **dataclasses.asdict(r),
                         "stage": stage}) for r in requests]
    lines += [json.dumps({"type": "placement", "time": when, "stage": stage, **p})
              for p in placements]
    with open(root / REQUESTS, "a") as f:
        f.write("".join(line + "\n" for line in lines))
    kernels: dict[str, int] = {}
    for r in requests:
        kernels[r.kernel] = kernels.get(r.kernel, 0) + 1
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    where: dict[str, dict[str, list]] = {}  # placement -> SAE -> its layers
    for p in placements:
        layers = where.setdefault(p["placement"], {}).setdefault(p["sae"], [])
        layers += [] if f"L{p['layer']}" in layers else [f"L{p['layer']}"]
    log.info("remote %s: %d request%s (%s), %s up, %s down, %.1f s%s", stage, len(requests),
             "" if len(requests) == 1 else "s",
             ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kernels.items()),
             mb(sum(r.up for r in requests)), mb(sum(r.down for r in requests)),
             sum(r.seconds for r in requests),
             "".join(f"; SAEs encoded {w}: " + ", ".join(
                 f"{sae} ({' '.join(layers)})" for sae, layers in saes.items())
                     for w, saes in sorted(where.items())))


@dataclass
class RunResult:
    """What :func:`run` produced; every piece is also on disk under ``run_dir``."""

    run_dir: Path
    results: xr.Dataset | None  # None: stopped before the evaluation (``run(until=...)``)
    cross_sections: dict[str, list[str]]
    timings: dict[str, float]
    report: Path
