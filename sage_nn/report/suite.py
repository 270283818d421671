"""A suite's results as one table and one score per SAE: the runs of several tasks joined
into a Dataset ``sae x task x attribute x metric``, each SAE's gap closed between its floor
and the ceiling averaged over the attributes in claims (with a seeded bootstrap over
attributes and prompts), how each task's ranking of the SAEs agrees with the others', a
heatmap, the score against L0, one SAEBench-shaped JSON per SAE and the summary."""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..common.figures import figure, finish
from .document import NOT_CONVERGED, SAE_COLUMNS, convergence, sae_rows, training_note
from .saebench import eval_document, eval_results_file, sae_identity
from .verdicts import sae_metrics
from .tables import (
    BY_K,
    HEADLINE,
    Lookup,
    excluded,
    goodness_interval,
    headline_k,
    headline_metrics,
    roles,
)

EVAL_TYPE_ID = "sage_suite"
#: what the Dataset holds per (SAE, item, metric, k): the SAE's value and 95% interval, the
#: ceiling's and the floor's with theirs, and the gap closed
FIELDS = ("value", "ci_low", "ci_high", "ceiling", "ceiling_low", "ceiling_high", "floor",
          "floor_low", "floor_high", "gap_closed")
#: the dimension of a suite's (task, attribute) items: a MultiIndex of the two in memory,
#: its two coordinates in ``suite.nc`` (:func:`item_index` restores it)
ITEM = "item"
#: the dimension of the per-task variables (``gated``, ``gate_reason``), every task of the
#: suite, gated out before its evaluation or not
TASKS = "tasks"


def item_index(ds: xr.Dataset) -> xr.Dataset:
    """``item`` as a MultiIndex of ``task`` and ``attribute``, so ``ds.sel(task="ioi")``
    holds that task's attributes only and ``ds.sel(task="ioi", attribute="io")`` one item
    (``suite.nc`` keeps the two coordinates; a MultiIndex is not netCDF)."""
    if ITEM in ds.dims and not isinstance(ds.indexes.get(ITEM), pd.MultiIndex):
        ds = ds.set_index({ITEM: ["task", "attribute"]})
    return ds


def flat(ds: xr.Dataset) -> xr.Dataset:
    """What ``suite.nc`` holds of a suite Dataset: ``item``'s coordinates without the
    MultiIndex."""
    return ds.reset_index(ITEM) if isinstance(ds.indexes.get(ITEM), pd.MultiIndex) else ds


def suite_dataset(runs: Mapping[str, xr.Dataset], sae_info: Mapping[str, Mapping] | None = None,
                  gates: Mapping[str, str | None] | None = None) -> xr.Dataset:
    """Each task's run results (``{task: evaluation Dataset}``) as one Dataset with dims
    ``sae, item, metric, k``, ``item`` being each task's own attributes (a MultiIndex of
    ``task`` and ``attribute``: no cell for an attribute a task does not have). Per
    (SAE, item, metric, k): ``value`` with ``ci_low``/``ci_high`` (95%), the ceiling's and
    the floor's values with theirs (``ceiling``, ``ceiling_low``, ...), and ``gap_closed``
    (``(sae - floor) / (ceiling - floor)`` in goodness units, higher better; NaN out of
    claims); the edits at every ``k`` evaluated, the other metrics the same at every k.
    Per (SAE, item) ``l0``; per item ``in_claims`` and ``reason`` (why not); per task of
    ``tasks`` ``gated`` and ``gate_reason``. ``gates``: tasks gated out before their
    evaluation (no run results) with the reason; a task whose attributes are all out of
    claims is gated too. ``attrs["edit_k"]``: the k of the headline edits, which the score
    uses."""
    gates = dict(gates or {})
    tasks = list(dict.fromkeys([*runs, *gates]))
    k = headline_k(next(iter(runs.values()))) if runs else 2
    ks = sorted({int(x) for results in runs.values() for x in results["k"].values} or {k})
    items = [(task, str(a)) for task, results in runs.items()
             for a in results.attribute.values]
    saes = list(dict.fromkeys(s for results in runs.values() for s in roles(results).saes))
    heads = list(headline_metrics(next(iter(runs.values())))) if runs else list(HEADLINE)
    metrics = list(dict.fromkeys([*heads, *BY_K]))  # the edits at every k too
    data = {name: np.full((len(saes), len(items), len(metrics), len(ks)), np.nan)
            for name in FIELDS}
    l0 = np.full((len(saes), len(items)), np.nan)
    reasons = {}
    for ii, (task, attribute) in enumerate(items):
        results = runs[task]
        r, look = roles(results), Lookup(results)
        reasons[ii] = excluded(results, attribute)
        for sae in r.saes:
            si = saes.index(sae)
            l0[si, ii] = _nan(look("l0", attribute, sae))
            gaps = sae_metrics(look, sae, attribute)
            for (mi, metric), (ki, kk) in itertools.product(enumerate(metrics), enumerate(ks)):
                if metric in BY_K and kk not in results["k"].values:
                    continue
                sel = {"k": kk} if metric in BY_K else {}
                for prefix, method in (("", sae), ("ceiling", r.ceiling_of(sae, metric)),
                                       ("floor", r.floors[sae])):
                    low, high = look.ci(metric, attribute, method, **sel)
                    data[prefix or "value"][si, ii, mi, ki] = _nan(
                        look(metric, attribute, method, **sel))
                    data[f"{prefix}_low" if prefix else "ci_low"][si, ii, mi, ki] = _nan(low)
                    data[f"{prefix}_high" if prefix else "ci_high"][si, ii, mi, ki] = _nan(high)
                # the report's gap closed: where the paired interval puts the ceiling
                # above the floor, and only in claims
                key = f"{metric}_k{kk}" if metric in BY_K else metric
                data["gap_closed"][si, ii, mi, ki] = _nan(gaps.get(f"{key}_gap_closed"))
    for task in runs:
        mine = [reasons[i] for i, (t, _) in enumerate(items) if t == task]
        if not gates.get(task) and mine and all(mine):
            gates[task] = "no attribute in claims: " + "; ".join(
                f"{a}: {reasons[i]}" for i, (t, a) in enumerate(items) if t == task)
    gated = {t: bool(gates.get(t)) for t in tasks}
    dims = ("sae", ITEM, "metric", "k")
    ds = xr.Dataset(
        {name: (dims, values) for name, values in data.items()},
        coords={"sae": saes, "task": (ITEM, [t for t, _ in items]),
                "attribute": (ITEM, [a for _, a in items]), "metric": metrics, "k": ks,
                TASKS: tasks})
    return item_index(ds.assign(
        l0=(dims[:2], l0),
        in_claims=(ITEM, np.array([reasons[i] is None and not gated[t]
                                   for i, (t, _) in enumerate(items)], dtype=bool)),
        reason=(ITEM, np.array([reasons[i] or "" for i in range(len(items))], dtype=str)),
        gated=(TASKS, np.array([gated[t] for t in tasks], dtype=bool)),
        gate_reason=(TASKS, np.array([gates.get(t) or "" for t in tasks], dtype=str)),
    ).assign_attrs(edit_k=int(k), higher_is_better=1,
                   gap_closed="(sae - floor) / (ceiling - floor), goodness units",
                   headline=",".join(heads),
                   by_k=", ".join(BY_K) + " depend on k; the other metrics are the same at "
                                          "every k"))


def _nan(value: float | None) -> float:
    return np.nan if value is None else float(value)


def headline(ds: xr.Dataset) -> xr.Dataset:
    """The suite's headline metrics (``attrs["headline"]``: the edits summarised over k,
    or at the headline budget ``attrs["edit_k"]`` for results written before): dims
    ``sae, item, metric``, what the score averages."""
    metrics = ds.attrs.get("headline")
    ds = ds.sel(k=int(ds.attrs.get("edit_k", 2)))
    return ds.sel(metric=metrics.split(",")) if metrics else ds


def suite_table(ds: xr.Dataset) -> pd.DataFrame:
    """``suite.csv``: one row per (SAE, task, attribute, metric) a task has, with ``k`` for
    the edits (one row per k) and empty for the other metrics; the value, its interval, the
    ceiling's and floor's with theirs, the gap closed, and whether it is in claims (why
    not); and one row per task gated out before its evaluation."""
    frame = flat(ds)[list(FIELDS)].to_dataframe().reset_index()
    frame = frame[frame.metric.isin(BY_K) | (frame.k == int(ds.attrs.get("edit_k", 2)))]
    frame.loc[~frame.metric.isin(BY_K), "k"] = np.nan
    frame = frame[frame[list(FIELDS)].notna().any(axis=1)]
    claims = flat(ds)[["in_claims", "reason"]].to_dataframe()[["in_claims", "reason"]]
    frame = frame.merge(claims, left_on=ITEM, right_index=True).drop(columns=ITEM)
    gates = pd.DataFrame({"task": ds[TASKS].values.astype(str), "gated": ds.gated.values,
                          "gate_reason": ds.gate_reason.values})
    frame = frame.merge(gates, on="task", how="outer")
    columns = ["sae", "task", "attribute", "metric", "k", *FIELDS, "in_claims", "reason",
               "gated", "gate_reason"]
    return frame[columns].reset_index(drop=True)


def _item_scores(ds: xr.Dataset) -> xr.DataArray:
    """Per (SAE, item): the mean over the headline metrics of the gap closed at the
    headline k (a metric whose ceiling is not above its floor has none and is left out)."""
    return headline(ds).gap_closed.mean("metric", skipna=True)


def _gap_se(ds: xr.Dataset) -> xr.DataArray:
    """The standard error of each gap closed at the headline k from its value's 95%
    interval (the run's bootstrap over prompts), in goodness units over ``ceiling -
    floor``."""
    ds = headline(ds)
    low, high = np.empty(ds.value.shape), np.empty(ds.value.shape)
    flat_ = zip(np.ndindex(ds.value.shape), ds.ci_low.values.ravel(), ds.ci_high.values.ravel())
    metrics = [str(m) for m in ds.metric.values]
    for index, lo, hi in flat_:
        ends = goodness_interval(metrics[index[-1]], None if np.isnan(lo) else float(lo),
                                 None if np.isnan(hi) else float(hi))
        low[index], high[index] = (np.nan, np.nan) if None in ends else ends
    span = (_goodness(ds.ceiling) - _goodness(ds.floor)).transpose(*ds.value.dims).values
    with np.errstate(divide="ignore", invalid="ignore"):  # no span: no gap closed either
        return xr.zeros_like(ds.value) + (high - low) / (2 * 1.96) / np.abs(span)


def _goodness(da: xr.DataArray) -> xr.DataArray:
    """:func:`~sage_nn.report.tables.goodness` of every value (sufficiency: 1 - |1 - s|)."""
    return xr.where(da.metric == "sufficiency", 1 - abs(1 - da), da).transpose(*da.dims)


def aggregate(ds: xr.Dataset, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per SAE: ``score``, the mean over the attributes in claims (of every task not gated)
    of the mean gap closed over the headline metrics (0: the floor, 1: the ceiling; higher
    is better), with ``score_low``/``score_high``, a seeded 95% bootstrap interval over
    attributes (resampled) and prompts (each gap closed drawn from a normal as wide as its
    own bootstrap interval over prompts), the same draws for every SAE; ``<metric>`` the mean
    gap closed of each metric; ``n_attributes``; ``l0``, the mean L0 over them."""
    index = pd.Index([str(s) for s in ds.sae.values], name="sae")
    metrics = [str(m) for m in headline(ds).metric.values]
    columns = ["score", "score_low", "score_high", *metrics, "n_attributes", "l0"]
    items = np.flatnonzero(ds.in_claims.values)
    if not len(items) or not ds.sizes["sae"]:  # every task gated out: no score
        table = pd.DataFrame(np.nan, index=index, columns=columns)
        table["n_attributes"] = 0
        table.attrs.update(n_boot=n_boot, seed=seed)
        return table
    pick_items = lambda da: da.isel({ITEM: items})  # noqa: E731
    gap = pick_items(headline(ds).gap_closed).transpose("sae", ITEM, "metric")
    se = pick_items(_gap_se(ds)).fillna(0.0).transpose("sae", ITEM, "metric").values
    # the same draws for every SAE (an SAE's interval does not depend on the others')
    picks, noise = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    draws = np.empty((n_boot, ds.sizes["sae"]))
    with warnings.catch_warnings():  # an SAE with no gap anywhere in a draw: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        score = np.nanmean(np.nanmean(gap.values, axis=2), axis=1)
        for b in range(n_boot):
            pick = picks.integers(0, len(items), len(items))
            z = noise.standard_normal((len(items), len(metrics)))
            noisy = gap.values[:, pick] + se[:, pick] * z
            draws[b] = np.nanmean(np.nanmean(noisy, axis=2), axis=1)
        low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
        per_metric = np.nanmean(gap.values, axis=1)
    table = pd.DataFrame({"score": score, "score_low": low, "score_high": high,
                          **dict(zip(metrics, per_metric.T)),
                          "n_attributes": len(items),
                          "l0": pick_items(ds.l0).mean(ITEM, skipna=True).values},
                         index=index)[columns]
    table.attrs.update(n_boot=n_boot, seed=seed)
    return table


def task_scores(ds: xr.Dataset) -> pd.DataFrame:
    """SAE x task: each task's score of each SAE (the mean over its attributes in claims);
    NaN for a gated task."""
    item = _item_scores(ds).where(ds.in_claims)
    tasks = [str(t) for t in ds[TASKS].values]
    by_task = {t: item.isel({ITEM: _of(ds, t)}).mean(ITEM, skipna=True).values for t in tasks}
    return pd.DataFrame(by_task, index=pd.Index([str(s) for s in ds.sae.values], name="sae"),
                        columns=pd.Index(tasks, name="task"))


def _of(ds: xr.Dataset, task: str) -> np.ndarray:
    """The positions along ``item`` of ``task``'s attributes (none for a task gated out
    before its evaluation)."""
    return np.flatnonzero(np.asarray(ds["task"].values, dtype=str) == task)


def rank_agreement(ds: xr.Dataset) -> pd.DataFrame:
    """Per task (not gated): the Spearman correlation of its SAE ranking (its score) with
    the aggregate of the other tasks' attributes in claims, and how many SAEs were ranked.
    NaN with fewer than two SAEs, no other task, or a tie everywhere."""
    scores = task_scores(ds)
    item = _item_scores(ds).where(ds.in_claims)
    rows = []
    for task in (str(t) for t in ds[TASKS].values):
        if bool(ds.gated.sel({TASKS: task})):
            continue
        others = np.setdiff1d(np.arange(ds.sizes[ITEM]), _of(ds, task))
        rest = pd.Series(item.isel({ITEM: others}).mean(ITEM, skipna=True).values,
                         index=scores.index)
        mine = scores[task]
        both = pd.concat([mine, rest], axis=1).dropna()
        rho = np.nan
        if len(both) >= 2 and both.iloc[:, 0].nunique() > 1 and both.iloc[:, 1].nunique() > 1:
            rho = float(both.iloc[:, 0].corr(both.iloc[:, 1], method="spearman"))
        rows.append({"task": task, "spearman_vs_others": rho, "n_saes": len(both)})
    return pd.DataFrame(rows, columns=["task", "spearman_vs_others", "n_saes"]).set_index("task")


# -- figures -----------------------------------------------------------------------------


def plot_heatmap(ds: xr.Dataset, path: str | Path | None = None, *, dpi: int = 110):
    """SAE x task: each task's score of each SAE (gap closed, 0 floor, 1 ceiling); gated
    tasks are marked and left blank."""
    scores = task_scores(ds)
    fig = figure(figsize=(1.6 + 1.1 * scores.shape[1], 1.2 + 0.45 * scores.shape[0]))
    ax = fig.subplots()
    image = ax.imshow(scores.values.astype(float), cmap="viridis", vmin=0, vmax=1,
                      aspect="auto")
    for (i, j), value in np.ndenumerate(scores.values.astype(float)):
        gated = bool(ds.gated.sel({TASKS: scores.columns[j]}))  # blank (white): dark text
        ax.text(j, i, "gated out" if gated else f"{value:.2f}", ha="center", va="center",
                color="k" if gated or value > 0.6 else "w", fontsize=8)
    ax.set_xticks(range(scores.shape[1]), labels=list(scores.columns), rotation=30,
                  ha="right")
    ax.set_yticks(range(scores.shape[0]), labels=list(scores.index))
    fig.colorbar(image, ax=ax, label="gap closed (higher is better)")
    ax.set_title("score per task: gap closed between floor (0) and ceiling (1)")
    return finish(fig, path, dpi)


def plot_score_vs_l0(table: pd.DataFrame, path: str | Path | None = None, *, dpi: int = 110):
    """Each SAE's aggregate score (with its 95% interval) against its mean L0."""
    fig = figure(figsize=(5, 3.6))
    ax = fig.subplots()
    err = np.abs(np.vstack([table.score - table.score_low, table.score_high - table.score]))
    ax.errorbar(table.l0, table.score, yerr=err, fmt="o", capsize=3)
    for sae, row in table.iterrows():
        ax.annotate(str(sae), (row.l0, row.score), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.axhline(1, color="#2ca02c", lw=0.8, ls="--")
    ax.set_xlabel("L0 (mean over the attributes in claims)")
    ax.set_ylabel("suite score (higher is better)")
    ax.set_title("suite score against L0")
    return finish(fig, path, dpi)


# -- SAEBench-shaped JSON and the summary ------------------------------------------------


def suite_eval_output(ds: xr.Dataset, table: pd.DataFrame, sae: str, *,
                      info: Mapping | None = None, config: Mapping | None = None) -> dict:
    """One SAE's suite results in SAEBench's ``BaseEvalOutput`` shape (``eval_type_id``
    ``"sage_suite"``): metric categories ``aggregate`` and one per task (its score and each
    metric's gap closed and value averaged over its attributes in claims); details per
    (task, attribute, metric)."""
    info = dict(info or {})
    ident = sae_identity(sae, info)
    row = table.loc[sae]
    num = lambda v: None if v is None or not np.isfinite(float(v)) else float(v)
    categories = {"aggregate": {"score": num(row.score), "score_ci_low": num(row.score_low),
                                "score_ci_high": num(row.score_high),
                                "n_attributes": int(row.n_attributes), "l0": num(row.l0),
                                **{f"{m}_gap_closed": num(row[str(m)])
                                   for m in headline(ds).metric.values}}}
    one = headline(ds).sel(sae=sae)
    scores = task_scores(ds)
    for task in (str(t) for t in ds[TASKS].values):
        mine = _of(ds, task)
        claims = one.in_claims.values[mine]
        entry = {"score": num(scores.loc[sae, task]), "gated": bool(ds.gated.sel({TASKS: task})),
                 "gate_reason": str(ds.gate_reason.sel({TASKS: task}).values) or None}
        for m in one.metric.values:
            sel = one.sel(metric=m).isel({ITEM: mine})
            entry[f"{m}_gap_closed"] = _mean(sel.gap_closed.values[claims])
            entry[str(m)] = _mean(sel.value.values[claims])
        categories[task] = entry
    details = [{"task": r.task, "attribute": r.attribute, "metric": r.metric,
                "k": None if pd.isna(r.k) else int(r.k),
                **{f: num(getattr(r, f)) for f in FIELDS}, "in_claims": bool(r.in_claims),
                "reason": r.reason or None}
               for r in suite_table(ds.sel(sae=[sae])).itertuples()
               if not r.gated and isinstance(r.sae, str)]
    eval_config = {"tasks": [str(t) for t in ds[TASKS].values],
                   "metrics": [str(m) for m in headline(ds).metric.values],
                   "edit_k": int(ds.attrs.get("edit_k", 2)),
                   "score": "mean over attributes in claims of the mean gap closed "
                            "(sae - floor) / (ceiling - floor) over the metrics; "
                            "higher is better",
                   "n_boot": table.attrs.get("n_boot"), "seed": table.attrs.get("seed"),
                   **dict(config or {})}
    return eval_document(EVAL_TYPE_ID, sae, eval_config, categories, details, ident, info, {})


def _mean(values: np.ndarray) -> float | None:
    """The mean of the finite values (None if there is none)."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _fmt(value) -> str:
    return "" if value is None or not np.isfinite(float(value)) else f"{float(value):.3f}"


def suite_summary(ds: xr.Dataset, table: pd.DataFrame, agreement: pd.DataFrame,
                  tasks: Mapping[str, Mapping], images: list[tuple[str, str]],
                  timings: Mapping[str, float] | None = None,
                  sae_info: Mapping[str, Mapping] | None = None) -> str:
    """The suite's ``summary.md``: the tasks (evaluated or gated, and why), the SAEs and
    how they were trained (converged or not), the score per SAE with its interval, the
    per-task scores and how each task's ranking agrees with the others', what each
    attribute left out of the score was left out for."""
    k = int(ds.attrs.get("edit_k", 2))
    metrics = [str(m) for m in headline(ds).metric.values]
    lines = ["# SAGE suite", "",
             (f"{ds.sizes['sae']} SAE(s) on {ds.sizes[TASKS]} task(s). **Score**: per SAE, "
              "the gap closed between its random floor (0) and the supervised ceiling (1) "
              "(necessity: its ideal, 1), "
              "`(sae - floor) / (ceiling - floor)`, averaged over the headline metrics "
              f"({', '.join(metrics)}; "
              + ("edits as the area over k" if "edit_auc" in metrics else f"edits at k = {k}")
              + ") and then "
              "over every attribute in claims of every task not gated. **Higher is "
              f"better.** The 95% interval is a bootstrap ({table.attrs.get('n_boot')} "
              f"resamples, seed {table.attrs.get('seed')}) over attributes and prompts."), "",
             "## Tasks", "", "| task | status | accuracy | attributes in claims | reason |",
             "|---|---|---|---|---|"]
    for task in (str(t) for t in ds[TASKS].values):
        info = tasks.get(task, {})
        mine = _of(ds, task)
        claimed = [str(a) for a, c in zip(ds["attribute"].values[mine],
                                          ds.in_claims.values[mine]) if c]
        status = "gated out" if bool(ds.gated.sel({TASKS: task})) else "evaluated"
        lines.append(f"| {task} | {status} | {_fmt(info.get('accuracy'))} | "
                     f"{', '.join(claimed) or '-'} | "
                     f"{ds.gate_reason.sel({TASKS: task}).values!s} |")
    saes = [str(sae) for sae in table.index]
    rows = sae_rows(saes, sae_info)
    if rows:
        lines += ["", "## SAEs", "", training_note(saes, sae_info), "",
                  "| " + " | ".join(SAE_COLUMNS) + " |", "|---" * len(SAE_COLUMNS) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Score per SAE (higher is better)", "",
              "| SAE | score | 95% interval | " + " | ".join(
                  f"{m} gap" for m in metrics) + " | L0 | attributes |",
              "|---|---|---|" + "---|" * len(metrics) + "---|---|"]
    for sae, row in table.sort_values("score", ascending=False).iterrows():
        late = NOT_CONVERGED if convergence(sae_info, str(sae))[1] is False else ""
        lines.append(f"| {sae}{late} | {_fmt(row.score)} | [{_fmt(row.score_low)}, "
                     f"{_fmt(row.score_high)}] | " + " | ".join(
                         _fmt(row[m]) for m in metrics)
                     + f" | {_fmt(row.l0)} | {int(row.n_attributes)} |")
    claimed = headline(ds).gap_closed.where(ds.in_claims)
    empty = [m for m in metrics
             if ds.sizes["sae"] and not np.isfinite(claimed.sel(metric=m).values).any()]
    if empty and len(table) and table.n_attributes.max() > 0:
        lines += ["", (f"{', '.join(empty)}: no gap closed at any attribute (the floor is at "
                       "or above the ceiling: where an SAE's L0 reaches the site's width, the "
                       "floor reconstructs exactly and these metrics cannot rank it; "
                       "docs/metrics.md), so the score averages the other metrics.")]
    scores = task_scores(ds)
    lines += ["", "## Score per task", "", "| SAE | " + " | ".join(scores.columns) + " |",
              "|---|" + "---|" * scores.shape[1]]
    for sae, row in scores.iterrows():
        lines.append(f"| {sae} | " + " | ".join(_fmt(v) for v in row.values) + " |")
    lines += ["", "## What each task adds", "",
              ("Spearman correlation of each task's ranking of the SAEs with the ranking "
               "by the other tasks' aggregate: near 1, the task agrees with the rest; low or "
               "negative, it carries independent evidence (or noise). With two SAEs it is "
               "±1 (agrees or not)."), "", "| task | Spearman vs the others | SAEs ranked |",
              "|---|---|---|"]
    for task, row in agreement.iterrows():
        lines.append(f"| {task} | {_fmt(row.spearman_vs_others)} | {int(row.n_saes)} |")
    left = [(str(t), str(a), str(r)) for t, a, r in
            zip(ds["task"].values, ds["attribute"].values, ds.reason.values) if r]
    if left:
        lines += ["", "## Attributes left out of the score", ""]
        lines += [f"- {t} / {a}: {r}" for t, a, r in left]
    lines += ["", *[f"![{title}]({file})" for title, file in images]]
    if timings:
        lines += ["", "## Time", "", "| part | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    return "\n".join(lines) + "\n"


def write_suite_report(ds: xr.Dataset, out_dir: str | Path, *, tasks: Mapping[str, Mapping],
                       sae_info: Mapping[str, Mapping] | None = None, n_boot: int = 1000,
                       seed: int = 0, timings: Mapping[str, float] | None = None,
                       config: Mapping | None = None) -> pd.DataFrame:
    """Write the suite report into ``out_dir``: ``aggregate.csv``, ``agreement.csv``, the
    heatmap, the score against L0 (when the SAEs differ in L0), one SAEBench-shaped JSON
    per SAE and ``summary.md``; return the aggregate table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(ds, n_boot=n_boot, seed=seed)
    agreement = rank_agreement(ds)
    table.to_csv(out / "aggregate.csv")
    agreement.to_csv(out / "agreement.csv")
    images = []
    if ds.sizes["sae"] and ds.sizes[TASKS]:
        plot_heatmap(ds, out / "heatmap.png")
        images.append(("SAE x task: score per task", "heatmap.png"))
    if table.l0.round(3).nunique() > 1:
        plot_score_vs_l0(table, out / "score_vs_l0.png")
        images.append(("suite score against L0", "score_vs_l0.png"))
    for sae in table.index:
        info = (sae_info or {}).get(sae)
        doc = suite_eval_output(ds, table, sae, info=info, config=config)
        (out / eval_results_file(sae, info)).write_text(json.dumps(doc, indent=2))
    (out / "summary.md").write_text(suite_summary(ds, table, agreement, tasks, images,
                                                  timings, sae_info))
    return table
