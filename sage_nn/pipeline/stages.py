"""The end-to-end run: task -> discovery -> ground truth -> SAEs -> evaluation -> report.

Each stage writes its output into the run directory and records it in ``manifest.json``
with a SHA-256 of every file and a hash of the settings it depended on. A rerun skips a
stage whose record matches; a stage whose file is missing, corrupt or computed with other
settings is recomputed (and so is everything after it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from ..common.io import (
    jsonable,
    read_netcdf,
    sha256,
    write_atomic,
    write_dir,
    write_netcdf,
)
from ..dictionaries.serving import residual_sites_for
from .cache import (
    SHARED_EVALUATION,
    evaluation_file,
    evaluation_part,
    merge_evaluation,
    sae_fingerprint,
    with_discovery,
)
from .config import RunConfig, run_prompts
from .resolve import (
    TRAINED_K_HEADS,
    release_ids,
    resolve_saes,
    sae_corpus,
    sae_site,
    saes_for_all_layers,
    saved_record,
    trained_cache,
    trained_record,
)
from .rundir import STAGES, RunDirectory, RunResult, Stage, log_requests
from .specs import (
    UnservableRunError,
    at_sites,
    discovery_restriction,
    dropped_kinds_note,
    expand_sae_specs,
    train_group,
    train_options,
    train_spec,
    trained_sites,
)

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    pass

log = logging.getLogger("sage_nn")


# -- the run ----------------------------------------------------------------------------


def served_restriction(config: RunConfig, model: Any) -> tuple[list[int], list[str]] | None:
    """:func:`discovery_restriction` for a loaded model (its layers, parallel blocks);
    nothing served is an :class:`~sage_nn.validate.InvalidRunError`, before any forward.
    Kinds asked for that no SAE serves are dropped with a warning saying what would."""
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


def coder_for(members: list, at_sites: bool, config: RunConfig) -> Any:
    """How one ``--sae``'s SAEs are evaluated: transcoders at the MLP output they write
    (:class:`~sage_nn.evaluation.coders.Transcoders`), SAEs trained at the cross-section
    sites or all at sublayer sites at those sites (``DirectSAE``), residual SAEs through the
    reconstruction (``ReconstructedSAE``). A mix of transcoders and SAEs is refused."""
    from ..evaluation.coders import DirectSAE, ReconstructedSAE, Transcoders
    from ..model.sites import RESID_KINDS

    transcoders = [s.transcoder for s in members]
    if any(transcoders):
        if not all(transcoders):
            raise ValueError(f"one --sae mixes transcoders and SAEs ({members[0]!r}, ...): "
                             "give transcoders and SAEs as separate --sae values")
        return Transcoders(members)
    if at_sites or all(s.kind not in RESID_KINDS for s in members):
        return DirectSAE(members)
    return ReconstructedSAE(members, batch_size=config.batch_size, mode=config.reconstruction)


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


def run(config: RunConfig | None = None, *, progress: bool = True, model: Any = None,
        remote: Any = None, until: str | None = None,
        resolved: dict | None = None) -> RunResult:
    """Build the task, discover cross-sections, get SAEs, evaluate, report; resumable.

    ``remote`` (a :class:`sage_nn.remote.Remote`) overrides the config's remote settings.
    ``until``: stop after this stage (``"task"`` or ``"discovery"``; the result has no
    ``results`` then), as a suite does to check a task before its SAEs are got.
    ``resolved``: a dict the SAEs got are kept in, by spec and sites, and taken from: runs
    sharing it (a suite's tasks) load each given or released SAE once."""
    if until not in (None, "task", "discovery"):
        raise ValueError(f"until={until!r}: give 'task' or 'discovery' (or None: every stage)")
    from .validate import check

    config = config or RunConfig()
    check(config, model=model)  # every input, before anything loads or runs (seconds)

    # the heavy imports after the check, so a refused run does not wait for them; they
    # import sae_lens (sage_nn.saes), as it must be, before the model is built or traced
    import pandas as pd

    from ..dictionaries.corpus import corpus_hash
    from ..discovery.stage import discover
    from ..evaluation.coders import CrossSection
    from ..evaluation.scoring import (
        EVALUATION_VERSION,
        evaluate_cross_section,
        pair_coords,
    )
    from ..model.loading import load_model
    from ..model.remote import Remote, as_remote
    from ..model.sites import Site, adapter
    from ..report import write_report
    from ..report.saebench import sae_cfg_dict
    from ..tasks.datasets import load_task, logit_diffs
    on_server = config.remote not in (False, "local")  # the model's weights are not here
    run_dir = RunDirectory(config.run_dir)
    stage = Stage(run_dir, STAGES)
    root = run_dir.path
    write_atomic(root / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))

    if remote is None and config.remote:
        remote = Remote(config.remote, max_prompts=config.max_prompts_per_request,
                        blocking=config.remote_blocking, transport=config.remote_transport,
                        placement=config.remote_placement,
                        jobs=None if config.remote_blocking else root / "remote_jobs.json")
    remote = as_remote(remote) if remote is not None else None
    remote = remote if remote is not None and remote.is_remote else None

    def sent(name: str, compute):
        """``compute`` with its remote requests labelled ``name`` and logged in the run
        directory (:data:`~sage_nn.pipeline.rundir.REQUESTS`), one line said."""
        if remote is None:
            return compute

        def logged():
            remote.stage, first, placed = name, len(remote.requests), len(remote.placements)
            try:
                compute()
            finally:
                log_requests(root, name, remote.requests[first:],
                             remote.placements[placed:])
        return logged

    model = model or load_model(config.model, device=config.device, dtype=config.dtype,
                                remote=on_server)
    restriction = served_restriction(config, model)  # what the named SAEs serve, first
    spec = load_task(config.task)
    full, fit, held_out = run_prompts(model, config)
    attributes = config.attributes or fit.attribute_names

    def task_stage():
        ld = logit_diffs(model, held_out, config.batch_size, remote=remote).to_pandas()
        summary = {"task": spec.name, "n_fit": len(fit), "n_eval": len(held_out),
                   "accuracy": float((ld["clean"] > 0).mean()),
                   "mean_logit_diff": ld.mean().to_dict(), "prompts": full.prompts}
        write_atomic(root / "task.json", json.dumps(summary, indent=2, default=jsonable))

    def task_load():
        stored = json.loads((root / "task.json").read_text())
        if stored["prompts"] != full.prompts:
            raise RuntimeError("the task built different prompts than the stored run: the "
                               "task spec or tokenizer changed; use a new run directory")
        return stored

    task_summary = stage("task", config.hash("model", "task", "seed", "n_fit", "n_eval"),
                         ["task.json"], sent("task", task_stage), task_load)
    from ..tasks.gates import task_problems

    for problem in task_problems(task_summary):  # what a suite would gate the task out for
        log.warning("task %s: %s; its numbers are kept, read them with care (a suite would "
                    "gate it out)", spec.name, problem)
    if until == "task":
        return RunResult(root, None, {}, stage.timings, root / "report")

    disc_dir = root / "discovery"
    disc_files = ["discovery/scores.nc", "discovery/cross_sections.csv", "discovery/summary.json"]

    def discovery_stage():
        prompts = fit.subset(np.arange(min(config.n_discovery, len(fit))))
        settings = discovery_settings(config, attributes, restriction)
        write_dir(disc_dir, lambda out: discover(model, prompts, settings, out_dir=out,
                                                 progress=progress, remote=remote))

    def discovery_load():
        table = pd.read_csv(disc_dir / "cross_sections.csv")
        return {a: [(Site.parse(s), str(p)) for s, p in zip(t.site, t.position)]
                for a, t in table.groupby("attribute", sort=False)}

    pairs_by_attr = stage("discovery", config.hash("model", "task", "seed", "n_fit", "n_eval",
                                                   "n_discovery", "attributes",
                                                   "discovery_kinds", "select_kinds",
                                                   "target", "max_sites", "top_k")
                          + (f",{restriction}" if restriction else ""),
                          disc_files, sent("discovery", discovery_stage), discovery_load)
    if until == "discovery":
        return RunResult(root, None, {a: [f"{s}@{p}" for s, p in pairs]
                                      for a, pairs in pairs_by_attr.items()},
                         stage.timings, root / "report")
    all_pairs = [p for pairs in pairs_by_attr.values() for p in pairs]
    needed = residual_sites_for(all_pairs, adapter(model).parallel, config.reconstruction)

    saes: dict[str, Any] = {}
    sae_specs = expand_sae_specs(config.saes)  # a sweep or a folder: each of its SAEs

    def resolve(spec_: str, sites: list[str]) -> tuple[str, list]:
        """:func:`resolve_saes`, kept in ``resolved``: a directory's SAEs do not depend on
        the sites, a release glob's and trained ones do."""
        if resolved is None:
            return resolve_saes(spec_, model, sites, config, progress)
        key = (spec_, *(sites if spec_.startswith("train:") or not Path(spec_).exists()
                        else ()))
        if key not in resolved:
            resolved[key] = resolve_saes(spec_, model, sites, config, progress)
        return resolved[key]

    def resolve_all() -> dict:  # trains what the SAE cache lacks, loads the rest
        # one activation stream trains every SAE an architecture (and width, k) needs
        union: dict[tuple, list[str]] = {}
        for spec_ in sae_specs:
            if spec_.startswith("train:"):
                union.setdefault(train_group(spec_), []).extend(
                    trained_sites(spec_, needed, all_pairs))
        for (arch, options), sites in union.items():
            resolve(f"train:{arch}" + "".join(f":{k}={v}" for k, v in options),
                    list(dict.fromkeys(sites)))
        listing = {}
        for spec_ in sae_specs:
            name, members = resolve(spec_, trained_sites(spec_, needed, all_pairs))
            if name in saes:
                raise ValueError(f"two --sae values are both named {name!r} (the second is "
                                 f"{spec_!r}); rename one SAE directory")
            saes[name] = coder_for(members, at_sites(spec_), config)
            training = None
            if spec_.startswith("train:"):  # what the trainer recorded next to the SAEs
                root_ = trained_cache(train_spec(spec_)[0], model, config,
                                       train_options(spec_))[3]
                training = trained_record(root_, trained_sites(spec_, needed, all_pairs))
            elif Path(spec_).is_dir():  # SAEs train_saes wrote carry their record along
                training = saved_record(Path(spec_), members)
            listing[name] = {"spec": spec_, "sites": [sae_site(s, spec_) for s in members],
                             "approach": saes[name].kind,
                             "n_saes": len(members),
                             "n_saes_all_layers": saes_for_all_layers(model, members),
                             "sae_cfg_dict": sae_cfg_dict(
                                 members, model_name=str(model.config._name_or_path),
                                 training=training)}
            if ":" in spec_ and not spec_.startswith("train:") and not Path(spec_).exists():
                listing[name]["sae_lens_ids"] = release_ids(spec_, members)
        return listing

    def saes_stage():
        write_atomic(root / "saes.json", json.dumps(resolve_all(), indent=2))

    def saes_load():
        if not saes:  # the stage was cached: resolving only reads the SAEs it trained
            resolve_all()

    sae_settings = config.hash("model", "saes", "sae_width", "sae_steps", "sae_corpus",
                               "sae_task_prompts", "seed", "reconstruction")
    sae_settings = (f"{sae_settings},kh{TRAINED_K_HEADS},{corpus_hash(sae_corpus(model, config))},"
                    f"{','.join(needed)}")
    stage("saes", sae_settings, ["saes.json"], saes_stage, saes_load)

    # The evaluation is cached per SAE: evaluation/shared.nc holds the supervised ceiling
    # and what every SAE shares (clean, mean, counterfactual runs: edit baseline, ground
    # truth); evaluation/<SAE>.nc each SAE and its floor, keyed by the SAE's weights and the
    # settings it was scored under (evaluation/index.json). A rerun with another list of
    # SAEs scores only the SAEs it has no file for (all of them in one batched evaluation),
    # and evaluation.nc merges the run's SAEs in their order: a removed SAE is left out.
    eval_settings = config.hash("model", "task", "seed", "n_fit", "n_eval", "n_discovery",
                                "attributes", "discovery_kinds", "select_kinds", "target",
                                "max_sites", "top_k", "ks", "n_boot", "remote_transport")
    # the ceilings shared by every SAE: a residual SAE through the reconstruction needs the
    # path ceiling, and the control seeds are every SAE's
    reconstructed = sorted(name for name, coder in saes.items()
                           if getattr(coder, "mode", None) is not None)
    eval_settings += f",controls{config.control_seeds},path{bool(reconstructed)}"
    eval_settings += f",v{EVALUATION_VERSION}," + hashlib.sha256(json.dumps(
        {a: [f"{s}@{p}" for s, p in pairs] for a, pairs in pairs_by_attr.items()},
        sort_keys=True).encode()).hexdigest()[:16]
    sae_keys = {name: f"{eval_settings},{sae_fingerprint(coder)}" for name, coder in saes.items()}
    eval_files = {SHARED_EVALUATION: f"evaluation/{SHARED_EVALUATION}.nc",
                  **{name: evaluation_file(name) for name in saes}}

    def evaluation_stage():
        (root / "evaluation").mkdir(exist_ok=True)
        index_path = root / "evaluation" / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}

        def fresh(name: str, key: str) -> bool:
            record, path = index.get(eval_files[name]), root / eval_files[name]
            return bool(record) and record["key"] == key and path.exists() and \
                sha256(path) == record["sha256"]

        shared_missing = not fresh(SHARED_EVALUATION, eval_settings)
        missing = [name for name in saes if not fresh(name, sae_keys[name])]
        if shared_missing:  # the path ceiling is read with the residual SAEs' own rows
            missing = list(saes)
        log.info("evaluation: %s%d of %d SAEs to score", "ceiling and " if shared_missing
                 else "", len(missing), len(saes))
        if shared_missing or missing:
            results = evaluate_cross_section(
                model, fit, held_out, [CrossSection(a, pairs)
                                       for a, pairs in pairs_by_attr.items()],
                {name: saes[name] for name in missing}, ks=config.ks, n_boot=config.n_boot,
                seed=config.seed, batch_size=config.batch_size, remote=remote,
                ceiling=shared_missing, control_seeds=config.control_seeds)
            scored = {SHARED_EVALUATION: (eval_settings, None)} if shared_missing else {}
            scored.update({name: (sae_keys[name], name) for name in missing})
            for name, (key, sae) in scored.items():
                write_netcdf(evaluation_part(results, sae), root / eval_files[name])
                index[eval_files[name]] = {"sae": sae, "key": key,
                                           "sha256": sha256(root / eval_files[name])}
                write_atomic(index_path, json.dumps(index, indent=2))
        merged = merge_evaluation(read_netcdf(root / eval_files[SHARED_EVALUATION]),
                                  [read_netcdf(root / eval_files[name]) for name in saes])
        write_netcdf(with_discovery(merged, disc_dir / "summary.json", config.target),
                     root / "evaluation.nc")

    # other SAEs (another corpus, width, ...) are other results
    results = stage("evaluation", eval_settings + "," + sae_settings,
                    ["evaluation.nc", *eval_files.values()],
                    sent("evaluation", evaluation_stage),
                    lambda: pair_coords(read_netcdf(root / "evaluation.nc")))

    from ..report.tables import excluded, roles
    from ..report.verdicts import sae_flags

    for attribute in (str(a) for a in results.attribute.values):  # numbers that are no claims
        reason = excluded(results, attribute)
        if reason:
            log.warning("attribute %s: kept out of claims: %s", attribute, reason)
    for sae in roles(results).saes:
        for flag in sae_flags(results, sae):
            log.warning("SAE %s: %s", sae, flag)

    report_dir = root / "report"

    def report_stage():
        listing = json.loads((root / "saes.json").read_text())
        write_dir(report_dir, lambda out: write_report(
            results, out, discovery_dir=disc_dir, sae_info=listing,
            config={**dataclasses.asdict(config), "task_summary": {
                k: v for k, v in task_summary.items() if k != "prompts"}},
            timings=stage.timings))

    stage("report", run_dir.manifest["evaluation"]["files"]["evaluation.nc"],
          ["report/summary.md"], report_stage, lambda: None)
    return RunResult(root, results, {a: [f"{s}@{p}" for s, p in pairs]
                                     for a, pairs in pairs_by_attr.items()},
                     stage.timings, report_dir)
