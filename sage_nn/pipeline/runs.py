"""Opening a finished run: ``sage_nn.open_run("runs/quickstart")``.

A run directory (written by :func:`sage_nn.pipeline.run` or ``sage run``) holds
``manifest.json`` (the finished stages), ``config.yaml``, ``task.json``, ``discovery/``,
``saes.json``, ``evaluation.nc`` and ``report/``. :func:`open_run` reads them back without
the model: the results Dataset, the cross-sections, the config, the discovery scores.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr

from ..common.io import read_netcdf
from .config import RunConfig
from .rundir import MANIFEST, STAGES


class NotARunError(FileNotFoundError):
    """A directory that does not hold a finished run; the message says what is missing."""


class Run:
    """A finished run, read from its directory. Everything loads on first access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = _finished_manifest(self.path)

    def __repr__(self) -> str:
        cfg = self.config
        return (f"Run({str(self.path)!r}: model {cfg.model}, task {cfg.task}, "
                f"attributes {list(self.cross_sections)}, "
                f"dictionaries {[str(d) for d in self.results.dictionary.values]})")

    @cached_property
    def results(self) -> xr.Dataset:
        """The evaluation (``evaluation.nc``): dims ``attribute, dictionary, k, pair``;
        ``pair`` also selects by ``site`` and ``position`` (``.sel(site="L9.z.h3")``)."""
        from ..evaluation.scoring import pair_coords

        return pair_coords(read_netcdf(self.path / "evaluation.nc"))

    @cached_property
    def config(self) -> RunConfig:
        """The run's :class:`~sage_nn.pipeline.RunConfig` (``config.yaml``)."""
        return RunConfig.from_file(self.path / "config.yaml")

    @cached_property
    def cross_sections(self) -> dict[str, list[str]]:
        """Per attribute, its cross-section as ``site@position`` names (``L9.z.h3@END``)."""
        table = pd.read_csv(self.path / "discovery" / "cross_sections.csv")
        return {str(a): [f"{s}@{p}" for s, p in zip(t.site, t.position)]
                for a, t in table.groupby("attribute", sort=False)}

    @cached_property
    def discovery(self):
        """What discovery found, as :class:`sage_nn.discovery.Discovery`: the attribution
        scores (``.scores``), the cross-section tables and their validation summaries."""
        from ..discovery.attribution import load_scores
        from ..discovery.stage import Discovery

        root = self.path / "discovery"
        table = pd.read_csv(root / "cross_sections.csv")
        tables = {str(a): t.drop(columns="attribute").reset_index(drop=True)
                  for a, t in table.groupby("attribute", sort=False)}
        summary = json.loads((root / "summary.json").read_text())
        return Discovery(load_scores(root / "scores.nc"), tables, summary)

    @cached_property
    def task(self) -> dict[str, Any]:
        """The task stage's summary (``task.json``): accuracy, logit differences, prompts."""
        return json.loads((self.path / "task.json").read_text())

    @cached_property
    def saes(self) -> dict[str, Any]:
        """Per SAE name: its spec, sites, approach and ``sae_cfg_dict`` (``saes.json``)."""
        return json.loads((self.path / "saes.json").read_text())

    @property
    def report_dir(self) -> Path:
        """The report: ``summary.md``/``.html``, plots, SAEBench JSON per SAE."""
        return self.path / "report"

    @property
    def timings(self) -> dict[str, float]:
        """Seconds each stage took when it was computed."""
        return {stage: float(record["seconds"]) for stage, record in self.manifest.items()}

    def headline(self) -> pd.DataFrame:
        """:func:`sage_nn.report.headline_table` of the results."""
        from ..report.tables import headline_table

        return headline_table(self.results)


def finished_stages(run_dir: str | Path, stages: tuple[str, ...] = STAGES) -> dict:
    """The manifest of a run directory whose ``stages`` finished with their files and
    ``config.yaml`` in place; else :class:`NotARunError` saying what is missing. Reads only:
    a script checks the run it needs with this before minutes of work."""
    return _finished_manifest(Path(run_dir), stages)


def _finished_manifest(path: Path, stages: tuple[str, ...] = STAGES) -> dict:
    """The manifest of a run whose ``stages`` finished with their files in place."""
    if not path.is_dir():
        raise NotARunError(f"{path} is not a directory: give the run_dir of a finished run "
                           "(sage run --run-dir DIR)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise NotARunError(f"{path} is not a sage_nn run directory (no {MANIFEST}); give the "
                           "run_dir of a finished run (sage run --run-dir DIR)") from None
    except json.JSONDecodeError:
        raise NotARunError(f"{path / MANIFEST} is corrupt: rerun `sage run --run-dir {path}` "
                           "to recompute the run") from None
    missing = [s for s in stages if s not in manifest]
    if missing:
        raise NotARunError(f"{path} is not a finished run: stage(s) {', '.join(missing)} did "
                           f"not finish (done: {', '.join(manifest) or 'none'}); rerun "
                           f"`sage run --config {path / 'config.yaml'}` to finish it")
    lost = [name for stage in stages for name in manifest[stage]["files"]
            if not (path / name).exists()]
    if lost or not (path / "config.yaml").exists():
        raise NotARunError(f"{path}: file(s) {', '.join(lost or ['config.yaml'])} of a "
                           "finished stage are missing; rerun `sage run` on this directory "
                           "to recompute them")
    return manifest


def open_run(run_dir: str | Path) -> Run:
    """Open a finished run directory; raise :class:`NotARunError` (saying what is missing)
    for anything else.

    >>> run = sage_nn.open_run("runs/quickstart")          # doctest: +SKIP
    >>> run.results.sufficiency.sel(attribute="io")         # the evaluation Dataset
    >>> run.cross_sections["io"]                            # ['L24.z.h3@END', ...]
    >>> run.config.n_eval, run.report_dir / "summary.md"
    """
    return Run(run_dir)
