"""The k of SAEs at the heads, by measurement: where the headline separates trained SAEs from
random ones beyond the seed spread.

The quickstart's run (``sage quickstart``: SmolLM2 IOI, its cross-sections, its SAE corpus):
TopK SAEs at the cross-sections' heads (``train:topk:k=K@sites``, width 1024, the
quickstart's training) for k in 4, 8, 16, 32 and two SAE seeds each, evaluated at io's and
s's cross-sections with their controls (the floor and the random SAE, three seeds each). Per
k and headline metric: the trained SAE's value (mean over its seeds) and its spread across
seeds, each control's value, the ceiling's, whether the SAE lies above both controls by the
paired intervals (for every seed), whether its margin over the random SAE exceeds the seed
spread, and whether the ceiling lies above the floor (a metric without that gap cannot rank
anything). The reference used k 3-24 with 512 latents at GPT-2's heads (64 wide). ``chosen``
(:func:`choose`) is the pipeline's k at heads, ``sage_nn.pipeline.resolve.TRAINED_K_HEADS``.

Writes benchmarks/results/head_k.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import sage_nn
from sage_nn.evaluation.coders import CrossSection, DirectSAE
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.model.sites import Site
from sage_nn.pipeline.config import run_prompts
from sage_nn.report import (HEADLINE, Lookup, against_floor, gap_defined, goodness,
                                   roles)
from validity import trained  # the run's SAE training, cached as the pipeline caches it


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/quickstart", help="a finished quickstart run")
    parser.add_argument("--ks", default="4,8,16,32")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--attributes", default="io,s")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "head_k.json"))
    args = parser.parse_args()
    try:
        run = sage_nn.open_run(args.run)
    except FileNotFoundError as err:
        sys.exit(f"benchmarks/head_k.py: {err}; run `sage quickstart` first (or pass --run)")
    config = run.config
    model = sage_nn.load_model(config.model)
    _, fit, held_out = run_prompts(model, config)
    attributes = args.attributes.split(",")
    sections = [CrossSection(a, [(Site.parse(p.split("@")[0]), p.split("@")[1])
                                 for p in run.cross_sections[a]]) for a in attributes]
    pairs = [p for cs in sections for p in cs.pairs]
    ks, seeds = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")]
    saes, training = {}, {}
    heads = list(dict.fromkeys(str(s) for s, _ in pairs))
    for k in ks:  # the run's corpus and prompts; only the SAE's seed changes
        for seed in seeds:
            saes[f"k{k}-seed{seed}"] = DirectSAE(trained(model, config, heads, k, seed,
                                                         training))
    start = time.perf_counter()
    results = evaluate_cross_section(model, fit, held_out, sections, saes, ks=config.ks,
                                     n_boot=args.n_boot, seed=config.seed,
                                     batch_size=config.batch_size)
    seconds = round(time.perf_counter() - start, 1)
    out = {"settings": {"run": args.run, "model": config.model, "task": config.task,
                        "width": config.sae_width, "ks": ks, "seeds": seeds,
                        "edit_ks": config.ks, "n_boot": args.n_boot,
                        "control_seeds": int(results.attrs["control_seeds"]),
                        "cross_sections": {cs.attribute: cs.labels for cs in sections}},
           "seconds": {"training": training, "evaluation": seconds},
           "by_k": summary(results, ks, seeds, attributes)}
    out["chosen"] = choose(out["by_k"], ks)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["chosen"], indent=1))
    print(f"wrote {path}")


def summary(results, ks, seeds, attributes) -> dict:
    """Per k, attribute and headline metric (goodness units): the SAE's mean over seeds and
    its spread, its controls', the ceiling's, and the verdicts."""
    look, r = Lookup(results), roles(results)
    out = {}
    for k in ks:
        names = [f"k{k}-seed{s}" for s in seeds]
        out[f"k{k}"] = {}
        for a in attributes:
            rows = {}
            for metric in HEADLINE:
                value = lambda d: goodness(metric, look(metric, a, d))  # noqa: E731
                sae = [value(n) for n in names]
                rows[metric] = {
                    "sae": float(np.mean(sae)), "seed_spread": float(np.ptp(sae)),
                    "floor": float(np.mean([value(r.floors[n]) for n in names])),
                    "random_sae": float(np.mean([value(r.random_saes[n]) for n in names])),
                    "ceiling": value(r.ceiling_of(names[0], metric)),  # necessity: its ideal
                    "fvu_floor": float(np.mean([look("fvu_pooled", a, r.floors[n])
                                                for n in names])),
                    "above_both_controls": all(
                        against_floor(look, n, a, metric, c) == "above"
                        for n in names for c in ("floor", "random SAE")),
                    "margin_over_random_exceeds_seed_spread": bool(
                        min(sae) - max(value(r.random_saes[n]) for n in names) > np.ptp(sae)),
                    "ceiling_above_floor": all(gap_defined(
                        look, a, metric, r.ceiling_of(n, metric), r.floors[n]) for n in names),
                }
            out[f"k{k}"][a] = rows
    return out


def choose(by_k: dict, ks) -> dict:
    """The k that meets the most criteria (every headline metric, at every attribute: the
    trained SAEs above both controls by the paired intervals, beyond the seed spread, with a
    gap to close); among those, the one whose SAEs close the most of the gap from floor to
    ceiling (the mean over the metrics with a gap, in goodness units)."""
    met, gaps = {}, {}
    for k in ks:
        cells = [row for attr in by_k[f"k{k}"].values() for row in attr.values()]
        met[k] = sum(row["above_both_controls"] and row["margin_over_random_exceeds_seed_spread"]
                     and row["ceiling_above_floor"] for row in cells) / len(cells)
        gaps[k] = float(np.mean([(row["sae"] - row["floor"]) / (row["ceiling"] - row["floor"])
                                 for row in cells if row["ceiling_above_floor"]]))
    best = max(met.values())
    chosen = max((k for k in ks if met[k] == best), key=lambda k: gaps[k])
    return {"k": chosen, "share_of_criteria_met": {f"k{k}": met[k] for k in ks},
            "mean_gap_closed": {f"k{k}": round(gaps[k], 3) for k in ks},
            "not_met": sorted({f"{a} {m}" for k in ks for a, rows in by_k[f"k{k}"].items()
                               for m, row in rows.items() if not row["ceiling_above_floor"]})}


if __name__ == "__main__":
    main()
