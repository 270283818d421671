"""Attribution patching vs exhaustive exact activation patching on SmolLM2 IOI.

One run, the same prompts throughout:
  1. exact patching of every head's z at END (30 layers x 9 heads = 270 sites), attribute io
     (all 270 variants stacked along the batch, ``--max-rows`` rows per forward);
  2. attribution patching of the same 270 sites (io);
  3. attribution patching of the full grid (all kinds, heads, named positions), io alone and
     all attributes;
  4. validation of the top-50 sites of the full grid and of a per-head z cross-section.
Writes ``benchmarks/results/discovery.json``.

    python benchmarks/discovery.py --n 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from sage_nn import load_model
from sage_nn.discovery import AttributionPatching, ranked, select_cross_section, validate
from sage_nn.interventions import counterfactual_patches, run_patched
from sage_nn.sites import adapter
from sage_nn.tasks import load_task


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "discovery.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model = load_model("smollm2-135m")
    ad = adapter(model)
    ds = load_task("ioi").build(model, n=args.n, seed=args.seed, split="train")
    report: dict = {"model": "smollm2-135m", "task": "ioi", "split": "train", "n_prompts": len(ds),
                    "seed": args.seed, "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": os.getloadavg()}

    # 1. exhaustive exact patching of z at END, attribute io --------------------------
    z_sites = ad.all_sites(kinds=["z"])
    pairs = [(s, "END") for s in z_sites]

    def exact_all():
        patches = counterfactual_patches(model, ds, ds.counterfactuals["io"], pairs,
                                         batch_size=args.batch_size)
        out = run_patched(model, ds, [[]] + [[p] for p in patches],
                          batch_size=args.batch_size, max_rows=args.max_rows)
        ld = out.logit_diff.mean("prompt").values
        return ld[1:] - ld[0]

    exact, t_exact = timed(exact_all)
    print(f"exact patching of {len(z_sites)} z sites: {t_exact:.1f} s", flush=True)

    # 2. attribution on the same 270 sites ------------------------------------------
    z_fit, t_attr_z = timed(lambda: AttributionPatching(
        kinds=["z"], positions=["END"], attributes=["io"], batch_size=args.batch_size
    ).fit(model, ds))
    est = np.array([float(z_fit.deltas_.sel(attribute="io", layer=s.layer, kind="z",
                                            head=s.head, position="END")) for s in z_sites])
    rho_z = spearmanr(est, exact).statistic
    print(f"attribution of the z sites: {t_attr_z:.1f} s, spearman {rho_z:.3f}", flush=True)

    # 3. attribution on the full grid -------------------------------------------------
    grid_io, t_attr_grid_io = timed(lambda: AttributionPatching(
        attributes=["io"], batch_size=args.batch_size).fit(model, ds))
    grid_all, t_attr_grid_all = timed(lambda: AttributionPatching(
        batch_size=args.batch_size).fit(model, ds))
    print(f"full grid: io {t_attr_grid_io:.1f} s, all attributes {t_attr_grid_all:.1f} s",
          flush=True)
    n_grid = int(grid_io.scores_.is_site.sum()) * len(grid_io.scores_.layer) * \
        len(grid_io.scores_.position)
    per_site = t_exact / len(z_sites)
    n_attr = len(grid_all.scores_.attribute)
    report["z_at_end"] = {
        "n_sites": len(z_sites),
        "exact_seconds": t_exact, "attribution_seconds": t_attr_z,
        "time_ratio": t_exact / t_attr_z, "spearman": float(rho_z),
        "pearson": float(np.corrcoef(est, exact)[0, 1]),
        "top10_exact": [[str(z_sites[i]), float(exact[i]), float(est[i])]
                        for i in np.argsort(-np.abs(exact))[:10]],
    }
    report["full_grid"] = {
        "n_site_positions": n_grid,
        "positions": list(grid_io.scores_.position.values),
        "attribution_seconds_io": t_attr_grid_io,
        "attribution_seconds_all_attributes": t_attr_grid_all,
        "exact_seconds_per_site_measured": per_site,
        "projected_exact_seconds_io": per_site * n_grid,
        "projected_ratio_io": per_site * n_grid / t_attr_grid_io,
        "projected_ratio_all_attributes": per_site * n_grid * n_attr / t_attr_grid_all,
    }
    report["effects"] = {a: {k: (bool(v) if k == "small_effect" else float(v))
                             for k, v in row.items()}
                         for a, row in grid_all.effects_.to_dict("index").items()}
    report["top_sites"] = {
        a: [f"{r.site}@{r.position} {r.score:+.2f}"
            for r in ranked(grid_all.result_, a, kinds=["z", "attn_out", "mlp_out"]).head(8)
                .itertuples()]
        for a in grid_all.scores_.attribute.values}

    # 4. validation: top-50 of the full grid; a per-head z cross-section per attribute ----
    report["validation"] = {}
    for attribute in ("io", "s"):
        entry = {}
        for name, kinds in (("all_kinds", None), ("components", ["q", "k", "v", "z",
                                                                "attn_out", "mlp_out"])):
            sel = select_cross_section(grid_all.result_, attribute, top_k=args.top, kinds=kinds)
            (table, summary), seconds = timed(lambda: validate(
                model, ds, grid_all.result_, attribute, sel, batch_size=args.batch_size,
                max_rows=args.max_rows))
            entry[f"top{args.top}_{name}"] = {"spearman": summary["spearman"],
                                              "recovered_by_all": summary["recovered"],
                                              "seconds": seconds}
        sel = select_cross_section(grid_all.result_, attribute, coverage=0.5, kinds=["z"])
        table, summary = validate(model, ds, grid_all.result_, attribute, sel,
                                  batch_size=args.batch_size, max_rows=args.max_rows)
        entry["z_cross_section_coverage_0.5"] = {
            "sites": [f"{s}@{p}" for s, p in zip(table.site, table.position)],
            "estimated_share": float(table.score.sum()),
            "exact_single_site_share": [round(float(x), 3) for x in table.exact_score],
            "recovered": summary["recovered"], "spearman": summary["spearman"],
        }
        report["validation"][attribute] = entry
        print(attribute, json.dumps(entry, indent=1), flush=True)

    report["total_seconds"] = time.perf_counter() - t0
    report["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("z_at_end", "full_grid", "effects")}, indent=2))


if __name__ == "__main__":
    main()
