"""SAE training against its compute floor on real SmolLM2, old trainer vs new (issue 27).

Settings are the quickstart's: TopK SAEs of width 1024, k 32, at most 300 steps x 1024
tokens, trained on the run's task corpus (``RunConfig().sae_corpus``: IOI prompts at the
named positions, other draws than the run's prompts). Fewer SAEs than the quickstart's 14
by default (``--sites``: 2 residual, 3 head), to fit a loaded 2-core machine.

Measured, in one process:
  * read: the activations of every site over the training corpus, read once (one trace
    per batch, stopped after the last site) -- what every trainer needs at least once;
  * matmul throughput: the dense encoder product of each group of same-shape SAEs
    (``[S, 1024, d_in] @ [S, d_in, d_sae]``), timed between the trainers' rounds;
  * steps: the old trainer (main before issue 27, commit ``OLD_COMMIT``: autograd through
    a stacked TopK forward) and the new one (:class:`sage_nn.dictionaries.topk.TopKStack`:
    sparse hand-written gradients) on the same batches of those activations, alternated
    every ``--round`` steps so that load changes hit both alike;
  * floor: the FLOPs each step needs (:func:`~sage_nn.dictionaries.topk.step_flops`: the
    encoder, the decoder over the active latents, their backward; the auxiliary loss's dead
    latents included) over the measured throughput;
  * end to end: ``train_saes`` of the old commit (300 steps, no normalisation) and of this
    one (its defaults: activations normalised, stopped at held-out convergence) on the same
    sites and corpus: wall time, steps, held-out FVU and dead latents.

Writes benchmarks/results/training.json. The issue's bound: training at most 2x its floor
plus one read (``new_steps_s <= 2 * floor_s + read_s``; ratio keys ``*_over_floor*``).

    python benchmarks/training.py [--sites L23.resid_pre ...] [--steps 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import linecache
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # before any trace (saes.py)

from sage_nn.dictionaries import stream, training
from sage_nn.dictionaries.corpus import corpus_units
from sage_nn.dictionaries.stream import count_tokens, read_activations, site_keys
from sage_nn.dictionaries.topk import TopKStack
from sage_nn.model.loading import load_model
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.resolve import sae_corpus

SITES = ["L23.resid_pre", "L29.resid_pre", "L23.z.h4", "L24.z.h5", "L29.z.h1"]
#: main before issue 27: its trainer is the "old" one
OLD_COMMIT = "21f08d8"


def old_training():
    """``sage_nn.dictionaries.training`` as of :data:`OLD_COMMIT`, read from git and
    imported beside the current package (its relative imports resolve to the same
    corpus/saes modules, unchanged since)."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:sage_nn/dictionaries/training.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    name = "sage_nn.dictionaries._training_before_27"
    filename = f"<training.py at {OLD_COMMIT}>"
    # nnsight reads a trace's `with` block back from its source: linecache holds it
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "sage_nn.dictionaries"
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def unit_key(unit) -> tuple:
    return tuple(getattr(unit, "ids", unit).tolist()), getattr(unit, "keep", None)


class Replay:
    """An activation reader that serves the corpus's activations from the one read: a
    sequence's activations do not depend on the batch it was read in (right padding,
    causal attention), so any list of the corpus's sequences is their slices in order.
    The end-to-end runs of both trainers then pay for no read of their own."""

    def __init__(self, real, units, acts: dict, skip_first: int):
        self.real, self.slices = real, {}
        start = 0
        for unit in units:
            n = count_tokens([unit], skip_first)
            self.slices[unit_key(unit)] = {k: v[start: start + n] for k, v in acts.items()}
            start += n
        self.misses = 0

    def __call__(self, model, units, sites, **kw):
        pieces = [self.slices.get(unit_key(u)) for u in units]
        if any(p is None for p in pieces) or any(s not in pieces[0] for s in sites):
            self.misses += 1
            yield from self.real(model, units, sites, **kw)
            return
        yield {s: torch.cat([p[s] for p in pieces]) for s in sites}


def new_saes(labels, widths, d_sae, k, seed):
    """sae_lens TopK training SAEs (the initialisation both trainers start from)."""
    torch.manual_seed(seed)
    return {label: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=widths[label], d_sae=d_sae, k=k))
            for label in labels}


def matmul_flops_per_s(S: int, B: int, d_in: int, d_sae: int, reps: int = 5) -> float:
    """Dense ``[S, B, d_in] @ [S, d_in, d_sae]`` throughput (best of ``reps``)."""
    x, w = torch.randn(S, B, d_in), torch.randn(S, d_in, d_sae)
    torch.bmm(x, w)  # warm
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.bmm(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * S * B * d_in * d_sae / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", nargs="+", default=SITES)
    ap.add_argument("--steps", type=int, default=RunConfig.sae_steps,
                    help="step cap of the end-to-end runs (the quickstart's)")
    ap.add_argument("--compare-steps", type=int, default=100,
                    help="steps of each trainer in the alternated comparison")
    ap.add_argument("--width", type=int, default=RunConfig.sae_width)
    ap.add_argument("--round", type=int, default=25, help="steps per trainer between swaps")
    # 1: on a shared 2-core machine a second thread contends with other jobs (measured: 2-8x
    # slower steps under load); every part measured runs with the same count
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-end-to-end", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model()
    run_cfg = RunConfig()
    source = sae_corpus(model, run_cfg)
    cfg = training.TrainConfig(d_sae=args.width, seed=run_cfg.seed, tokens=args.steps * 1024)
    units = corpus_units(model, source, cfg)
    labels = [k[0] for k in site_keys(model, args.sites)]
    print(f"{len(units)} prompts, {count_tokens(units, cfg.skip_first)} tokens "
          f"({time.perf_counter() - t0:.0f} s to load)", flush=True)

    # -- one read of the corpus ------------------------------------------------------
    t = time.perf_counter()
    acts = read_activations(model, units, labels, skip_first=cfg.skip_first,
                            batch_tokens=cfg.model_batch_size * cfg.context_size)
    read_s = time.perf_counter() - t
    n_tokens = len(acts[labels[0]])
    print(f"read {n_tokens} tokens x {len(labels)} sites in {read_s:.1f} s", flush=True)

    # -- steps: old and new trainers alternated on the same batches ------------------
    widths = {label: acts[label].shape[1] for label in labels}
    groups: dict[int, list[str]] = {}
    for label in labels:
        groups.setdefault(widths[label], []).append(label)
    old_module = old_training()
    saes = new_saes(labels, widths, args.width, cfg.k, cfg.seed)
    dead_window = max(1, args.steps // 4)  # the trainers' default: a quarter of the cap
    old_cfg = old_module.TrainConfig(d_sae=args.width, k=cfg.k, lr=cfg.lr)
    stacks = {"old": {d: old_module._TopKStack(group, saes, old_cfg, dead_window)
                      for d, group in groups.items()},
              "new": {d: TopKStack(group, {n: torch.stack([getattr(saes[lb], n).detach()
                                                          for lb in group])
                                           for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
                                   k=cfg.k, lr=cfg.lr, dead_window=dead_window)
                      for d, group in groups.items()}}
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n_tokens, generator=gen)
                       for _ in range(-(-args.compare_steps * 1024 // n_tokens))])
    seconds = {"old": 0.0, "new": 0.0}
    flops_per_s: dict[int, list[float]] = {d: [] for d in groups}
    step = 0
    while step < args.compare_steps:
        steps = range(step, min(args.compare_steps, step + args.round))
        for name in ("old", "new") if (step // args.round) % 2 == 0 else ("new", "old"):
            t = time.perf_counter()
            for s in steps:
                idx = order[s * 1024: (s + 1) * 1024]
                for d, group in groups.items():
                    stacks[name][d].step(torch.stack([acts[lb][idx] for lb in group]))
            seconds[name] += time.perf_counter() - t
        for d, group in groups.items():
            flops_per_s[d].append(matmul_flops_per_s(len(group), 1024, d, args.width))
        step = steps[-1] + 1
        print(f"step {step}: old {seconds['old']:.1f} s, new {seconds['new']:.1f} s",
              flush=True)
    throughput = {d: statistics.median(v) for d, v in flops_per_s.items()}
    floor_flops = {d: stacks["new"][d].flops["floor"] for d in groups}
    floor_s = sum(floor_flops[d] / throughput[d] for d in groups)
    dense_s = sum(stacks["new"][d].flops["dense_encoder_backward"] / throughput[d]
                  for d in groups)

    # -- end to end: train_saes before and after ------------------------------------------
    end_to_end = {}
    if not args.no_end_to_end:
        # one read for both (timed above): each run's time is its steps, checks, evaluation
        replay = Replay(stream.activation_batches, units, acts, cfg.skip_first)
        stream.activation_batches = old_module.activation_batches = replay
        for name, module, c in (
                ("old", old_module, old_module.TrainConfig(d_sae=args.width, seed=cfg.seed,
                                                           tokens=args.steps * 1024)),
                ("new", training, cfg)):
            t = time.perf_counter()
            _, report = module.train_saes(model, args.sites, c, source=source, progress=False)
            end_to_end[name] = {
                "seconds_without_read": round(time.perf_counter() - t, 1),
                "reads_not_replayed": replay.misses,
                "per_sae": json.loads(report[[col for col in ("fvu", "l0", "dead", "steps",
                                                               "converged", "corpus_passes")
                                              if col in report]].to_json(orient="index"))}
            print(name, end_to_end[name], flush=True)

    new_s, old_s = seconds["new"], seconds["old"]
    result = {
        "model": str(model.config._name_or_path),
        "machine": f"{os.cpu_count()} CPUs, torch threads {args.threads}; shared (other jobs "
                   "running): the trainers alternate, compare the ratios",
        "settings": {"sites": labels, "n_saes": len(labels), "d_sae": args.width, "k": cfg.k,
                     "steps_compared": args.compare_steps, "end_to_end_step_cap": args.steps,
                     "batch_size": 1024, "round": args.round,
                     "corpus": str(run_cfg.sae_corpus), "prompts": len(units),
                     "corpus_tokens": n_tokens, "old_commit": OLD_COMMIT},
        "read_s": round(read_s, 2),
        "matmul_gflops_per_s": {str(d): round(v / 1e9, 1) for d, v in throughput.items()},
        "floor_gflop": round(sum(floor_flops.values()) / 1e9, 1),
        "floor_s": round(floor_s, 2),
        "floor_with_dense_encoder_backward_s": round(dense_s, 2),
        "old_steps_s": round(old_s, 2),
        "new_steps_s": round(new_s, 2),
        "ratio_old_steps_over_new": round(old_s / new_s, 3),
        "ratio_new_steps_over_floor": round(new_s / floor_s, 3),
        "ratio_old_steps_over_floor": round(old_s / floor_s, 3),
        "ratio_new_steps_plus_read_over_floor_plus_read": round(
            (new_s + read_s) / (floor_s + read_s), 3),
        "within_2x_floor_plus_read": new_s <= 2 * floor_s + read_s,
        "end_to_end": end_to_end,
        "seconds_benchmark": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "end_to_end"}, indent=1))


if __name__ == "__main__":
    main()
