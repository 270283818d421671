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
from ..evaluation.paired import percentile_interval
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

    def ceiling_of(self, sae: str) -> str:
        """The ceiling ``sae`` is measured against (the path ceiling for a residual SAE
        through the reconstruction)."""
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

    def boot(self, name: str, attribute: str, method: str) -> np.ndarray | None:
        """The metric's bootstrap replicates (``<name>_boot``; every dictionary of an
        attribute on the same draws), or None."""
        var = f"{name}_boot"
        if var not in self.results or method not in self.results["dictionary"].values:
            return None
        values = self.results[var].sel(attribute=attribute, dictionary=method).values
        return None if not np.isfinite(values).any() else values.astype(np.float64)


def _lookup(results: "xr.Dataset | Lookup") -> Lookup:
    return results if isinstance(results, Lookup) else Lookup(results)


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


def paired_interval(look: "Lookup", attribute: str, metric: str, first: str,
                    second: str) -> tuple[float, float] | None:
    """The 95% interval of ``first - second`` in goodness units, draw by draw over their
    shared bootstrap draws (the controls' seeds and the detectors' choice inside them);
    None without replicates (results written before they were kept)."""
    a, b = look.boot(metric, attribute, first), look.boot(metric, attribute, second)
    if a is None or b is None:
        return None
    lo, hi = percentile_interval(goodness(metric, a) - goodness(metric, b))
    return None if np.isnan(lo) else (lo, hi)


def compare(look: "Lookup", attribute: str, metric: str, first: str,
            second: str) -> str | None:
    """``"above"`` when ``first`` lies above ``second`` (in goodness; the paired interval of
    their difference above 0), ``"below"``, or ``"overlap"``; None when either has no
    value. Results without replicates compare the two intervals."""
    interval = paired_interval(look, attribute, metric, first, second)
    if interval is not None:
        lo, hi = interval
        return "above" if lo > 0 else "below" if hi < 0 else "overlap"
    mine = goodness_interval(metric, *look.ci(metric, attribute, first))
    other = goodness_interval(metric, *look.ci(metric, attribute, second))
    if None in mine + other:
        return None
    return "above" if mine[0] > other[1] else "below" if mine[1] < other[0] else "overlap"


def against_floor(look: "Lookup", sae: str, attribute: str, metric: str,
                  control: str = "floor", **sel) -> str | None:
    """``"above"``/``"below"``/``"overlap"``: the SAE against its ``control`` (``"floor"``
    or ``"random SAE"``) by the paired interval of their difference (:func:`compare`)."""
    name = (RANDOM_SAE_PREFIX if control == "random SAE" else FLOOR_PREFIX) + sae
    if sel:  # one k of an edit: no replicates kept, the intervals compared
        mine = goodness_interval(metric, *look.ci(metric, attribute, sae, **sel))
        other = goodness_interval(metric, *look.ci(metric, attribute, name, **sel))
        if None in mine + other:
            return None
        return "above" if mine[0] > other[1] else "below" if mine[1] < other[0] else "overlap"
    return compare(look, attribute, metric, sae, name)


def gap_defined(look: "Lookup", attribute: str, metric: str, ceiling: str,
                floor: str) -> bool:
    """Whether there is a gap to close: the ceiling lies above the floor (by the paired
    interval of their difference where there are replicates, else by value)."""
    verdict = compare(look, attribute, metric, ceiling, floor)
    if look.boot(metric, attribute, ceiling) is not None:
        return verdict == "above"
    c, f = (goodness(metric, look(metric, attribute, m)) for m in (ceiling, floor))
    return None not in (c, f) and c - f > 1e-12


def calibration(look: "Lookup", r: "Roles", sae: str, attribute: str,
                metric: str) -> tuple[str, float | None]:
    """An SAE's place between its controls and its ceiling on one headline metric, from
    paired intervals: ``("✓", gap)`` above every control and not above the ceiling, ``("✗
    below <control>", gap)``, ``("✗ above the ceiling", gap)``, ``("~", gap)`` (not apart
    from some control), or ``("no gap", None)`` where the ceiling is not above the floor."""
    ceiling, floor = r.ceiling_of(sae), r.floors[sae]
    values = [goodness(metric, look(metric, attribute, m)) for m in (sae, ceiling, floor)]
    if None in values:
        return "–", None
    if not gap_defined(look, attribute, metric, ceiling, floor):
        return "no gap", None
    gap = gap_closed(*values)
    verdicts = {role: compare(look, attribute, metric, sae, name)
                for role, name in r.controls(sae).items()}
    below = [role for role, v in verdicts.items() if v == "below"]
    if below:
        return f"✗ below {' and '.join(below)}", gap
    if compare(look, attribute, metric, sae, ceiling) == "above":
        return "✗ above the ceiling", gap
    if all(v == "above" for v in verdicts.values()):
        return "✓", gap
    return "~", gap


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


def sae_metrics(results: "xr.Dataset | Lookup", sae: str,
                attribute: str) -> dict[str, float | None]:
    """Flat metrics of one SAE at one attribute, each next to its ceiling and controls:
    ``m``, ``m_ci_low``, ``m_ci_high``, ``m_ceiling`` (the ceiling the SAE is measured
    against), ``m_floor``, ``m_random_sae``, ``m_gap_closed`` (None where the ceiling is not
    above the floor, or out of claims), and for the headline metrics the paired intervals
    ``m_minus_floor_low``/``_high`` and ``m_minus_random_sae_low``/``_high``."""
    look = _lookup(results)
    results = look.results
    r = roles(results)
    floor, ceiling = FLOOR_PREFIX + sae, r.ceiling_of(sae)
    random = r.random_saes.get(sae)
    claimed = excluded(results, attribute) is None  # no gap closed against a failed ceiling
    out: dict[str, float | None] = {}

    def put(key: str, name: str, with_gap: bool, **sel) -> None:
        out[key] = look(name, attribute, sae, **sel)
        if f"{name}_ci" in results:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = look.ci(name, attribute, sae, **sel)
        out[f"{key}_ceiling"] = look(name, attribute, ceiling, **sel)
        out[f"{key}_floor"] = look(name, attribute, floor, **sel)
        if random is not None:
            out[f"{key}_random_sae"] = look(name, attribute, random, **sel)
        if with_gap:
            gap = not sel and name in HEADLINE and look.boot(name, attribute, ceiling) is not None
            defined = gap_defined(look, attribute, name, ceiling, floor) if gap else True
            out[f"{key}_gap_closed"] = gap_closed(*(goodness(name, out[key + role]) for role
                                                    in ("", "_ceiling", "_floor"))) \
                if claimed and defined else None
        if not sel and name in HEADLINE:
            for label, other in (("floor", floor), ("random_sae", random)):
                interval = None if other is None else paired_interval(
                    look, attribute, name, sae, other)
                if interval is not None:
                    out[f"{key}_minus_{label}_low"], out[f"{key}_minus_{label}_high"] = interval

    for name in ("sufficiency", "necessity", "edit_auc", "edit_f1_auc"):
        if name in results:
            put(name, name, True)
    for name in (n for n in BY_K if n in results):
        for k in results["k"].values:
            put(f"{name}_k{int(k)}", name, True, k=int(k))
            if f"{name}_magnitude" in results:
                put(f"{name}_magnitude_k{int(k)}", f"{name}_magnitude", False, k=int(k))
    for name in [n for n in PER_PAIR if n in results] + extra_scalars(results):
        put(name, name, name in CALIBRATED)
    if "fvu_pooled" in results:
        put("fvu_pooled", "fvu_pooled", False)
    if "best_f1_chance" in results:
        out["best_f1_chance"] = look("best_f1_chance", attribute, sae)
    return out


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


def comparison_table(results: xr.Dataset, sae_info: Mapping | None = None, *,
                     k: int | None = None) -> pd.DataFrame:
    """One row per (SAE, attribute), one column per metric: width, per-token L0 at its own
    site (``l0``), L0 at the pairs (``l0_site``), pooled FVU, and per headline metric
    (:func:`headline_metrics`) its value, 95% interval (``*_low``/``*_high``), its
    ceiling's, floor's and random SAE's values (``*_ceiling``, ``*_floor``,
    ``*_random_sae``), its gap closed (``*_gap``; empty where the ceiling is not above the
    floor, or out of claims) and its place against each control by their paired interval
    (``*_above_floor``, ``*_above_random_sae``: 1 above, -1 below, 0 overlapping).
    ``k``: the edit budget of results without the edits over k."""
    results = check_results(results)
    r, look = roles(results), Lookup(results)
    k = headline_k(results) if k is None else k
    widths = sae_widths(results, sae_info)
    rows = []
    for sae in r.saes:
        for a in (str(x) for x in results["attribute"].values):
            row = {"sae": sae, "attribute": a, "width": widths[sae],
                   "l0": look("l0", a, sae), "l0_site": look("l0_site", a, sae),
                   "fvu": look("fvu_pooled", a, sae) if "fvu_pooled" in results
                   else look("fvu", a, sae)}
            metrics = sae_metrics(look, sae, a)
            for metric in headline_metrics(results):
                name, sel = metric_key(metric, k)
                if sel:  # results without the edits over k
                    metrics[name] = look(metric, a, sae, **sel)
                row[name] = metrics.get(name)
                row[f"{name}_low"], row[f"{name}_high"] = look.ci(metric, a, sae, **sel)
                for role in ("ceiling", "floor", "random_sae"):
                    row[f"{name}_{role}"] = metrics.get(f"{name}_{role}")
                row[f"{name}_gap"] = metrics.get(f"{name}_gap_closed")
                for control, label in (("floor", "floor"), ("random SAE", "random_sae")):
                    verdict = against_floor(look, sae, a, metric, control, **sel)
                    row[f"{name}_above_{label}"] = {"above": 1, "below": -1,
                                                    "overlap": 0}.get(verdict)
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
    for metric in headline_metrics(results):
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


def headline_columns(k: int, results: xr.Dataset | None = None) -> list[tuple[str, str, dict]]:
    """(metric, column label, selection) of the headline metrics (of ``results``: results
    written before the edits were summarised over k have the edits at ``k``)."""
    metrics = HEADLINE if results is None else headline_metrics(results)
    return [(m, LABELS[m] + (f" k={k}" if m in BY_K else ""), {"k": k} if m in BY_K else {})
            for m in metrics]


def sae_flags(results: xr.Dataset, sae: str) -> list[str]:
    """What a reader must know of an SAE before its numbers: a reconstruction worse than the
    mean (pooled FVU above 1) at some attribute, and an SAE that no headline metric of an
    attribute in claims puts above both its controls (paired intervals)."""
    look, r = Lookup(results), roles(results)
    flags = []
    attributes = [str(a) for a in results["attribute"].values]
    worse = [(a, v) for a in attributes
             if (v := look("fvu_pooled" if "fvu_pooled" in results else "fvu", a, sae))
             is not None and v > 1]
    if worse:
        flags.append("reconstruction worse than the mean (FVU > 1) at " + ", ".join(
            f"{a} ({v:.3g})" for a, v in worse))
    claimed = [a for a in attributes if excluded(results, a) is None]
    if claimed and sae in r.saes:
        columns = headline_columns(headline_k(results), results)
        above = [(a, m) for a in claimed for m, _, sel in columns
                 if all(against_floor(look, sae, a, m, c, **sel) == "above"
                        for c in r.controls(sae))]
        if not above:
            flags.append("no headline metric puts it above its random controls at any "
                         "attribute in claims: indistinguishable from random weights here")
    return flags


# -- the whole report --------------------------------------------------------------------
