"""The metrics validated by construction on SmolLM2 IOI, random SAEs against trained ones, and
the seed noise of trained SAEs.

1. Ladders (sage_nn.evaluation.validity) at the quickstart's cross-sections of ``io`` and ``s`` (heads'
   ``z`` at END): planted dictionaries (a share f of the attribute's values has a latent that
   is its supervised feature, firing exactly on it) for the edits, F1 and alignment, at the
   heads themselves and through the residual-to-sublayer reconstruction (residual SAEs whose
   planted latents fire at the attribute's token); and reconstructions keeping a share f of
   what the quickstart's trained SAEs explain for sufficiency and necessity, for the
   residual SAEs through the reconstruction and for the SAEs at the heads. Per metric:
   Spearman over the levels, whether the f = 0 and f = 1 intervals are apart, the floor
   against f = 0, the f = 1 rung against the ceiling's interval.
2. In the tool's regime (``regime``): planted latents among a trained residual SAE's own
   latents (its real L0, dense codes summed over the context) through the reconstruction,
   for the edits over k and F1, the SAE's latents that detect a value of the attribute on
   the fit prompts (F1 above ``DETECTOR_F1``) removed at every pair, so that f = 0 does
   not know the attribute and the planted latents are the detectors of their values;
   equal-FVU rungs whose error lies inside versus orthogonal to the task's subspace at the
   heads, for sufficiency and necessity (FVU flat); an overshoot (twice what the SAE
   explains) that parts sufficiency from necessity. Every rung with its
   floor's place (the paired interval of rung - floor).
3. Random SAEs (``random``): sae_lens TopK and JumpReLU SAEs with random weights (built with
   sae_lens's config classes, saved as SAE directories and loaded back as a user's) at the
   residual layers feeding io's and s's heads, against the trained SAEs there, at the whole
   cross-sections: every headline metric, the paired verdicts, the flags and the
   calibration marks.
4. Seed noise: the quickstart's residual TopK SAEs (width 1024, k = 32) trained with three
   seeds, against an L0 sweep (k = 8, 16, 32, 64, seed 0), all on the same corpus and
   evaluated on the same prompts; per metric, the spread across seeds against the
   differences between neighbouring configurations of the sweep. A metric separates two
   SAEs only where their difference exceeds the seed spread.

Needs the quickstart run (``sage quickstart``, its cross-sections and SAE corpus); trained
SAEs are cached under ``$SAGE_NN_CACHE/saes`` as the pipeline caches them. Writes
benchmarks/results/validity.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sage_nn
from sage_nn.evaluation.coders import CrossSection, DirectSAE, ReconstructedSAE
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.pipeline.config import RunConfig, run_prompts
from sage_nn.pipeline.resolve import cached_saes, trained_cache, trained_k
from sage_nn.dictionaries.serving import residual_sites_for
from sage_nn.report import HEADLINE, goodness
from sage_nn.model.sites import Site
from sage_nn.dictionaries.training import train_saes
from sage_nn.evaluation.validity import (SHARES, Perturbed, PlantedDictionary, Shrunk,
                                         WithoutDetectors, WithPlanted, ladder,
                                         ladder_summary, planted_sae, saved_random_saes)

PLANTED = ["edit", "edit_f1", "edit_auc", "edit_f1_auc", "best_f1", "alignment"]
SHRUNK = ["sufficiency", "necessity"]
#: control seeds in the ladders (each rung has its floor and random SAE): two keep the
#: ladders' evaluations short; the floor's place is read off the paired intervals
LADDER_CONTROL_SEEDS = 2
#: the regime's planted rungs stand on the trained SAE without its latents that detect a
#: value of the attribute with F1 above this on the fit prompts (WithoutDetectors): with
#: about 5 fit prompts per value many latents pass 0.5 by chance, win the choice of
#: detector over a planted latent and lose on the held-out prompts
DETECTOR_F1 = 0.4


def trained(model, config: RunConfig, sites, k: int, seed: int, log: dict) -> list:
    """The run's residual TopK SAEs at ``sites`` with ``k`` and SAE seed ``seed`` (the
    prompts stay the run's), from the pipeline's cache or trained into it."""
    # the default k at these sites is the pipeline's `train:topk`, whose cache the
    # quickstart filled (TrainConfig's k at the residual, TRAINED_K_HEADS at heads)
    defaults = {trained_k("topk", Site.parse(s).kind) for s in sites}
    name, cfg, source, root = trained_cache("topk", model, config,
                                             {} if defaults == {k} else {"k": k})
    if seed != config.seed:
        cfg.seed = seed
        root = root.with_name(root.name.replace(f"-seed{config.seed}-", f"-seed{seed}-"))
    have, _ = cached_saes(root, model)
    missing = [s for s in sites if s not in have]
    if missing:
        start = time.perf_counter()
        saes, report = train_saes(model, missing, cfg, source=source, out_dir=root,
                                  progress=False)
        have.update(saes)
        log[f"k{k}-seed{seed}"] = {"seconds": round(time.perf_counter() - start, 1),
                                   "held_out_fvu": report["fvu"].round(4).to_dict()}
    return [have[s] for s in sites]


def summary_json(table) -> dict:
    """The ladder summary as JSON: numbers, flags, and the floor's places as words."""
    def plain(value):
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        return None if not np.isfinite(value) else float(value)
    return {metric: {key: plain(value) for key, value in row.items()}
            for metric, row in table.iterrows()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/quickstart", help="a finished quickstart run")
    parser.add_argument("--attributes", default="io,s")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--parts", default="ladders,regime,random,seeds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "validity.json"))
    args = parser.parse_args()
    run_dir = Path(args.run)
    try:  # inputs first: minutes of work must not end in a missing file
        run = sage_nn.open_run(run_dir)
    except FileNotFoundError as err:
        sys.exit(f"benchmarks/validity.py: {err}; run `sage quickstart` first (or pass --run)")
    parts = args.parts.split(",")
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    config = run.config
    model = sage_nn.load_model(config.model)
    _, fit, held_out = run_prompts(model, config)
    attributes = args.attributes.split(",")
    sections = {a: CrossSection(a, [(Site.parse(p.split("@")[0]), p.split("@")[1])
                                    for p in run.cross_sections[a]]) for a in attributes}
    needed = residual_sites_for([p for cs in sections.values() for p in cs.pairs], False)
    log: dict = {}
    ks = [1, 2, 4, 8, 16, 32]
    boot = dict(ks=ks, n_boot=args.n_boot, seed=config.seed, batch_size=config.batch_size,
                control_seeds=LADDER_CONTROL_SEEDS)
    out["settings"] = {"run": str(run_dir), "model": config.model, "task": config.task,
                       "n_fit": len(fit), "n_eval": len(held_out), "shares": list(SHARES),
                       "ks": ks, "headline_k": 2, "n_boot": args.n_boot,
                       "ladder_control_seeds": LADDER_CONTROL_SEEDS,
                       "cross_sections": {a: cs.labels for a, cs in sections.items()}}

    if "ladders" in parts:
        residual = trained(model, config, needed, 32, config.seed, log)
        at_heads = [s for s in trained_at_sites(model, config, sections, log)]
        ladders = {}
        for a, cs in sections.items():
            position = {"io": "IO", "s": "S1"}.get(a, "END")
            layers = sorted({site.layer for site, _ in cs.pairs})
            variants = {
                "planted at the heads": (PLANTED, {
                    f"planted-{f:g}": (f, PlantedDictionary(fit, a, f)) for f in SHARES}),
                "planted, through the reconstruction": (PLANTED, {
                    f"planted-{f:g}": (f, ReconstructedSAE(
                        [planted_sae(model, fit, a, layer, position, f) for layer in layers]))
                    for f in SHARES}),
                "trained residual SAEs shrunk, through the reconstruction": (SHRUNK, {
                    f"shrunk-{f:g}": (f, Shrunk(ReconstructedSAE(residual), f))
                    for f in SHARES}),
                "trained SAEs at the heads shrunk": (SHRUNK, {
                    f"shrunk-{f:g}": (f, Shrunk(DirectSAE(at_heads), f)) for f in SHARES}),
            }
            ladders[a] = {}
            for name, (metrics, rungs) in variants.items():
                start = time.perf_counter()
                results = ladder(model, fit, held_out, cs, rungs, **boot)
                table = ladder_summary(results, metrics, k=2)
                ladders[a][name] = {"metrics": summary_json(table),
                                    "edit_metric": str(results.edit_metric.values[0]),
                                    "seconds": round(time.perf_counter() - start, 1)}
                print(a, name, "\n", table.T.to_string(), flush=True)
        out["ladders"] = ladders
    if "regime" in parts:
        out["regime"] = regime(model, config, fit, held_out, sections, needed, log, boot)
    if "random" in parts:
        out["random_saes"] = random_saes(model, config, fit, held_out, sections, log,
                                         args.n_boot, Path(tempfile.mkdtemp()))
    if "seeds" in parts:
        saes = {f"k32-seed{s}": trained(model, config, needed, 32, s, log)
                for s in (config.seed, config.seed + 1, config.seed + 2)}
        saes |= {f"k{k}-seed{config.seed}": trained(model, config, needed, k, config.seed,
                                                    log) for k in (8, 16, 64)}
        results = evaluate_cross_section(
            model, fit, held_out, list(sections.values()),
            {name: ReconstructedSAE(members) for name, members in saes.items()},
            ceiling=False, **boot)
        out["seeds"] = seed_table(results, config.seed)
        print(json.dumps(out["seeds"], indent=1), flush=True)
    out["training"] = {**out.get("training", {}), **log}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))
    print(f"wrote {out_path}")


def regime(model, config, fit, held_out, sections, needed, log, boot) -> dict:
    """The ladders in the tool's regime, per attribute: planted latents among the trained
    residual SAE's through the reconstruction, its detectors of the attribute removed;
    equal-FVU rungs with the error inside or outside the task's subspace at the heads; the
    overshoot."""
    residual = trained(model, config, needed, 32, config.seed, log)
    out = {}
    for a, cs in sections.items():
        position = {"io": "IO", "s": "S1"}.get(a, "END")
        layers = sorted({site.layer for site, _ in cs.pairs})
        out[a] = {}
        bases = {f: WithoutDetectors(ReconstructedSAE(residual), fit, a, DETECTOR_F1)
                 for f in SHARES}
        for name, (metrics, rungs) in {
                "planted among the trained SAE's latents without its detectors of the "
                "attribute, through the reconstruction": (
                    PLANTED, {f"planted-{f:g}": (f, WithPlanted(
                        bases[f],
                        ReconstructedSAE([planted_sae(model, fit, a, layer, position, f)
                                          for layer in layers]))) for f in SHARES}),
                "equal FVU, a share f of the error outside the task's subspace": (
                    SHRUNK + ["fvu_pooled"], {f"error-out-{f:g}": (f, Perturbed(fit, f))
                                              for f in SHARES})}.items():
            start = time.perf_counter()
            results = ladder(model, fit, held_out, cs, rungs, **boot)
            table = ladder_summary(results, metrics, k=2)
            out[a][name] = {"metrics": summary_json(table),
                            "seconds": round(time.perf_counter() - start, 1)}
            if metrics == PLANTED:
                base = bases[0.0]
                out[a][name]["base"] = {
                    "detector_f1_threshold": DETECTOR_F1,
                    "latents_removed": {f"{site}@{pos}": [len(found), base.latents[site, pos]]
                                        for (site, pos), found in base.removed.items()}}
            print(a, name, "\n", table.T.to_string(), flush=True)
        over = ladder(model, fit, held_out, cs, {"twice": (2.0, Shrunk(
            ReconstructedSAE(residual), 2.0))}, **boot).sel(attribute=a, dictionary="twice")
        out[a]["overshoot: twice what the trained residual SAE explains"] = {
            m: float(over[m]) for m in SHRUNK}
    return out


def random_saes(model, config, fit, held_out, sections, log, n_boot, root: Path) -> dict:
    """sae_lens SAEs with random weights at the residual layers feeding the cross-sections'
    heads against the trained SAEs there, at each attribute's whole cross-section (so that
    mean ablation moves the logit difference enough for sufficiency and necessity to be
    defined): every headline metric (goodness units), the paired interval of trained -
    random, the flags and the calibration marks."""
    from sage_nn.report import (Lookup, calibration, goodness, paired_interval, roles,
                                       sae_flags)

    layers = sorted({site.layer for cs in sections.values() for site, _ in cs.pairs})
    saes = {"trained": ReconstructedSAE(trained(
        model, config, [f"L{layer}.resid_pre" for layer in layers], 32, config.seed, log)),
        **saved_random_saes(model, layers, root)}
    at = list(sections.values())
    results = evaluate_cross_section(model, fit, held_out, at, saes, ks=config.ks,
                                     n_boot=n_boot, seed=config.seed,
                                     batch_size=config.batch_size)
    look, r = Lookup(results), roles(results)
    out = {"layers": layers, "pairs": {cs.attribute: cs.labels for cs in at}}
    for name in ("random-topk", "random-jumprelu"):
        out[name] = {"flags": sae_flags(results, name)}
        for cs in at:
            a = cs.attribute
            rows = {}
            for metric in HEADLINE:
                trained_value, value = (goodness(metric, look(metric, a, d))
                                        for d in ("trained", name))
                undefined = None in (value, trained_value)  # NaN at this cross-section
                rows[metric] = {"trained": trained_value, "random": value,
                                "below_trained": None if undefined
                                else bool(value < trained_value),
                                "trained_minus_random": paired_interval(look, a, metric,
                                                                        "trained", name),
                                "calibration": calibration(look, r, name, a, metric)[0],
                                "fvu_pooled": look("fvu_pooled", a, name)}
            out[name][a] = rows
    print(json.dumps(out, indent=1), flush=True)
    return out


def trained_at_sites(model, config, sections, log) -> list:
    """The quickstart's TopK SAEs at the cross-sections' own heads (``train:topk@sites``)."""
    sites = list(dict.fromkeys(str(s) for cs in sections.values() for s, _ in cs.pairs))
    return trained(model, config, sites, 32, config.seed, log)


def seed_table(results, seed: int) -> dict:
    """Per attribute and headline metric (edits at k = 2, in goodness units: sufficiency by
    its distance from 1): each SAE's value, the spread (max - min) over the three seeds of
    k = 32, and the differences between neighbouring k of the sweep, each marked whether it
    exceeds the seed spread."""
    out = {}
    seeds = [f"k32-seed{s}" for s in (seed, seed + 1, seed + 2)]
    sweep = [f"k{k}-seed{seed}" if k != 32 else f"k32-seed{seed}" for k in (8, 16, 32, 64)]
    for a in (str(x) for x in results.attribute.values):
        out[a] = {}
        for metric in HEADLINE:
            da = results[metric].sel(attribute=a)
            da = da.sel(k=2) if "k" in da.dims else da
            da = da.mean("pair") if "pair" in da.dims else da
            value = {d: goodness(metric, float(da.sel(dictionary=d))) for d in seeds + sweep}
            finite = [value[d] for d in seeds if value[d] is not None and np.isfinite(value[d])]
            spread = float(max(finite) - min(finite)) if len(finite) > 1 else None
            steps = {}
            for lo, hi in zip(sweep, sweep[1:]):
                diff = (None if value[lo] is None or value[hi] is None
                        else float(value[hi] - value[lo]))
                steps[f"{lo.split('-')[0]}->{hi.split('-')[0]}"] = {
                    "difference": diff,
                    "exceeds_seed_spread": None if diff is None or spread is None
                    else bool(abs(diff) > spread)}
            out[a][metric] = {"values": value, "seed_spread": spread, "sweep_steps": steps}
    return out


if __name__ == "__main__":
    main()
