"""The summary document: one list of blocks (headings, paragraphs, tables, images)
rendered twice, as Markdown (images linked) and as self-contained HTML (images embedded)."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..common.io import jsonable
from .saebench import eval_results_file
from .tables import (
    CEILING,
    FLOOR_PREFIX,
    LABELS,
    PER_PAIR,
    Lookup,
    excluded,
    extra_scalars,
    headline_columns,
    headline_metrics,
    metric_key,
    roles,
)
from .verdicts import (
    against_floor,
    calibration,
    comparison_table,
    fvu_name,
    sae_flags,
    sae_orderings,
)


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


def _role(r, method: str) -> str:
    if method == r.ceiling:
        return "ceiling"
    if method == r.path_ceiling:
        return "path ceiling"
    if method in r.saes:
        return "SAE"
    if method in r.floors.values():
        return "floor"
    return "random SAE" if method in r.random_saes.values() else "reference"


def _attribute_table(look: Lookup, attribute: str, k: int) -> tuple[list, list]:
    results = look.results
    r = roles(results)
    columns = headline_columns(k, results)
    header = ["dictionary", "role"] + [label for _, label, _ in columns]
    if "best_f1_chance" in results:
        header[-1] += f" (chance {_fmt(look('best_f1_chance', attribute, r.ceiling), 2)})"
    fvu = fvu_name(results)
    per_pair = [fvu] + [n for n in PER_PAIR if n in results and n not in ("best_f1", "fvu")]
    extra = extra_scalars(results)
    header += [LABELS.get(n, n) for n in per_pair + extra]
    rows = []
    for method in r.ordered:
        row = [method, _role(r, method)]
        for name, _, sel in columns:
            row.append(_with_ci(look(name, attribute, method, **sel),
                                *look.ci(name, attribute, method, **sel)))
        row += [_fmt(look(n, attribute, method)) for n in per_pair + extra]
        rows.append(row)
    return header, rows


def _calibration_table(look: Lookup, k: int) -> tuple[list, list]:
    """Per SAE and attribute: the share of the floor→ceiling gap it closes, and its place
    against its controls and its ceiling by paired intervals (:func:`calibration`);
    attributes kept out of claims say why (and get no gap)."""
    rows, r = [], roles(look.results)
    columns = headline_columns(k, look.results)
    for sae in r.saes:
        for a in (str(x) for x in look.results["attribute"].values):
            reason = excluded(look.results, a)
            row = [sae, a]
            for metric, _, sel in columns:
                if reason:
                    row.append("–")
                    continue
                mark, gap = calibration(look, r, sae, a, metric) if not sel else ("–", None)
                row.append("– (ceiling ≤ floor)" if mark == "no gap"
                           else mark if gap is None else f"{_fmt(gap, 2)} {mark}")
            row.append(reason or "claimed")
            rows.append(row)
    return (["SAE", "attribute"] + [label for _, label, _ in columns] + ["in claims"], rows)


def _floor_table(look: Lookup, k: int) -> tuple[list, list]:
    """Per SAE and attribute: whether the SAE lies above each of its controls, per headline
    metric, by the paired interval of their difference (:func:`against_floor`)."""
    words = {"above": "above", "below": "below", "overlap": "overlap", None: "–"}
    rows, r = [], roles(look.results)
    columns = headline_columns(k, look.results)
    for sae in r.saes:
        for a in (str(x) for x in look.results["attribute"].values):
            cells = []
            for metric, _, sel in columns:
                cells.append(" / ".join(words[against_floor(look, sae, a, metric, c, **sel)]
                                        for c in r.controls(sae)))
            rows.append([sae, a] + cells
                        + ["yes" if excluded(look.results, a) is None else "no"])
    return (["SAE", "attribute"] + [label for _, label, _ in columns] + ["in claims"], rows)


def task_flags(summary: Mapping | None) -> list[str]:
    """What a suite would gate a task for, said of a single run: a held-out accuracy below
    :data:`~sage_nn.tasks.gates.MIN_ACCURACY` or a small clean logit difference."""
    from ..tasks.gates import task_problems

    return [f"Task: {p}." for p in task_problems(summary)] if summary else []


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


def _approach_rows(look: Lookup, saes: list[str], sae_info: Mapping | None,
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
                     _fmt(mean("edit_auc") if "edit_auc" in results else mean("edit", k=k)),
                     _fmt(mean("fvu_pooled") if "fvu_pooled" in results else mean("fvu"))])
    return rows


def _span(values, digits: int = 3) -> str:
    """``min–max`` of the known numbers among ``values`` (one number if they agree)."""
    known = sorted(float(v) for v in values if v is not None)
    if not known:
        return "–"
    lo, hi = known[0], known[-1]
    digits = 0 if all(v == int(v) for v in known) else digits
    return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}–{hi:.{digits}f}"


def _training(sae_info: Mapping | None, sae: str) -> dict:
    cfg = ((sae_info or {}).get(sae) or {}).get("sae_cfg_dict") or {}
    return cfg.get("training") or {}


def convergence(sae_info: Mapping | None, sae: str) -> tuple[str, bool | None]:
    """Whether an SAE's members converged by the trainer's held-out criterion, in words,
    and as True (all did), False (some did not: its numbers are labelled so) or None (no
    record, or its trainer did not check)."""
    training = _training(sae_info, sae)
    verdicts = list((training.get("converged") or {}).values())
    if not verdicts:
        return ("not checked" if training.get("steps_used") else "–"), None
    if all(verdicts):
        return "yes", True
    return f"no ({len(verdicts) - sum(map(bool, verdicts))} of {len(verdicts)})", False


NOT_CONVERGED = " (not converged)"
#: the columns of :func:`sae_rows`
SAE_COLUMNS = ["SAE", "architecture", "d_in", "d_sae", "k", "hooks", "training corpus",
               "corpus passes", "training steps", "held-out FVU", "held-out dead", "converged"]


def sae_rows(saes: list[str], sae_info: Mapping | None) -> list[list[str]]:
    """One row per SAE with a known config: what it is, what it was trained on (and how
    often its corpus was repeated), how many steps its members trained, their FVU and
    dead share on the held-out part of their corpus, and whether they converged."""
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
        k = cfg.get("k") or _span(m.get("k") for m in cfg.get("sites") or [])
        passes = _span((training.get("corpus_passes") or {}).values(), digits=1)
        rows.append([sae, str(cfg.get("architecture", "–")), str(cfg.get("d_in", "–")),
                     str(cfg.get("d_sae", "–")), str(k or "–"),
                     ", ".join(hooks) if isinstance(hooks, list) else str(hooks or "–"),
                     str(cfg.get("dataset_path") or "–"),
                     passes + ("×" if passes != "–" else ""), _span(steps),
                     _span((training.get("held_out_fvu") or {}).values()),
                     _span((training.get("held_out_dead") or {}).values()),
                     convergence(sae_info, sae)[0]])
    return rows


def training_note(saes: list[str], sae_info: Mapping | None) -> str:
    """How to read the SAE table: what was held out, the convergence criterion, and
    which SAEs did not meet it."""
    criteria = sorted({str(_training(sae_info, s)["criterion"]) for s in saes
                       if _training(sae_info, s).get("criterion")})
    text = ("Training steps, held-out FVU and held-out dead share (latents never active on "
            "the part of the training corpus held out from training) are per member SAE, "
            "as a range; corpus passes say how often the training corpus was repeated. ")
    if criteria:
        text += ("Converged: every member's " + "; or ".join(criteria)
                 + ", by its curve in the training plot. ")
    late = [s for s in saes if convergence(sae_info, s)[1] is False]
    if late:
        text += (", ".join(f"`{s}`" for s in late) + " did not converge: marked"
                 f" \"{NOT_CONVERGED.strip()}\" in every table, its scores may be those of "
                 "an undertrained SAE.")
    elif not criteria:
        text += "Convergence was not checked: a low score may mean an undertrained SAE."
    return text


def _comparison_blocks(results, sae_info, k) -> list[tuple]:
    """The SAE x attribute x metric table and whether the metrics order the SAEs alike."""
    table = comparison_table(results, sae_info, k=k)
    cols = [metric_key(m, k)[0] for m in headline_metrics(results)]
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
             + [label for _, label, _ in headline_columns(k, results)], rows)]


def document(results, config, timings, images, k, discovery_note,
              sae_info=None, files=None) -> list[tuple]:
    title = "SAGE report"
    if config and config.get("task"):
        title += f": task {config['task']}" + (f" on {config['model']}"
                                               if config.get("model") else "")
    r = roles(results)
    blocks: list[tuple] = [("h1", title), ("p", (
        "Ground-truth evaluation of sparse autoencoders. For every attribute of the task, "
        "each SAE is measured at the attribute's cross-section next to the supervised "
        f"dictionary (`{CEILING}`, the ceiling; `supervised:path` for residual SAEs reaching "
        "heads: the supervised dictionary fitted at the residual stream and pushed through "
        "the same reconstruction) and its two controls, each built at the SAE's own site "
        f"with its width and per-token budget: the floor (`{FLOOR_PREFIX}<sae>`, random unit "
        "directions encoded as a TopK SAE with tied random weights, one least-squares "
        "gain) and the random SAE (`random-sae:<sae>`, the SAE's own architecture "
        "with random weights, encoded the same way), each over several seeds. The edits "
        "are summarised over k by the area under their edit-vs-k curve. Intervals are 95% "
        "bootstrap intervals over prompts, every dictionary on the same draws, and every "
        "verdict (against a control or the ceiling) is the paired interval of a difference; "
        "per-site metrics (F1, L0, ...) are means over the cross-section's sites, FVU is "
        "pooled over them."))]
    blocks.append(("p", f"SAEs under test: {', '.join(f'`{s}`' for s in r.saes) or 'none'}. "
                        f"Files: `results.nc` (all results), "
                        + ", ".join(f"`{f}`" for s in r.saes
                                    for f in (files or {}).get(s) or [eval_results_file(s)])
                        + " (SAEBench eval-output format)."))
    rows = sae_rows(r.saes, sae_info)
    if rows:
        blocks.append(("p", training_note(r.saes, sae_info)))
        blocks.append(("table", SAE_COLUMNS, rows))
    flags = [f"`{sae}`: {flag}." for sae in r.saes for flag in sae_flags(results, sae)]
    flags += task_flags((config or {}).get("task_summary"))
    if flags:
        blocks.append(("h2", "Flags"))
        blocks += [("p", flag) for flag in flags]
    look = Lookup(results)
    approaches = _approach_rows(look, r.saes, sae_info, k)
    if approaches:
        blocks.append(("h2", "Kinds of dictionary: residual SAEs through the reconstruction, "
                             "SAEs at the sites, transcoders"))
        blocks.append(("p", "Each dictionary's kind (a residual SAE reaching the sites through "
                            "the reconstruction, an SAE at the site itself, or a transcoder "
                            "of the MLP whose output is the site, coded from the MLP's input), "
                            "its quality at the cross-sections (means over the attributes in "
                            "claims) and how many dictionaries an evaluation at every layer of "
                            "the model would need of that kind."))
        blocks.append(("table", ["SAE", "kind", "SAEs here", "SAEs for all layers",
                                 "sufficiency", "edit (over k)" if "edit_auc" in results
                                 else f"edit k={k}", "FVU"], approaches))
    blocks.append(("h2", "Against the controls: is the SAE better than random weights?"))
    blocks.append(("p", "Per headline metric, whether the SAE lies above its floor / its "
                        "random SAE, below, or overlaps: the paired 95% interval of the "
                        "difference (the same bootstrap draws of the prompts for both, one "
                        "control seed per draw, each detector chosen inside the draw) above "
                        "0, below 0, or holding 0. Sufficiency is compared by its distance "
                        "from 1 (1 - |1 - s|)."))
    blocks.append(("table",) + _floor_table(look, k))
    blocks.append(("h2", "Calibration: SAE between its controls and its ceiling"))
    blocks.append(("p", "Share of the gap between floor (0) and ceiling (1) that each SAE "
                        "closes (against the path ceiling for a residual SAE through the "
                        "reconstruction; on necessity against its ideal, 1, an exact "
                        "reconstruction's, since a dictionary of the attributes alone is no "
                        "upper bound for it); ✓: the paired intervals put it above both "
                        "controls and not above the ceiling; ~: not apart from some control; "
                        "✗: below "
                        "a control, or above the ceiling; no gap where the ceiling is not "
                        "above the floor. An attribute whose cross-section was not found, "
                        "whose ceiling fails its own checks, or whose effect is small, is "
                        "listed but kept out of claims, and gets no gap closed."))
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
        blocks.append(("code", json.dumps(jsonable(config), indent=2)))
    return _label_unconverged(blocks, r.saes, sae_info)


def _label_unconverged(blocks: list[tuple], saes: list[str], sae_info) -> list[tuple]:
    """Every table row of an SAE that did not converge names it so, wherever its
    numbers appear."""
    late = {s for s in saes if convergence(sae_info, s)[1] is False}
    if not late:
        return blocks
    out = []
    for block in blocks:
        if block[0] == "table":
            block = ("table", block[1], [[row[0] + NOT_CONVERGED, *row[1:]]
                                         if row and row[0] in late else row
                                         for row in block[2]])
        out.append(block)
    return out


def render_markdown(blocks: list[tuple]) -> str:
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


def render_html(blocks: list[tuple], root: Path) -> str:
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
