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
from ..evaluation.scoring import pair_mean

CEILING = SUPERVISED
FLOOR_PREFIX = f"{RANDOM}:"
REQUIRED = ("sufficiency", "necessity", "edit")
# Metrics where higher is better and ceiling/floor calibrate the scale (gap closed).
CALIBRATED = ("sufficiency", "necessity", "edit", "edit_f1", "best_f1")
#: the metrics every SAE is judged by, against its floor and the ceiling (edits at the
#: headline k)
HEADLINE = ("sufficiency", "necessity", "edit", "edit_f1", "best_f1")
BY_K = ("edit", "edit_f1")
PER_PAIR = ("fvu", "l0", "dead", "best_f1", "share_interpretable", "alignment")
LABELS = {"sufficiency": "sufficiency", "necessity": "necessity",
          "edit": "edit (greedy)", "edit_magnitude": "edit magnitude",
          "edit_f1": "edit (top-F1 latents)", "edit_f1_magnitude": "F1 edit magnitude",
          "best_f1": "best F1", "share_interpretable": "share F1 ≥ 0.8",
          "alignment": "alignment", "fvu": "FVU", "l0": "L0", "dead": "dead share",
          "loss_increase": "loss increase (nats)"}


# -- reading the results -----------------------------------------------------------------

@dataclass
class Roles:
    """Which method is the ceiling, which are SAEs (each with its floor), which are other."""

    ceiling: str
    saes: list[str]
    floors: dict[str, str]
    others: list[str] = field(default_factory=list)

    @property
    def ordered(self) -> list[str]:
        """Ceiling, then each SAE followed by its floor, then references."""
        out = [self.ceiling]
        for sae in self.saes:
            out += [sae, self.floors[sae]]
        return out + self.others


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
    others = [m for m in methods if m != CEILING and m not in saes
              and m not in floors.values()]
    return Roles(CEILING, saes, floors, others)


def headline_k(results: xr.Dataset, k: int = 2) -> int:
    """The edit budget of the headline: ``k`` if evaluated, else the smallest larger one
    (else the largest there is)."""
    ks = sorted(int(x) for x in results["k"].values)
    larger = [x for x in ks if x >= k]
    return larger[0] if larger else ks[-1]


def headline_table(results: xr.Dataset) -> pd.DataFrame:
    """Headline metrics, one row per (attribute, method): sufficiency, necessity, the
    greedy and the top-F1 edit at k = 2 (or the smallest k ≥ 2 evaluated; the columns are
    named after it), best F1, FVU and L0 (both averaged over the cross-section's pairs), and
    the next-token loss increase when the results have it."""
    results = check_results(results)
    order = roles(results).ordered
    k = headline_k(results)
    columns = {"sufficiency": results["sufficiency"], "necessity": results["necessity"],
               **{f"{name}_k{k}": results[name].sel(k=k, drop=True)
                  for name in BY_K if name in results}}
    for name in ("best_f1", "fvu", "l0"):
        if name in results:
            columns[name] = pair_mean(results[name])
    if "loss_increase" in results:
        columns["loss_increase"] = results["loss_increase"]
    rows = []
    for attribute in results["attribute"].values:
        for method in order:
            row = {"attribute": str(attribute), "dictionary": method}
            for name, da in columns.items():
                row[name] = float(da.sel({"attribute": attribute, "dictionary": method}))
            rows.append(row)
    table = pd.DataFrame(rows).set_index(["attribute", "dictionary"])
    table.attrs["edit_k"] = k
    return table


class Lookup:
    """Scalar access to the results by labels (one ``.sel`` per scalar is slow)."""

    def __init__(self, results: xr.Dataset):
        self.results = results
        self._series: dict[str, pd.Series] = {}

    def __call__(self, name: str, attribute: str, method: str, **sel) -> float | None:
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

    def ci(self, name: str, attribute: str, method: str, **sel):
        return (self(f"{name}_ci", attribute, method, bound="low", **sel),
                self(f"{name}_ci", attribute, method, bound="high", **sel))


def _lookup(results: "xr.Dataset | Lookup") -> Lookup:
    return results if isinstance(results, Lookup) else Lookup(results)


def extra_scalars(results: xr.Dataset) -> list[str]:
    """Further (attribute, method) metrics a newer evaluation adds (e.g. a loss increase)."""
    known = set(REQUIRED) | set(PER_PAIR) | set(BY_K) | {"edit_magnitude", "edit_f1_magnitude"}
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


def against_floor(look: "Lookup", sae: str, attribute: str, metric: str,
                  **sel) -> str | None:
    """``"above"`` when the SAE's 95% interval lies above its floor's (in goodness),
    ``"below"`` when it lies below, ``"overlap"`` when they overlap; None without intervals."""
    mine = goodness_interval(metric, *look.ci(metric, attribute, sae, **sel))
    floor = goodness_interval(metric, *look.ci(metric, attribute, FLOOR_PREFIX + sae, **sel))
    if None in mine + floor:
        return None
    return "above" if mine[0] > floor[1] else "below" if mine[1] < floor[0] else "overlap"


def goodness(name: str, value: float | None) -> float | None:
    """Higher is better: sufficiency is best at 1 (overshooting the clean logit difference
    is no better than falling short), so it is scored as ``1 - |1 - s|``."""
    if value is None or name != "sufficiency":
        return value
    return 1 - abs(1 - value)


# -- SAEBench-style JSON -----------------------------------------------------------------


def sae_metrics(results: "xr.Dataset | Lookup", sae: str,
                attribute: str) -> dict[str, float | None]:
    """Flat metrics of one SAE at one attribute, each next to ceiling and floor:
    ``m``, ``m_ci_low``, ``m_ci_high``, ``m_ceiling``, ``m_floor``, ``m_gap_closed``."""
    look = _lookup(results)
    results = look.results
    floor = FLOOR_PREFIX + sae
    claimed = excluded(results, attribute) is None  # no gap closed against a failed ceiling
    out: dict[str, float | None] = {}

    def put(key: str, name: str, with_gap: bool, **sel) -> None:
        out[key] = look(name, attribute, sae, **sel)
        if f"{name}_ci" in results:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = look.ci(name, attribute, sae, **sel)
        out[f"{key}_ceiling"] = look(name, attribute, CEILING, **sel)
        out[f"{key}_floor"] = look(name, attribute, floor, **sel)
        if with_gap:
            out[f"{key}_gap_closed"] = gap_closed(*(goodness(name, out[key + role]) for role
                                                    in ("", "_ceiling", "_floor"))) \
                if claimed else None

    for name in ("sufficiency", "necessity"):
        put(name, name, True)
    for name in (n for n in BY_K if n in results):
        for k in results["k"].values:
            put(f"{name}_k{int(k)}", name, True, k=int(k))
            if f"{name}_magnitude" in results:
                put(f"{name}_magnitude_k{int(k)}", f"{name}_magnitude", False, k=int(k))
    for name in [n for n in PER_PAIR if n in results] + extra_scalars(results):
        put(name, name, name in CALIBRATED)
    return out


# -- plots -------------------------------------------------------------------------------


# -- many SAEs: one table and plots across them ------------------------------------------

#: the headline metrics compared across SAEs (``edit`` at the headline k)
SWEEP_METRICS = HEADLINE


def metric_key(metric: str, k: int) -> tuple[str, dict]:
    """A headline metric's column name and selection: an edit at ``k`` is ``edit_k2``."""
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


def comparison_table(results: xr.Dataset, sae_info: Mapping | None = None, *,
                     k: int | None = None) -> pd.DataFrame:
    """One row per (SAE, attribute), one column per metric: width, L0, FVU, sufficiency,
    necessity, both edits at ``k`` (default: the headline k), best F1, each metric's 95%
    interval (``*_low``/``*_high``), its gap closed between floor and ceiling (``*_gap``;
    empty for an attribute kept out of claims), the floor's and ceiling's value
    (``*_floor``, ``*_ceiling``) and whether the SAE's interval lies above its floor's
    (``*_above_floor``: 1 above, -1 below, 0 overlapping; :func:`against_floor`)."""
    results = check_results(results)
    r, look = roles(results), Lookup(results)
    k = headline_k(results) if k is None else k
    widths = sae_widths(results, sae_info)
    rows = []
    for sae in r.saes:
        for a in (str(x) for x in results["attribute"].values):
            row = {"sae": sae, "attribute": a, "width": widths[sae],
                   "l0": look("l0", a, sae), "fvu": look("fvu", a, sae)}
            claimed = excluded(results, a) is None
            for metric in SWEEP_METRICS:
                name, sel = metric_key(metric, k)
                value = look(metric, a, sae, **sel)
                row[name] = value
                row[f"{name}_low"], row[f"{name}_high"] = look.ci(metric, a, sae, **sel)
                ceiling, floor = look(metric, a, r.ceiling, **sel), look(metric, a, r.floors[sae], **sel)
                row[f"{name}_ceiling"], row[f"{name}_floor"] = ceiling, floor
                row[f"{name}_gap"] = gap_closed(goodness(metric, value),
                                                goodness(metric, ceiling),
                                                goodness(metric, floor)) if claimed else None
                verdict = against_floor(look, sae, a, metric, **sel)
                row[f"{name}_above_floor"] = {"above": 1, "below": -1, "overlap": 0}.get(verdict)
            rows.append(row)
    table = pd.DataFrame(rows).set_index(["sae", "attribute"])
    table = table.apply(lambda c: pd.to_numeric(c.astype(float)))  # missing: NaN, not None
    table.attrs["edit_k"] = k
    return table


def sae_orderings(results: xr.Dataset, *, k: int | None = None) -> dict[str, list[str]]:
    """Per headline metric, the SAEs from best to worst by their mean over the attributes
    kept in claims (sufficiency by its distance from 1)."""
    results = check_results(results)
    r, look = roles(results), Lookup(results)
    k = headline_k(results) if k is None else k
    claimed = [str(a) for a in results["attribute"].values if not excluded(results, str(a))]
    claimed = claimed or [str(a) for a in results["attribute"].values]
    out = {}
    for metric in SWEEP_METRICS:
        key, sel = metric_key(metric, k)
        scores = {}
        for sae in r.saes:
            values = [goodness(metric, look(metric, a, sae, **sel)) for a in claimed]
            values = [v for v in values if v is not None]
            if values:
                scores[sae] = float(np.mean(values))
        if scores:
            out[key] = sorted(
                scores, key=lambda s: -scores[s])
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


def headline_columns(k: int) -> list[tuple[str, str, dict]]:
    """(metric, column label, selection) of the headline metrics, edits at ``k``."""
    return [(m, LABELS[m] + (f" k={k}" if m in BY_K else ""), {"k": k} if m in BY_K else {})
            for m in HEADLINE]


# -- the whole report --------------------------------------------------------------------
