"""The evaluation cached per SAE: ``evaluation/shared.nc`` holds the ceiling and what every
SAE shares, ``evaluation/<SAE>-<hash>.nc`` each SAE and its floor, keyed by the SAE's weights
and the settings; they merge into ``evaluation.nc`` with discovery's facts per attribute."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    import xarray as xr
log = logging.getLogger("sage_nn")


SHARED_EVALUATION = "shared"


def evaluation_file(name: str) -> str:
    """An SAE's cached results in the run directory: ``evaluation/<safe name>-<hash>.nc``
    (the hash keeps two names that read the same as file names apart)."""
    from ..report.saebench import safe_name

    return f"evaluation/{safe_name(name)}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.nc"


def evaluation_files(saes: dict) -> list[str]:
    """The files of an evaluation in the run directory: the shared part and each SAE's."""
    return [f"evaluation/{SHARED_EVALUATION}.nc", *map(evaluation_file, saes)]


def evaluate_cached(root: Path, settings: str, saes: dict,
                    evaluate: Callable[[dict, bool], xr.Dataset],
                    target: float = 0.6) -> None:
    """Score what ``root/evaluation/`` lacks and merge the run's parts into
    ``evaluation.nc`` (with discovery's facts per attribute).

    ``evaluation/shared.nc`` holds the supervised ceiling and what every SAE shares
    (clean, mean, counterfactual runs: edit baseline, ground truth), keyed by ``settings``;
    ``evaluation/<SAE>.nc`` each SAE and its floor, keyed by the settings and the SAE's
    weights (``evaluation/index.json``). Only the SAEs without a fresh file are scored,
    all in one ``evaluate(saes, ceiling)``; ``evaluation.nc`` merges the run's SAEs in
    their order, so a removed SAE is left out. Scoring the ceiling scores every SAE again
    (the path ceiling is read with the residual SAEs' own rows); ``target``: the run's,
    for :func:`with_discovery`."""
    from ..common.io import read_netcdf, sha256, write_atomic, write_netcdf

    (root / "evaluation").mkdir(exist_ok=True)
    index_path = root / "evaluation" / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    files = dict(zip([SHARED_EVALUATION, *saes], evaluation_files(saes)))
    keys = {SHARED_EVALUATION: settings,
            **{name: f"{settings},{sae_fingerprint(coder)}" for name, coder in saes.items()}}

    def fresh(name: str) -> bool:
        record, path = index.get(files[name]), root / files[name]
        return bool(record) and record["key"] == keys[name] and path.exists() and \
            sha256(path) == record["sha256"]

    shared_missing = not fresh(SHARED_EVALUATION)
    missing = [name for name in saes if not fresh(name)]
    if shared_missing:  # the path ceiling is read with the residual SAEs' own rows
        missing = list(saes)
    log.info("evaluation: %s%d of %d SAEs to score", "ceiling and " if shared_missing
             else "", len(missing), len(saes))
    if shared_missing or missing:
        results = evaluate({name: saes[name] for name in missing}, shared_missing)
        scored = ([SHARED_EVALUATION] if shared_missing else []) + missing
        for name in scored:
            sae = None if name == SHARED_EVALUATION else name
            write_netcdf(evaluation_part(results, sae), root / files[name])
            index[files[name]] = {"sae": sae, "key": keys[name],
                                  "sha256": sha256(root / files[name])}
            write_atomic(index_path, json.dumps(index, indent=2))
    merged = merge_evaluation(read_netcdf(root / files[SHARED_EVALUATION]),
                              [read_netcdf(root / files[name]) for name in saes])
    write_netcdf(with_discovery(merged, root / "discovery" / "summary.json", target),
                 root / "evaluation.nc")


def sae_fingerprint(coder: Any) -> str:
    """A hash of what an SAE's evaluation depends on: its weights and settings (every
    member SAE), and how it is evaluated (at its own sites or through the reconstruction,
    and the reconstruction mode)."""
    import torch

    h = hashlib.sha256(f"{type(coder).__name__}|{getattr(coder, 'mode', '')}".encode())
    for sae in getattr(coder, "saes", [coder]):
        h.update(repr([getattr(sae, a, None) for a in (
            "architecture", "k", "layer", "kind", "heads", "hook_name", "normalize", "center",
            "apply_b_dec_to_input", "rescale_acts_by_decoder_norm")]).encode())
        if getattr(sae, "transcoder", False) or getattr(sae, "activation", "") == \
                "matching_pursuit":  # only these have more settings (older keys stay as they were)
            h.update(repr([getattr(sae, a, None) for a in (
                "input_layer", "input_kind", "input_form", "residual_threshold",
                "max_iterations", "stop_on_duplicate_support")]).encode())
        for key, value in sorted(sae.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def evaluation_part(results: xr.Dataset, sae: str | None) -> xr.Dataset:
    """What one cache file holds of an evaluation: an SAE and its controls (variables over
    ``dictionary``), or (``sae=None``) the ceilings, every other dictionary and every shared
    variable."""
    from ..evaluation.controls import CONTROLS

    names = [str(d) for d in results.dictionary.values]
    if sae is not None:
        part = results.sel(dictionary=[d for d in [sae, *(f"{c}:{sae}" for c in CONTROLS)]
                                       if d in names])
        return part[[v for v in part.data_vars if "dictionary" in part[v].dims]]
    own = lambda d: any(d.startswith(f"{c}:") for c in CONTROLS) or \
        f"{CONTROLS[0]}:{d}" in names  # noqa: E731
    return results.sel(dictionary=[d for d in names if not own(d)])


def merge_evaluation(shared: xr.Dataset, parts: list[xr.Dataset]) -> xr.Dataset:
    """The shared part (ceiling, shared variables, attributes) and each SAE's, in order."""
    import xarray as xr

    per_dictionary = [v for v in shared.data_vars if "dictionary" in shared[v].dims]
    # names along `dictionary` (its labels, role, sae, ceiling_of) as objects: with a fixed
    # width, the shared part's '' would cut every longer name in the parts to one letter
    names = lambda ds: ds.assign_coords({  # noqa: E731
        c: ("dictionary", np.array([str(d) for d in ds[c].values], dtype=object))
        for c in ds.coords if ds[c].dims == ("dictionary",) and ds[c].dtype.kind in "UO"})
    merged = xr.concat([names(shared[per_dictionary]), *map(names, parts)], "dictionary",
                       join="outer",
                       data_vars="all", coords="minimal", compat="override")
    for v in shared.data_vars:
        if v not in per_dictionary:
            merged[v] = shared[v]
    merged.attrs = dict(shared.attrs)
    return merged


#: A cross-section whose joint patch recovers less than this share of its target was not
#: found: its attribute is still scored, but kept out of claims.
WEAK_SHARE = 0.5


def with_discovery(results: xr.Dataset, summary_path: Path,
                   default_target: float = 0.6) -> xr.Dataset:
    """The cross-sections' discovery facts as attribute variables: ``recovered`` (joint
    exact share of the effect) and its ``target``, ``cap_hit``, ``small_effect``,
    ``weak_cross_section`` (``recovered`` below :data:`WEAK_SHARE` of the target; a
    cross-section chosen by ``top_k`` has no target of its own and is held to
    ``default_target``, the run's ``target``, so no setting switches the check off),
    ``effect_layers`` (where attribution puts the effect, comma-separated) and ``same_as``
    (the other attributes with the same cross-section, comma-separated)."""
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    attributes = [str(a) for a in results.attribute.values]
    get = lambda a, key, default: summary.get(a, {}).get(key, default)  # noqa: E731
    recovered = [float(get(a, "recovered", np.nan)) for a in attributes]
    target = [float(get(a, "target", np.nan)) for a in attributes]
    target = [default_target if np.isnan(t) else t for t in target]
    return results.assign(
        recovered=("attribute", recovered), target=("attribute", target),
        cap_hit=("attribute", [bool(get(a, "cap_hit", False)) for a in attributes]),
        small_effect=("attribute", [bool(get(a, "small_effect", False)) for a in attributes]),
        weak_cross_section=("attribute", [bool(r < WEAK_SHARE * t)  # NaN: not known weak
                                          for r, t in zip(recovered, target)]),
        effect_layers=("attribute", [", ".join(map(str, get(a, "effect_layers", [])))
                                     for a in attributes]),
        same_as=("attribute", [", ".join(get(a, "same_as", [])) for a in attributes]))
