"""The report of a run: results as netCDF, a SAEBench-style JSON per SAE, plots, a summary.

``write_report(results, out_dir)`` takes the labeled results of
:func:`sage_nn.evaluation.evaluate_cross_section` (concatenated over ``attribute``) and
writes into ``out_dir``::

    results.nc                      the Dataset itself (h5netcdf)
    <release>_<sae_id>_eval_results.json   one per SAE, in SAEBench's eval-output shape and
                                    file naming (release "sage_nn" for SAEs trained here)
    compare_<metric>.png            SAEs vs ceiling vs floor, bars per attribute, 95% CIs
    controllability.png             edit accuracy and magnitude over k, every SAE
    training.png                    each trained SAE's held-out FVU and dead share over steps
    comparison.csv                  SAE x attribute x metric, with intervals, floors, ceiling
    sweep_<metric>_vs_l0.png        with several SAEs: each headline metric against L0 (and
    sweep_<metric>_vs_width.png     width, if the SAEs differ in it), ceiling/floor bands
    discovery/*.png                 copies of the discovery heatmaps (if given)
    summary.md, summary.html        the same summary; the HTML embeds its images

The plot functions return matplotlib Figures (shown inline in a notebook); they save them
only when given a path.

Roles of the ``dictionary`` coordinate: ``"supervised"`` is the ceiling (and
``"supervised:path"`` the path ceiling of residual SAEs through the reconstruction), an SAE
under test is any ``NAME`` that has a floor ``"random:NAME"`` (and a random SAE
``"random-sae:NAME"``); other dictionaries (e.g. another supervised dictionary) are shown as
references.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from ..common.io import jsonable
from ..common.lazy import lazy_exports
from .document import document, render_html, render_markdown
from .plots import plot_comparison, plot_controllability, plot_sweep, plot_training
from .saebench import eval_results_file, member_files, sae_eval_output
from .tables import (
    BY_K,
    FLOOR_PREFIX,
    LABELS,
    check_results,
    headline_k,
    headline_metrics,
    roles,
    sae_widths,
)
from .verdicts import (
    comparison_table,
)


def _write_netcdf(results: xr.Dataset, path: Path, config: Mapping | None) -> None:
    ds = results.copy()
    # netCDF attributes must be numbers or strings; keep the config as JSON text.
    # After xr.concat over attributes, per-attribute attrs are the first one's: drop the
    # misleading "attribute" label.
    ds.attrs = {k: (v if isinstance(v, (str, int, float, np.number)) else json.dumps(
        jsonable(v))) for k, v in ds.attrs.items()
        if v is not None and not (k == "attribute" and "attribute" in ds.dims)}
    if config:
        ds.attrs["sage_config"] = json.dumps(jsonable(config))
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
    results = check_results(results)
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
        for member_info, pairs in member_files(results, info):
            doc = sae_eval_output(results, sae, config=config, info=member_info, pairs=pairs)
            written.append(eval_results_file(sae, member_info) if pairs is not None else name)
            (out / written[-1]).write_text(json.dumps(doc, indent=2))
        files[sae] = written

    k = headline_k(results)
    images = []
    edits = ((("edit_auc", {}), ("edit_f1_auc", {})) if "edit_auc" in results
             else (("edit", {"k": k}), ("edit_f1", {"k": k})))
    for metric, sel in (("sufficiency", {}), ("necessity", {}), *edits, ("best_f1", {}),
                        ("alignment", {}), ("fvu", {})):
        if metric in results:
            file = f"compare_{metric}" + (f"_k{k}" if sel else "") + ".png"
            plot_comparison(results, metric, out / file, **sel)
            images.append((LABELS[metric] + (f" at k = {k}" if sel else "")
                           + ": SAEs vs ceilings and controls", file))
    plot_controllability(results, out / "controllability.png")
    images.append(("Controllability over k", "controllability.png"))
    if plot_training(sae_info or {}, out / "training.png") is not None:
        images.append(("Training: each trained SAE's held-out FVU and dead share over its "
                       "steps", "training.png"))
    comparison_table(results, sae_info, k=k).to_csv(out / "comparison.csv")
    if len(r.saes) > 1:  # a sweep: each headline metric against L0 and width
        known = {w for w in sae_widths(results, sae_info).values() if w is not None}
        for metric in headline_metrics(results):
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

    blocks = document(results, config, timings, images, k, note, sae_info, files)
    (out / "summary.md").write_text(render_markdown(blocks))
    (out / "summary.html").write_text(render_html(blocks, out))
    return out / "summary.md"

__getattr__, __dir__ = lazy_exports(__name__, {
    "BY_K": "tables",
    "CALIBRATED": "tables",
    "CEILING": "tables",
    "EVAL_TYPE_ID": "saebench",
    "FLOOR_PREFIX": "tables",
    "HEADLINE": "tables",
    "IDEAL": "tables",
    "IDEAL_CEILINGS": "tables",
    "LABELS": "tables",
    "Lookup": "tables",
    "PER_PAIR": "tables",
    "REQUIRED": "tables",
    "OLD_HEADLINE": "tables",
    "RANDOM_SAE_PREFIX": "tables",
    "Roles": "tables",
    "SWEEP_METRICS": "tables",
    "TRAINED_RELEASE": "saebench",
    "against_floor": "verdicts",
    "calibration": "verdicts",
    "compare": "verdicts",
    "aggregate": "suite",
    "check_results": "tables",
    "comparison_table": "verdicts",
    "document": "document",
    "eval_results_file": "saebench",
    "excluded": "tables",
    "extra_scalars": "tables",
    "gap_closed": "tables",
    "gap_defined": "verdicts",
    "goodness": "tables",
    "goodness_interval": "tables",
    "headline_columns": "tables",
    "headline_k": "tables",
    "headline_metrics": "tables",
    "headline_table": "tables",
    "member_files": "saebench",
    "paired_interval": "verdicts",
    "metric_key": "tables",
    "plot_comparison": "plots",
    "plot_controllability": "plots",
    "plot_heatmap": "suite",
    "plot_score_vs_l0": "suite",
    "plot_sweep": "plots",
    "plot_training": "plots",
    "rank_agreement": "suite",
    "render_html": "document",
    "render_markdown": "document",
    "roles": "tables",
    "sae_cfg_dict": "saebench",
    "sae_eval_output": "saebench",
    "sae_flags": "verdicts",
    "sae_identity": "saebench",
    "sae_metrics": "verdicts",
    "sae_orderings": "verdicts",
    "sae_widths": "tables",
    "safe_name": "saebench",
    "suite_dataset": "suite",
    "suite_eval_output": "suite",
    "suite_summary": "suite",
    "suite_table": "suite",
    "task_scores": "suite",
    "tl_hook_name": "saebench",
    "write_suite_report": "suite",
})
