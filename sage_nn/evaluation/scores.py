"""One attribute's scores: from its patched runs and every dictionary's codes to a Dataset.

Per dictionary, every metric's value and its bootstrap replicates on the attribute's shared
draws (:mod:`sage_nn.evaluation.paired`); a control's seeds are merged into one row (its
value the mean over seeds, draw ``b`` of its replicates seed ``draws[b]``'s). The headline
metrics keep their replicates (``<metric>_boot``), so the report can subtract them draw by
draw (SAE − floor, ceiling − SAE).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from . import metrics, paired
from .coders import SiteCode

#: the headline metrics: each has replicates (``<metric>_boot``), paired verdicts and a gap
HEADLINE = ("sufficiency", "necessity", "edit_auc", "edit_f1_auc", "best_f1")
#: intervention metrics of one variant (name -> the variant it is measured on)
INTERVENTION = ("sufficiency", "sufficiency_ratio", "loss_increase", "necessity")
PER_PAIR = ("fvu", "l0", "l0_site", "dead", "best_f1", "share_interpretable", "alignment")


def edit_scorer(out: xr.Dataset, edit_metric: str):
    """``score(variant, rows=all)``: the attribute's edit metric of one variant of
    :func:`~sage_nn.model.patching.run_patched`'s output, against the clean and
    counterfactual runs of the same prompts; ``rows`` may be ``[n_boot, n]`` draws (then one
    value per draw). Each variant's rows are read out of the Dataset once."""
    table = out.top1 if edit_metric == "accuracy" else out.logit_diff
    values = dict(zip(out.variant.values.tolist(), table.values))
    if edit_metric == "accuracy":
        return lambda variant, rows=slice(None): metrics.edit_accuracy(
            values[variant][rows], values["cf"][rows], values["clean"][rows])
    return lambda variant, rows=slice(None): metrics.edit_success(
        values[variant][rows], values["clean"][rows], values["cf"][rows])


def intervention_scores(out: xr.Dataset, method: str, ks: Sequence[int], magnitudes: Mapping,
                        edit_metric: str, idx: np.ndarray) -> dict:
    """One dictionary's intervention metrics: ``{name: (value, replicates)}`` (edits: a
    list over ``ks``), and ``magnitudes`` per edit kind."""
    ld = out.logit_diff
    get = lambda v: ld.sel(variant=v).values  # noqa: E731
    clean, mean = get("clean"), get("mean")
    suff, nec = get(f"{method}|sufficiency"), get(f"{method}|necessity")
    logp = [out.answer_logprob.sel(variant=v).values
            for v in (f"{method}|sufficiency", "clean")]
    row = {}
    for name, fn, args in (("sufficiency", metrics.sufficiency, (suff, mean, clean)),
                           ("sufficiency_ratio", metrics.sufficiency_ratio, (suff, clean)),
                           ("loss_increase", metrics.loss_increase, logp),
                           ("necessity", metrics.necessity, (nec, mean, clean))):
        value = fn(*args)
        row[name] = (value, np.full(len(idx), np.nan) if np.isnan(value)
                     else np.asarray(fn(*(x[idx] for x in args)), dtype=np.float64))
    score = edit_scorer(out, edit_metric)
    for kind in ("edit", "edit_f1"):
        values, reps, mags = [], [], []
        for k in ks:
            if (method, kind, k) not in magnitudes:
                values.append(np.nan)
                reps.append(np.full(len(idx), np.nan))
                mags.append(np.nan)
                continue
            variant = f"{method}|{kind}{k}"
            values.append(float(score(variant)))
            reps.append(np.asarray(score(variant, idx), dtype=np.float64))
            mags.append(magnitudes[method, kind, k])
        row[kind] = (np.array(values), np.stack(reps, -1))  # replicates [B, K]
        row[f"{kind}_magnitude"] = (np.array(mags), None)
        row[f"{kind}_auc"] = (float(paired.curve_area(np.array(values), ks)),
                              paired.curve_area(np.stack(reps, -1), ks))
    return row


def code_scores(codes: Mapping[tuple, SiteCode], fitted: Mapping[tuple, dict], features,
                labels_fit, labels, idx: np.ndarray, idx_fit: np.ndarray) -> dict:
    """Per pair: FVU, per-token L0 at the dictionary's own site (``l0``) and at the pair
    (``l0_site``), dead latents, held-out best F1 (detectors chosen on the fit prompts),
    share interpretable, alignment; pooled FVU; and best F1's replicates with the detector
    chosen inside each draw (:func:`paired.detector_replicates`)."""
    row = {k: [] for k in PER_PAIR}
    residual = variance = 0.0
    reps = []
    for pair, code in codes.items():
        held_out = code.codes.numpy()
        # each value's detector (chosen on the fit prompts) scored on the held-out ones: what
        # metrics.interpretability tabulates, without building its table per pair
        _, _, _, active, positive = metrics.detectors(fitted[pair], held_out, labels)
        f1 = metrics.detector_f1(active, positive)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a value absent here: NaN
            best, share = float(np.nanmean(f1)), float(np.nanmean(np.where(
                np.isnan(f1), np.nan, f1 >= metrics.INTERPRETABLE_F1)))
        a, a_hat = code.a.double().numpy(), code.a_hat.double().numpy()
        residual += float(((a - a_hat) ** 2).sum())
        variance += float(((a - a.mean(0)) ** 2).sum())
        row["fvu"].append(metrics.fvu(a, a_hat))
        row["l0_site"].append(metrics.l0(held_out))
        row["l0"].append(row["l0_site"][-1] if code.l0_own is None else float(code.l0_own))
        row["dead"].append(metrics.dead_share(held_out))
        row["best_f1"].append(best)
        row["share_interpretable"].append(share)
        row["alignment"].append(np.nan if code.directions is None else float(
            metrics.feature_alignment(features[pair], code.directions.numpy()).mean()))
        reps.append(paired.detector_replicates(code.codes_fit.numpy(), labels_fit, held_out,
                                               labels, fitted[pair], idx, idx_fit))
    out = {k: (v, None) for k, v in row.items()}
    out["fvu_pooled"] = (residual / variance if variance > 0 else np.nan, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["best_f1_mean"] = (float(np.nanmean(row["best_f1"])), np.nanmean(np.stack(reps), 0))
    return out


def merge_seeds(rows: Sequence[dict], draws: np.ndarray) -> dict:
    """One control's rows over its seeds as one row: values the mean over seeds (per pair,
    per k), replicates draw ``b`` from seed ``draws[b]``."""
    if len(rows) == 1:
        return rows[0]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for key in rows[0]:
            values = np.nanmean(np.stack([np.asarray(r[key][0], dtype=np.float64)
                                          for r in rows]), 0)
            reps = None if rows[0][key][1] is None else paired.over_seeds(
                [r[key][1] for r in rows], draws % len(rows))
            out[key] = (values if np.ndim(values) else float(values), reps)
    return out


def to_dataset(rows: Mapping[str, dict], ks: Sequence[int], pairs: Sequence[str],
               n_boot: int) -> xr.Dataset:
    """The per-dictionary rows of one attribute as a Dataset over ``dictionary`` (and ``k``,
    ``pair``, ``bound``, ``boot``): each metric, its ``_ci`` from its replicates, and the
    headline metrics' replicates ``<metric>_boot``."""
    names = list(rows)
    data = {}
    first = next(iter(rows.values()))
    for key, (value, reps) in first.items():
        name = "best_f1" if key == "best_f1_mean" else key
        values = [rows[d][key][0] for d in names]
        if key in ("edit", "edit_f1", "edit_magnitude", "edit_f1_magnitude"):
            data[name] = (("dictionary", "k"), values)
        elif key in PER_PAIR:
            data[name] = (("dictionary", "pair"), values)
        elif key != "best_f1_mean":
            data[name] = (("dictionary",), values)
        if reps is None:
            continue
        stacked = [rows[d][key][1] for d in names]
        if key in ("edit", "edit_f1"):
            data[f"{name}_ci"] = (("dictionary", "k", "bound"), [
                [paired.percentile_interval(r[:, j]) for j in range(len(ks))] for r in stacked])
        else:
            data[f"{name}_ci"] = (("dictionary", "bound"),
                                  [paired.percentile_interval(r) for r in stacked])
        if name in HEADLINE:
            data[f"{name}_boot"] = (("dictionary", "boot"), stacked)
    return xr.Dataset(data, coords={"dictionary": names, "k": list(ks), "pair": list(pairs),
                                    "bound": ["low", "high"], "boot": np.arange(n_boot)})
