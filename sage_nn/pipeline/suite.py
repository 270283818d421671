"""A suite: several tasks on one model, the same SAEs, one score per SAE.

``run_suite`` (``sage suite``) runs each task's stages in its own run directory under the
suite directory (``<suite>/<task>/``, a normal resumable run that :func:`open_run` reads),
sharing what can be shared: one model load; the residual SAEs trained once, on a corpus
mixing every task's prompts with the built-in text (so they are nobody's task-specific
SAEs), from one activation stream for the sites every task needs; given and released SAEs
loaded once. Each task is checked on the model first (its accuracy and its attributes'
effects, then the ceiling's own checks per attribute after its evaluation); a task that
fails is listed with its reason and kept out of the score. The joined results go to
``suite.nc`` and ``suite.csv``, the score per SAE and the report to ``report/``;
:func:`open_suite` reads them back. A rerun with another task or SAE recomputes only what
is new: the SAE corpus stays the one recorded in ``suite.json`` (``corpus_tasks``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from ..common.io import jsonable, read_netcdf, write_atomic, write_netcdf
from ..tasks.gates import MIN_ACCURACY, MIN_CLEAN_LD, MIN_EFFECT, effects, task_gate  # noqa: F401
from .config import RunConfig

log = logging.getLogger("sage_nn")

#: the SAE corpus of a suite by default: the built-in text and every task's prompts
SUITE_CORPUS = "builtin+task@positions"
#: the cap on a suite's SAE training steps: the mixed corpus is larger than one task's, and
#: at a run's 300 four of the 13 residual SAEs of the SmolLM2 suite had not converged; at 600
#: all did, at 180-360 steps (each stops where its held-out FVU stops improving;
#: benchmarks/results/suite.json)
SUITE_SAE_STEPS = 600
#: what a suite's RunConfig has unless it says otherwise (``suite_config``)
SUITE_DEFAULTS = {"sae_corpus": SUITE_CORPUS, "sae_steps": SUITE_SAE_STEPS}
SUITE_FILE = "suite.json"


class NotASuiteError(FileNotFoundError):
    """A directory that does not hold a finished suite; the message says what is missing."""


def suite_config(**settings) -> RunConfig:
    """A suite's :class:`RunConfig`: ``settings`` over :data:`SUITE_DEFAULTS` over a run's."""
    return RunConfig(**{**SUITE_DEFAULTS, **settings})


def suite_tasks(tasks: list[str] | None = None) -> dict[str, str]:
    """``{name: task}`` of the suite's tasks: names in ``tasks/`` or YAML paths (default:
    every task in ``tasks/``), each loaded and checked; the name is the spec's own."""
    from ..tasks.datasets import available_tasks, load_task

    out: dict[str, str] = {}
    for task in list(tasks or available_tasks()):
        name = load_task(task).name  # a bad spec: its error, before anything loads
        if name in out:
            raise ValueError(f"tasks {out[name]!r} and {task!r} are both named {name!r}: "
                             "rename one (its name: field)")
        out[name] = str(task)
    if not out:
        raise ValueError("no tasks: give task names or YAML paths")
    return out


def _train_once(configs: dict[str, RunConfig], found: dict[str, dict], model: Any,
                progress: bool) -> None:
    """Train every SAE a ``train:`` spec needs at the sites of every task's cross-sections,
    from one activation stream per architecture (and width, k), so each task's run finds
    them in the SAE cache."""
    from ..dictionaries.serving import residual_sites_for
    from ..model.sites import Site, adapter
    from .resolve import resolve_saes
    from .specs import expand_sae_specs, train_group, trained_sites

    union: dict[tuple, list[str]] = {}
    for name, cross_sections in found.items():
        config = configs[name]
        pairs = [(Site.parse(s.split("@")[0]), s.split("@", 1)[1])
                 for sites in cross_sections.values() for s in sites]
        needed = residual_sites_for(pairs, adapter(model).parallel, config.reconstruction)
        for spec in expand_sae_specs(config.saes):
            if spec.startswith("train:"):
                union.setdefault(train_group(spec), []).extend(trained_sites(spec, needed, pairs))
    config = configs[next(iter(found))]  # every task's config gives the same corpus
    for (arch, options), sites in union.items():
        resolve_saes(f"train:{arch}" + "".join(f":{k}={v}" for k, v in options), model,
                     list(dict.fromkeys(sites)), config, progress)


def join_sae_info(info: dict, more: dict) -> dict:
    """One SAE's ``saes.json`` entry over two tasks: the hooks and the per-site training
    record of both (a suite's SAE set serves every task's sites; each run lists its own)."""
    cfg, extra = info.get("sae_cfg_dict") or {}, more.get("sae_cfg_dict") or {}
    hooks = cfg.get("hook_name")
    if isinstance(hooks, list):
        hooks = list(dict.fromkeys(hooks + list(extra.get("hook_name") or [])))
    training = dict(cfg.get("training") or {})
    for key, value in (extra.get("training") or {}).items():
        if isinstance(value, dict) and isinstance(training.get(key), dict):
            training[key] = {**training[key], **value}  # per site
    return {**info, "sae_cfg_dict": {**cfg, "hook_name": hooks, "training": training}}


def run_suite(config: RunConfig | None = None, tasks: list[str] | None = None,
              suite_dir: str | Path | None = None, *, model: Any = None,
              progress: bool = True, corpus_tasks: list[str] | None = None,
              min_accuracy: float = MIN_ACCURACY, min_effect: float = MIN_EFFECT) -> Suite:
    """Run ``tasks`` (default: every task in ``tasks/``; names or YAML paths) with the SAEs
    and settings of ``config`` (its ``task`` and ``run_dir`` are replaced per task; default
    ``suite_config()``) under ``suite_dir`` (default ``config.run_dir``);
    resumable. ``corpus_tasks``: the tasks whose prompts the SAE corpus mixes (default: the
    ones ``suite.json`` recorded, else every task). Returns the :class:`Suite`."""
    from ..model.loading import load_model
    from ..report.suite import suite_dataset, suite_table, write_suite_report
    from .stages import run
    from .validate import InvalidRunError, task_problems, validate

    config = config or suite_config()
    root = Path(suite_dir or config.run_dir)
    named = suite_tasks(tasks)
    try:
        record = json.loads((root / SUITE_FILE).read_text())
    except (OSError, ValueError):
        record = {}
    start = time.perf_counter()
    first = dataclasses.replace(config, task=next(iter(named.values())),
                                run_dir=str(root / next(iter(named))))
    problems = validate(first, model=model, task=False)  # all but the tasks, before loading
    if problems:
        raise InvalidRunError(problems)
    timings = {}
    model = model or load_model(config.model, device=config.device, dtype=config.dtype,
                                remote=config.remote not in (False, "local"))
    timings["model load"] = time.perf_counter() - start
    status: dict[str, dict] = {}
    for name, task in named.items():  # 0. a task that cannot be built for this model
        alone = dataclasses.replace(config, task=task, corpus_tasks=[task])
        problems = task_problems(alone, getattr(model, "tokenizer", None))
        if problems:
            status[name] = {"task": task, "accuracy": None, "effects": {}, "in_corpus": False,
                            "gate": "cannot be built for this model: " + "; ".join(problems)}
            log.warning("suite: task %s gated out: %s", name, status[name]["gate"])
    corpus = list(corpus_tasks or record.get("corpus_tasks")
                  or [t for n, t in named.items() if n not in status])
    configs = {name: dataclasses.replace(config, task=task, run_dir=str(root / name),
                                         corpus_tasks=corpus)
               for name, task in named.items() if name not in status}

    def timed(part: str, cfg: RunConfig, **kwargs):
        """``run(cfg, **kwargs)`` on the suite's model, its seconds added to ``part``."""
        begin = time.perf_counter()
        out = run(cfg, model=model, progress=progress, **kwargs)
        timings[part] = timings.get(part, 0.0) + time.perf_counter() - begin
        return out

    for name, cfg in configs.items():  # 1. can the model do the task?
        timed("task checks", cfg, until="task")
        summary = json.loads((root / name / "task.json").read_text())
        status[name] = {"task": cfg.task, "accuracy": summary["accuracy"],
                        "effects": effects(summary),
                        "gate": task_gate(summary, min_accuracy, min_effect),
                        "in_corpus": cfg.task in corpus}
        if status[name]["gate"]:
            log.warning("suite: task %s gated out: %s", name, status[name]["gate"])
    passing = [name for name in configs if not status[name]["gate"]]
    found = {name: timed("discovery", configs[name], until="discovery").cross_sections
             for name in passing}
    if passing:  # 2. the SAEs every task needs, trained once
        begin = time.perf_counter()
        _train_once(configs, found, model, progress)
        timings["SAE training (shared)"] = time.perf_counter() - begin
    resolved: dict = {}  # given and released SAEs loaded once for every task
    results, sae_info = {}, {}
    for name in passing:  # 3. evaluation and each task's report
        done = timed("evaluation and reports", configs[name], resolved=resolved)
        results[name] = done.results
        for sae, info in json.loads((root / name / "saes.json").read_text()).items():
            sae_info[sae] = join_sae_info(sae_info[sae], info) if sae in sae_info else info
    ds = suite_dataset(results, sae_info, {n: s["gate"] for n, s in status.items() if s["gate"]})
    for name, task in status.items():  # the gate after the ceiling's checks, recorded too
        task["gate"] = str(ds.gate_reason.sel(task=name).values) or None
    write_netcdf(ds, root / "suite.nc")
    write_atomic(root / "suite.csv", suite_table(ds).to_csv(index=False))
    timings["total"] = time.perf_counter() - start
    write_suite_report(ds, root / "report", tasks=status, sae_info=sae_info,
                       n_boot=config.n_boot, seed=config.seed, timings=timings,
                       config={"model": config.model, "saes": config.saes,
                               "sae_corpus": config.sae_corpus, "corpus_tasks": corpus})
    write_atomic(root / SUITE_FILE, json.dumps(jsonable({
        "tasks": status, "corpus_tasks": corpus, "config": dataclasses.asdict(config),
        "timings": timings}), indent=2))
    not_in = [n for n, s in status.items() if not s["in_corpus"]]
    if not_in:
        log.info("suite: tasks %s joined after the SAEs' corpus was recorded; their prompts "
                 "are not in it (pass corpus_tasks to train on every task)", ", ".join(not_in))
    return open_suite(root)


class Suite:
    """A finished suite, read from its directory. Everything loads on first access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        missing = [f for f in (SUITE_FILE, "suite.nc", "report/aggregate.csv")
                   if not (self.path / f).exists()]
        if missing:
            raise NotASuiteError(f"{self.path} is not a finished suite (no {', '.join(missing)}); "
                                 "run `sage suite --run-dir DIR` to make or finish it")
        self.record = json.loads((self.path / SUITE_FILE).read_text())

    def __repr__(self) -> str:
        return (f"Suite({str(self.path)!r}: tasks {list(self.record['tasks'])}, "
                f"SAEs {list(self.aggregate.index)})")

    @cached_property
    def results(self):
        """The joined results (``suite.nc``): dims ``sae, task, attribute, metric``."""
        return read_netcdf(self.path / "suite.nc")

    @cached_property
    def aggregate(self):
        """Per SAE: the score (higher is better), its 95% interval, per metric gap closed."""
        import pandas as pd

        return pd.read_csv(self.path / "report" / "aggregate.csv", index_col="sae")

    @cached_property
    def agreement(self):
        """Per task: Spearman of its SAE ranking with the other tasks' aggregate."""
        import pandas as pd

        return pd.read_csv(self.path / "report" / "agreement.csv", index_col="task")

    @property
    def tasks(self):
        """Per task: accuracy, effects, and why it was gated out (None: evaluated)."""
        import pandas as pd

        frame = pd.DataFrame.from_dict(self.record["tasks"], orient="index").astype(object)
        return frame.where(frame.notna(), None)

    @cached_property
    def runs(self) -> dict:
        """Each evaluated task's run (:class:`~sage_nn.pipeline.runs.Run`)."""
        from .runs import open_run

        return {name: open_run(self.path / name) for name, s in self.record["tasks"].items()
                if (self.path / name / "evaluation.nc").exists() and not s.get("gate")}

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.record.get("timings", {}))


def open_suite(suite_dir: str | Path) -> Suite:
    """Open a finished suite directory (``sage suite``); :class:`NotASuiteError` saying
    what is missing for anything else.

    >>> suite = sage_nn.open_suite("runs/suite")            # doctest: +SKIP
    >>> suite.aggregate.score                               # per SAE, higher is better
    >>> suite.results.gap_closed.sel(task="ioi", metric="edit")
    """
    return Suite(suite_dir)
