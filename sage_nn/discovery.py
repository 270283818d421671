"""Discovery: where in the model each task attribute is computed.

:mod:`sage_nn.attribution` scores every site of a grid per attribute; this module turns the
scores into tables (:func:`ranked`, :func:`head_grid`) and cross-sections, checks them by
exact patching (:func:`validate`) and plots them; :func:`discover` runs the whole stage.
(``AttributionPatching``, ``load_scores`` and ``save_scores`` are importable from here too.)

A cross-section is a set of components (by default per-head ``z``) whose *joint* exact patch
recovers a share of the attribute's total effect: :func:`grow_cross_sections` (the default of
:func:`discover`) takes its candidates from attribution and decides by exact joint patching,
in four model runs shared by every attribute, one request remotely (:mod:`sage_nn.growth`).
On SmolLM2 IOI (16 prompts) it finds io: 6 heads at END (L29.h1, L23.h7/h0/h2/h1/h4)
recovering 0.63; s: 3 heads (L24.h5, L23.h0/h7) 0.66; order: L20.h0 alone, 2.6 (it
overshoots the small total effect), in 18 s on 2 idle CPU cores. The top-|score| pick (:func:`select_cross_section`) stays available
as ``top_k`` / ``coverage``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .attribution import (RESIDUAL_KINDS, AttributionPatching, effects_table,  # noqa: F401
                          load_scores, save_scores)
from .growth import measure_growth
from .interventions import Patch, run_patched, site_values
from .sites import HEAD_KINDS, Site

# -- tables and selection ------------------------------------------------------------

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


# -- validation by exact activation patching ------------------------------------------

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


# -- cross-sections grown by their joint exact patch ----------------------------------

def grow_cross_sections(model: Any, dataset: Any, scores: xr.Dataset,
                        attributes: Sequence[str] | None = None, *, target: float = 0.6,
                        max_sites: int = 16, kinds: Sequence[str] | None = ("z",),
                        positions: Sequence[str] | None = None, candidates: int | None = None,
                        layers: Sequence[int] | None = None, batch_size: int = 16,
                        max_rows: int = 256, progress: bool = False,
                        remote: Any = None) -> dict[str, tuple[pd.DataFrame, dict]]:
    """Per attribute, a small set of components whose *joint* exact patch recovers
    ``target`` of the total effect; attribution proposes, exact joint patching decides.

    Candidates are the attribute's sites in ``scores`` of ``kinds`` (default per-head ``z``;
    ``None``: every component kind of the grid, never the residual stream, which is a
    candidate only where a residual kind is listed, and then not at the tokens the
    counterfactual replaces or moves) at ``positions`` (default all) in ``layers`` (default
    all), ordered by their
    estimated delta *signed in the direction of the total effect*: the sites that should
    carry most of the effect first, the ones estimated to push against it (negative
    name-mover-like heads) last. Components cancel, so patching the top |score| can recover
    little, even a negative share. The first ``candidates`` (default ``max_sites``) form the
    pool. Then, with every attribute's variants stacked in the same forwards:

    1. one counterfactual forward reads every pool site's value (and the counterfactual
       logit differences, so the total effect is measured on ``dataset`` itself);
    2. the joint patch of every prefix of the pool (1, 2, ... sites); ``S`` is the shortest
       prefix reaching ``target``, else the best one;
    3. every member of ``S`` alone (its ``exact_delta``) and ``S`` without it (leave-one-out);
    4. backward pruning: ``S`` without its 1, 2, ... most dispensable members (highest
       leave-one-out recovery first), each set patched jointly.

    The result is the smallest measured set (a prefix from run 2 or a pruned set from run 4)
    of at most ``max_sites`` sites that reaches ``target`` (ties: recovery closest to 1);
    when none does, the measured set of at most ``max_sites`` with the highest recovery.
    Its ``recovered`` is therefore always a measured joint patch, never an estimate. The
    whole search is one kernel (:mod:`sage_nn.growth`): one request remotely, whatever the
    number of attributes, and the counterfactual values never travel (with
    ``Remote.max_prompts``, each run is its own request instead). Each variant recomputes
    only the layers and tokens its patches can change (:func:`run_patched`), so late-layer
    sets at the last token are cheap.

    Returns ``{attribute: (table, summary)}``. The table has :func:`ranked`'s columns for
    the chosen sites plus each site's single-site ``exact_delta`` and ``exact_score``
    (over the measured total effect). The summary: ``recovered`` (the set's joint exact
    delta over the total effect), ``reached``, ``target``, ``max_sites``, ``cap_hit`` (the
    target was not reached within ``max_sites`` sites although more candidates existed),
    ``n_sites``, ``total_effect``, clean and counterfactual logit differences,
    ``joint_delta``, ``small_effect`` (from ``scores``: the share divides by a near-zero
    effect), ``same_as`` (other attributes that ended with the same set of (site,
    position)), ``prefix_recovered`` (run 2's curve), ``spearman`` (estimated vs exact
    single-site deltas of the set) and a plain-words ``note`` when the target was missed.
    """
    from scipy.stats import spearmanr

    if not 0 < target:
        raise ValueError(f"target must be a positive share of the total effect, got {target}")
    if max_sites < 1:
        raise ValueError(f"max_sites must be >= 1, got {max_sites}")
    pool_size = max_sites if candidates is None else int(candidates)
    if pool_size < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    attributes = [str(a) for a in (scores.attribute.values if attributes is None else attributes)]
    missing = [a for a in attributes if a not in scores.attribute.values
               or a not in dataset.counterfactuals]
    if missing or not attributes:
        raise ValueError(f"attributes {missing} are not both scored in scores "
                         f"({list(scores.attribute.values)}) and counterfactuals of the dataset "
                         f"({sorted(dataset.counterfactuals)})")
    if int(scores.attrs.get("n_prompts", len(dataset.prompts))) != len(dataset.prompts):
        warnings.warn(f"scores were scored on {scores.attrs['n_prompts']} prompts, the dataset "
                      f"has {len(dataset.prompts)}: candidates come from the former, every "
                      "exact number from the latter", stacklevel=2)
    grid_kinds = list(scores.kind.values)
    kinds = [k for k in grid_kinds if k not in RESIDUAL_KINDS] if kinds is None else list(kinds)
    absent = [k for k in kinds if k not in grid_kinds]
    if absent or not kinds:
        raise ValueError(f"kinds {absent or kinds} are not in the attribution grid "
                         f"({grid_kinds}); score them first or choose others")
    pools, n_candidates = {}, {}
    for a in attributes:
        df = ranked(scores, a, kinds=kinds, positions=positions, changed_tokens=False,
                    layers=layers)
        n_candidates[a] = len(df)
        sign = 1.0 if float(scores.total_effect.sel(attribute=a)) >= 0 else -1.0
        order = np.argsort(-sign * df["delta"].to_numpy(), kind="stable")
        pools[a] = df.iloc[order[:pool_size]].reset_index(drop=True)
        if pools[a].empty:
            raise ValueError(f"attribute {a!r} has no candidate sites of kinds {kinds}"
                             + (f" in layers {list(layers)}" if layers is not None else ""))
    pairs = {a: [(Site.parse(s), str(p)) for s, p in zip(df["site"], df["position"])]
             for a, df in pools.items()}

    m = measure_growth(model, dataset, pairs, target, batch_size=batch_size,
                       max_rows=max_rows, progress=progress, remote=remote)
    clean_ld, cf_ld = m["clean"], m["cf"]
    total = {a: cf_ld[a] - clean_ld for a in attributes}

    def share(a, ld):
        return (np.asarray(ld) - clean_ld) / total[a] if total[a] else np.full(len(ld), np.nan)

    measured, single = {}, {}  # (members, joint logit difference); each member alone
    for a in attributes:
        s = m["chosen"][a]
        measured[a] = ([(list(range(k + 1)), ld) for k, ld in enumerate(m["prefix"][a])]
                       + list(zip(m["pruned"].get(a, []), m["pruned_ld"].get(a, []))))
        single[a] = dict(zip(s, m["loo"][a][:len(s)]))
    found = {}
    for a in attributes:
        eligible = [(members, ld) for members, ld in measured[a] if len(members) <= max_sites]
        rec = share(a, [ld for _, ld in eligible])
        hit = [i for i in range(len(eligible)) if rec[i] >= target]
        if hit:
            best = min(hit, key=lambda i: (len(eligible[i][0]), abs(1 - rec[i])))
        else:
            best = min(range(len(eligible)), key=lambda i: (
                -rec[i] if np.isfinite(rec[i]) else np.inf, len(eligible[i][0])))
        members, joint = eligible[best]
        members = sorted(members)
        table = pools[a].iloc[members].reset_index(drop=True)
        table["exact_delta"] = [single[a][i] - clean_ld for i in members]
        table["exact_score"] = table["exact_delta"] / total[a] if total[a] else np.nan
        recovered = float(rec[best])
        reached = bool(recovered >= target)
        cap_hit = not reached and n_candidates[a] > max_sites
        summary = {
            "attribute": a, "method": "joint coverage", "recovered": recovered,
            "reached": reached, "target": float(target), "max_sites": int(max_sites),
            "cap_hit": bool(cap_hit), "n_sites": len(members),
            "total_effect": float(total[a]), "clean_logit_diff": float(clean_ld),
            "counterfactual_logit_diff": float(cf_ld[a]),
            "joint_delta": float(joint - clean_ld),
            "small_effect": bool(scores.small_effect.sel(attribute=a)),
            "n_candidates": n_candidates[a], "pool": len(pairs[a]),
            "prefix_recovered": [float(x) for x in share(a, m["prefix"][a])],
            "spearman": float(spearmanr(table["delta"], table["exact_delta"]).statistic)
            if len(table) > 2 else float("nan")}
        if cap_hit:
            summary["note"] = (f"cap hit: max_sites={max_sites} reached before the target "
                               f"{target:g}; the best set of at most {max_sites} sites "
                               f"recovers {recovered:.2f} of the total effect")
        elif not reached:
            summary["note"] = (f"target {target:g} not reached: the best of the "
                               f"{len(pairs[a])} candidates' sets recovers {recovered:.2f}")
        found[a] = (table, summary)
    keys = {a: frozenset(zip(t["site"], t["position"])) for a, (t, _) in found.items()}
    for a, (_, summary) in found.items():
        summary["same_as"] = [b for b in attributes if b != a and keys[b] == keys[a]]
    return found


# -- plots ----------------------------------------------------------------------------

def plot_heatmaps(scores: xr.Dataset, attribute: str, out_dir: str | Path | None = None, *,
                  dpi: int = 90) -> dict:
    """Heatmaps of ``attribute``'s scores: layer x head per head kind, and layer x kind for
    the other kinds (panel ``residual``); one column per named position. Returns ``{panel:
    matplotlib Figure}`` (shown inline in a notebook), each saved as
    ``heatmap_{attribute}_{panel}.png`` in ``out_dir`` when one is given."""
    from .report import _figure, _finish

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    sub = scores.score.sel(attribute=attribute)
    vmax = float(np.abs(sub).max()) or 1.0
    positions = list(scores.position.values)
    layers = sorted(set(int(l) for l in scores.layer.values))
    kinds = list(dict.fromkeys(str(k) for k in scores.kind.values))
    panels = [(k, head_grid(sub, k)) for k in kinds if k in HEAD_KINDS]
    other = np.flatnonzero(~np.isin(scores.kind.values, sorted(HEAD_KINDS)))
    if len(other):
        rest = sub.isel(site=other).drop_vars(["head", "site"])
        rest = rest.set_index(site=["layer", "kind"]).unstack("site")
        panels.append(("residual", rest.sel(kind=[k for k in kinds if k not in HEAD_KINDS])))
    figures = {}
    for name, data in panels:
        data = data.reindex(layer=layers)  # layers without this kind stay blank
        fig = _figure(figsize=(2.2 * len(positions) + 1.5, 0.18 * len(layers) + 1.5))
        axes = fig.subplots(1, len(positions), squeeze=False, sharey=True)
        for ax, pos in zip(axes[0], positions):
            values = data.sel(position=pos).transpose("layer", ...).values
            im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                           origin="lower", interpolation="nearest")
            xt = data["head"].values if name != "residual" else data.kind.values
            ax.set_xticks(range(len(xt)), [str(x) for x in xt],
                          rotation=0 if name != "residual" else 90, fontsize=7)
            ax.set_title(pos, fontsize=9)
            ax.set_xlabel("head" if name != "residual" else "")
        axes[0][0].set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score (fraction of effect)")
        fig.suptitle(f"{scores.attrs.get('task', '')} / {attribute}: {name}")
        figures[name] = _finish(fig, out_dir and out_dir / f"heatmap_{attribute}_{name}.png",
                                dpi)
    return figures


def plot_cross_section(table: pd.DataFrame, path: str | Path | None = None, title: str = "",
                       *, dpi: int = 90):
    """Bar chart of a selected cross-section: estimated score, and exact when validated.
    Returns the matplotlib Figure, saved to ``path`` when one is given."""
    from .report import _figure, _finish

    labels = [f"{s}@{p}" for s, p in zip(table["site"], table["position"])]
    y = np.arange(len(labels))
    fig = _figure(figsize=(6, 0.28 * len(labels) + 1.2))
    ax = fig.subplots()
    has_exact = "exact_score" in table
    h = 0.4 if has_exact else 0.8
    ax.barh(y - (h / 2 if has_exact else 0), table["score"], height=h, label="attribution")
    if has_exact:
        ax.barh(y + h / 2, table["exact_score"], height=h, label="exact patching")
        ax.legend(fontsize=8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("fraction of the counterfactual effect")
    ax.set_title(title, fontsize=9)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _finish(fig, path, dpi)


# -- the whole stage ------------------------------------------------------------------

@dataclass
class DiscoveryConfig:
    """Settings of :func:`discover` (the attribution grid, selection and validation).

    ``kinds`` / ``layers`` / ``positions`` / ``attributes`` restrict the attribution grid
    (scores and heatmaps). ``select_kinds`` and ``select_layers`` restrict what a
    cross-section may hold (the grid still shows where else the effect is); the
    default (``None``) is per-head ``z``, or, when ``kinds`` lists the grid without ``z``,
    the kinds listed there. The residual stream is selectable only where a residual kind is
    named in ``select_kinds`` or ``kinds``.

    Selection: by default a cross-section is grown by its joint exact patch
    (:func:`grow_cross_sections`) until it recovers ``target`` of the total effect, with
    at most ``max_sites`` sites from a pool of the ``candidates`` best estimates (default
    ``max_sites``). Setting ``top_k`` or ``coverage`` selects the old way instead (the top
    sites by |attribution|, or those covering a share of the summed |score|), validated by
    exact patching when ``validate``; the joint growth is exact patching itself.
    """

    kinds: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    positions: Sequence[str] | None = None
    attributes: Sequence[str] | None = None
    batch_size: int = 16
    min_effect: float = 1.0
    exact_residuals: bool = True  # residual stream at changed tokens patched exactly
    ig_steps: int = 0  # > 0: integrated gradients (see AttributionPatching)
    target: float = 0.6  # share of the total effect the joint patch must recover
    max_sites: int = 16
    candidates: int | None = None
    select_kinds: Sequence[str] | None = None
    select_layers: Sequence[int] | None = None
    top_k: int | None = None  # set one of top_k / coverage to select by attribution alone
    coverage: float | None = None
    changed_tokens: bool = False  # may a cross-section hold the changed tokens' own stream?
    validate: bool = True
    max_rows: int = 256

    def selectable_kinds(self, grid_kinds: Sequence[str]) -> list[str]:
        """The kinds a cross-section may hold, given the kinds the grid scored."""
        if self.select_kinds is not None:
            wanted = list(self.select_kinds)
        elif self.kinds is not None and "z" not in self.kinds:
            wanted = list(self.kinds)  # the caller named the grid: its kinds are asked for
        else:
            wanted = ["z"]
        kinds = [k for k in wanted if k in grid_kinds]
        if not kinds:
            raise ValueError(f"select_kinds {wanted} are not in the attribution grid "
                             f"({list(grid_kinds)}); set DiscoveryConfig.select_kinds")
        return kinds


@dataclass
class Discovery:
    """What :func:`discover` found: scores, cross-sections, validation summaries."""

    scores: xr.Dataset  # attribution scores (saved as scores.nc)
    cross_sections: dict[str, pd.DataFrame]
    validation: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        """Per attribute: effects, the cross-section and its validation (JSON-ready): for a
        grown cross-section ``recovered``, ``reached``, ``target``, ``max_sites``,
        ``cap_hit``, ``n_sites``, ``same_as``, ``small_effect``, a ``note`` when the
        target was missed, and ``effect_layers`` (:func:`effect_layers`)."""
        effects = effects_table(self.scores)
        return {a: {**{k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v))
                       for k, v in effects.loc[a].items()},
                    "cross_section": [f"{s}@{p}" for s, p in zip(t["site"], t["position"])],
                    "effect_layers": effect_layers(self.scores, a),
                    **{k: _plain(v) for k, v in self.validation.get(a, {}).items()
                       if k != "attribute"}}
                for a, t in self.cross_sections.items()}


def _plain(value: Any) -> Any:
    """numpy scalars and lists of them as Python ones, for JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def discover(model: Any, dataset: Any, config: DiscoveryConfig | None = None, *,
             out_dir: str | Path | None = None, progress: bool = False,
             remote: Any = None) -> Discovery:
    """Score the grid, select a cross-section per attribute, validate it, save and plot.

    By default each cross-section is grown by its joint exact patch (see
    :class:`DiscoveryConfig` and :func:`grow_cross_sections`); its summary says the share it
    recovers (``recovered``), whether ``max_sites`` stopped it short of the target
    (``cap_hit``) and which attributes ended with the same set (``same_as``).

    With ``out_dir``: ``scores.nc``, ``cross_sections.csv``, ``summary.json`` and the PNGs.
    ``remote`` runs the model's passes elsewhere (see :mod:`sage_nn.remote`).
    """
    config = config or DiscoveryConfig()
    if config.top_k is not None and config.coverage is not None:
        raise ValueError("set only one of DiscoveryConfig.top_k or DiscoveryConfig.coverage")
    fit = AttributionPatching(config.kinds, config.layers, config.positions, config.attributes,
                              config.batch_size, config.min_effect,
                              exact_residuals=config.exact_residuals, ig_steps=config.ig_steps,
                              progress=progress).fit(model, dataset, remote=remote)
    found = Discovery(fit.scores_, {})
    kinds = config.selectable_kinds(list(fit.scores_.kind.values))
    if config.top_k is None and config.coverage is None:  # grown by the joint exact patch
        grown = grow_cross_sections(model, dataset, fit.scores_, target=config.target,
                                    max_sites=config.max_sites, kinds=kinds,
                                    candidates=config.candidates, layers=config.select_layers,
                                    batch_size=config.batch_size, max_rows=config.max_rows,
                                    progress=progress, remote=remote)
        for a, (table, summary) in grown.items():
            found.cross_sections[a], found.validation[a] = table, summary
    else:
        found.cross_sections = {
            str(a): select_cross_section(fit.scores_, a, top_k=config.top_k,
                                         coverage=config.coverage, kinds=kinds,
                                         changed_tokens=config.changed_tokens,
                                         layers=config.select_layers)
            for a in fit.scores_.attribute.values}
        if config.validate:  # every attribute's exact patching shares the same model runs
            for a, (sel, summary) in validate_all(model, dataset, fit.scores_,
                                                  found.cross_sections,
                                                  batch_size=config.batch_size,
                                                  max_rows=config.max_rows,
                                                  remote=remote).items():
                found.cross_sections[a], found.validation[a] = sel, summary
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_scores(fit.scores_, out_dir / "scores.nc")
        pd.concat([t.assign(attribute=a) for a, t in found.cross_sections.items()]).to_csv(
            out_dir / "cross_sections.csv", index=False)
        (out_dir / "summary.json").write_text(json.dumps(found.summary(), indent=2))
        for attribute, table in found.cross_sections.items():
            plot_heatmaps(fit.scores_, attribute, out_dir)
            plot_cross_section(table, out_dir / f"cross_section_{attribute}.png",
                               title=f"{fit.scores_.attrs['task']} / {attribute}")
    return found
