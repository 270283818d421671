"""The SAE against its controls and its ceiling: paired verdicts (the interval of a difference
over the shared bootstrap draws), gap closed, the calibration mark, the flags, and the tables
built from them (one SAE's metrics, the comparison across SAEs, their orderings)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from ..evaluation.paired import percentile_interval
from .tables import (
    BY_K,
    CALIBRATED,
    FLOOR_PREFIX,
    HEADLINE,
    PER_PAIR,
    RANDOM_SAE_PREFIX,
    Lookup,
    Roles,
    check_results,
    excluded,
    extra_scalars,
    gap_closed,
    goodness,
    goodness_interval,
    headline_columns,
    headline_k,
    headline_metrics,
    metric_key,
    roles,
    sae_widths,
)


def _lookup(results: "xr.Dataset | Lookup") -> Lookup:
    return results if isinstance(results, Lookup) else Lookup(results)


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


def fvu_name(results: xr.Dataset) -> str:
    """The pooled FVU (results written before it: the per-pair mean)."""
    return "fvu_pooled" if "fvu_pooled" in results else "fvu"


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
    from some control), ``("no gap", None)`` where the ceiling is not above the floor, or
    ``("✗ FVU > 1", gap)`` for a reconstruction worse than the mean: its edits and detectors
    are not credited (a random sae_lens TopK at SmolLM2's L23, FVU 97, otherwise edits above
    its calibrated controls by moving the output with its large decoder)."""
    ceiling, floor = r.ceiling_of(sae, metric), r.floors[sae]
    values = [goodness(metric, look(metric, attribute, m)) for m in (sae, ceiling, floor)]
    if None in values:
        return "–", None
    if not gap_defined(look, attribute, metric, ceiling, floor):
        return "no gap", None
    gap = gap_closed(*values)
    if (fvu := look(fvu_name(look.results), attribute, sae)) is not None and fvu > 1:
        return "✗ FVU > 1", gap
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


def sae_metrics(results: "xr.Dataset | Lookup", sae: str,
                attribute: str) -> dict[str, float | None]:
    """Flat metrics of one SAE at one attribute, each next to its ceiling and controls:
    ``m``, ``m_ci_low``, ``m_ci_high``, ``m_ceiling`` (the ceiling the SAE is measured
    against: its ideal for necessity), ``m_floor``, ``m_random_sae``, ``m_gap_closed``
    (None where the ceiling is not above the floor, or out of claims), and for the headline
    metrics the paired intervals ``m_minus_floor_low``/``_high`` and
    ``m_minus_random_sae_low``/``_high``."""
    look = _lookup(results)
    results = look.results
    r = roles(results)
    floor = FLOOR_PREFIX + sae
    random = r.random_saes.get(sae)
    claimed = excluded(results, attribute) is None  # no gap closed against a failed ceiling
    out: dict[str, float | None] = {}

    def put(key: str, name: str, with_gap: bool, **sel) -> None:
        ceiling = r.ceiling_of(sae, name)
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
                   "fvu": look(fvu_name(results), a, sae)}
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


def sae_flags(results: xr.Dataset, sae: str) -> list[str]:
    """What a reader must know of an SAE before its numbers: a reconstruction worse than the
    mean (pooled FVU above 1) at some attribute, and an SAE that no headline metric of an
    attribute in claims puts above both its controls (paired intervals)."""
    look, r = Lookup(results), roles(results)
    flags = []
    attributes = [str(a) for a in results["attribute"].values]
    worse = [(a, v) for a in attributes
             if (v := look(fvu_name(results), a, sae)) is not None and v > 1]
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
