"""Getting the run's SAEs: trained here on the run's corpus (cached by its content under
``$SAGE_NN_CACHE/saes``), loaded from a directory, or from a sae_lens release."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dictionaries.serving import residual_key
from .config import RunConfig, run_prompts
from .specs import train_options, train_spec

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    pass
log = logging.getLogger("sage_nn")


TASK_CORPORA = ("task", "task@positions")  # every token / only the named positions

#: Active latents per token (a JumpReLU SAE's target L0) of the SAEs a run trains at a head's
#: site (q/k/v/z, 64 wide on SmolLM2), where ``train:...`` names no k; a residual SAE keeps
#: TrainConfig's k (32). Measured by benchmarks/head_k.py (results/head_k.json: TopK SAEs at
#: the quickstart's io and s heads, k 4/8/16/32, two seeds): k 4, 8 and 16 put the trained
#: SAEs above both controls beyond the seed spread on the same share of headline cells (0.8;
#: k 32: 0.7), and k 8 closes the most of the floor-to-ceiling gap (0.80; 0.78, 0.73, 0.53).
TRAINED_K_HEADS = 8


def trained_k(arch: str, kind: str, options: dict | None = None) -> int | None:
    """The k a ``train:ARCH`` spec with ``options`` trains at a site of ``kind`` (None: the
    architecture has no k). A k named in the spec holds at every site."""
    from ..dictionaries.training import K_ARCHITECTURES, TrainConfig
    from ..model.sites import HEAD_KINDS

    if arch not in (*K_ARCHITECTURES, "jumprelu"):
        return None
    if options and "k" in options:
        return int(options["k"])
    return TRAINED_K_HEADS if kind in HEAD_KINDS else TrainConfig.k


def sae_corpus(model: Any, config: RunConfig) -> list:
    """``config.sae_corpus`` as training sources: each ``task`` part becomes prompts of
    each of ``config.corpus_tasks`` (default: the run's task) drawn at another seed, minus
    every prompt (and counterfactual) a run of that task fits and evaluates on, so the SAEs
    never see an evaluation's prompts. Built once per tokenizer and settings (a suite asks
    for the same corpus from every task's run; prompts depend on the tokenizer only)."""
    from ..dictionaries.corpus import task_prompts, text_sources

    parts = text_sources(config.sae_corpus)
    if not set(parts) & set(TASK_CORPORA):
        return parts
    tasks = list(config.corpus_tasks or [config.task])
    edited = [Path(t).stat().st_mtime_ns if Path(t).is_file() else None for t in tasks]
    key = json.dumps([config.sae_corpus, tasks, edited, config.n_fit, config.n_eval,
                      config.seed, config.sae_task_prompts])  # a task file edited: built again
    try:
        memo = _CORPORA.setdefault(model.tokenizer, {})
    except TypeError:  # not weak-referenceable: built each time
        memo = {}
    if key not in memo:
        drawn = {}
        for task in tasks:
            full = run_prompts(model, dataclasses.replace(config, task=task))[0]
            used = [p for d in [full, *full.counterfactuals.values()] for p in d.prompts]
            for where in set(parts) & set(TASK_CORPORA):
                drawn[task, where] = task_prompts(
                    model, task, n=config.sae_task_prompts, seed=config.seed, exclude=used,
                    named_positions=where == "task@positions")
        memo[key] = [s for p in parts for s in (
            [drawn[t, p] for t in tasks] if p in TASK_CORPORA else [p])]
    return list(memo[key])


#: per tokenizer, the task corpora built for it (by settings)
_CORPORA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trained_cache(arch: str, model: Any, config: RunConfig, options: dict | None = None):
    """``(name, TrainConfig, sources, cache directory)`` of the run's trained SAEs: the
    directory is keyed by width, k, tokens, seed, trainer version and the corpus's content.
    ``options`` (``{"width": 512, "k": 8}``, from ``train:topk:width=512:k=8``) override the run's
    ``sae_width`` and the k at every site; a k named in the spec is part of the name
    (``topk-1024-k8``), so each SAE of a sweep has its own name and cache entry. Without one,
    SAEs at heads keep :data:`TRAINED_K_HEADS` latents (the entry's directory says so:
    ``-kh8``) and the others TrainConfig's k."""
    from ..common.formats import TRAINED_TRANSCODERS, TRANSCODER_TRAINER_VERSION
    from ..dictionaries.corpus import corpus_hash
    from ..dictionaries.training import TrainConfig, trainer_version
    from ..model.loading import cache_dir

    options = options or {}
    width = int(options.get("width", config.sae_width))
    extra = {"k": int(options["k"])} if "k" in options else {}
    heads = trained_k(arch, "z", options)
    cfg = TrainConfig(architecture=arch, d_sae=width, seed=config.seed,
                      tokens=config.sae_steps * 1024, k_heads=heads, **extra)
    name = f"{arch}-{width}" + (f"-k{extra['k']}" if extra else "")
    entry = name + (f"-kh{heads}" if heads is not None and not extra else "")
    source = sae_corpus(model, config)
    version = trainer_version(arch) + (f"-{TRANSCODER_TRAINER_VERSION}"
                                       if arch in TRAINED_TRANSCODERS else "")
    root = cache_dir() / "saes" / str(model.config._name_or_path).replace("/", "--") / \
        f"{entry}-{cfg.tokens}-seed{cfg.seed}-{version}-{corpus_hash(source)}"
    return name, cfg, source, root


def resolve_saes(spec: str, model: Any, sites: list[str], config: RunConfig,
                 progress: bool = True) -> tuple[str, list]:
    """``(name, [SparseAutoencoder, ...])`` for one ``--sae`` value.

    ``train:topk`` / ``train:standard``: SAEs at ``sites`` trained here on
    ``config.sae_corpus`` (:func:`sae_corpus`), cached under ``$SAGE_NN_CACHE/saes`` by
    the corpus's content and reused (``train:topk@sites`` names the SAEs trained at the
    cross-section's own sites; they share the cache). A directory with
    ``cfg.json``: one sae_lens SAE. A directory of such directories: all of them.
    ``RELEASE:SAE_ID`` / ``RELEASE:ID_GLOB``: sae_lens pretrained SAEs (:func:`release_saes`;
    from the HF cache when offline).
    """
    from ..dictionaries.saes import load_sae
    from ..dictionaries.sealing import cache_lock
    from ..dictionaries.training import load_trained

    if spec.startswith("train:"):
        arch, at_sites = train_spec(spec)
        name, cfg, source, root = trained_cache(arch, model, config, train_options(spec))
        with cache_lock(root):  # a second process needing these SAEs waits, then reads them
            have, broken = cached_saes(root, model)
            missing = [s for s in sites if s not in have]
            if set(broken) & set(sites):  # retrained with its first companions: same draws
                missing = list(sites)
            if missing:
                log.info("training %s SAEs at %s", arch, ", ".join(missing))
                have.update(_train_into_cache(root, model, missing, cfg, source, progress))
        return name + ("@sites" if at_sites else ""), [have[s] for s in sites]
    path = Path(spec)
    if (path / "cfg.json").exists():
        return path.name, [load_sae(path, model=model)]
    if path.is_dir():
        return path.name, list(load_trained(path, model).values())
    if ":" in spec:
        return release_saes(spec, model, sites)
    raise ValueError(f"--sae {spec!r}: not a directory with cfg.json, a directory of SAE "
                     "directories, 'train:ARCH' (topk, standard, batchtopk, matryoshka_batchtopk, jumprelu, gated; optionally '@sites'), or "
                     "'RELEASE:SAE_ID'")


def release_saes(spec: str, model: Any, sites: list[str]) -> tuple[str, list]:
    """``RELEASE:SAE_ID`` or ``RELEASE:ID_GLOB`` (:mod:`sage_nn.releases`): the release's
    SAEs loaded through sae_lens's ``SAE.from_pretrained`` (from the HF cache when the hub
    is offline). A glob loads only the SAEs whose residual tensor is one of ``sites`` (the
    residuals the cross-sections need), one per tensor; its name is the glob."""
    from ..dictionaries.releases import (
        cfg_site,
        expand,
        hook_names,
        is_glob,
        register,
        sae_config,
        split_spec,
    )
    from ..dictionaries.saes import load_sae
    from ..dictionaries.serving import TRANSCODER_PREFIX
    from ..model.sites import adapter, parse_site

    register()  # $SAGE_NN_SAE_REGISTRY's releases, for SAE.from_pretrained
    release, pattern = split_spec(spec)
    _, ids = expand(spec)
    if not is_glob(pattern):
        return pattern, [load_sae(release, ids[0], model=model)]
    n_layers = adapter(model).n_layers
    key = lambda name: residual_key(*parse_site(name)[:2], n_layers)  # noqa: E731
    wanted, chosen = {key(s) for s in sites}, {}
    for sae_id, hook in hook_names(spec).items():
        served = cfg_site(sae_config(release, sae_id)) or ""
        try:  # a transcoder of layer L's MLP where its resid_mid feeds a cross-section
            site = (parse_site(served[len(TRANSCODER_PREFIX):])[0], "resid_mid") \
                if served.startswith(TRANSCODER_PREFIX) else key(hook)
        except (TypeError, ValueError):
            continue  # not a residual site of this model's grammar: serves no cross-section
        if site in wanted and site not in chosen:
            chosen[site] = sae_id
    log.info("%s: %d of %d SAEs serve the cross-sections: %s", spec, len(chosen), len(ids),
             ", ".join(chosen.values()))
    return pattern, [load_sae(release, chosen[s], model=model) for s in sorted(chosen)]


def release_ids(spec: str, members: list) -> list[str | None]:
    """The release ids of the SAEs :func:`release_saes` loaded for ``spec`` (by hook name)."""
    from ..dictionaries.releases import hook_names

    by_hook: dict = {}
    for sae_id, hook in hook_names(spec).items():
        by_hook.setdefault(hook, sae_id)
    return [by_hook.get(m.hook_name) for m in members]


def cached_saes(root: Path, model: Any) -> tuple[dict, list[str]]:
    """The intact SAEs of a cache directory by site, and the sites of entries that were
    truncated, corrupt or unreadable: those are removed (and so trained again)."""
    from ..dictionaries.saes import load_sae
    from ..dictionaries.sealing import sealed_problem
    from ..dictionaries.training import transcoder_dir

    have, broken = {}, []
    for directory in sorted(p.parent for p in root.glob("*/cfg.json")):
        problem = sealed_problem(directory)
        if problem is None:
            try:  # a transcoder is placed by its config's hooks, an SAE by its folder
                have[directory.name] = load_sae(
                    directory, model=model,
                    site=None if transcoder_dir(directory) else directory.name)
                continue
            except Exception as err:  # noqa: BLE001 (an unreadable entry is retrained)
                problem = f"{type(err).__name__}: {err}"
        log.warning("SAE cache entry %s is unusable (%s): training it again", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
        broken.append(directory.name)
    return have, broken


def _train_into_cache(root: Path, model: Any, sites: list[str], cfg, source,
                      progress: bool = True) -> dict:
    """Train in a side directory, seal each SAE (SHA-256 of its files) and move it into
    the cache by rename: a killed or failed training leaves nothing a reader takes for an
    SAE. Called with the cache's lock held, so side directories left by killed runs go."""
    from ..dictionaries.sealing import seal
    from ..dictionaries.training import train_saes

    for stale in root.parent.glob(f".{root.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    try:
        trained, report = train_saes(model, sites, cfg, source=source, out_dir=partial,
                                     progress=progress)
        log.info("trained SAEs:\n%s", report.to_string())
        root.mkdir(parents=True, exist_ok=True)
        entries = sorted(partial.iterdir(), key=lambda p: not p.is_dir())  # SAEs, then records
        for entry in entries:
            if entry.is_dir():
                seal(entry)
                shutil.rmtree(root / entry.name, ignore_errors=True)
            os.replace(entry, root / entry.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return trained


def trained_record(root: Path, sites: list[str]) -> dict | None:
    """What the trainer recorded of the SAEs at ``sites`` of a cache directory: its config
    (``train_config.json``) with, per site, what each SAE's ``cfg.json`` says of its
    training (:func:`per_site_training`; else ``report.csv``)."""
    record = root / "train_config.json"
    if not record.exists():
        return None
    training = json.loads(record.read_text())
    for key in ("held_out_curves", "held_out_fvu_curves", "steps_used", "converged",
                "converged_at_step"):
        training.pop(key, None)  # per site, below: only the sites asked for
    report = root / "report.csv"
    table = {}
    if report.exists():
        import pandas as pd

        table = pd.read_csv(report, index_col="site").to_dict("index")
    per_site = per_site_training({site: root / site for site in sites})
    for site in sites:  # SAEs trained before cfg.json carried the record
        per_site["steps_used"].setdefault(site, table.get(site, {}).get("steps"))
        per_site["held_out_fvu"].setdefault(site, table.get(site, {}).get("fvu"))
    return {**training, **per_site}


#: per-site fields of a training record: the key in it, the key in training_record
PER_SITE = {"steps_used": "steps", "held_out_fvu": "held_out_fvu",
            "held_out_dead": "held_out_dead", "converged": "converged",
            "converged_at_step": "converged_at_step", "corpus_passes": "corpus_passes",
            "held_out_curves": "curve", "continued_from": "continued_from"}


def per_site_training(directories: dict[str, Path]) -> dict:
    """``{field: {site: value}}`` of what each SAE directory's ``cfg.json`` records of its
    training (:func:`~sage_nn.dictionaries.training.training_record`), plus the shared
    ``corpus`` and ``criterion`` (joined with " | " where members differ)."""
    from ..dictionaries.training import training_record

    records = {site: training_record(d) for site, d in directories.items()}
    out: dict = {field: {site: r[key] for site, r in records.items() if r.get(key) is not None}
                 for field, key in PER_SITE.items()}
    for key in ("corpus", "criterion", "tokens_per_pass"):
        values = list(dict.fromkeys(str(r[key]) for r in records.values() if r.get(key)))
        if values:
            out[key] = " | ".join(values)
    return out


def saved_record(path: Path, members: list) -> dict | None:
    """The training record of SAEs given as a directory (``--sae DIR``) that
    :func:`~sage_nn.dictionaries.training.train_saes` wrote: read from each one's
    ``cfg.json`` (None if none of them says how it was trained)."""
    if (path / "cfg.json").exists():
        directories = {sae_site(members[0]): path}
    else:
        directories = {d.name: d for d in sorted(p.parent for p in path.glob("*/cfg.json"))}
    record = per_site_training(directories)
    if not record["steps_used"]:
        return None
    return {"source": str(path), **record}


def sae_site(sae, spec: str = "train:") -> str:
    """An SAE's site as saes.json lists it: the hook name of an SAE the user named (a
    release or a directory: ``blocks.8.hook_resid_post`` stays so), else ``L8.resid_post``."""
    heads = sae.heads or []
    if getattr(sae, "transcoder", False):  # what it reads -> what it writes
        return f"{sae.hook_name or f'L{sae.input_layer}.{sae.input_kind}'} -> " \
            f"{sae.hook_name_out or f'L{sae.layer}.{sae.kind}'}"
    site = f"L{sae.layer}.{sae.kind}" + (f".h{heads[0]}" if len(heads) == 1 else "")
    hook = str(sae.hook_name or "")
    if not spec.startswith("train:") and hook.startswith("blocks.") and len(heads) != 1:
        from ..model.sites import parse_site

        try:
            if parse_site(hook)[:2] == (sae.layer, sae.kind):
                return hook
        except ValueError:
            pass
    return site


def saes_for_all_layers(model: Any, members: list) -> int:
    """How many SAEs of this kind an evaluation at every layer would need: one per layer
    for each residual or sublayer kind among ``members``, times the heads for q/k/v/z."""
    from ..model.sites import HEAD_KINDS, adapter

    ad = adapter(model)
    return sum(ad.n_layers * (ad.n_heads_of(kind) if kind in HEAD_KINDS else 1)
               for kind in {s.kind for s in members})
