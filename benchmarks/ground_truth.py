"""Are the supervised dictionaries trustworthy ground truth? (issue 5 evidence)

On real SmolLM2, for each task: discover cross-sections on fit prompts (heads grown by their
joint exact patch to 0.6 of each attribute's effect, the pipeline's default), fit mean and
MSE dictionaries with unit and fitted weights there, and measure on held-out prompts (same
vocabulary, other prompts) their sufficiency, necessity and edit (accuracy or success, see
``edit_metric``), with bootstrap 95% intervals, and whether the first (MSE, unit weights,
the pipeline's ceiling) passes the ground-truth checks. Writes
benchmarks/results/ground_truth.json and a Markdown table next to it.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sage_nn import load_model
from sage_nn.dictionaries.supervised import MeanDictionary, MSEDictionary
from sage_nn.discovery.stage import DiscoveryConfig, discover
from sage_nn.evaluation.coders import CrossSection
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.model.sites import Site
from sage_nn.tasks.datasets import load_task

DICTIONARIES = {
    "mse/unit": MSEDictionary(weights="unit"),
    "mse/fitted": MSEDictionary(weights="fitted"),
    "mean/unit": MeanDictionary(weights="unit"),
    "mean/fitted": MeanDictionary(weights="fitted"),
}


def one_task(model, task: str, n_fit: int, n_eval: int, n_discovery: int,
             seed: int) -> pd.DataFrame:
    full = load_task(task).build(model, n=n_fit + n_eval, seed=seed, split="train")
    fit, held_out = full.subset(np.arange(n_fit)), full.subset(np.arange(n_fit, len(full)))
    found = discover(model, fit.subset(np.arange(min(n_discovery, n_fit))), DiscoveryConfig())
    summary = found.summary()
    model._module.set_attn_implementation("eager")
    rows = []
    for attribute, table in found.cross_sections.items():
        pairs = [(Site.parse(s), str(p)) for s, p in zip(table.site, table.position)]
        res = evaluate_cross_section(model, fit, held_out, CrossSection(attribute, pairs),
                                     dictionaries=DICTIONARIES, ks=[1, 2, 4], seed=seed)
        res = res.squeeze("attribute")
        for method in res.dictionary.values:
            r = res.sel(dictionary=method)
            rows.append({
                "task": task, "attribute": attribute, "cross_section": " ".join(res.pair.values),
                "recovered": summary[attribute]["recovered"],
                "small_effect": summary[attribute]["small_effect"],
                "dictionary": str(method), "n_eval": int(res.attrs["n_prompts"]),
                "edit_metric": str(res.edit_metric.values),
                "ground_truth": bool(res.ground_truth),
                "ground_truth_note": str(res.ground_truth_note.values),
                "sufficiency": float(r.sufficiency),
                "sufficiency_ci": [float(x) for x in r.sufficiency_ci.values],
                "necessity": float(r.necessity),
                "necessity_ci": [float(x) for x in r.necessity_ci.values],
                "edit_k2": float(r.edit.sel(k=2)),
                "edit_k2_ci": [float(x) for x in r.edit_ci.sel(k=2).values],
                "fvu": float(r.fvu.mean()),
            })
    return pd.DataFrame(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", nargs="+", default=["ioi", "pronouns"])
    parser.add_argument("--n-fit", type=int, default=128)
    parser.add_argument("--n-eval", type=int, default=96)
    parser.add_argument("--n-discovery", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model()
    start = time.perf_counter()
    table = pd.concat([one_task(model, t, args.n_fit, args.n_eval, args.n_discovery, args.seed)
                       for t in args.tasks])
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    result = {"benchmark": "ground_truth", "model": "smollm2-135m", "settings": vars(args),
              "seconds": time.perf_counter() - start, "rows": table.to_dict("records")}
    (out / "ground_truth.json").write_text(json.dumps(result, indent=2))
    fmt = lambda v, ci: f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"  # noqa: E731
    lines = ["| task | attribute | cross-section (recovered) | dictionary | sufficiency | "
             "necessity | edit (k=2) | FVU | ground truth |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        gt = ("yes" if r["ground_truth"] else f"no: {r['ground_truth_note']}") + (
            ", small effect" if r["small_effect"] else "")
        lines.append(f"| {r['task']} | {r['attribute']} | {r['cross_section']} "
                     f"({r['recovered']:.2f}) | {r['dictionary']} | "
                     f"{fmt(r['sufficiency'], r['sufficiency_ci'])} | "
                     f"{fmt(r['necessity'], r['necessity_ci'])} | "
                     f"{r['edit_metric']} {fmt(r['edit_k2'], r['edit_k2_ci'])} | "
                     f"{r['fvu']:.2f} | {gt if r['dictionary'] == 'mse/unit' else ''} |")
    (out / "ground_truth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
