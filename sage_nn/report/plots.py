"""The report's plots: SAEs against ceiling and floor per metric, controllability over k,
and a sweep of SAEs against L0 or width. Each returns a matplotlib Figure (inline in a
notebook), saved only when given a path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from ..common.figures import figure, finish
from ..evaluation.scoring import pair_mean
from .tables import (
    BY_K,
    IDEAL,
    IDEAL_CEILINGS,
    LABELS,
    Lookup,
    Roles,
    check_results,
    excluded,
    headline_k,
    roles,
    sae_widths,
)

#: how an attribute kept out of claims is drawn: a grey field behind it
OUT_OF_CLAIMS = dict(color="#d9d9d9", alpha=0.6, zorder=0)
#: what an edit measures, by the results' ``edit_metric`` of the attribute
MEASURES = {"accuracy": "accuracy", "success": "success (logit diff.)"}


def edit_measure(results: xr.Dataset, attribute: str) -> str | None:
    """What the edits of ``attribute`` measure in these results: accuracy where its
    counterfactual changes the prediction, logit-difference success where it does not
    (``edit_metric``); None when the results do not say."""
    if "edit_metric" not in results:
        return None
    value = str(results["edit_metric"].sel(attribute=attribute).values)
    return MEASURES.get(value, value)


def attribute_label(results: xr.Dataset, attribute: str, metric: str | None = None) -> str:
    """An attribute as a plot names it: with its edit's measure (for an edit) and "out of
    claims" when its numbers are kept out of claims (:func:`~.tables.excluded`)."""
    lines = [attribute]
    measure = edit_measure(results, attribute) if metric in BY_K else None
    if measure:
        lines.append(f"edit {measure}")
    if excluded(results, attribute):
        lines.append("out of claims")
    return "\n".join(lines)


def claims_note(results: xr.Dataset, attributes: list[str]) -> str | None:
    """One line under a figure: which attributes are kept out of claims, and why."""
    out = [f"{a}: {excluded(results, a)}" for a in attributes if excluded(results, a)]
    return ("grey: kept out of claims (" + "; ".join(out) + ")") if out else None


def _note(fig, text: str | None) -> None:
    if text:
        import textwrap

        fig.supxlabel("\n".join(textwrap.wrap(text, int(fig.get_figwidth() * 14))),
                      fontsize=7, color="#555555")


def _styles(r: Roles) -> dict[str, dict]:
    """Colour per method: the ceiling green (the path ceiling dark green), each SAE its own
    colour, its floor the same colour hatched and pale, its random SAE the same colour
    dotted and paler, references grey."""
    palette = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    styles = {r.ceiling: dict(color="#2ca02c", label=f"{r.ceiling} (ceiling)")}
    if r.path_ceiling:
        styles[r.path_ceiling] = dict(color="#145a14", label=f"{r.path_ceiling} (path ceiling)")
    for i, sae in enumerate(r.saes):
        c = palette[i % len(palette)]
        styles[sae] = dict(color=c, label=sae)
        styles[r.floors[sae]] = dict(color=c, alpha=0.35, hatch="//", linestyle="--",
                                     label=f"{r.floors[sae]} (floor)")
        if sae in r.random_saes:
            styles[r.random_saes[sae]] = dict(color=c, alpha=0.2, hatch="..", linestyle=":",
                                              label=f"{r.random_saes[sae]} (random SAE)")
    for other in r.others:
        styles[other] = dict(color="#7f7f7f", label=other)
    return styles


def plot_comparison(results: xr.Dataset, metric: str, path: str | Path | None = None, *,
                    k: int | None = None, dpi: int = 110):
    """Grouped bars, one group per attribute and one bar per method, with the bootstrap
    95% interval as error bars where the results have one. Each attribute is labelled
    with what its edit measures (for an edit) and, when kept out of claims, so and drawn on
    grey, its reason under the figure. Returns the matplotlib Figure, saved to ``path``
    when one is given. ``k``: the edit budget of ``edit``."""
    results = check_results(results)
    r, styles = roles(results), _styles(roles(results))
    methods = r.ordered
    sel = {} if k is None else {"k": k}
    values = pair_mean(results[metric]).sel(**sel)
    ci = results[f"{metric}_ci"].sel(**sel) if f"{metric}_ci" in results else None
    attributes = [str(a) for a in results["attribute"].values]
    width = 0.8 / len(methods)
    fig = figure(figsize=(max(4.5, 1.1 + len(attributes) * len(methods) * 0.45), 3.6))
    ax = fig.subplots()
    x = np.arange(len(attributes))
    for i, method in enumerate(methods):
        v = values.sel({"dictionary": method, "attribute": attributes}).values.astype(float)
        err = None
        if ci is not None:
            lo = ci.sel({"dictionary": method, "attribute": attributes, "bound": "low"}).values
            hi = ci.sel({"dictionary": method, "attribute": attributes, "bound": "high"}).values
            err = np.clip(np.stack([v - lo, hi - v]), 0, None)  # CIs may not contain v
        style = {k_: s for k_, s in styles[method].items() if k_ != "linestyle"}
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(v), width, yerr=err, capsize=3,
               edgecolor=style["color"], linewidth=0.8, **style)
    for i, attribute in enumerate(attributes):
        if excluded(results, attribute):
            ax.axvspan(i - 0.5, i + 0.5, **OUT_OF_CLAIMS)
    ax.set_xticks(x, [attribute_label(results, a, metric) for a in attributes])
    ax.set_xlabel("attribute")
    _note(fig, claims_note(results, attributes))
    title = LABELS.get(metric, metric) + (f" at k = {k}" if k is not None else "")
    ax.set_title(title + (" (95% bootstrap CI)" if ci is not None else ""))
    ax.axhline(0, color="black", linewidth=0.6)
    if metric in ("sufficiency", "necessity", "edit_auc", "edit_f1_auc", *BY_K):
        ax.axhline(1, color="black", linewidth=0.6, linestyle=":")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return finish(fig, path, dpi)


def plot_controllability(results: xr.Dataset, path: str | Path | None = None, *,
                         dpi: int = 110):
    """The edits (with their 95% bands) and edit magnitude over k: one column per
    attribute, titled with what its edit measures (accuracy or logit-difference success),
    grey where the attribute is kept out of claims; one line per method. Returns the
    matplotlib Figure, saved to ``path`` when one is given."""
    results = check_results(results)
    r = roles(results)
    styles = _styles(r)
    attributes = [str(a) for a in results["attribute"].values]
    rows = [name for name in (*BY_K, "edit_magnitude") if name in results]
    ks = results["k"].values.astype(int)
    fig = figure(figsize=(1.5 + 3.2 * len(attributes), 1.2 + 2.6 * len(rows)))
    axes = fig.subplots(len(rows), len(attributes), squeeze=False, sharex=True, sharey="row")
    for j, attribute in enumerate(attributes):
        for i, metric in enumerate(rows):
            ax = axes[i, j]
            for method in r.ordered:
                s = styles[method]
                y = results[metric].sel({"attribute": attribute, "dictionary": method}).values
                ax.plot(ks, y, marker="o", markersize=3, color=s["color"],
                        linestyle=s.get("linestyle", "-"), label=s["label"])
                if f"{metric}_ci" in results:
                    ci = results[f"{metric}_ci"].sel({"attribute": attribute, "dictionary": method})
                    ax.fill_between(ks, ci.sel(bound="low"), ci.sel(bound="high"),
                                    color=s["color"], alpha=0.12, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.grid(alpha=0.3)
            if excluded(results, attribute):
                ax.set_facecolor("#efefef")  # OUT_OF_CLAIMS, without its alpha
            if i == 0:
                ax.set_title(f"attribute {attribute}" + (
                    f": edit {edit_measure(results, attribute)}"
                    if edit_measure(results, attribute) else "")
                    + (" (out of claims)" if excluded(results, attribute) else ""),
                    fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("k (latents edited)")
            if j == 0:
                ax.set_ylabel(LABELS[metric])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # as many columns as the figure is wide (about 0.55 em a character, 4.8 em of handle
    # and spacing); "outside": the layout keeps room for the rows below the axes
    column = (0.55 * max(map(len, labels)) + 4.8) * 8 / 72
    ncol = max(1, min(5, len(labels), int(fig.get_figwidth() / column)))
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncol=ncol,
               frameon=False)
    note = claims_note(results, attributes)
    if note:
        fig.suptitle(note.replace("grey", "grey panels"), fontsize=7, color="#555555")
    return finish(fig, path, dpi)


def plot_sweep(results: xr.Dataset, metric: str, path: str | Path | None = None, *,
               x: str = "l0", k: int | None = None, sae_info: Mapping | None = None,
               dpi: int = 110):
    """``metric`` of every SAE against its L0 (``x="l0"``: per token at its own site, the
    residual stream for a residual SAE) or its width (``x="width"``, from ``sae_info``): one panel per
    attribute, each SAE a point with its 95% bootstrap interval, the ceiling as a band (its
    interval around its line) and the floors as a band over the SAEs' x (each SAE's floor
    at that SAE's x). ``k``: the edit budget (default: the headline k). Returns the
    Figure, saved to ``path`` when one is given."""
    results = check_results(results)
    if x not in ("l0", "width"):
        raise ValueError(f"x={x!r}: plot against 'l0' or 'width'")
    r, look = roles(results), Lookup(results)
    k = headline_k(results) if (k is None and metric in BY_K) else k
    sel = {"k": k} if metric in BY_K else {}
    widths = sae_widths(results, sae_info)
    attributes = [str(a) for a in results["attribute"].values]
    styles = _styles(r)
    fig = figure(figsize=(1.4 + 3.4 * len(attributes), 3.4))
    axes = fig.subplots(1, len(attributes), squeeze=False)[0]
    for ax, a in zip(axes, attributes):
        xs = {sae: (look("l0", a, sae) if x == "l0" else widths[sae]) for sae in r.saes}
        saes = sorted((s for s in r.saes if xs[s] is not None), key=lambda s: xs[s])
        if not saes:
            ax.set_title(f"attribute {a}: no {x}")
            continue
        xv = np.array([xs[s] for s in saes], dtype=float)
        lo_x, hi_x = xv.min(), xv.max()
        pad = (hi_x - lo_x) * 0.05 or max(abs(hi_x) * 0.05, 0.5)
        top = IDEAL if metric in IDEAL_CEILINGS else r.ceiling
        ceiling = look(metric, a, top, **sel)
        if ceiling is not None:
            c_lo, c_hi = look.ci(metric, a, top, **sel)
            ax.axhline(ceiling, color="#2ca02c", linewidth=1, label=f"{top} (ceiling)")
            if c_lo is not None and c_hi is not None:
                ax.axhspan(c_lo, c_hi, color="#2ca02c", alpha=0.15, linewidth=0)
        floors = [look(metric, a, r.floors[s], **sel) for s in saes]
        f_ci = [look.ci(metric, a, r.floors[s], **sel) for s in saes]
        fv = np.array([np.nan if v is None else v for v in floors], dtype=float)
        f_lo = np.array([np.nan if c[0] is None else c[0] for c in f_ci], dtype=float)
        f_hi = np.array([np.nan if c[1] is None else c[1] for c in f_ci], dtype=float)
        if np.isfinite(fv).any():
            ax.plot(xv, fv, color="#7f7f7f", linestyle="--", marker="x", markersize=4,
                    label="floors (random:<sae>)")
            band_lo = np.where(np.isfinite(f_lo), f_lo, fv)
            band_hi = np.where(np.isfinite(f_hi), f_hi, fv)
            ax.fill_between(xv, band_lo, band_hi, color="#7f7f7f", alpha=0.15, linewidth=0)
        for sae, xi in zip(saes, xv):
            v = look(metric, a, sae, **sel)
            if v is None:
                continue
            lo, hi = look.ci(metric, a, sae, **sel)
            err = None if lo is None or hi is None else np.clip([[v - lo], [hi - v]], 0, None)
            ax.errorbar([xi], [v], yerr=err, fmt="o", capsize=3, color=styles[sae]["color"],
                        label=sae)
        if len(saes) > 1 and x == "width" and lo_x > 0 and hi_x / lo_x > 3:
            ax.set_xscale("log", base=2)
        ax.set_xlim(lo_x - pad, hi_x + pad) if ax.get_xscale() == "linear" else None
        ax.set_xlabel("L0 (active latents per token at the SAE's own site)" if x == "l0"
                      else "width (latents)")
        ax.set_title(f"attribute {a}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(LABELS.get(metric, metric) + (f" at k = {k}" if sel else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    column = (0.55 * max(map(len, labels), default=1) + 4.8) * 7 / 72  # as above, 7 pt
    ncol = max(1, min(4, len(labels), int(fig.get_figwidth() / column)))
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=ncol,
               frameon=False)
    fig.suptitle(f"{LABELS.get(metric, metric)}" + (f" at k = {k}" if sel else "")
                 + f" against {'L0' if x == 'l0' else 'width'} (95% bootstrap intervals)",
                 fontsize=10)
    return finish(fig, path, dpi)


def plot_training(sae_info: Mapping, path: str | Path | None = None, *, dpi: int = 110):
    """Each trained SAE's held-out FVU and dead share over its training steps, one line per
    member (the trainer's checks, ``training.held_out_curves`` of ``sae_info``), a dot
    where a member met the convergence criterion. Returns the Figure (None if no SAE has
    a curve), saved to ``path`` when one is given."""
    palette = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    curves = {}
    for sae, info in sae_info.items():
        training = ((info or {}).get("sae_cfg_dict") or {}).get("training") or {}
        if any(training.get("held_out_curves") or {}):
            curves[sae] = training
    if not curves:
        return None
    fig = figure(figsize=(8.5, 3.4))
    axes = fig.subplots(1, 2)
    for i, (sae, training) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        at = training.get("converged_at_step") or {}
        for j, (site, curve) in enumerate(training["held_out_curves"].items()):
            if not curve:
                continue
            steps = np.array([c[0] for c in curve], dtype=float)
            for ax, column in zip(axes, (1, 2)):
                values = np.array([c[column] for c in curve], dtype=float)
                ax.plot(steps, values, color=color, linewidth=0.9, alpha=0.7,
                        label=sae if j == 0 and column == 1 else None)
                if site in at and at[site] in steps:
                    ax.plot([at[site]], [values[list(steps).index(at[site])]], "o",
                            color=color, markersize=3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out FVU")
    axes[1].set_ylabel("held-out dead share")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center", ncol=min(4, len(curves)),
               frameon=False)
    fig.suptitle("Training: held-out FVU and dead latents per member SAE (dot: converged)",
                 fontsize=10)
    return finish(fig, path, dpi)
