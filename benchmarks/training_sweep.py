"""How long the quickstart's SAEs take to converge, and at which k (issue 27's sweep, a first
part): SmolLM2 IOI, the quickstart's corpus and width, the benchmark's five sites, trained
past the quickstart's 300-step cap without stopping, their held-out curves recorded; for
several tolerances, the step where each SAE meets the convergence criterion and its
held-out FVU there. Variants: k at heads (``--k-heads``), learning rate (``--lr``). One
read of the corpus serves every variant (benchmarks/training.py's Replay).

Writes benchmarks/results/training_sweep.json.

    python benchmarks/training_sweep.py [--steps 800] [--k-heads 32 16 8] [--lr 4e-4 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch
from training import SITES, Replay  # benchmarks/training.py

from sage_nn.dictionaries import stream
from sage_nn.dictionaries.corpus import corpus_units
from sage_nn.dictionaries.fit import converged
from sage_nn.dictionaries.stream import read_activations, site_keys
from sage_nn.dictionaries.training import TrainConfig, train_saes, training_record
from sage_nn.model.loading import load_model
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.resolve import sae_corpus

TOLERANCES = [0.0005, 0.001, 0.002, 0.005]


def first_converged(curve: list, cfg: TrainConfig) -> list | None:
    """The first check at which ``curve`` meets ``cfg``'s criterion: [step, fvu, dead]."""
    for i in range(len(curve)):
        if converged(curve[: i + 1], cfg):
            return curve[i]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", nargs="+", default=SITES)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--k-heads", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--lr", type=float, nargs="+", default=[TrainConfig.lr])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "training_sweep.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model()
    run_cfg = RunConfig()
    source = sae_corpus(model, run_cfg)
    base = TrainConfig(d_sae=run_cfg.sae_width, seed=run_cfg.seed, tokens=args.steps * 1024,
                       stop_at_convergence=False)
    units = corpus_units(model, source, base)
    labels = [k[0] for k in site_keys(model, args.sites)]
    t = time.perf_counter()
    acts = read_activations(model, units, labels, skip_first=base.skip_first,
                            batch_tokens=base.model_batch_size * base.context_size)
    read_s = time.perf_counter() - t
    stream.activation_batches = Replay(stream.activation_batches, units, acts, base.skip_first)
    variants = {}
    for lr, k_heads in [(lr, k) for lr in args.lr for k in args.k_heads]:
        # the residual SAEs do not depend on k_heads: trained with the first one only
        sites = (args.sites if k_heads == args.k_heads[0]
                 else [s for s in args.sites if ".z." in s])
        cfg = TrainConfig(**{**vars(base), "k_heads": k_heads, "lr": lr})
        out = Path(tempfile.mkdtemp())
        t = time.perf_counter()
        _, report = train_saes(model, sites, cfg, source=source, out_dir=out, progress=False)
        seconds = time.perf_counter() - t
        per_sae = {}
        for site in report.index:
            curve = training_record(out / site)["curve"]
            stops = {}
            for tol in TOLERANCES:
                hit = first_converged(curve, TrainConfig(**{**vars(cfg), "converge_tol": tol}))
                stops[str(tol)] = ({"step": hit[0], "fvu": hit[1], "dead_share": hit[2]}
                                   if hit else None)
            per_sae[site] = {"k": int(report.loc[site, "k"]),
                             "fvu_at_cap": float(report.loc[site, "fvu"]),
                             "held_out_dead_at_cap": int(report.loc[site, "dead"]),
                             "stop_by_tolerance": stops, "curve": curve}
        name = f"k_heads={k_heads}" + (f",lr={lr:g}" if len(args.lr) > 1 else "")
        variants[name] = {"seconds": round(seconds, 1), "per_sae": per_sae}
        print(k_heads, {s: (v["fvu_at_cap"], v["stop_by_tolerance"]) for s, v in
                        per_sae.items()}, flush=True)
    result = {"model": str(model.config._name_or_path),
              "settings": {"sites": labels, "d_sae": run_cfg.sae_width, "k": base.k,
                           "step_cap": args.steps, "batch_size": base.batch_size,
                           "lr": base.lr, "converge_window": base.converge_window,
                           "check_every": base.check_every, "min_steps": base.min_steps,
                           "corpus": str(run_cfg.sae_corpus), "prompts": len(units),
                           "corpus_tokens": len(acts[labels[0]]), "threads": args.threads},
              "read_s": round(read_s, 1), "variants": variants,
              "seconds_benchmark": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
