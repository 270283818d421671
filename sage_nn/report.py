"""The report of a run: results as netCDF, a SAEBench-style JSON per SAE, plots, a summary.

``write_report(results, out_dir)`` takes the labeled results of
:func:`sage_nn.evaluation.evaluate_cross_section` (concatenated over ``attribute``) and
writes into ``out_dir``::

    results.nc                      the Dataset itself (h5netcdf)
    <release>_<sae_id>_eval_results.json   one per SAE, in SAEBench's eval-output shape and
                                    file naming (release "sage_nn" for SAEs trained here)
    compare_<metric>.png            SAEs vs ceiling vs floor, bars per attribute, 95% CIs
    controllability.png             edit accuracy and magnitude over k, every SAE
    comparison.csv                  SAE x attribute x metric, with intervals, floors, ceiling
    sweep_<metric>_vs_l0.png        with several SAEs: each headline metric against L0 (and
    sweep_<metric>_vs_width.png     width, if the SAEs differ in it), ceiling/floor bands
    discovery/*.png                 copies of the discovery heatmaps (if given)
    summary.md, summary.html        the same summary; the HTML embeds its images

The plot functions return matplotlib Figures (shown inline in a notebook); they save them
only when given a path.

Roles of the ``method`` coordinate: ``"supervised"`` is the ceiling, an SAE under test is
any method ``NAME`` that has a floor ``"random:NAME"``; other methods (e.g. another
supervised dictionary) are shown as references.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .evaluation import RANDOM, SUPERVISED
from .sites import HEAD_KINDS, Site

CEILING = SUPERVISED
FLOOR_PREFIX = f"{RANDOM}:"
EVAL_TYPE_ID = "sage"
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


def _check(results: Any) -> xr.Dataset:
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


def _pair_mean(da: xr.DataArray) -> xr.DataArray:
    """Mean over the pairs of each attribute's cross-section (NaN marks other pairs)."""
    if "pair" not in da.dims:
        return da
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        return da.mean("pair", skipna=True)


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
    results = _check(results)
    order = roles(results).ordered
    k = headline_k(results)
    columns = {"sufficiency": results["sufficiency"], "necessity": results["necessity"],
               **{f"{name}_k{k}": results[name].sel(k=k, drop=True)
                  for name in BY_K if name in results}}
    for name in ("best_f1", "fvu", "l0"):
        if name in results:
            columns[name] = _pair_mean(results[name])
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


class _Lookup:
    """Scalar access to the results by labels (one ``.sel`` per scalar is slow)."""

    def __init__(self, results: xr.Dataset):
        self.results = results
        self._series: dict[str, pd.Series] = {}

    def __call__(self, name: str, attribute: str, method: str, **sel) -> float | None:
        if name not in self.results:
            return None
        if name not in self._series:  # per-pair metrics: mean over the cross-section
            self._series[name] = _pair_mean(self.results[name]).to_series()
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


def _lookup(results: "xr.Dataset | _Lookup") -> _Lookup:
    return results if isinstance(results, _Lookup) else _Lookup(results)


def _extra_scalars(results: xr.Dataset) -> list[str]:
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
    """A 95% interval in :func:`_goodness`'s units (sufficiency: ``1 - |1 - s|``, so an
    interval around 1 reaches 1)."""
    if low is None or high is None or name != "sufficiency":
        return low, high
    ends = (_goodness(name, low), _goodness(name, high))
    return min(ends), (1.0 if low <= 1 <= high else max(ends))


def against_floor(look: "_Lookup", sae: str, attribute: str, metric: str,
                  **sel) -> str | None:
    """``"above"`` when the SAE's 95% interval lies above its floor's (in goodness),
    ``"below"`` when it lies below, ``"overlap"`` when they overlap; None without intervals."""
    mine = goodness_interval(metric, *look.ci(metric, attribute, sae, **sel))
    floor = goodness_interval(metric, *look.ci(metric, attribute, FLOOR_PREFIX + sae, **sel))
    if None in mine + floor:
        return None
    return "above" if mine[0] > floor[1] else "below" if mine[1] < floor[0] else "overlap"


def _goodness(name: str, value: float | None) -> float | None:
    """Higher is better: sufficiency is best at 1 (overshooting the clean logit difference
    is no better than falling short), so it is scored as ``1 - |1 - s|``."""
    if value is None or name != "sufficiency":
        return value
    return 1 - abs(1 - value)


# -- SAEBench-style JSON -----------------------------------------------------------------

def sae_cfg_dict(saes: Any, *, model_name: str | None = None,
                 training: Mapping | None = None) -> dict:
    """SAEBench's ``sae_cfg_dict`` (sae_lens's config fields) of an SAE under test: one
    :class:`~sage_nn.saes.SparseAutoencoder`, a list of them, or an object holding them in
    ``.saes`` (residual SAEs evaluated together, one per site).

    Fields all members share are top-level (``architecture``, ``d_in``, ``d_sae``, ``k``,
    ...); ``hook_name``/``hook_layer`` are the member's, or lists over ``sites`` (one entry
    per member). ``training`` (the trainer's config: corpus, steps, tokens, seed, ...) is
    kept under ``training`` and its corpus named in ``dataset_path``."""
    members = getattr(saes, "saes", saes)
    members = list(members) if isinstance(members, (list, tuple)) else [members]
    if not members:
        raise ValueError("sae_cfg_dict needs at least one SAE")
    sites = []
    for m in members:
        heads = "" if m.heads is None else ".h" + "_".join(map(str, m.heads))
        sites.append({"site": f"L{m.layer}.{m.kind}{heads}" if m.kind else None,
                      "hook_name": tl_hook_name(m), "hook_layer": m.layer,
                      "architecture": m.architecture, "d_in": m.d_in, "d_sae": m.d_sae,
                      "k": m.k, "apply_b_dec_to_input": m.apply_b_dec_to_input,
                      "normalize_activations": m.normalize,
                      "rescale_acts_by_decoder_norm": m.rescale_acts_by_decoder_norm,
                      "center_writing_weights": m.center})
        if m.kind in HEAD_KINDS and m.heads is not None and len(m.heads) == 1:
            sites[-1]["hook_head_index"] = m.heads[0]  # sae_lens's name for a one-head SAE
    per_member = ("site", "hook_name", "hook_layer", "hook_head_index")
    out = {key: value for key, value in sites[0].items()
           if key not in per_member and all(s.get(key) == value for s in sites)}
    if len(sites) == 1:
        out.update({key: sites[0][key] for key in per_member if key in sites[0]})
    else:
        out.update(hook_name=[s["hook_name"] for s in sites],
                   hook_layer=[s["hook_layer"] for s in sites], sites=sites)
    if model_name:
        out["model_name"] = model_name
    if training:
        training = dict(training)
        out["dataset_path"] = training.get("corpus")
        out["training"] = training
    return _jsonable(out)


def tl_hook_name(sae: Any) -> str | None:
    """The sae_lens/TransformerLens hook an SAE reads (``blocks.8.hook_resid_post``): its
    own hook name when it has one of that form, else its site's
    (:attr:`sage_nn.sites.Site.hook_name`; q/k/v/z SAEs read the all-heads hook)."""
    if sae.hook_name and str(sae.hook_name).startswith("blocks."):
        return sae.hook_name
    if sae.kind is None:
        return sae.hook_name
    head = (sae.heads or [0])[0] if sae.kind in HEAD_KINDS else None
    return Site(sae.layer, sae.kind, head).hook_name


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to null, anything else exotic to str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict
        return _jsonable(asdict(value))
    return str(value)


def _commit_hash() -> str | None:
    """The sage_nn git commit that produced the report (None outside a git checkout).

    Recorded as ``eval_result_unstructured.sage_nn_commit_hash``: SAEBench's
    ``sae_bench_commit_hash`` means SAEBench's own commit, and SAEBench did not run here."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


TRAINED_RELEASE = "sage_nn"  # the release name of SAEs trained by a run, in file names


def sae_identity(sae: str, info: Mapping | None = None) -> dict[str, str | None]:
    """Where an SAE comes from, as SAEBench names it: ``release`` and ``sae_id`` (its file
    is ``{release}_{sae_id}_eval_results.json``), and ``sae_lens_release_id`` /
    ``sae_lens_id``, which are sae_lens's identifiers or None for SAEs sae_lens does not know.

    ``info`` (a run's ``saes.json`` entry) gives them explicitly or through its ``spec``:
    ``RELEASE:SAE_ID`` is a sae_lens release; ``train:...`` was trained here (release
    ``"sage_nn"``); a directory's release is the name of the directory holding it."""
    info = dict(info or {})
    spec = str(info.get("spec") or "")
    lens_release, lens_id = info.get("sae_lens_release_id"), info.get("sae_lens_id")
    release = lens_release
    if spec.startswith("train:") or not spec:
        release = release or TRAINED_RELEASE
    elif ":" in spec and not Path(spec).exists():  # a sae_lens pretrained release
        spec_release, spec_id = spec.split(":", 1)
        lens_release, lens_id = lens_release or spec_release, lens_id or spec_id
        release = lens_release
    else:  # a directory
        release = release or Path(spec).resolve().parent.name
    return {"release": release or "local", "sae_id": lens_id or sae,
            "sae_lens_release_id": lens_release, "sae_lens_id": lens_id}


def eval_results_file(sae: str, info: Mapping | None = None) -> str:
    """SAEBench's file name of an SAE's results: ``{release}_{sae_id}_eval_results.json``
    (characters unsafe in a file name, such as ``/``, become ``_``)."""
    ident = sae_identity(sae, info)
    return f"{safe_name(ident['release'])}_{safe_name(ident['sae_id'])}_eval_results.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def sae_metrics(results: "xr.Dataset | _Lookup", sae: str,
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
            out[f"{key}_gap_closed"] = gap_closed(*(_goodness(name, out[key + role]) for role
                                                    in ("", "_ceiling", "_floor"))) \
                if claimed else None

    for name in ("sufficiency", "necessity"):
        put(name, name, True)
    for name in (n for n in BY_K if n in results):
        for k in results["k"].values:
            put(f"{name}_k{int(k)}", name, True, k=int(k))
            if f"{name}_magnitude" in results:
                put(f"{name}_magnitude_k{int(k)}", f"{name}_magnitude", False, k=int(k))
    for name in [n for n in PER_PAIR if n in results] + _extra_scalars(results):
        put(name, name, name in CALIBRATED)
    return out


def sae_eval_output(results: xr.Dataset, sae: str, *, config: Mapping | None = None,
                    info: Mapping | None = None, pairs: Sequence[str] | None = None) -> dict:
    """One SAE's results in the shape of SAEBench's ``BaseEvalOutput`` (``eval_type_id``
    ``"sage"``). Metric categories are the attributes (plus ``"mean"`` over them), each a
    flat dict; ``eval_result_details`` holds one entry per (attribute, cross-section pair).
    ``info`` may give ``spec``, ``sae_lens_id``, ``sae_lens_release_id`` (see
    :func:`sae_identity`) and ``sae_cfg_dict``. ``sae_bench_commit_hash`` is null: SAEBench
    did not run; sage_nn's own commit is ``eval_result_unstructured.sage_nn_commit_hash``.
    ``pairs`` keeps only those pairs' details (one member SAE of a set: the pairs it feeds).
    """
    results = _check(results)
    r = roles(results)
    if sae not in r.saes:
        raise ValueError(f"{sae!r} is not an SAE of these results (an SAE needs a floor "
                         f"'{FLOOR_PREFIX}{sae}'); SAEs: {r.saes}")
    info = dict(info or {})
    ident = sae_identity(sae, info)
    attributes = [str(a) for a in results["attribute"].values]
    look = _Lookup(results)
    categories = {a: sae_metrics(look, sae, a) for a in attributes}
    if len(attributes) > 1:
        keys = categories[attributes[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            categories["mean"] = {key: _none_nan(np.nanmean(
                [np.nan if categories[a][key] is None else categories[a][key]
                 for a in attributes])) for key in keys}
    details = []
    for a in attributes:
        for pair in (results["pair"].values if "pair" in results.dims else []):
            if pairs is not None and str(pair) not in pairs:
                continue
            entry = {"attribute": a, "pair": str(pair)}
            for name in (n for n in PER_PAIR if n in results):
                for role, method in (("", sae), ("_ceiling", CEILING),
                                     ("_floor", FLOOR_PREFIX + sae)):
                    entry[name + role] = _none_nan(float(
                        results[name].sel({"attribute": a, "dictionary": method, "pair": pair})))
            if all(v is None for k, v in entry.items() if k not in ("attribute", "pair")):
                continue  # this pair is not in this attribute's cross-section
            details.append(entry)
    eval_config = {"metric": "logit difference (answer - distractor) at the last token",
                   "ceiling": CEILING, "floor": FLOOR_PREFIX + sae,
                   "ks": [int(k) for k in results["k"].values], **dict(config or {})}
    return _jsonable({
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": categories,
        "eval_result_details": details,
        "sae_bench_commit_hash": None,
        "sae_lens_id": ident["sae_lens_id"],
        "sae_lens_release_id": ident["sae_lens_release_id"],
        "sae_lens_version": _version("sae_lens"),
        "sae_cfg_dict": info.get("sae_cfg_dict", {}),
        "eval_result_unstructured": {"sage_nn_version": _version("sage_nn"),
                                     "sage_nn_commit_hash": _commit_hash(), "sae": sae,
                                     "release": ident["release"], "sae_id": ident["sae_id"],
                                     "spec": info.get("spec"), "attributes": attributes,
                                     **({"set": info["set"]} if info.get("set") else {})},
    })


def _members(results: xr.Dataset, info: Mapping) -> list[tuple[dict, list[str] | None]]:
    """SAEBench files for one SAE: itself, or, for a set of a release's SAEs (a glob:
    ``info["sae_lens_ids"]`` lists several), one per member, each with its own id, config
    and ``hook_name`` and the details of the pairs it feeds; the metrics are the set's
    (its members are patched jointly), which ``eval_result_unstructured.set`` records."""
    ids = info.get("sae_lens_ids") or []
    members = (info.get("sae_cfg_dict") or {}).get("sites") or []
    if len(ids) < 2 or len(members) != len(ids):
        return [(dict(info), None)]
    from .pipeline import served_sites
    from .sites import Site

    labels = [str(p) for p in results["pair"].values] if "pair" in results.dims else []
    sites = {p: Site.parse(p.split("@")[0]) for p in labels}
    out = []
    for sae_id, cfg in zip(ids, members):
        # no model here: no top layer whose resid_post stays its own, no parallel blocks
        served = served_sites([cfg["hook_name"]], n_layers=1 << 30, parallel=False)
        fed = [p for p, s in sites.items() if (s.layer, s.kind) in served]
        out.append(({**info, "sae_lens_id": sae_id, "sae_cfg_dict": cfg,
                     "set": list(ids)}, fed))
    return out


def _none_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def safe_name(name: str) -> str:
    """A file-name-safe form of a method name (``random:topk/x`` -> ``random_topk_x``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sae"


# -- plots -------------------------------------------------------------------------------

def _figure(**kwargs):
    """A Figure outside pyplot: no backend or window is touched and nothing stays open,
    and a notebook shows the returned Figure inline. Laid out by matplotlib's constrained
    layout, which keeps room for titles, labels and legends placed "outside"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)  # a renderer to measure text with (_finish), no GUI
    return fig


def _finish(fig, path: str | Path | None, dpi: int):
    """Fit the figure to what it holds, then save it (when ``path``) and return it.

    The layout engine shrinks the axes to make room, but cannot make a figure wider than
    it is: a title or legend wider than the figure (one attribute, long SAE names) widens
    the figure, until every artist lies on the canvas."""
    renderer = fig.canvas.get_renderer()
    for _ in range(5):
        fig.draw_without_rendering()
        box = fig.get_tightbbox(renderer)  # inches, every artist drawn
        width, height = fig.get_size_inches()
        dx = max(0.0, -box.x0, box.x1 - width)
        dy = max(0.0, -box.y0, box.y1 - height)
        if dx < 0.01 and dy < 0.01:
            break
        fig.set_size_inches(width + 2 * dx + 0.05, height + 2 * dy + 0.05)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _styles(r: Roles) -> dict[str, dict]:
    """Colour per method: the ceiling green, each SAE its own colour, its floor the same
    colour hatched and pale, references grey."""
    palette = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    styles = {r.ceiling: dict(color="#2ca02c", label=f"{r.ceiling} (ceiling)")}
    for i, sae in enumerate(r.saes):
        c = palette[i % len(palette)]
        styles[sae] = dict(color=c, label=sae)
        styles[r.floors[sae]] = dict(color=c, alpha=0.35, hatch="//", linestyle="--",
                                     label=f"{r.floors[sae]} (floor)")
    for other in r.others:
        styles[other] = dict(color="#7f7f7f", label=other)
    return styles


def plot_comparison(results: xr.Dataset, metric: str, path: str | Path | None = None, *,
                    k: int | None = None, dpi: int = 110):
    """Grouped bars, one group per attribute and one bar per method, with the bootstrap
    95% interval as error bars where the results have one. Returns the matplotlib
    Figure, saved to ``path`` when one is given. ``k``: the edit budget of ``edit``."""
    results = _check(results)
    r, styles = roles(results), _styles(roles(results))
    methods = r.ordered
    sel = {} if k is None else {"k": k}
    values = _pair_mean(results[metric]).sel(**sel)
    ci = results[f"{metric}_ci"].sel(**sel) if f"{metric}_ci" in results else None
    attributes = [str(a) for a in results["attribute"].values]
    width = 0.8 / len(methods)
    fig = _figure(figsize=(max(4.5, 1.1 + len(attributes) * len(methods) * 0.45), 3.6))
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
    ax.set_xticks(x, attributes)
    ax.set_xlabel("attribute")
    title = LABELS.get(metric, metric) + (f" at k = {k}" if k is not None else "")
    ax.set_title(title + (" (95% bootstrap CI)" if ci is not None else ""))
    ax.axhline(0, color="black", linewidth=0.6)
    if metric in ("sufficiency", "necessity", *BY_K):
        ax.axhline(1, color="black", linewidth=0.6, linestyle=":")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path, dpi)


def plot_controllability(results: xr.Dataset, path: str | Path | None = None, *,
                         dpi: int = 110):
    """Edit accuracy (with its 95% band) and edit magnitude over k: one column per
    attribute, one line per method. Returns the matplotlib Figure, saved to ``path`` when
    one is given."""
    results = _check(results)
    r = roles(results)
    styles = _styles(r)
    attributes = [str(a) for a in results["attribute"].values]
    rows = [name for name in (*BY_K, "edit_magnitude") if name in results]
    ks = results["k"].values.astype(int)
    fig = _figure(figsize=(1.5 + 3.2 * len(attributes), 1.2 + 2.6 * len(rows)))
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
            if i == 0:
                ax.set_title(f"attribute {attribute}")
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
    return _finish(fig, path, dpi)


# -- many SAEs: one table and plots across them ------------------------------------------

#: the headline metrics compared across SAEs (``edit`` at the headline k)
SWEEP_METRICS = HEADLINE


def _metric_key(metric: str, k: int) -> tuple[str, dict]:
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
    results = _check(results)
    r, look = roles(results), _Lookup(results)
    k = headline_k(results) if k is None else k
    widths = sae_widths(results, sae_info)
    rows = []
    for sae in r.saes:
        for a in (str(x) for x in results["attribute"].values):
            row = {"sae": sae, "attribute": a, "width": widths[sae],
                   "l0": look("l0", a, sae), "fvu": look("fvu", a, sae)}
            claimed = excluded(results, a) is None
            for metric in SWEEP_METRICS:
                name, sel = _metric_key(metric, k)
                value = look(metric, a, sae, **sel)
                row[name] = value
                row[f"{name}_low"], row[f"{name}_high"] = look.ci(metric, a, sae, **sel)
                ceiling, floor = look(metric, a, r.ceiling, **sel), look(metric, a, r.floors[sae], **sel)
                row[f"{name}_ceiling"], row[f"{name}_floor"] = ceiling, floor
                row[f"{name}_gap"] = gap_closed(_goodness(metric, value),
                                                _goodness(metric, ceiling),
                                                _goodness(metric, floor)) if claimed else None
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
    results = _check(results)
    r, look = roles(results), _Lookup(results)
    k = headline_k(results) if k is None else k
    claimed = [str(a) for a in results["attribute"].values if not excluded(results, str(a))]
    claimed = claimed or [str(a) for a in results["attribute"].values]
    out = {}
    for metric in SWEEP_METRICS:
        key, sel = _metric_key(metric, k)
        scores = {}
        for sae in r.saes:
            values = [_goodness(metric, look(metric, a, sae, **sel)) for a in claimed]
            values = [v for v in values if v is not None]
            if values:
                scores[sae] = float(np.mean(values))
        if scores:
            out[key] = sorted(
                scores, key=lambda s: -scores[s])
    return out


def plot_sweep(results: xr.Dataset, metric: str, path: str | Path | None = None, *,
               x: str = "l0", k: int | None = None, sae_info: Mapping | None = None,
               dpi: int = 110):
    """``metric`` of every SAE against its L0 (``x="l0"``, the mean over the
    cross-section's sites) or its width (``x="width"``, from ``sae_info``): one panel per
    attribute, each SAE a point with its 95% bootstrap interval, the ceiling as a band (its
    interval around its line) and the floors as a band over the SAEs' x (each SAE's floor
    at that SAE's x). ``k``: the edit budget (default: the headline k). Returns the
    Figure, saved to ``path`` when one is given."""
    results = _check(results)
    if x not in ("l0", "width"):
        raise ValueError(f"x={x!r}: plot against 'l0' or 'width'")
    r, look = roles(results), _Lookup(results)
    k = headline_k(results) if (k is None and metric in BY_K) else k
    sel = {"k": k} if metric in BY_K else {}
    widths = sae_widths(results, sae_info)
    attributes = [str(a) for a in results["attribute"].values]
    styles = _styles(r)
    fig = _figure(figsize=(1.4 + 3.4 * len(attributes), 3.4))
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
        ceiling = look(metric, a, r.ceiling, **sel)
        if ceiling is not None:
            c_lo, c_hi = look.ci(metric, a, r.ceiling, **sel)
            ax.axhline(ceiling, color="#2ca02c", linewidth=1, label=f"{r.ceiling} (ceiling)")
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
        ax.set_xlabel("L0 (active latents, mean over the sites)" if x == "l0"
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
    return _finish(fig, path, dpi)


# -- the summary document ----------------------------------------------------------------
# One list of blocks rendered twice: Markdown (images linked) and HTML (images embedded).

def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def _with_ci(value, low, high) -> str:
    if value is None:
        return "–"
    return _fmt(value) + ("" if low is None else f" [{_fmt(low, 2)}, {_fmt(high, 2)}]")


def _attribute_table(look: _Lookup, attribute: str, k: int) -> tuple[list, list]:
    results = look.results
    r = roles(results)
    header = ["dictionary", "role", "sufficiency", "necessity", f"edit k={k}",
              f"F1 edit k={k}", "best F1"]
    per_pair = [n for n in PER_PAIR if n in results and n != "best_f1"]
    extra = _extra_scalars(results)
    header += [LABELS.get(n, n) for n in per_pair + extra]
    rows = []
    for method in r.ordered:
        role = ("ceiling" if method == r.ceiling else "SAE" if method in r.saes
                else "floor" if method in r.floors.values() else "reference")
        row = [method, role]
        for name, sel in (("sufficiency", {}), ("necessity", {}), ("edit", {"k": k}),
                          ("edit_f1", {"k": k}), ("best_f1", {})):
            row.append(_with_ci(look(name, attribute, method, **sel),
                                *look.ci(name, attribute, method, **sel)))
        row += [_fmt(look(n, attribute, method)) for n in per_pair + extra]
        rows.append(row)
    return header, rows


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


def _headline_columns(k: int) -> list[tuple[str, str, dict]]:
    """(metric, column label, selection) of the headline metrics, edits at ``k``."""
    return [(m, LABELS[m] + (f" k={k}" if m in BY_K else ""), {"k": k} if m in BY_K else {})
            for m in HEADLINE]


def _calibration_table(look: _Lookup, k: int) -> tuple[list, list]:
    """Per SAE and attribute: the share of the floor→ceiling gap it closes, and whether
    ceiling > SAE > floor holds; attributes kept out of claims say why (and get no gap)."""
    rows = []
    for sae in roles(look.results).saes:
        for a in (str(x) for x in look.results["attribute"].values):
            m = sae_metrics(look, sae, a)
            reason = excluded(look.results, a)
            row = [sae, a]
            for metric, _, sel in _headline_columns(k):
                key = _metric_key(metric, k)[0]
                ceiling, value, floor = (_goodness(metric, m.get(key + role))
                                         for role in ("_ceiling", "", "_floor"))
                if None in (ceiling, value, floor) or reason:
                    row.append("–")
                elif m[f"{key}_gap_closed"] is None:
                    row.append("– (ceiling ≤ floor)")
                else:
                    ok = "✓" if ceiling > value > floor else "✗ violated"
                    row.append(f"{_fmt(m[f'{key}_gap_closed'], 2)} {ok}")
            row.append(reason or "claimed")
            rows.append(row)
    return (["SAE", "attribute"] + [label for _, label, _ in _headline_columns(k)]
            + ["in claims"], rows)


def _floor_table(look: _Lookup, k: int) -> tuple[list, list]:
    """Per SAE and attribute: whether the SAE's 95% interval lies above its floor's, per
    headline metric (:func:`against_floor`)."""
    words = {"above": "above ✓", "below": "below ✗", "overlap": "overlap", None: "–"}
    rows = []
    for sae in roles(look.results).saes:
        for a in (str(x) for x in look.results["attribute"].values):
            rows.append([sae, a] + [words[against_floor(look, sae, a, metric, **sel)]
                                    for metric, _, sel in _headline_columns(k)]
                        + ["yes" if excluded(look.results, a) is None else "no"])
    return (["SAE", "attribute"] + [label for _, label, _ in _headline_columns(k)]
            + ["in claims"], rows)


def _attribute_notes(results: xr.Dataset, attribute: str) -> list[str]:
    """What a reader needs to read an attribute's table: the cross-section's recovered share,
    the edit metric and its no-edit baseline, the ceiling's checks, undefined metrics."""
    row = results.sel(attribute=attribute)
    notes = []
    if "recovered" in results and not np.isnan(float(row.recovered)):
        text = (f"The cross-section's joint exact patch recovers "
                f"{float(row.recovered):.2f} of the attribute's effect")
        if "cap_hit" in results and bool(row.cap_hit):
            text += " (the site cap was reached before the target share)"
        notes.append(text + ".")
    if "same_as" in results and str(row.same_as.values):
        notes.append(f"Same cross-section as: {row.same_as.values}.")
    if "edit_metric" in results.coords:
        metric = str(row.edit_metric.values)
        changed = (f"{int(row.n_changed_prediction)} of {int(row.n_scored_prompts)}"
                   if "n_scored_prompts" in results else str(int(row.n_changed_prediction)))
        what = ("accuracy: the share of those prompts where the edit gives the "
                "counterfactual's prediction" if metric == "accuracy"
                else "success: the share of the counterfactual's move of the logit difference "
                "that the edit achieves")
        notes.append(f"In this run the cross-section's counterfactual patch changes the "
                     f"model's prediction on {changed} held-out prompts, so both edits are "
                     f"scored as {what} (accuracy needs at least 10 changed prompts); no-edit "
                     f"baseline {_fmt(float(row.edit_baseline))}.")
    for name, label in (("mean_ablation_note", "sufficiency and necessity"),
                        ("necessity_note", "necessity"), ("edit_note", "edit")):
        if name in results and str(row[name].values):
            notes.append(f"{label}: {row[name].values}")
    reason = excluded(results, attribute)
    if reason:
        notes.append(f"Kept out of claims: {reason}.")
    return notes


def _approach_rows(look: _Lookup, saes: list[str], sae_info: Mapping | None,
                   k: int) -> list[list[str]]:
    """Per SAE whose info names its approach (see :func:`sage_nn.pipeline.run`): the SAEs
    it uses, the SAEs all layers would need, and its mean quality over claimed attributes."""
    results = look.results
    claimed = [str(a) for a in results["attribute"].values if not excluded(results, str(a))]
    rows = []
    for sae in saes:
        info = (sae_info or {}).get(sae) or {}
        if "approach" not in info:
            continue

        def mean(name, **sel):
            values = [look(name, a, sae, **sel) for a in claimed]
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        rows.append([sae, str(info["approach"]), str(info.get("n_saes", "–")),
                     str(info.get("n_saes_all_layers", "–")), _fmt(mean("sufficiency")),
                     _fmt(mean("edit", k=k)), _fmt(mean("fvu"))])
    return rows


def _span(values) -> str:
    """``min–max`` of the known numbers among ``values`` (one number if they agree)."""
    known = sorted(float(v) for v in values if v is not None)
    if not known:
        return "–"
    lo, hi = known[0], known[-1]
    digits = 0 if all(v == int(v) for v in known) else 3
    return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}–{hi:.{digits}f}"


def _sae_rows(saes: list[str], sae_info: Mapping | None) -> list[list[str]]:
    """One row per SAE with a known config: what it is, what it was trained on, how many
    steps its members trained and their FVU on the held-out part of their corpus."""
    rows = []
    for sae in saes:
        cfg = ((sae_info or {}).get(sae) or {}).get("sae_cfg_dict") or {}
        if not cfg:
            continue
        hooks = cfg.get("hook_name")
        training = cfg.get("training") or {}
        steps = (training.get("steps_used") or {}).values() or [
            training["tokens"] // training["batch_size"]
            if training.get("tokens") and training.get("batch_size") else None]
        rows.append([sae, str(cfg.get("architecture", "–")), str(cfg.get("d_in", "–")),
                     str(cfg.get("d_sae", "–")), str(cfg.get("k") or "–"),
                     ", ".join(hooks) if isinstance(hooks, list) else str(hooks or "–"),
                     str(cfg.get("dataset_path") or "–"), _span(steps),
                     _span((training.get("held_out_fvu") or {}).values())])
    return rows


def _comparison_blocks(results, sae_info, k) -> list[tuple]:
    """The SAE x attribute x metric table and whether the metrics order the SAEs alike."""
    table = comparison_table(results, sae_info, k=k)
    cols = [_metric_key(m, k)[0] for m in HEADLINE]
    rows = []
    for (sae, a), row in table.iterrows():
        cells = [sae, a, "–" if pd.isna(row["width"]) else str(int(row["width"])),
                 _fmt(row["l0"], 1), _fmt(row["fvu"])]
        for c in cols:
            value = None if pd.isna(row[c]) else float(row[c])
            lo, hi = (None if pd.isna(row[f"{c}_{b}"]) else float(row[f"{c}_{b}"])
                      for b in ("low", "high"))
            gap = None if pd.isna(row[f"{c}_gap"]) else float(row[f"{c}_gap"])
            cells.append(_with_ci(value, lo, hi) + (f" ({_fmt(gap, 2)})" if gap is not None
                                                    else ""))
        rows.append(cells)
    orderings = sae_orderings(results, k=k)
    distinct = {tuple(v) for v in orderings.values()}
    verdict = ("All headline metrics order the SAEs the same way." if len(distinct) <= 1 else
               "The headline metrics order the SAEs differently: " + "; ".join(
                   f"{m}: {' > '.join(v)}" for m, v in orderings.items()) + ".")
    return [("h2", "Comparison across SAEs"),
            ("p", "Every SAE at every attribute: value [95% interval] (share of the gap "
                  "from its floor to the ceiling it closes). Also in `comparison.csv`, with "
                  "each floor's and the ceiling's values. Orderings are by the mean over "
                  "the attributes kept in claims. " + verdict),
            ("table", ["SAE", "attribute", "width", "L0", "FVU"]
             + [label for _, label, _ in _headline_columns(k)], rows)]


def _document(results, config, timings, images, k, discovery_note,
              sae_info=None, files=None) -> list[tuple]:
    title = "SAGE report"
    if config and config.get("task"):
        title += f": task {config['task']}" + (f" on {config['model']}"
                                               if config.get("model") else "")
    r = roles(results)
    blocks: list[tuple] = [("h1", title), ("p", (
        "Ground-truth evaluation of sparse autoencoders. For every attribute of the task, "
        "each SAE is measured at the attribute's cross-section next to the supervised "
        f"dictionary (`{CEILING}`, the ceiling) and a random SAE of the same shape "
        f"(`{FLOOR_PREFIX}<sae>`, the floor). Intervals are 95% bootstrap intervals over "
        "prompts; per-site metrics (F1, FVU, L0, ...) are means over the cross-section's "
        "sites."))]
    blocks.append(("p", f"SAEs under test: {', '.join(f'`{s}`' for s in r.saes) or 'none'}. "
                        f"Files: `results.nc` (all results), "
                        + ", ".join(f"`{f}`" for s in r.saes
                                    for f in (files or {}).get(s) or [eval_results_file(s)])
                        + " (SAEBench eval-output format)."))
    sae_rows = _sae_rows(r.saes, sae_info)
    if sae_rows:
        blocks.append(("p", "Training steps and held-out FVU (on the part of the training "
                            "corpus held out from training) are per member SAE, as a range. "
                            "Convergence is not checked yet: a low score may mean an "
                            "undertrained SAE."))
        blocks.append(("table", ["SAE", "architecture", "d_in", "d_sae", "k", "hooks",
                                 "training corpus", "training steps", "held-out FVU"],
                       sae_rows))
    look = _Lookup(results)
    approaches = _approach_rows(look, r.saes, sae_info, k)
    if approaches:
        blocks.append(("h2", "Approaches: residual SAEs through the reconstruction vs SAEs at "
                             "the sites"))
        blocks.append(("p", "Quality at the cross-sections (means over the attributes in "
                            "claims) and how many SAEs an evaluation at every layer of the "
                            "model would need with each approach."))
        blocks.append(("table", ["SAE", "approach", "SAEs here", "SAEs for all layers",
                                 "sufficiency", f"edit k={k}", "FVU"], approaches))
    blocks.append(("h2", "Against the floor: is the SAE better than random directions?"))
    blocks.append(("p", "Per headline metric, whether the SAE's 95% interval lies above its "
                        "floor's (random unit directions with the SAE's number of latents and "
                        "L0 at the site, the best sparse codes over them: never worse than "
                        "the mean), below it, or overlaps it. Sufficiency is compared by its "
                        "distance from 1 (1 - |1 - s|)."))
    blocks.append(("table",) + _floor_table(look, k))
    blocks.append(("h2", "Calibration: SAE between floor and ceiling"))
    blocks.append(("p", "Share of the gap between floor (0) and ceiling (1) that each SAE "
                        "closes; ✓ marks that ceiling > SAE > floor holds, ✗ that it does "
                        "not; no gap where the ceiling is not above the floor. An attribute "
                        "whose cross-section was not found, whose ceiling fails its own "
                        "checks, or whose effect is small, is listed but kept out of claims, "
                        "and gets no gap closed."))
    blocks.append(("table",) + _calibration_table(look, k))
    if len(r.saes) > 1:
        blocks += _comparison_blocks(results, sae_info, k)
    blocks.append(("h2", "Headline metrics per attribute"))
    for a in (str(x) for x in results["attribute"].values):
        pairs = []
        if "pair" in results.dims:
            probe = next((results[n] for n in PER_PAIR if n in results), None)
            if probe is not None:
                pairs = [str(p) for p in results["pair"].values
                         if not np.all(np.isnan(probe.sel(attribute=a, pair=p).values))]
        blocks.append(("h3", f"Attribute `{a}`"))
        if pairs:
            blocks.append(("p", "Cross-section: " + ", ".join(f"`{p}`" for p in pairs)))
        for note in _attribute_notes(results, a):
            blocks.append(("p", note))
        blocks.append(("table",) + _attribute_table(look, a, k))
    blocks.append(("h2", "Plots"))
    for caption, path in images:
        blocks.append(("img", caption, path))
    if discovery_note:
        blocks.append(("p", discovery_note))
    if timings:
        blocks.append(("h2", "Stage timings"))
        rows = [[str(s), f"{float(t):.1f}"] for s, t in timings.items()]
        rows.append(["total", f"{sum(float(t) for t in timings.values()):.1f}"])
        blocks.append(("table", ["stage", "seconds"], rows))
    if config:
        blocks.append(("h2", "Configuration"))
        blocks.append(("code", json.dumps(_jsonable(config), indent=2)))
    return blocks


def _render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body[0])
        elif kind == "p":
            out.append(body[0])
        elif kind == "table":
            header, rows = body
            esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            out.append("\n".join(["| " + " | ".join(map(esc, header)) + " |",
                                  "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(map(esc, row)) + " |" for row in rows]))
        elif kind == "img":
            caption, path = body
            out.append(f"**{caption}**\n\n![{caption}]({path})")
        elif kind == "code":
            out.append("```json\n" + body[0] + "\n```")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then the two Markdown inlines the summary uses: `code` and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def _render_html(blocks: list[tuple], root: Path) -> str:
    body = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline_html(content[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(content[0])}</p>")
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                          + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            caption, path = content
            data = base64.b64encode((root / path).read_bytes()).decode("ascii")
            body.append(f"<figure><img alt=\"{html.escape(caption)}\" "
                        f"src=\"data:image/png;base64,{data}\"><figcaption>"
                        f"{html.escape(caption)}</figcaption></figure>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(content[0])}</code></pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "line-height:1.4}table{border-collapse:collapse;margin:.5em 0 1.5em;"
             "font-size:.85em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}"
             "td:first-child,td:nth-child(2){text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
             "figcaption{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:.8em;"
             "overflow-x:auto}code{background:#f3f3f3;padding:0 .2em}")
    title = html.escape(blocks[0][1]) if blocks and blocks[0][0] == "h1" else "SAGE report"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# -- the whole report --------------------------------------------------------------------

def _write_netcdf(results: xr.Dataset, path: Path, config: Mapping | None) -> None:
    ds = results.copy()
    # netCDF attributes must be numbers or strings; keep the config as JSON text.
    # After xr.concat over attributes, per-attribute attrs are the first one's: drop the
    # misleading "attribute" label.
    ds.attrs = {k: (v if isinstance(v, (str, int, float, np.number)) else json.dumps(
        _jsonable(v))) for k, v in ds.attrs.items()
        if v is not None and not (k == "attribute" and "attribute" in ds.dims)}
    if config:
        ds.attrs["sage_config"] = json.dumps(_jsonable(config))
    tmp = path.with_suffix(".partial")
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)  # never leave half a file under the final name


def _discovery_images(discovery_dir: str | Path, out_dir: Path) -> list[Path]:
    """The discovery heatmaps, relative to ``out_dir``: used in place when they already lie
    inside it, copied into ``out_dir/discovery`` otherwise."""
    src = Path(discovery_dir)
    found = sorted(src.glob("*.png"))
    src_abs, out_abs = src.resolve(), out_dir.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        return [p.resolve().relative_to(out_abs) for p in found]
    dest = out_dir / "discovery"
    dest.mkdir(exist_ok=True)
    copied = []
    for p in found:
        shutil.copy2(p, dest / p.name)
        copied.append(Path("discovery") / p.name)
    return copied


def write_report(results: xr.Dataset, out_dir: str | Path, *,
                 discovery_dir: str | Path | None = None, config: Mapping | None = None,
                 timings: Mapping[str, float] | None = None,
                 sae_info: Mapping[str, Mapping] | None = None) -> Path:
    """Write the report of a run into ``out_dir`` (created if needed) and return the path
    of ``summary.md``; see the module docstring for the files.

    ``config``: the run's options (recorded in every JSON and the summary); ``timings``:
    seconds per stage; ``sae_info``: per SAE name, SAEBench identity fields
    (``sae_lens_id``, ``sae_lens_release_id``, ``sae_cfg_dict``: see :func:`sae_cfg_dict`)."""
    results = _check(results)
    r = roles(results)
    if not r.saes:
        raise ValueError("results hold no SAE under test (a method NAME with its floor "
                         f"'{FLOOR_PREFIX}NAME'); methods: "
                         f"{[str(m) for m in results['dictionary'].values]}. Pass SAEs to "
                         "evaluate_cross_section")
    files = {s: eval_results_file(s, (sae_info or {}).get(s)) for s in r.saes}
    if len(set(files.values())) < len(files):
        raise ValueError(f"SAE names {r.saes} give clashing file names {files}: rename them")
    if discovery_dir is not None and not Path(discovery_dir).is_dir():
        raise FileNotFoundError(f"discovery_dir {discovery_dir} is not a directory: pass the "
                                "folder the discovery stage wrote its heatmaps (*.png) into, "
                                "or leave it out")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})

    _write_netcdf(results, out / "results.nc", config)
    for sae, name in list(files.items()):
        info = (sae_info or {}).get(sae) or {}
        written = []
        for member_info, pairs in _members(results, info):
            doc = sae_eval_output(results, sae, config=config, info=member_info, pairs=pairs)
            written.append(eval_results_file(sae, member_info) if pairs is not None else name)
            (out / written[-1]).write_text(json.dumps(doc, indent=2))
        files[sae] = written

    k = headline_k(results)
    images = []
    for metric, sel in (("sufficiency", {}), ("necessity", {}), ("edit", {"k": k}),
                        ("edit_f1", {"k": k}), ("best_f1", {}), ("alignment", {}),
                        ("fvu", {})):
        if metric in results:
            file = f"compare_{metric}" + (f"_k{k}" if sel else "") + ".png"
            plot_comparison(results, metric, out / file, **sel)
            images.append((LABELS[metric] + (f" at k = {k}" if sel else "")
                           + ": SAEs vs ceiling and floor", file))
    plot_controllability(results, out / "controllability.png")
    images.append(("Controllability over k", "controllability.png"))
    comparison_table(results, sae_info, k=k).to_csv(out / "comparison.csv")
    if len(r.saes) > 1:  # a sweep: each headline metric against L0 and width
        known = {w for w in sae_widths(results, sae_info).values() if w is not None}
        for metric in SWEEP_METRICS:
            if metric not in results:
                continue
            for x in ("l0", "width") if len(known) > 1 else ("l0",):
                file = f"sweep_{metric}_vs_{x}.png"
                plot_sweep(results, metric, out / file, x=x, k=k, sae_info=sae_info)
                images.append((f"{LABELS[metric]}" + (f" at k = {k}" if metric in BY_K
                                                      else "")
                               + f" against {'L0' if x == 'l0' else 'width'}: every SAE, "
                               "ceiling and floors as bands", file))
    note = None
    if discovery_dir is not None:
        found = _discovery_images(discovery_dir, out)
        images += [(f"Discovery: {p.stem}", p.as_posix()) for p in found]
        if not found:
            note = f"No discovery heatmaps (*.png) were found in `{discovery_dir}`."

    blocks = _document(results, config, timings, images, k, note, sae_info, files)
    (out / "summary.md").write_text(_render_markdown(blocks))
    (out / "summary.html").write_text(_render_html(blocks, out))
    return out / "summary.md"
