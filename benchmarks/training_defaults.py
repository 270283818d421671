"""Have the quickstart's headline metrics stopped moving when its SAEs stop training?
(issue 27's check of the defaults.)

Runs the quickstart (SmolLM2 IOI, its default SAEs trained until they meet the convergence
criterion), then continues training every one of those SAEs for ``--more`` steps past
convergence (same corpus, their saved Adam state), evaluates the continued SAEs in the same
run directory (only they are new), and compares, per attribute in claims and headline
metric at the headline k, each continued SAE's value with the converged one's 95% interval.
Also records the quickstart's stage times, and per SAE its steps, held-out FVU and whether
it converged.

Writes benchmarks/results/training_defaults.json.

    python benchmarks/training_defaults.py [--more 200] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_nn.dictionaries.training import TrainConfig, train_saes, training_record
from sage_nn.model.loading import load_model
from sage_nn.pipeline import open_run
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.resolve import trained_cache
from sage_nn.pipeline.stages import run
from sage_nn.report.tables import (
    HEADLINE,
    comparison_table,
    excluded,
    headline_k,
    metric_key,
)


def trained(root: Path) -> dict:
    """Per site SAE under ``root``: steps, held-out FVU, converged (its cfg.json)."""
    out = {}
    for d in sorted(p.parent for p in root.glob("*/cfg.json")):
        rec = training_record(d)
        out[d.name] = {k: rec.get(k) for k in ("steps", "held_out_fvu", "held_out_dead",
                                               "converged", "converged_at_step")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--more", type=int, default=200, help="steps past convergence")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "training_defaults.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("SAGE_NN_CACHE", tempfile.mkdtemp(prefix="sage-cache-"))
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="sage-defaults-"))
    config = RunConfig(run_dir=str(run_dir))
    t = time.perf_counter()
    model = load_model(config.model)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    run(config, progress=False, model=model)
    first_s = time.perf_counter() - t
    timings = open_run(run_dir).timings
    _, cfg, source, root = trained_cache("topk", model, config)
    before = trained(root)
    more = TrainConfig(**{**asdict(cfg), "tokens": args.more * cfg.batch_size,
                          "stop_at_convergence": False})
    sites = sorted(before)
    t = time.perf_counter()
    cont = Path(tempfile.mkdtemp(prefix="sage-continued-"))
    train_saes(model, sites, more, source=source, out_dir=cont / "all",
               init=root, progress=False)
    continue_s = time.perf_counter() - t
    after = trained(cont / "all")
    # the two SAE sets of the quickstart (residual SAEs, SAEs at the sites), continued
    sets = {"resid": "topk-1024-continued", "sites": "topk-1024-continued@sites"}
    for site in sites:
        part = "resid" if "resid" in site else "sites"
        shutil.copytree(cont / "all" / site, cont / sets[part] / site)
    config.saes = [*config.saes, str(cont / sets["resid"]), str(cont / sets["sites"])]
    t = time.perf_counter()
    run(config, progress=False, model=model)
    second_s = time.perf_counter() - t

    results = open_run(run_dir).results
    k = headline_k(results)
    table = comparison_table(results, k=k).reset_index()
    pairs = {"topk-1024": sets["resid"], "topk-1024@sites": sets["sites"]}
    rows, moved = [], 0
    for orig, continued in pairs.items():
        for attribute in sorted(set(table.attribute)):
            if excluded(results, attribute) is not None:
                continue
            a = table[(table.sae == orig) & (table.attribute == attribute)].iloc[0]
            b = table[(table.sae == continued) & (table.attribute == attribute)].iloc[0]
            for metric in HEADLINE:
                name, _ = metric_key(metric, k)
                inside = bool(a[f"{name}_low"] <= b[name] <= a[f"{name}_high"])
                moved += not inside
                rows.append({"sae": orig, "attribute": attribute, "metric": name,
                             "converged": round(float(a[name]), 4),
                             "interval": [round(float(a[f"{name}_low"]), 4),
                                          round(float(a[f"{name}_high"]), 4)],
                             "continued": round(float(b[name]), 4),
                             "continued_inside_interval": inside})
    out = {"model": str(model.config._name_or_path), "task": config.task,
           "settings": {"train_config": {k: v for k, v in asdict(cfg).items()
                                         if k not in ("cache_bytes",)},
                        "steps_past_convergence": args.more,
                        "threads": os.environ.get("OMP_NUM_THREADS", "default")},
           "model_load_seconds": round(load_s, 1), "quickstart_seconds": round(first_s, 1),
           "quickstart_stage_seconds": {s: round(v, 1) for s, v in timings.items()},
           "saes_at_convergence": before, "saes_continued": after,
           "continue_seconds": round(continue_s, 1),
           "evaluate_continued_seconds": round(second_s, 1),
           "headline_k": k, "comparisons": len(rows),
           "continued_outside_interval": moved, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
