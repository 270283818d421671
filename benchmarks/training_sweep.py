"""How long the quickstart's SAEs take to converge, under which settings (issue 27's sweep):
SmolLM2 IOI, the quickstart's corpus and width, the benchmark's five sites, trained without
stopping for ``--steps``, their held-out curves recorded; for several tolerances, the step
where each SAE meets the convergence criterion and its held-out FVU there. Each variant
overrides TrainConfig fields and may train on fewer of the corpus's prompts (``prompts``:
the first draws of the same seed, so a subset of the one read, which serves every variant:
benchmarks/training.py's Replay).

Writes benchmarks/results/training_sweep.json.

    python benchmarks/training_sweep.py [--steps 300] \
        [--variants weight_init=sae_lens,lr=4e-4 weight_init=data prompts=1024 ...]
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


def parse(text: str, default):
    """A variant's value, typed as the field's default (a None default: an int)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    return int(text) if default is None else type(default)(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", nargs="+", default=SITES)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--variants", nargs="+", default=["weight_init=sae_lens,lr=4e-4",
                                                      "weight_init=data", "prompts=1024"],
                    help="comma-separated KEY=VALUE: TrainConfig fields, and prompts")
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
    for variant in args.variants:
        fields = dict(kv.split("=") for kv in variant.split(",") if kv)
        prompts = int(fields.pop("prompts", run_cfg.sae_task_prompts))
        fields = {k: parse(v, getattr(base, k)) for k, v in fields.items()}
        cfg = TrainConfig(**{**vars(base), **fields})
        source = sae_corpus(model, RunConfig(sae_task_prompts=prompts))
        sites = args.sites
        out = Path(tempfile.mkdtemp())
        t = time.perf_counter()
        _, report = train_saes(model, sites, cfg, source=source, out_dir=out, progress=False)
        assert stream.activation_batches.misses == 0, "a variant's corpus is not in the read"
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
        variants[variant] = {"seconds": round(seconds, 1), "prompts": prompts,
                             "config": {k: getattr(cfg, k) for k in ("lr", "k", "k_heads",
                                                                     "weight_init")},
                             "per_sae": per_sae}
        print(variant, {s: (v["fvu_at_cap"], v["stop_by_tolerance"]) for s, v in
                        per_sae.items()}, flush=True)
    result = {"model": str(model.config._name_or_path),
              "settings": {"sites": labels, "d_sae": run_cfg.sae_width, "k": base.k,
                           "step_cap": args.steps, "batch_size": base.batch_size,
                           "lr": base.lr, "lr_by_width": base.lr_by_width,
                           "converge_tol": base.converge_tol, "converge_window": base.converge_window,
                           "check_every": base.check_every, "min_steps": base.min_steps,
                           "corpus": str(run_cfg.sae_corpus), "prompts": len(units),
                           "corpus_tokens": len(acts[labels[0]]), "threads": args.threads},
              "read_s": round(read_s, 1), "variants": variants,
              "seconds_benchmark": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
