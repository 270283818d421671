"""The results read as a report reads them: which dictionary is ceiling, SAE or floor,
the headline metrics, gap closed, the SAE against its floor, what is kept out of claims,
and the tables across SAEs (``headline_table``, ``comparison_table``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ..evaluation.coders import RANDOM, SUPERVISED
from ..evaluation.controls import RANDOM_SAE
from ..evaluation.path import PATH_CEILING
from ..evaluation.scoring import pair_mean

CEILING = SUPERVISED
FLOOR_PREFIX = f"{RANDOM}:"
RANDOM_SAE_PREFIX = f"{RANDOM_SAE}:"
REQUIRED = ("sufficiency", "necessity", "edit")
# Metrics where higher is better and ceiling/floor calibrate the scale (gap closed).
CALIBRATED = ("sufficiency", "necessity", "edit", "edit_f1", "edit_auc", "edit_f1_auc",
              "best_f1")
#: the metrics every SAE is judged by, against its controls and its ceiling: the edits
#: summarised over k (the area under the edit-vs-k curve)
HEADLINE = ("sufficiency", "necessity", "edit_auc", "edit_f1_auc", "best_f1")
#: the headline metrics of results written before the edits were summarised over k (edits
#: at the headline k)
OLD_HEADLINE = ("sufficiency", "necessity", "edit", "edit_f1", "best_f1")
BY_K = ("edit", "edit_f1")
#: headline metrics measured against their ideal value instead of a supervised dictionary:
#: prompt by prompt, necessity is 1 for any exact reconstruction, and a dictionary of the
#: attributes alone leaves what else the heads carry pushing each prompt, so it is no
#: ceiling for necessity (docs/metrics.md, "Intervals and verdicts")
IDEAL_CEILINGS = {"necessity": 1.0}
#: the name the ideal goes by where a ceiling's name is asked for
IDEAL = "ideal"
PER_PAIR = ("fvu", "l0", "l0_site", "dead", "best_f1", "share_interpretable", "alignment")
LABELS = {"sufficiency": "sufficiency", "necessity": "necessity",
          "edit": "edit (greedy)", "edit_magnitude": "edit magnitude",
          "edit_f1": "edit (top-F1 latents)", "edit_f1_magnitude": "F1 edit magnitude",
          "edit_auc": "edit (greedy, over k)", "edit_f1_auc": "edit (top-F1, over k)",
          "best_f1": "best F1", "share_interpretable": "share F1 ≥ 0.8",
          "alignment": "alignment", "fvu": "FVU", "fvu_pooled": "FVU (pooled)",
          "l0": "L0 per token", "l0_site": "L0 at the site", "dead": "dead share",
          "loss_increase": "loss increase (nats)"}


# -- reading the results -----------------------------------------------------------------

@dataclass
class Roles:
    """Which method is the ceiling (and the path ceiling), which are SAEs (each with its
    floor, its random SAE, and the ceiling it is measured against), which are other."""

    ceiling: str
    saes: list[str]
    floors: dict[str, str]
    others: list[str] = field(default_factory=list)
    random_saes: dict[str, str] = field(default_factory=dict)
    ceilings: dict[str, str] = field(default_factory=dict)
    path_ceiling: str | None = None

    @property
    def ordered(self) -> list[str]:
        """Ceilings, then each SAE followed by its controls, then references."""
        out = [self.ceiling] + ([self.path_ceiling] if self.path_ceiling else [])
        for sae in self.saes:
            out += [sae, self.floors[sae]] + ([self.random_saes[sae]]
                                              if sae in self.random_saes else [])
        return out + self.others

    def ceiling_of(self, sae: str, metric: str | None = None) -> str:
        """The ceiling ``sae`` is measured against (the path ceiling for a residual SAE
        through the reconstruction), on ``metric``: :data:`IDEAL` for a metric measured
        against its ideal (:data:`IDEAL_CEILINGS`)."""
        if metric in IDEAL_CEILINGS:
            return IDEAL
        return self.ceilings.get(sae, self.ceiling)

    def controls(self, sae: str) -> dict[str, str]:
        """``{"floor": ..., "random SAE": ...}`` of ``sae`` (the random SAE where it has one)."""
        out = {"floor": self.floors[sae]}
        if sae in self.random_saes:
            out["random SAE"] = self.random_saes[sae]
        return out


def check_results(results: Any) -> xr.Dataset:
    if not isinstance(results, xr.Dataset):
        raise TypeError(f"results must be an xarray.Dataset (from evaluate_cross_section, "
                        f"concatenated over 'attribute'), got {type(results).__name__}")
    missing = [v for v in REQUIRED if v not in results.data_vars]
    if missing:
        raise ValueError(f"results lack the variable(s) {missing}: pass the Dataset returned "
                         "by sage_nn.evaluation.evaluate_cross_section (one per attribute, "
                         "joined with xr.concat(..., 'attribute'))")
    if "attribute" not in results.dims:
        if "attribute" in results.attrs:  # one cross-section without its attribute dim
            results = results.expand_dims(attribute=[results.attrs["attribute"]])
        else:
            raise ValueError("results have no 'attribute' dimension: concatenate the "
                             "per-attribute Datasets with xr.concat(datasets, 'attribute')")
    return results


def roles(results: xr.Dataset) -> Roles:
    """Split the ``method`` coordinate into ceiling, SAEs with their floors, and others."""
    methods = [str(m) for m in results["dictionary"].values]
    if CEILING not in methods:
        raise ValueError(f"results have no {CEILING!r} method (the ceiling); methods: "
                         f"{methods}. Evaluate with the supervised dictionary (the default "
                         "of evaluate_cross_section)")
    saes = [m for m in methods if FLOOR_PREFIX + m in methods]
    floors = {m: FLOOR_PREFIX + m for m in saes}
    random_saes = {m: RANDOM_SAE_PREFIX + m for m in saes if RANDOM_SAE_PREFIX + m in methods}
    path = PATH_CEILING if PATH_CEILING in methods else None
    ceilings = {}
    if "ceiling_of" in results.coords:
        given = dict(zip(methods, (str(c) for c in results["ceiling_of"].values)))
        ceilings = {m: given[m] for m in saes if given.get(m) in methods}
    others = [m for m in methods if m not in (CEILING, path) and m not in saes
              and m not in floors.values() and m not in random_saes.values()]
    return Roles(CEILING, saes, floors, others, random_saes, ceilings, path)


def headline_k(results: xr.Dataset, k: int = 2) -> int:
    """The edit budget shown where a single k is asked for (per-k tables): ``k`` if
    evaluated, else the smallest larger one (else the largest there is)."""
    ks = sorted(int(x) for x in results["k"].values)
    larger = [x for x in ks if x >= k]
    return larger[0] if larger else ks[-1]


def headline_metrics(results: xr.Dataset) -> tuple[str, ...]:
    """The headline metrics the results hold: edits summarised over k, or (results written
    before) the edits at the headline k."""
    return HEADLINE if "edit_auc" in results else OLD_HEADLINE


def headline_table(results: xr.Dataset) -> pd.DataFrame:
    """Headline metrics, one row per (attribute, method): sufficiency, necessity, both edits
    summarised over k (the area under the edit-vs-k curve), best F1 (and its chance level),
    FVU pooled over the cross-section's pairs, the per-token L0 at the dictionary's own site
    and the L0 at the pairs (means over the pairs), and the next-token loss increase."""
    results = check_results(results)
    order = roles(results).ordered
    k = headline_k(results)
    columns = {"sufficiency": results["sufficiency"], "necessity": results["necessity"]}
    if "edit_auc" in results:
        columns |= {name: results[name] for name in ("edit_auc", "edit_f1_auc")}
    else:
        columns |= {f"{name}_k{k}": results[name].sel(k=k, drop=True)
                    for name in BY_K if name in results}
    if "best_f1" in results:
        columns["best_f1"] = pair_mean(results["best_f1"])
    if "best_f1_chance" in results:
        columns["best_f1_chance"] = results["best_f1_chance"]
    columns["fvu"] = results["fvu_pooled"] if "fvu_pooled" in results \
        else pair_mean(results["fvu"])
    for name in ("l0", "l0_site"):
        if name in results:
            columns[name] = pair_mean(results[name])
    if "loss_increase" in results:
        columns["loss_increase"] = results["loss_increase"]
    rows = []
    for attribute in results["attribute"].values:
        for method in order:
            row = {"attribute": str(attribute), "dictionary": method}
            for name, da in columns.items():
                sel = {d: v for d, v in (("attribute", attribute), ("dictionary", method))
                       if d in da.dims}
                row[name] = float(da.sel(sel))
            rows.append(row)
    table = pd.DataFrame(rows).set_index(["attribute", "dictionary"])
    table.attrs["edit_k"] = k
    return table


class Lookup:
    """Scalar access to the results by labels (one ``.sel`` per scalar is slow). The
    method :data:`IDEAL` reads a metric's ideal (:data:`IDEAL_CEILINGS`), defined where
    the ceiling's value is."""

    def __init__(self, results: xr.Dataset):
        self.results = results
        self._series: dict[str, pd.Series] = {}

    def __call__(self, name: str, attribute: str, method: str, **sel) -> float | None:
        if method == IDEAL:
            return self._ideal(name, attribute)
        if name not in self.results:
            return None
        if name not in self._series:  # per-pair metrics: mean over the cross-section
            self._series[name] = pair_mean(self.results[name]).to_series()
        series = self._series[name]
        labels = {"attribute": attribute, "dictionary": method, **sel}
        key = tuple(labels[d] for d in series.index.names)
        try:
            value = float(series.loc[key if len(key) > 1 else key[0]])
        except KeyError:
            return None
        return None if math.isnan(value) else value

    def _ideal(self, name: str, attribute: str) -> float | None:
        if name not in IDEAL_CEILINGS or self(name, attribute, CEILING) is None:
            return None
        return IDEAL_CEILINGS[name]

    def ci(self, name: str, attribute: str, method: str, **sel):
        if method == IDEAL:
            return (self._ideal(name, attribute),) * 2
        return (self(f"{name}_ci", attribute, method, bound="low", **sel),
                self(f"{name}_ci", attribute, method, bound="high", **sel))

    def boot(self, name: str, attribute: str, method: str) -> np.ndarray | None:
        """The metric's bootstrap replicates (``<name>_boot``; every dictionary of an
        attribute on the same draws), or None."""
        var = f"{name}_boot"
        if method == IDEAL:  # the ideal on every draw where the ceiling is defined
            ceiling, ideal = self.boot(name, attribute, CEILING), self._ideal(name, attribute)
            return None if ceiling is None or ideal is None else np.where(
                np.isfinite(ceiling), ideal, np.nan)
        if var not in self.results or method not in self.results["dictionary"].values:
            return None
        values = self.results[var].sel(attribute=attribute, dictionary=method).values
        return None if not np.isfinite(values).any() else values.astype(np.float64)


def extra_scalars(results: xr.Dataset) -> list[str]:
    """Further (attribute, method) metrics a newer evaluation adds (e.g. a loss increase)."""
    known = set(REQUIRED) | set(PER_PAIR) | set(BY_K) | set(HEADLINE) | {
        "edit_magnitude", "edit_f1_magnitude", "fvu_pooled"}
    return [str(v) for v, da in results.data_vars.items()
            if v not in known and not str(v).endswith("_ci")
            and set(da.dims) <= {"attribute", "dictionary", "pair"} and "dictionary" in da.dims]


def gap_closed(sae: float | None, ceiling: float | None, floor: float | None) -> float | None:
    """Where the SAE sits between floor (0) and ceiling (1); None where the ceiling is not
    above the floor (there is no gap to close: the metric cannot rank here)."""
    if None in (sae, ceiling, floor) or ceiling - floor < 1e-12:
        return None
    return (sae - floor) / (ceiling - floor)


def goodness_interval(name: str, low: float | None,
                      high: float | None) -> tuple[float | None, float | None]:
    """A 95% interval in :func:`goodness`'s units (sufficiency: ``1 - |1 - s|``, so an
    interval around 1 reaches 1)."""
    if low is None or high is None or name != "sufficiency":
        return low, high
    ends = (goodness(name, low), goodness(name, high))
    return min(ends), (1.0 if low <= 1 <= high else max(ends))


def goodness(name: str, value):
    """Higher is better: sufficiency is best at 1 (overshooting the clean logit difference
    is no better than falling short), so it is scored as ``1 - |1 - s|`` (values or
    arrays of replicates)."""
    if value is None or name != "sufficiency":
        return value
    if isinstance(value, np.ndarray):
        return 1 - np.abs(1 - value)
    return 1 - abs(1 - value)


# -- SAEBench-style JSON -----------------------------------------------------------------


# -- plots -------------------------------------------------------------------------------


# -- many SAEs: one table and plots across them ------------------------------------------

#: the headline metrics compared across SAEs
SWEEP_METRICS = HEADLINE


def metric_key(metric: str, k: int) -> tuple[str, dict]:
    """A metric's column name and selection: an edit at ``k`` is ``edit_k2``; the headline
    edits over k (``edit_auc``) are their own names."""
    return (f"{metric}_k{k}", {"k": k}) if metric in BY_K else (metric, {})


def sae_widths(results: xr.Dataset, sae_info: Mapping | None = None) -> dict[str, int | None]:
    """Each SAE's width (latents, ``d_sae``) from its info's ``sae_cfg_dict``, else None."""
    out = {}
    for sae in roles(results).saes:
        cfg = ((sae_info or {}).get(sae) or {}).get("sae_cfg_dict") or {}
        try:
            out[sae] = int(cfg["d_sae"])
        except (KeyError, TypeError, ValueError):
            out[sae] = None
    return out


# -- the summary document ----------------------------------------------------------------
# One list of blocks rendered twice: Markdown (images linked) and HTML (images embedded).


def excluded(results: xr.Dataset, attribute: str) -> str | None:
    """Why an attribute is kept out of claims (its cross-section recovers far less than its
    target, its ceiling is not ground truth at the cross-section, or its effect is small),
    or None."""
    row = results.sel(attribute=attribute)
    reasons = []
    if "weak_cross_section" in results and bool(row.weak_cross_section):
        where = str(row.effect_layers.values) if "effect_layers" in results else ""
        reasons.append(f"no cross-section found (its joint patch recovers "
                       f"{float(row.recovered):.2f} of the effect, target "
                       f"{float(row.target):g})" + (f"; attribution puts the effect at "
                                                    f"layers {where}" if where else ""))
    if "ground_truth" in results and not bool(row.ground_truth):
        reasons.append(f"not ground truth here ({row.ground_truth_note.item()})")
    if "small_effect" in results and bool(row.small_effect):
        reasons.append("small effect")
    return "; ".join(reasons) or None


def headline_columns(k: int, results: xr.Dataset | None = None) -> list[tuple[str, str, dict]]:
    """(metric, column label, selection) of the headline metrics (of ``results``: results
    written before the edits were summarised over k have the edits at ``k``)."""
    metrics = HEADLINE if results is None else headline_metrics(results)
    return [(m, LABELS[m] + (f" k={k}" if m in BY_K else ""), {"k": k} if m in BY_K else {})
            for m in metrics]
