"""Choosing and checking cross-sections from attribution scores: the ranked candidates, a
top-k or coverage selection, exact patching to validate it, and where the effect lies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ..model.patching import Patch, run_patched
from ..model.reads import site_values
from ..model.sites import HEAD_KINDS, Site
from .attribution import RESIDUAL_KINDS


def ranked(scores: xr.Dataset, attribute: str, *, kinds: Sequence[str] | None = None,
           positions: Sequence[str] | None = None, changed_tokens: bool = True,
           layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Every (site, position) of ``attribute`` (of ``kinds``, at ``positions``, in
    ``layers``: default all), by decreasing |score|; without the residual stream at tokens
    the counterfactual replaces or moves unless ``changed_tokens``.

    Columns: ``site`` (e.g. ``L9.z.h3``), ``layer``, ``kind``, ``head`` (empty for kinds
    that are not per head), ``position``, ``score``, ``delta``, ``exact`` (patched
    exactly, not estimated), ``share`` (of the summed |score|) and ``cum_share``.
    """
    if attribute not in scores.attribute.values:
        raise ValueError(f"attribute {attribute!r} was not scored; scored: "
                         f"{list(scores.attribute.values)}")
    sub = scores[["score", "delta", "exact"]].sel(attribute=attribute)
    if kinds is not None:
        sub = sub.isel(site=np.isin(sub.kind.values, list(kinds)))
    if layers is not None:
        sub = sub.isel(site=np.isin(sub.layer.values, list(layers)))
    if positions is not None:
        sub = sub.sel(position=list(positions))
    sub = sub.reset_coords(["layer", "kind", "head"])
    df = sub.to_dataframe().reset_index()
    if not changed_tokens:
        df = df[~(df["kind"].isin(RESIDUAL_KINDS) & df["changed_token"].astype(bool))]
    df = df.drop(columns=["changed_token", "attribute"], errors="ignore")
    df["head"] = df["head"].astype("Int64")
    df = df[["site", "layer", "kind", "head", "position", "score", "delta", "exact"]]
    df = df.iloc[np.argsort(-np.abs(df["delta"].to_numpy()), kind="stable")]
    total = np.abs(df["score"]).sum()
    df["share"] = np.abs(df["score"]) / total if total > 0 else 0.0
    df["cum_share"] = df["share"].cumsum()
    return df.reset_index(drop=True)


def effect_layers(scores: xr.Dataset, attribute: str, n: int = 3) -> list[int]:
    """The ``n`` layers where attribution puts most of ``attribute``'s effect: the largest
    summed scores (signed with the total effect) over each layer's estimated component
    sites, so a reader whose cross-section missed can see where to look."""
    sub = scores.score.sel(attribute=attribute)
    keep = ~np.isin(sub.kind.values, list(RESIDUAL_KINDS))
    if not keep.any():  # a residual-only grid: where else could it be
        keep = np.ones_like(keep)
    per_layer = sub.isel(site=keep).sum("position").groupby("layer").sum()
    sign = 1.0 if float(scores.total_effect.sel(attribute=attribute)) >= 0 else -1.0
    order = np.argsort(-sign * per_layer.values, kind="stable")[:n]
    return [int(per_layer.layer.values[i]) for i in order]


def head_grid(scores: xr.DataArray, kind: str = "z") -> xr.DataArray:
    """One per-head ``kind`` of a scores variable as a ``(layer, head)`` grid (the other
    dims kept), for heatmaps and ``.sel(layer=9, head=3)``: e.g.
    ``head_grid(run.discovery.scores.score.sel(attribute="io"))``."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind {kind!r} is not per head; per-head kinds: {sorted(HEAD_KINDS)}")
    sub = scores.isel(site=np.flatnonzero(scores.kind.values == kind))
    if not sub.sizes["site"]:
        raise ValueError(f"no {kind!r} sites were scored; scored kinds: "
                         f"{sorted(set(scores.kind.values))}")
    sub = sub.drop_vars(["kind", "site"])
    sub = sub.assign_coords(head=sub["head"].astype(int))
    return sub.set_index(site=["layer", "head"]).unstack("site")


def select_cross_section(scores: xr.Dataset, attribute: str, *, top_k: int | None = None,
                         coverage: float | None = None, kinds: Sequence[str] | None = None,
                         positions: Sequence[str] | None = None,
                         changed_tokens: bool = False,
                         layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The top-``k`` sites, or the fewest top sites covering ``coverage`` of summed |score|.

    Give exactly one of ``top_k`` / ``coverage`` (a share in (0, 1]). Returns the first rows
    of :func:`ranked`, without the residual stream at tokens the counterfactual replaces or
    moves unless ``changed_tokens``: that stream is the changed input itself (on SmolLM2 IOI the
    IO token's stream carries 0.93-1.0 of the io effect at every layer up to 22), so it
    would fill a cross-section with copies of the input instead of the places the model
    moves the attribute to. Their scores stay in ``scores`` and its plots.
    """
    if (top_k is None) == (coverage is None):
        raise ValueError("give exactly one of top_k (a number of sites) or coverage (a share "
                         "of the summed |score| in (0, 1])")
    df = ranked(scores, attribute, kinds=kinds, positions=positions,
                changed_tokens=changed_tokens, layers=layers)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return df.iloc[:top_k].copy()
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    k = int(np.searchsorted(df["cum_share"].to_numpy(), coverage - 1e-12) + 1)
    return df.iloc[:min(k, len(df))].copy()


def exact_patching(model: Any, dataset: Any, attribute: str, pairs: Sequence[tuple], *,
                   joint: bool = True, batch_size: int = 32, max_rows: int = 256,
                   progress: bool = False, remote: Any = None) -> tuple[pd.DataFrame, dict]:
    """Exact change in logit difference from patching each (site, position) from ``x'``.

    All variants (one per pair, plus all pairs together when ``joint``) run stacked along
    the batch, ``max_rows`` rows per forward. Returns a table (``site``, ``position``,
    ``exact_delta``) and a dict with the clean and counterfactual logit differences, the
    total effect and, when ``joint``, ``joint_delta`` (all pairs patched at once).
    """
    return _exact_patching(model, dataset, {attribute: pairs}, joint=joint,
                           batch_size=batch_size, max_rows=max_rows, progress=progress,
                           remote=remote)[attribute]


def _exact_patching(model, dataset, pairs_by_attr: dict, *, joint, batch_size, max_rows,
                    progress, remote) -> dict[str, tuple[pd.DataFrame, dict]]:
    """:func:`exact_patching` of several attributes, sharing its three model runs (so three
    requests remotely): the counterfactual activations at every pair, every variant, and the
    counterfactual prompts' logit differences."""
    missing = sorted(set(pairs_by_attr) - set(dataset.counterfactuals))
    if missing:
        raise ValueError(f"attribute(s) {missing} have no counterfactuals; available: "
                         f"{sorted(dataset.counterfactuals)}")
    attributes = list(pairs_by_attr)
    pairs_by_attr = {a: [(Site.parse(s), str(p)) for s, p in pairs]
                     for a, pairs in pairs_by_attr.items()}
    cfs = [dataset.counterfactuals[a] for a in attributes]
    every_pair = list(dict.fromkeys(p for pairs in pairs_by_attr.values() for p in pairs))
    values = site_values(model, cfs, every_pair, batch_size=batch_size, remote=remote)
    variants, spans = [[]], {}
    for a, cf_values in zip(attributes, values):
        patches = [Patch(site, dataset.positions[pos], cf_values[(site, pos)], f"{site}@{pos}")
                   for site, pos in pairs_by_attr[a]]
        spans[a] = len(variants)
        variants += [[p] for p in patches] + ([patches] if joint and patches else [])
    out = run_patched(model, dataset, variants, names=list(range(len(variants))),
                      batch_size=batch_size, max_rows=max_rows, progress=progress,
                      remote=remote)
    ld = out.logit_diff.mean("prompt").values.astype(float)
    n = len(dataset.prompts)
    cf_ld = run_patched(model, [p for cf in cfs for p in cf.prompts], [[]],
                        answer_ids=np.tile(dataset.answer_ids, len(cfs)),
                        distractor_ids=np.tile(dataset.distractor_ids, len(cfs)),
                        batch_size=batch_size, remote=remote).logit_diff.values[0]
    found = {}
    for i, a in enumerate(attributes):
        pairs, first = pairs_by_attr[a], spans[a]
        table = pd.DataFrame({"site": [str(s) for s, _ in pairs],
                              "position": [p for _, p in pairs],
                              "exact_delta": ld[first:first + len(pairs)] - ld[0]})
        counterfactual = float(cf_ld[i * n:(i + 1) * n].mean())
        summary = {"clean_logit_diff": ld[0], "counterfactual_logit_diff": counterfactual,
                   "total_effect": counterfactual - ld[0]}
        if joint and pairs:
            summary["joint_delta"] = ld[first + len(pairs)] - ld[0]
        found[a] = (table, summary)
    return found


def validate(model: Any, dataset: Any, scores: xr.Dataset, attribute: str,
             selection: pd.DataFrame, *, batch_size: int = 32, max_rows: int = 256,
             remote: Any = None) -> tuple[pd.DataFrame, dict]:
    """Exact patching of the selected sites next to their estimates.

    Returns the selection with ``exact_delta`` (and ``exact_score`` = exact_delta / exact
    total effect) added, and a summary: Spearman rank correlation of estimated vs exact
    deltas, and ``recovered`` = exact effect of patching the whole selection at once over
    the total effect.
    """
    return validate_all(model, dataset, scores, {attribute: selection}, batch_size=batch_size,
                        max_rows=max_rows, remote=remote)[attribute]


def validate_all(model: Any, dataset: Any, scores: xr.Dataset,
                 selections: dict[str, pd.DataFrame], *, batch_size: int = 32,
                 max_rows: int = 256, remote: Any = None) -> dict[str, tuple]:
    """:func:`validate` for every attribute's selection, in the same three model runs."""
    from scipy.stats import spearmanr

    exact = _exact_patching(model, dataset,
                            {a: list(zip(sel["site"], sel["position"]))
                             for a, sel in selections.items()},
                            joint=True, batch_size=batch_size, max_rows=max_rows,
                            progress=False, remote=remote)
    found = {}
    for attribute, selection in selections.items():
        table, summary = exact[attribute]
        out = selection.reset_index(drop=True).copy()
        out["exact_delta"] = table["exact_delta"].to_numpy()
        total = summary["total_effect"]
        out["exact_score"] = out["exact_delta"] / total if total else 0.0
        rho = (spearmanr(out["delta"], out["exact_delta"]).statistic if len(out) > 2
               else float("nan"))
        summary.update(attribute=attribute, n_sites=len(out), spearman=float(rho),
                       recovered=float(summary["joint_delta"] / total) if total
                       else float("nan"))
        found[attribute] = (out, summary)
    return found
