"""Discovery: where in the model each task attribute is computed.

:mod:`.attribution` scores every site of a grid per attribute; this module turns the
scores into tables (:func:`ranked`, :func:`head_grid`) and cross-sections, checks them by
exact patching (:func:`validate`) and plots them; :func:`discover` runs the whole stage.
(``AttributionPatching``, ``load_scores`` and ``save_scores`` are importable from here too.)

A cross-section is a set of components (by default per-head ``z``) whose *joint* exact patch
recovers a share of the attribute's total effect: :func:`grow_cross_sections` (the default of
:func:`discover`) takes its candidates from attribution and decides by exact joint patching,
in four model runs shared by every attribute, one request remotely (:mod:`.growth`).
On SmolLM2 IOI (16 prompts) it finds io: 6 heads at END (L29.h1, L23.h7/h0/h2/h1/h4)
recovering 0.63; s: 3 heads (L24.h5, L23.h0/h7) 0.66; order: L20.h0 alone, 2.6 (it
overshoots the small total effect), in 18 s on 2 idle CPU cores. The top-|score| pick (:func:`select_cross_section`) stays available
as ``top_k`` / ``coverage``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ..common.io import jsonable
from .attribution import AttributionPatching, effects_table, save_scores
from .growth import grow_cross_sections
from .plots import plot_cross_section, plot_heatmaps
from .selection import effect_layers, select_cross_section, validate_all

# -- tables and selection ------------------------------------------------------------


# -- validation by exact activation patching ------------------------------------------


# -- cross-sections grown by their joint exact patch ----------------------------------


# -- plots ----------------------------------------------------------------------------


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
                    **{k: jsonable(v) for k, v in self.validation.get(a, {}).items()
                       if k != "attribute"}}
                for a, t in self.cross_sections.items()}


def discover(model: Any, dataset: Any, config: DiscoveryConfig | None = None, *,
             out_dir: str | Path | None = None, progress: bool = False,
             remote: Any = None) -> Discovery:
    """Score the grid, select a cross-section per attribute, validate it, save and plot.

    By default each cross-section is grown by its joint exact patch (see
    :class:`DiscoveryConfig` and :func:`grow_cross_sections`); its summary says the share it
    recovers (``recovered``), whether ``max_sites`` stopped it short of the target
    (``cap_hit``) and which attributes ended with the same set (``same_as``).

    With ``out_dir``: ``scores.nc``, ``cross_sections.csv``, ``summary.json`` and the PNGs.
    ``remote`` runs the model's passes elsewhere (see :mod:`sage_nn.model.remote`).
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
