"""SAE training speed on real SmolLM2, old path vs new, in one process (issue 15).

Settings are the quickstart's: TopK SAEs of width 1024, k 32, 300 steps x 1024 tokens,
trained on the run's task corpus (``RunConfig().sae_corpus``: IOI prompts at the named
positions, other draws than the run's prompts). Fewer SAEs than the quickstart's 14 by
default (``--sites``), to fit a loaded 2-core machine; the per-step cost of each trainer
grows with the number of SAEs, the forwards do not.

Measured:
  * forwards: reading every site over the same prompts, the old way (the whole model,
    logits included) and the new way (stopped after the last site), interleaved, on
    ``--forward-units`` of the training prompts;
  * training: sae_lens's MultiSAETrainer (old) and the batched trainer (new) on the same
    activations (read once and replayed to both, so the trainer times exclude forwards),
    with held-out FVU, L0 and dead latents per SAE;
  * convergence: the batched run checks held-out FVU every 10 steps (converge_tol=0: it
    never stops, so its weights are those of the fixed-step run); from those curves, the
    step each SAE would stop at and its FVU there, for several tolerances. Training is
    deterministic, so a run with that tolerance stops there with exactly those weights.

Writes benchmarks/results/training.json.

    python benchmarks/training.py [--sites L23.resid_pre ...] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sage_nn.dictionaries import training  # noqa: E402  (sae_lens before any trace)
import torch  # noqa: E402

from sage_nn.model.loading import load_model
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.resolve import sae_corpus
from sage_nn.model.sites import HEAD_KINDS, adapter

SITES = ["L23.resid_pre", "L29.resid_pre", "L23.z.h4", "L24.z.h5", "L29.z.h1"]
TOLERANCES = [0.002, 0.005, 0.01, 0.02]


def full_forward(model, units, sites, cfg):
    """The old activation read: the same trace without the early stop (logits computed)."""
    ad = adapter(model)
    keys = sorted(training._site_keys(model, sites),
                  key=lambda k: (k[1], ad.kinds().index(k[2])))  # model order
    for start, end in training._batch_ranges([len(u) for u in units], 16,
                                             training._batch_tokens(cfg)):
        part = list(units[start:end])
        lengths = torch.tensor([len(u) for u in part])
        ids = torch.nn.utils.rnn.pad_sequence([getattr(u, "ids", u) for u in part],
                                              batch_first=True, padding_value=0)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        saved = {}
        with torch.no_grad(), model.trace({"input_ids": ids, "attention_mask": mask.long()}):
            for label, layer, kind, heads in keys:
                t = ad.tensor(model, layer, kind)
                if kind in HEAD_KINDS:
                    t = t[..., ad.channels(kind, heads)]
                saved[label] = t.save()
        yield saved


def timed_forwards(model, units, sites, cfg) -> dict:
    old = new = 0.0
    for i in range(0, len(units), 128):  # interleaved: load changes hit both alike
        part = units[i:i + 128]
        t = time.perf_counter()
        list(full_forward(model, part, sites, cfg))
        old += time.perf_counter() - t
        t = time.perf_counter()
        list(training.activation_batches(model, part, sites, skip_first=cfg.skip_first,
                                         batch_tokens=training._batch_tokens(cfg)))
        new += time.perf_counter() - t
    return {"units": len(units), "old_full_forward_s": round(old, 2),
            "new_stopped_forward_s": round(new, 2), "ratio_old_over_new": round(old / new, 3)}


class Replay:
    """activation_batches, memoized by the sequences it is given: the first trainer's
    forwards are timed and kept, the second trainer gets the same activations."""

    def __init__(self):
        self.memo, self.seconds = {}, 0.0
        self.real = training.activation_batches

    def __call__(self, model, units, sites, **kw):
        key = (tuple((tuple(getattr(u, "ids", u).tolist()), getattr(u, "keep", None))
                     for u in units), tuple(sites))
        if key not in self.memo:
            t = time.perf_counter()
            self.memo[key] = list(self.real(model, units, sites, **kw))
            self.seconds += time.perf_counter() - t
        return iter(self.memo[key])


def stop_at(curve: list, cfg) -> list | None:
    for step, _ in curve:
        if training._converged([c for c in curve if c[0] <= step], step, cfg):
            return next(c for c in curve if c[0] == step)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", nargs="+", default=SITES)
    ap.add_argument("--steps", type=int, default=RunConfig.sae_steps)
    ap.add_argument("--width", type=int, default=RunConfig.sae_width)
    ap.add_argument("--forward-units", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model()
    run_cfg = RunConfig()
    source = sae_corpus(model, run_cfg)
    cfg = training.TrainConfig(architecture="topk", d_sae=args.width, seed=run_cfg.seed,
                               tokens=args.steps * 1024)
    units = training.corpus_units(model, source, cfg)
    print(f"{len(units)} prompts, {training.count_tokens(units, cfg.skip_first)} tokens "
          f"({time.perf_counter() - t0:.0f} s to load)", flush=True)

    forwards = timed_forwards(model, units[:args.forward_units], args.sites, cfg)
    print("forwards", forwards, flush=True)

    replay = Replay()
    training.activation_batches = replay
    runs = {}
    try:
        for name, trainer, tol in (("new", "batched", 0.0), ("old", "sae_lens", None)):
            c = training.TrainConfig(**{**vars(cfg), "trainer": trainer, "converge_tol": tol})
            before = replay.seconds
            t = time.perf_counter()
            out_dir = Path(tempfile.mkdtemp()) / name  # written in sae_lens's format
            saes, report = training.train_saes(model, args.sites, c, source=source,
                                               out_dir=out_dir)
            wall = time.perf_counter() - t
            forward_s = replay.seconds - before
            runs[name] = {"trainer": trainer, "seconds_total": round(wall, 2),
                          "seconds_forwards": round(forward_s, 2),
                          "seconds_training": round(wall - forward_s, 2),
                          "report": json.loads(report.to_json(orient="index"))}
            record = json.loads((out_dir / "train_config.json").read_text())
            if trainer == "batched":
                curves = record["held_out_fvu_curves"]
            shutil.rmtree(out_dir.parent, ignore_errors=True)
            print(name, {k: v for k, v in runs[name].items() if k != "report"},
                  report[["fvu", "l0", "dead", "steps"]].to_dict(), flush=True)
    finally:
        training.activation_batches = replay.real

    old, new = runs["old"], runs["new"]
    per_sae = {s: {"fvu_old": old["report"][s]["fvu"], "fvu_new": new["report"][s]["fvu"],
                   "dead_old": old["report"][s]["dead"], "dead_new": new["report"][s]["dead"],
                   "steps_old": old["report"][s]["steps"],
                   "steps_new": new["report"][s]["steps"]} for s in args.sites}
    convergence = {}
    for tol in TOLERANCES:
        c = training.TrainConfig(**{**vars(cfg), "converge_tol": tol})
        stops = {s: stop_at(curves[s], c) for s in args.sites}
        convergence[str(tol)] = {s: {"stop_step": v[0] if v else args.steps,
                                     "fvu_at_stop": v[1] if v else new["report"][s]["fvu"]}
                                 for s, v in stops.items()}
    # a training run's time: one forward pass over its prompts (cached) plus the steps
    fwd_ratio = forwards["ratio_old_over_new"]
    old_total = new["seconds_forwards"] * fwd_ratio + old["seconds_training"]
    new_total = new["seconds_forwards"] + new["seconds_training"]
    result = {
        "model": str(model.config._name_or_path),
        "machine": f"{os.cpu_count()} CPUs, torch threads {args.threads}; shared and loaded "
                   "(other jobs running): compare the ratios, not the absolute seconds",
        "settings": {"sites": args.sites, "n_saes": len(args.sites), "d_sae": args.width,
                     "k": cfg.k, "steps": args.steps, "batch_size": cfg.batch_size,
                     "corpus": str(run_cfg.sae_corpus), "prompts": len(units),
                     "note": "quickstart settings; fewer SAEs than its 14 (5 residual + 9 "
                             "per-head z) to fit the machine"},
        "forwards": forwards,
        "old": {k: v for k, v in old.items() if k != "report"},
        "new": {k: v for k, v in new.items() if k != "report"},
        "ratio_training_steps_old_over_new": round(old["seconds_training"]
                                                   / new["seconds_training"], 3),
        "estimated_total_old_s": round(old_total, 1),
        "estimated_total_new_s": round(new_total, 1),
        "ratio_total_old_over_new": round(old_total / new_total, 3),
        "total_note": "total = the forwards over all training + held-out prompts (new: timed "
                      "in the batched run; old: that times forwards.ratio_old_over_new) + "
                      "the trainer's steps and evaluation",
        "per_sae": per_sae,
        "max_abs_fvu_difference": max(abs(v["fvu_old"] - v["fvu_new"])
                                      for v in per_sae.values()),
        "held_out_fvu_curves_new": curves,
        "convergence_by_tolerance": convergence,
        "reports": {"old": old["report"], "new": new["report"]},
        "seconds_benchmark": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("forwards", "old", "new",
                                             "ratio_training_steps_old_over_new",
                                             "ratio_total_old_over_new", "per_sae",
                                             "convergence_by_tolerance")}, indent=1))


if __name__ == "__main__":
    main()
