"""Attribution patching vs exhaustive exact activation patching on SmolLM2 IOI.

One run, the same prompts throughout:
  1. exact patching of every head's z at END (30 layers x 9 heads = 270 sites), attribute io
     (all 270 variants stacked along the batch, ``--max-rows`` rows per forward);
  2. attribution patching of the same 270 sites (io);
  3. discovery's scoring of the full grid (all kinds, heads, named positions), io alone and
     all attributes: as sage_nn runs it (attribution patching, with the residual stream at
     the tokens a counterfactual replaces or moves patched exactly) and attribution
     patching alone (``exact_residuals=False``);
  4. validation by exact patching, for every attribute, of the top-50 sites of the full
     grid (all kinds; the 50 best estimated ones, i.e. not exact; those a cross-section may
     hold, i.e. not the changed tokens' own stream; components only: no residual-stream
     sites; and attribution patching alone) and of a per-head z cross-section covering half
     the summed |score|: the union of their sites runs as one batch of variants (one per
     site, plus one per whole selection);
  5. (in the same batch) the integrated-gradients variant (``--ig-steps``): the
     rank correlation of its own top-50, and of its estimates on plain attribution's top-50.
The full grid names each residual tensor once (see sage_nn.discovery); its size is the
fitted ``site`` dimension's. Attribution times are the median of ``--repeat`` fits
(each takes seconds, so one fit is at the mercy of the load on a shared machine); the exact
patching of step 1 runs once (minutes). Writes ``benchmarks/results/discovery.json`` after
every step, so an interrupted run keeps what it measured.

    python benchmarks/discovery.py --n 6                  # results/discovery.json
    python benchmarks/discovery.py --n 16 --repeat 1 --ig-steps 0 \
        --out benchmarks/results/discovery_n16.json
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
from sage_nn.discovery.attribution import AttributionPatching
from sage_nn.discovery.selection import ranked, select_cross_section
from sage_nn.model.reads import counterfactual_patches
from sage_nn.model.patching import run_patched
from sage_nn.model.sites import adapter
from sage_nn.tasks.datasets import load_task

COMPONENTS = ["q", "k", "v", "z", "attn_out", "mlp_out"]


def timed(fn, repeat: int = 1):
    """The last result of ``repeat`` calls and the median wall time of one call."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def exact_effects(model, ds, attribute, pairs, joints, args):
    """Exact change in the mean logit difference from patching each (site, position) alone,
    and each list of ``joints`` all at once: one batch of variants for everything."""
    patches = counterfactual_patches(model, ds, ds.counterfactuals[attribute], pairs,
                                     batch_size=args.batch_size)
    by_pair = dict(zip(pairs, patches))
    variants = [[]] + [[p] for p in patches] + [[by_pair[q] for q in j] for j in joints]
    ld = run_patched(model, ds, variants, batch_size=args.batch_size,
                     max_rows=args.max_rows).logit_diff.mean("prompt").values.astype(float)
    delta = ld - ld[0]
    return dict(zip(pairs, delta[1:1 + len(pairs)])), delta[1 + len(pairs):]


def write(report: dict, path: str, t0: float) -> None:
    report["total_seconds"] = time.perf_counter() - t0
    report["load_average_end"] = os.getloadavg()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6, help="IOI prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3,
                        help="attribution fits to time (z sites, full grid for io)")
    parser.add_argument("--ig-steps", type=int, default=2,
                        help="integrated-gradients steps of the variant compared (0: skip)")
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
                    "load_average_start": os.getloadavg(), "attribution_repeats": args.repeat}
    # warm-up, so that first-call costs (a grid's first trace is slower) land on no timed step
    AttributionPatching(attributes=["io"]).fit(model, ds)
    AttributionPatching(kinds=["z"], positions=["END"], attributes=["io"]).fit(model, ds)
    exact_effects(model, ds, "io", [("L0.z.h0", "END")], [], args)

    # 1. exhaustive exact patching of z at END, attribute io --------------------------
    z_sites = ad.all_sites(kinds=["z"])
    pairs = [(str(s), "END") for s in z_sites]
    (exact, _), t_exact = timed(lambda: exact_effects(model, ds, "io", pairs, [], args))
    exact = np.array([exact[p] for p in pairs])
    print(f"exact patching of {len(z_sites)} z sites: {t_exact:.1f} s", flush=True)

    # 2. attribution on the same 270 sites ------------------------------------------
    z_fit, t_attr_z = timed(lambda: AttributionPatching(
        kinds=["z"], positions=["END"], attributes=["io"], batch_size=args.batch_size
    ).fit(model, ds), args.repeat)
    est = z_fit.scores_.delta.sel(attribute="io", site=[str(s) for s in z_sites],
                                  position="END").values
    rho_z = spearmanr(est, exact).statistic
    print(f"attribution of the z sites: {t_attr_z:.1f} s, spearman {rho_z:.3f}", flush=True)

    # 3. the full grid: as discovery scores it, and attribution patching alone ------------
    def grid_fit(attributes=None, exact_residuals=True):
        return AttributionPatching(attributes=attributes, batch_size=args.batch_size,
                                   exact_residuals=exact_residuals).fit(model, ds)

    grid_io, t_attr_grid_io = timed(lambda: grid_fit(["io"]), args.repeat)
    grid_all, t_attr_grid_all = timed(lambda: grid_fit(), args.repeat)
    _, t_plain_io = timed(lambda: grid_fit(["io"], False), args.repeat)
    plain_all, t_plain_all = timed(lambda: grid_fit(None, False), args.repeat)
    print(f"full grid: io {t_attr_grid_io:.1f} s, all attributes {t_attr_grid_all:.1f} s; "
          f"attribution alone {t_plain_io:.1f} s, {t_plain_all:.1f} s", flush=True)
    n_grid = grid_io.scores_.sizes["site"] * grid_io.scores_.sizes["position"]
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
        "kinds": list(dict.fromkeys(grid_io.scores_.kind.values.tolist())),
        "positions": list(grid_io.scores_.position.values),
        "residual_names": "resid_pre at every layer + the last layer's resid_post "
                          "(L.resid_post is L+1.resid_pre, scored once)",
        "exact_cells": {a: int(grid_all.scores_.exact.sel(attribute=a).sum())
                        for a in grid_all.scores_.attribute.values},
        "changed_tokens": {a: [str(p) for p in grid_all.scores_.position.values
                               if bool(grid_all.scores_.changed_token.sel(attribute=a,
                                                                          position=p))]
                           for a in grid_all.scores_.attribute.values},
        "attribution_seconds_io": t_attr_grid_io,
        "attribution_seconds_all_attributes": t_attr_grid_all,
        "attribution_alone_seconds_io": t_plain_io,
        "attribution_alone_seconds_all_attributes": t_plain_all,
        "exact_seconds_per_site_measured": per_site,
        "projected_exact_seconds_io": per_site * n_grid,
        "projected_ratio_io": per_site * n_grid / t_attr_grid_io,
        "projected_ratio_all_attributes": per_site * n_grid * n_attr / t_attr_grid_all,
        "attribution_alone_projected_ratio_io": per_site * n_grid / t_plain_io,
        "attribution_alone_projected_ratio_all_attributes":
            per_site * n_grid * n_attr / t_plain_all,
    }
    report["effects"] = {a: {k: (bool(v) if k == "small_effect" else float(v))
                             for k, v in row.items()}
                         for a, row in grid_all.effects_.to_dict("index").items()}
    report["top_sites"] = {
        a: [f"{r.site}@{r.position} {r.score:+.2f}"
            for r in ranked(grid_all.scores_, a, kinds=COMPONENTS).head(8).itertuples()]
        for a in grid_all.scores_.attribute.values}
    print(json.dumps({k: report[k] for k in ("z_at_end", "full_grid", "effects")}, indent=2),
          flush=True)
    write(report, args.out, t0)

    # 5 (fit). the integrated-gradients variant, validated with step 4 --------------------
    ig = None
    if args.ig_steps:
        ig, t_ig = timed(lambda: AttributionPatching(
            batch_size=args.batch_size, ig_steps=args.ig_steps,
            exact_residuals=False).fit(model, ds))
        report["integrated_gradients"] = {"ig_steps": args.ig_steps,
                                          "attribution_seconds_all_attributes": t_ig}

    # 4. validation by exact patching ---------------------------------------------------
    report["validation"] = {}
    for attribute in ("io", "s", "order"):
        res = grid_all.scores_
        top = args.top
        estimated = ranked(res, attribute)
        selections = {
            f"top{top}_all_kinds": select_cross_section(res, attribute, top_k=top,
                                                        changed_tokens=True),
            f"top{top}_estimated": estimated[~estimated.exact].head(top),
            f"top{top}_selectable": select_cross_section(res, attribute, top_k=top),
            f"top{top}_components": select_cross_section(res, attribute, top_k=top,
                                                         kinds=COMPONENTS),
            f"attribution_alone_top{top}_all_kinds": select_cross_section(
                plain_all.scores_, attribute, top_k=top, changed_tokens=True),
            "z_coverage_0.5": select_cross_section(res, attribute, coverage=0.5, kinds=["z"]),
        }
        if ig is not None:
            selections[f"ig{args.ig_steps}_top{args.top}_all_kinds"] = select_cross_section(
                ig.scores_, attribute, top_k=args.top, changed_tokens=True)
        chosen = {k: list(zip(t.site, t.position)) for k, t in selections.items()}
        pairs = list(dict.fromkeys(q for c in chosen.values() for q in c))
        (single, joint), seconds = timed(lambda: exact_effects(
            model, ds, attribute, pairs, list(chosen.values()), args))
        # the total effect of attribution's own clean and counterfactual forwards
        total = float(res.total_effect.sel(attribute=attribute))
        entry = {"exact_seconds": seconds, "n_sites_patched": len(pairs), "total_effect": total}
        for (name, table), j in zip(selections.items(), joint):
            ex = np.array([single[q] for q in chosen[name]])
            entry[name] = {
                "n_sites": len(table), "n_exact": int(table.exact.sum()),
                "spearman": float(spearmanr(table.delta, ex).statistic),
                "pearson": float(np.corrcoef(table.delta, ex)[0, 1]),
                "estimated_share": float(table.score.sum()),
                "recovered_by_all": float(j / total),
                "sites": [f"{s}@{p} est {sc:+.3f} exact {e / total:+.3f}" for s, p, sc, e
                          in zip(table.site, table.position, table.score, ex)]}
        if ig is not None:  # the variant's estimates of attribution's own top sites
            plain = selections[f"attribution_alone_top{args.top}_all_kinds"]
            ig_est = [float(ig.scores_.delta.sel(attribute=attribute, site=q, position=p))
                      for q, p in zip(plain.site, plain.position)]
            entry[f"ig{args.ig_steps}_on_top{args.top}_all_kinds"] = {"spearman": float(
                spearmanr(ig_est, [single[q] for q in
                                   chosen[f"attribution_alone_top{args.top}_all_kinds"]]
                          ).statistic)}
        report["validation"][attribute] = entry
        print(attribute, {k: (v["spearman"], v.get("recovered_by_all"))
                          if isinstance(v, dict) else v for k, v in entry.items()}, flush=True)
        write(report, args.out, t0)


if __name__ == "__main__":
    main()
