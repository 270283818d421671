"""One SAE's results in SAEBench's eval-output shape and file naming (``eval_type_id``
``"sage"``), with its sae_lens identity and config."""

from __future__ import annotations

import math
import re
import subprocess
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..common.io import jsonable
from ..model.sites import HEAD_KINDS, Site
from .tables import (
    CEILING,
    FLOOR_PREFIX,
    PER_PAIR,
    Lookup,
    check_results,
    roles,
)
from .verdicts import (
    sae_metrics,
)

EVAL_TYPE_ID = "sage"


def sae_cfg_dict(saes: Any, *, model_name: str | None = None,
                 training: Mapping | None = None) -> dict:
    """SAEBench's ``sae_cfg_dict`` (sae_lens's config fields) of an SAE under test: one
    :class:`~sage_nn.saes.SparseAutoencoder`, a list of them, or an object holding them in
    ``.saes`` (residual SAEs evaluated together, one per site).

    Fields all members share are top-level (``architecture``, ``d_in``, ``d_sae``, ``k``,
    ...); ``hook_name``/``hook_layer`` are the member's, or lists over ``sites`` (one entry
    per member). ``training`` (the trainer's config: corpus, steps, tokens, seed, ...) is
    kept under ``training`` and its corpus named in ``dataset_path``."""
    members = getattr(saes, "saes", saes)
    members = list(members) if isinstance(members, (list, tuple)) else [members]
    if not members:
        raise ValueError("sae_cfg_dict needs at least one SAE")
    sites = []
    for m in members:
        heads = "" if m.heads is None else ".h" + "_".join(map(str, m.heads))
        sites.append({"site": f"L{m.layer}.{m.kind}{heads}" if m.kind else None,
                      "hook_name": tl_hook_name(m), "hook_layer": m.layer,
                      "architecture": m.architecture, "d_in": m.d_in, "d_sae": m.d_sae,
                      "k": m.k, "apply_b_dec_to_input": m.apply_b_dec_to_input,
                      "normalize_activations": m.normalize,
                      "rescale_acts_by_decoder_norm": m.rescale_acts_by_decoder_norm,
                      "center_writing_weights": m.center})
        if m.kind in HEAD_KINDS and m.heads is not None and len(m.heads) == 1:
            sites[-1]["hook_head_index"] = m.heads[0]  # sae_lens's name for a one-head SAE
    per_member = ("site", "hook_name", "hook_layer", "hook_head_index")
    out = {key: value for key, value in sites[0].items()
           if key not in per_member and all(s.get(key) == value for s in sites)}
    if len(sites) == 1:
        out.update({key: sites[0][key] for key in per_member if key in sites[0]})
    else:
        out.update(hook_name=[s["hook_name"] for s in sites],
                   hook_layer=[s["hook_layer"] for s in sites], sites=sites)
    if model_name:
        out["model_name"] = model_name
    if training:
        training = dict(training)
        out["dataset_path"] = training.get("corpus")
        out["training"] = training
    return jsonable(out)


def tl_hook_name(sae: Any) -> str | None:
    """The sae_lens/TransformerLens hook an SAE reads (``blocks.8.hook_resid_post``): its
    own hook name when it has one of that form, else its site's
    (:attr:`sage_nn.sites.Site.hook_name`; q/k/v/z SAEs read the all-heads hook)."""
    if sae.hook_name and str(sae.hook_name).startswith("blocks."):
        return sae.hook_name
    if sae.kind is None:
        return sae.hook_name
    head = (sae.heads or [0])[0] if sae.kind in HEAD_KINDS else None
    return Site(sae.layer, sae.kind, head).hook_name


def _commit_hash() -> str | None:
    """The sage_nn git commit that produced the report (None outside a git checkout).

    Recorded as ``eval_result_unstructured.sage_nn_commit_hash``: SAEBench's
    ``sae_bench_commit_hash`` means SAEBench's own commit, and SAEBench did not run here."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


TRAINED_RELEASE = "sage_nn"  # the release name of SAEs trained by a run, in file names


def sae_identity(sae: str, info: Mapping | None = None) -> dict[str, str | None]:
    """Where an SAE comes from, as SAEBench names it: ``release`` and ``sae_id`` (its file
    is ``{release}_{sae_id}_eval_results.json``), and ``sae_lens_release_id`` /
    ``sae_lens_id``, which are sae_lens's identifiers or None for SAEs sae_lens does not know.

    ``info`` (a run's ``saes.json`` entry) gives them explicitly or through its ``spec``:
    ``RELEASE:SAE_ID`` is a sae_lens release; ``train:...`` was trained here (release
    ``"sage_nn"``); a directory's release is the name of the directory holding it."""
    info = dict(info or {})
    spec = str(info.get("spec") or "")
    lens_release, lens_id = info.get("sae_lens_release_id"), info.get("sae_lens_id")
    release = lens_release
    if spec.startswith("train:") or not spec:
        release = release or TRAINED_RELEASE
    elif ":" in spec and not Path(spec).exists():  # a sae_lens pretrained release
        spec_release, spec_id = spec.split(":", 1)
        lens_release, lens_id = lens_release or spec_release, lens_id or spec_id
        release = lens_release
    else:  # a directory
        release = release or Path(spec).resolve().parent.name
    return {"release": release or "local", "sae_id": lens_id or sae,
            "sae_lens_release_id": lens_release, "sae_lens_id": lens_id}


def eval_results_file(sae: str, info: Mapping | None = None) -> str:
    """SAEBench's file name of an SAE's results: ``{release}_{sae_id}_eval_results.json``
    (characters unsafe in a file name, such as ``/``, become ``_``)."""
    ident = sae_identity(sae, info)
    return f"{safe_name(ident['release'])}_{safe_name(ident['sae_id'])}_eval_results.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def sae_eval_output(results: xr.Dataset, sae: str, *, config: Mapping | None = None,
                    info: Mapping | None = None, pairs: Sequence[str] | None = None) -> dict:
    """One SAE's results in the shape of SAEBench's ``BaseEvalOutput`` (``eval_type_id``
    ``"sage"``). Metric categories are the attributes (plus ``"mean"`` over them), each a
    flat dict; ``eval_result_details`` holds one entry per (attribute, cross-section pair).
    ``info`` may give ``spec``, ``sae_lens_id``, ``sae_lens_release_id`` (see
    :func:`sae_identity`) and ``sae_cfg_dict``. ``sae_bench_commit_hash`` is null: SAEBench
    did not run; sage_nn's own commit is ``eval_result_unstructured.sage_nn_commit_hash``.
    ``pairs`` keeps only those pairs' details (one member SAE of a set: the pairs it feeds).
    """
    results = check_results(results)
    r = roles(results)
    if sae not in r.saes:
        raise ValueError(f"{sae!r} is not an SAE of these results (an SAE needs a floor "
                         f"'{FLOOR_PREFIX}{sae}'); SAEs: {r.saes}")
    info = dict(info or {})
    ident = sae_identity(sae, info)
    attributes = [str(a) for a in results["attribute"].values]
    look = Lookup(results)
    categories = {a: sae_metrics(look, sae, a) for a in attributes}
    if len(attributes) > 1:
        keys = categories[attributes[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            categories["mean"] = {key: _none_nan(np.nanmean(
                [np.nan if categories[a][key] is None else categories[a][key]
                 for a in attributes])) for key in keys}
    details = []
    for a in attributes:
        for pair in (results["pair"].values if "pair" in results.dims else []):
            if pairs is not None and str(pair) not in pairs:
                continue
            entry = {"attribute": a, "pair": str(pair)}
            for name in (n for n in PER_PAIR if n in results):
                for role, method in (("", sae), ("_ceiling", CEILING),
                                     ("_floor", FLOOR_PREFIX + sae)):
                    entry[name + role] = _none_nan(float(
                        results[name].sel({"attribute": a, "dictionary": method, "pair": pair})))
            if all(v is None for k, v in entry.items() if k not in ("attribute", "pair")):
                continue  # this pair is not in this attribute's cross-section
            details.append(entry)
    eval_config = {"metric": "logit difference (answer - distractor) at the last token",
                   "ceiling": CEILING, "floor": FLOOR_PREFIX + sae,
                   "ks": [int(k) for k in results["k"].values], **dict(config or {})}
    return eval_document(EVAL_TYPE_ID, sae, eval_config, categories, details, ident, info,
                         {"attributes": attributes,
                          **({"set": info["set"]} if info.get("set") else {})})


def eval_document(eval_type_id: str, sae: str, eval_config: Mapping, categories: Mapping,
                  details: list, ident: Mapping, info: Mapping, unstructured: Mapping) -> dict:
    """SAEBench's eval-results layout (SAE ``sae``, one evaluation) around its metrics
    (``eval_result_metrics``, by category) and details; ``ident``: :func:`sae_identity`;
    ``unstructured``: what else ``eval_result_unstructured`` holds."""
    return jsonable({
        "eval_type_id": eval_type_id,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": categories,
        "eval_result_details": details,
        "sae_bench_commit_hash": None,
        "sae_lens_id": ident["sae_lens_id"],
        "sae_lens_release_id": ident["sae_lens_release_id"],
        "sae_lens_version": _version("sae_lens"),
        "sae_cfg_dict": info.get("sae_cfg_dict", {}),
        "eval_result_unstructured": {"sage_nn_version": _version("sage_nn"),
                                     "sage_nn_commit_hash": _commit_hash(),
                                     "sae": sae,
                                     "release": ident["release"], "sae_id": ident["sae_id"],
                                     "spec": info.get("spec"), **unstructured},
    })


def member_files(results: xr.Dataset, info: Mapping) -> list[tuple[dict, list[str] | None]]:
    """SAEBench files for one SAE: itself, or, for a set of a release's SAEs (a glob:
    ``info["sae_lens_ids"]`` lists several), one per member, each with its own id, config
    and ``hook_name`` and the details of the pairs it feeds; the metrics are the set's
    (its members are patched jointly), which ``eval_result_unstructured.set`` records."""
    ids = info.get("sae_lens_ids") or []
    members = (info.get("sae_cfg_dict") or {}).get("sites") or []
    if len(ids) < 2 or len(members) != len(ids):
        return [(dict(info), None)]
    from ..dictionaries.serving import served_sites
    from ..model.sites import Site

    labels = [str(p) for p in results["pair"].values] if "pair" in results.dims else []
    sites = {p: Site.parse(p.split("@")[0]) for p in labels}
    out = []
    for sae_id, cfg in zip(ids, members):
        # no model here: no top layer whose resid_post stays its own, no parallel blocks
        served = served_sites([cfg["hook_name"]], n_layers=1 << 30, parallel=False)
        fed = [p for p, s in sites.items() if (s.layer, s.kind) in served]
        out.append(({**info, "sae_lens_id": sae_id, "sae_cfg_dict": cfg,
                     "set": list(ids)}, fed))
    return out


def _none_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def safe_name(name: str) -> str:
    """A file-name-safe form of a method name (``random:topk/x`` -> ``random_topk_x``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sae"
