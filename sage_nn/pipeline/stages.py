"""The end-to-end run: task -> discovery -> SAEs -> evaluation -> report.

:func:`run` checks every input once, up front (:func:`~.validate.check`: configs, files
and the tokenizer; nothing loads, nothing runs), opens the run (:func:`open_run_state`:
the model, the remote, the prompts and the sites the named SAEs serve), then runs
:data:`STEPS` in order. Each stage is a short function of the run (:class:`RunState`: the
config, the run directory, and what the earlier stages left): it names the settings its
output depends on and the files it writes, and the run directory's :class:`~.rundir.Stage`
runs it, or loads its output when the directory holds it for those settings. A rerun skips
such a stage; one whose file is missing, corrupt or computed with other settings is
recomputed (and so is everything after it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..common.io import jsonable, read_netcdf, write_atomic, write_dir
from ..dictionaries.serving import residual_sites_for
from .cache import evaluate_cached, evaluation_files
from .config import RunConfig, remote_of, run_prompts
from .rundir import STAGES, RunDirectory, RunResult, Stage, log_requests
from .specs import UnservableRunError, discovery_restriction, dropped_kinds_note

log = logging.getLogger("sage_nn")


@dataclass
class RunState:
    """A run in progress: what the checks and the model load give every stage (the config,
    the run directory, the model, where it runs, the prompts, what the SAEs serve) and what
    each stage leaves for the later ones."""

    config: RunConfig
    directory: RunDirectory
    stage: Stage
    model: Any
    remote: Any  # a Remote that sends requests, or None: the model runs here
    progress: bool
    resolved: dict | None  # SAEs got, shared by the runs of a suite
    restriction: tuple | None  # (layers, kinds) the named SAEs serve, or None: anywhere
    full: Any
    fit: Any
    held_out: Any
    task_summary: dict | None = None
    cross_sections: dict = field(default_factory=dict)  # attribute -> [(Site, position)]
    saes: dict = field(default_factory=dict)  # name -> coder
    results: Any = None

    @property
    def root(self) -> Path:
        return self.directory.path

    @property
    def attributes(self) -> list[str]:
        return self.config.attributes or self.fit.attribute_names

    @property
    def pairs(self) -> list[tuple]:
        """Every (site, position) of every cross-section."""
        return [p for pairs in self.cross_sections.values() for p in pairs]

    def sent(self, name: str, compute: Callable[[], None]) -> Callable[[], None]:
        """``compute`` with its remote requests labelled ``name`` and logged in the run
        directory (:data:`~sage_nn.pipeline.rundir.REQUESTS`), one line said."""
        if self.remote is None:
            return compute
        remote = self.remote

        def logged():
            remote.stage, first, placed = name, len(remote.requests), len(remote.placements)
            try:
                compute()
            finally:
                log_requests(self.root, name, remote.requests[first:],
                             remote.placements[placed:])
        return logged

    def result(self) -> RunResult:
        return RunResult(self.root, self.results,
                         {a: [f"{s}@{p}" for s, p in pairs]
                          for a, pairs in self.cross_sections.items()},
                         self.stage.timings, self.root / "report")


def run(config: RunConfig | None = None, *, progress: bool = True, model: Any = None,
        remote: Any = None, until: str | None = None,
        resolved: dict | None = None) -> RunResult:
    """Build the task, discover cross-sections, get SAEs, evaluate, report; resumable.

    ``remote`` (a :class:`sage_nn.model.remote.Remote`) overrides the config's remote
    settings. ``until``: stop after this stage (``"task"`` or ``"discovery"``; the result
    has no ``results`` then), as a suite does to check a task before its SAEs are got.
    ``resolved``: a dict the SAEs got are kept in, by spec and sites, and taken from: runs
    sharing it (a suite's tasks) load each given or released SAE once."""
    if until not in (None, "task", "discovery"):
        raise ValueError(f"until={until!r}: give 'task' or 'discovery' (or None: every stage)")
    from .validate import check

    config = config or RunConfig()
    check(config, model=model)  # every input, once, before anything loads or runs (seconds)
    state = open_run_state(config, model=model, remote=remote, progress=progress,
                           resolved=resolved)
    for name, step in STEPS.items():
        step(state)
        if name == until:
            break
    return state.result()


def open_run_state(config: RunConfig, *, model: Any = None, remote: Any = None,
                   progress: bool = True, resolved: dict | None = None) -> RunState:
    """The run directory (with ``config.yaml``), the model (loaded unless given), the remote
    its passes go through, what the named SAEs serve, and the task's prompts."""
    # the heavy imports here, after the checks, so a refused run does not wait for them;
    # they import sae_lens (dictionaries.saes), as it must be, before the model is traced
    from ..model.loading import load_model
    from ..model.remote import as_remote

    directory = RunDirectory(config.run_dir)
    write_atomic(directory.path / "config.yaml",
                 yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    if remote is None and config.remote:
        remote = remote_of(config, jobs=None if config.remote_blocking
                           else directory.path / "remote_jobs.json")
    remote = as_remote(remote) if remote is not None else None
    model = model or load_model(config.model, device=config.device, dtype=config.dtype,
                                remote=config.remote not in (False, "local"))
    full, fit, held_out = run_prompts(model, config)
    return RunState(config, directory, Stage(directory, STAGES, label=_label(config)), model,
                    remote if remote is not None and remote.is_remote else None, progress,
                    resolved, served_restriction(config, model), full, fit, held_out)


def _label(config: RunConfig) -> str:
    """What the stage lines name: the run's task (a suite runs several)."""
    from ..tasks.datasets import load_task

    return load_task(config.task).name


# -- the stages, in order ---------------------------------------------------------------


def task(run: RunState) -> None:
    """The held-out prompts' logit differences: the model does the task (``task.json``)."""
    from ..tasks.datasets import load_task, logit_diffs
    from ..tasks.gates import task_problems

    config, root = run.config, run.root

    def compute():
        ld = logit_diffs(run.model, run.held_out, config.batch_size,
                         remote=run.remote).to_pandas()
        summary = {"task": load_task(config.task).name, "n_fit": len(run.fit),
                   "n_eval": len(run.held_out), "accuracy": float((ld["clean"] > 0).mean()),
                   "mean_logit_diff": ld.mean().to_dict(), "prompts": run.full.prompts}
        write_atomic(root / "task.json", json.dumps(summary, indent=2, default=jsonable))

    def load():
        stored = json.loads((root / "task.json").read_text())
        if stored["prompts"] != run.full.prompts:
            raise RuntimeError("the task built different prompts than the stored run: the "
                               "task spec or tokenizer changed; use a new run directory")
        return stored

    run.task_summary = run.stage("task", config.hash("model", "task", "seed", "n_fit",
                                                     "n_eval"),
                                 ["task.json"], run.sent("task", compute), load)
    for problem in task_problems(run.task_summary):  # what a suite would gate the task out for
        log.warning("task %s: %s; its numbers are kept, read them with care (a suite would "
                    "gate it out)", run.task_summary["task"], problem)


def discovery(run: RunState) -> None:
    """Each attribute's cross-section (``discovery/``), in the sites the SAEs serve."""
    import pandas as pd

    from ..discovery.stage import discover
    from ..model.sites import Site

    config, out = run.config, run.root / "discovery"

    def compute():
        prompts = run.fit.subset(np.arange(min(config.n_discovery, len(run.fit))))
        settings = discovery_settings(config, run.attributes, run.restriction)
        write_dir(out, lambda d: discover(run.model, prompts, settings, out_dir=d,
                                          progress=run.progress, remote=run.remote))

    def load():
        table = pd.read_csv(out / "cross_sections.csv")
        return {a: [(Site.parse(s), str(p)) for s, p in zip(t.site, t.position)]
                for a, t in table.groupby("attribute", sort=False)}

    settings = config.hash("model", "task", "seed", "n_fit", "n_eval", "n_discovery",
                           "attributes", "discovery_kinds", "select_kinds", "target",
                           "max_sites", "top_k") + \
        (f",{run.restriction}" if run.restriction else "")
    run.cross_sections = run.stage(
        "discovery", settings, ["discovery/scores.nc", "discovery/cross_sections.csv",
                                "discovery/summary.json"],
        run.sent("discovery", compute), load)


def saes(run: RunState) -> None:
    """The SAEs: trained where the cross-sections need them (cached by their corpus) or
    loaded (``saes.json``)."""
    from ..dictionaries.corpus import corpus_hash
    from ..model.sites import adapter
    from .resolve import TRAINED_K_HEADS, run_saes, sae_corpus

    config, root = run.config, run.root
    needed = residual_sites_for(run.pairs, adapter(run.model).parallel, config.reconstruction)

    def compute():
        run.saes, listing = run_saes(config, run.model, needed, run.pairs, run.progress,
                                     run.resolved)
        write_atomic(root / "saes.json", json.dumps(listing, indent=2))

    def load():
        if not run.saes:  # the stage was cached: resolving only reads the SAEs it trained
            run.saes = run_saes(config, run.model, needed, run.pairs, run.progress,
                                run.resolved)[0]

    settings = config.hash("model", "saes", "sae_width", "sae_steps", "sae_corpus",
                           "sae_task_prompts", "seed", "reconstruction")
    run.stage("saes", f"{settings},kh{TRAINED_K_HEADS},"
              f"{corpus_hash(sae_corpus(run.model, config))},{','.join(needed)}",
              ["saes.json"], compute, load)


def evaluation(run: RunState) -> None:
    """Every SAE, its floor and the ceiling scored at the cross-sections
    (``evaluation.nc``; cached per SAE under ``evaluation/``: :func:`~.cache.evaluate_cached`)."""
    from ..evaluation.coders import CrossSection
    from ..evaluation.scoring import EVALUATION_VERSION, evaluate_cross_section, pair_coords
    from ..report.tables import excluded, roles
    from ..report.verdicts import sae_flags

    config, root = run.config, run.root
    shared = config.hash("model", "task", "seed", "n_fit", "n_eval", "n_discovery",
                         "attributes", "discovery_kinds", "select_kinds", "target",
                         "max_sites", "top_k", "ks", "n_boot", "remote_transport")
    # the ceilings every SAE shares: a residual SAE through the reconstruction needs the
    # path ceiling, and the control seeds are every SAE's
    reconstructed = any(getattr(coder, "mode", None) is not None for coder in run.saes.values())
    shared += f",controls{config.control_seeds},path{reconstructed}"
    shared += f",v{EVALUATION_VERSION}," + hashlib.sha256(json.dumps(
        run.result().cross_sections, sort_keys=True).encode()).hexdigest()[:16]

    def evaluate(saes: dict, ceiling: bool):
        return evaluate_cross_section(
            run.model, run.fit, run.held_out,
            [CrossSection(a, pairs) for a, pairs in run.cross_sections.items()], saes,
            ks=config.ks, n_boot=config.n_boot, seed=config.seed,
            batch_size=config.batch_size, remote=run.remote, ceiling=ceiling,
            control_seeds=config.control_seeds)

    run.results = run.stage(
        "evaluation", shared + "," + run.directory.manifest["saes"]["settings"],
        ["evaluation.nc", *evaluation_files(run.saes)],
        run.sent("evaluation", lambda: evaluate_cached(root, shared, run.saes, evaluate,
                                                      config.target)),
        lambda: pair_coords(read_netcdf(root / "evaluation.nc")))
    for attribute in (str(a) for a in run.results.attribute.values):  # numbers, no claims
        reason = excluded(run.results, attribute)
        if reason:
            log.warning("attribute %s: kept out of claims: %s", attribute, reason)
    for sae in roles(run.results).saes:
        for flag in sae_flags(run.results, sae):
            log.warning("SAE %s: %s", sae, flag)


def report(run: RunState) -> None:
    """The report (``report/``): tables, plots, the summary, one SAEBench JSON per SAE."""
    from ..report import write_report

    config, root = run.config, run.root

    def compute():
        listing = json.loads((root / "saes.json").read_text())
        summary = {k: v for k, v in run.task_summary.items() if k != "prompts"}
        write_dir(root / "report", lambda out: write_report(
            run.results, out, discovery_dir=root / "discovery", sae_info=listing,
            config={**dataclasses.asdict(config), "task_summary": summary},
            timings=run.stage.timings))

    run.stage("report", run.directory.manifest["evaluation"]["files"]["evaluation.nc"],
              ["report/summary.md"], compute, lambda: None)


#: The stages of a run, in order (:func:`run` runs them).
STEPS: dict[str, Callable[[RunState], None]] = dict(zip(
    STAGES, (task, discovery, saes, evaluation, report)))


# -- what the stages share with a suite and a plan ------------------------------------


def served_restriction(config: RunConfig, model: Any) -> tuple[list[int], list[str]] | None:
    """:func:`discovery_restriction` for a loaded model (its layers, parallel blocks);
    nothing served is an :class:`~sage_nn.pipeline.validate.InvalidRunError`, before any
    forward. Kinds asked for that no SAE serves are dropped with a warning saying what
    would."""
    from ..model.sites import adapter
    from .validate import InvalidRunError

    ad = adapter(model)
    try:
        found = discovery_restriction(config, ad.n_layers, ad.parallel)
    except UnservableRunError as err:
        raise InvalidRunError([str(err)]) from None
    if found:
        log.info("discovery restricted to what the SAEs serve: layers %s, kinds %s", *found)
        note = dropped_kinds_note(config, found, ad.parallel)
        if note:
            log.warning("%s", note)
    return found


def discovery_settings(config: RunConfig, attributes: list[str], restriction) -> Any:
    """The run's :class:`~sage_nn.discovery.DiscoveryConfig`. The grid scores what a
    cross-section may hold unless asked for more (heatmaps of every kind cost the residual
    stream's exact sweep, which selection does not use), at every layer, so a report can
    say where an effect lies when the layers the SAEs serve miss it; the cross-sections
    stay in the served layers."""
    from ..discovery.stage import DiscoveryConfig

    layers, select = restriction or (None, config.select_kinds)
    return DiscoveryConfig(kinds=config.discovery_kinds or select or ["z"],
                           attributes=attributes, select_layers=layers, select_kinds=select,
                           target=config.target, max_sites=config.max_sites,
                           top_k=config.top_k, batch_size=config.batch_size)
