"""Discovery's figures: attribution heatmaps per kind (heads as a layer x head grid) and a
cross-section's sites with their estimated and exact shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..model.sites import HEAD_KINDS
from .selection import head_grid


def plot_heatmaps(scores: xr.Dataset, attribute: str, out_dir: str | Path | None = None, *,
                  dpi: int = 90) -> dict:
    """Heatmaps of ``attribute``'s scores: layer x head per head kind, and layer x kind for
    the other kinds (panel ``residual``); one column per named position. Returns ``{panel:
    matplotlib Figure}`` (shown inline in a notebook), each saved as
    ``heatmap_{attribute}_{panel}.png`` in ``out_dir`` when one is given."""
    from ..common.figures import figure, finish

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
        fig = figure(figsize=(2.2 * len(positions) + 1.5, 0.18 * len(layers) + 1.5))
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
        figures[name] = finish(fig, out_dir and out_dir / f"heatmap_{attribute}_{name}.png",
                                dpi)
    return figures


def plot_cross_section(table: pd.DataFrame, path: str | Path | None = None, title: str = "",
                       *, dpi: int = 90):
    """Bar chart of a selected cross-section: estimated score, and exact when validated.
    Returns the matplotlib Figure, saved to ``path`` when one is given."""
    from ..common.figures import figure, finish

    labels = [f"{s}@{p}" for s, p in zip(table["site"], table["position"])]
    y = np.arange(len(labels))
    fig = figure(figsize=(6, 0.28 * len(labels) + 1.2))
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
    return finish(fig, path, dpi)
