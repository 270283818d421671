"""Evaluation time with many SAEs in one run: 1, 2, 4, 8 SAEs against the lower bound.

Times :func:`sage_nn.evaluation.evaluate_cross_section` on SmolLM2-135M IOI (attribute
``io``, a fixed cross-section of head outputs reached through the residual-to-sublayer
reconstruction, as the pipeline's default ``train:topk`` SAEs reach them) with the first
``n`` of 8 TopK SAEs (widths 256/512 x k 4/8/16/32) in one call: the ceiling, every SAE and
its floor. ``lower_bound_s`` is the evaluation benchmark's (benchmarks/evaluation.py): the
plain HuggingFace forward of the held-out prompts (last-token logits), timed in the same
process, times the
``patched_forwards`` the evaluation reports (the clean run plus, per variant, the block of
layers x tokens its patches can change); ``complete_lower_bound_s`` adds the full forwards
the reads need and the patched rows' readout (unembedding, log-softmax, argmax of each
row's last token, measured here on as many rows), as benchmarks/evaluation.py's complete
bound does. Every SAE comes with its controls (its floor and its random SAE, three seeds
each) and every variant they patch is in the bound. Also times adding one SAE to a finished
run (the per-SAE cache: ``evaluate_cross_section(..., ceiling=False)`` with that SAE alone).

The SAEs have random unit directions (tied encoder, zero biases) at the residual sites the
cross-section needs: evaluation time depends on their shapes and ``k``, not on what they
learned, and no training is needed. Writes benchmarks/results/many_saes.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sage_nn import load_model
from sage_nn.model.activations import batches, encode
from sage_nn.evaluation.coders import CrossSection, ReconstructedSAE
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.pipeline.config import RunConfig, run_prompts
from sage_nn.dictionaries.serving import residual_sites_for
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.model.sites import Site, adapter
from evaluation import readout_time  # the same readout as the evaluation benchmark's

SHAPES = [(256, 4), (512, 4), (256, 8), (512, 8), (256, 16), (512, 16), (256, 32), (512, 32)]


def random_topk(d_in: int, width: int, k: int, site: str, seed: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(width, d_in, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    layer, kind = int(site.split(".")[0][1:]), site.split(".")[1]
    return SparseAutoencoder(directions.T.clone(), torch.zeros(width), directions.clone(),
                             torch.zeros(d_in), architecture="topk", k=k, layer=layer,
                             kind=kind, hook_name=f"blocks.{layer}.hook_{kind}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", default="L23.z.h7@END,L29.z.h1@END,L28.z.h1@END",
                        help="the io cross-section (comma-separated SITE@POSITION)")
    parser.add_argument("--n-saes", default="1,2,4,8")
    parser.add_argument("--n-fit", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=48)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "many_saes.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    sizes = [int(n) for n in args.n_saes.split(",")]
    config = RunConfig(model=args.model, task="ioi", n_fit=args.n_fit, n_eval=args.n_eval,
                       ks=ks, n_boot=args.n_boot, batch_size=args.batch_size)
    model = load_model(config.model)
    model._module.set_attn_implementation("eager")  # the frozen pattern is read
    _, fit, held_out = run_prompts(model, config)
    pairs = [(Site.parse(p.split("@")[0]), p.split("@")[1]) for p in args.pairs.split(",")]
    section = CrossSection("io", pairs)
    residual = residual_sites_for(pairs, adapter(model).parallel)
    d_in = adapter(model).width("resid_pre")
    saes = {f"topk-{w}-k{k}": ReconstructedSAE(
        [random_topk(d_in, w, k, site, seed=i * 100 + j) for j, site in enumerate(residual)],
        batch_size=config.batch_size) for i, (w, k) in enumerate(SHAPES[:max(sizes)])}

    def plain():
        with torch.no_grad():
            for idx in batches(len(held_out), config.batch_size):
                model._module(**encode(model, [held_out.prompts[i] for i in idx]).inputs,
                              logits_to_keep=1)  # what the task reads: the last token

    def evaluate(names, ceiling=True):
        start = time.perf_counter()
        out = evaluate_cross_section(model, fit, held_out, section,
                                     {n: saes[n] for n in names}, ks=ks, n_boot=args.n_boot,
                                     seed=0, batch_size=config.batch_size, ceiling=ceiling)
        seconds = time.perf_counter() - start
        return seconds, out.attrs["patched_forwards"], out.attrs["patched_rows"]

    plain()  # warm-up
    evaluate(list(saes)[:1])  # warm-up: the reconstruction's fit, first traces
    start = time.perf_counter()
    plain()
    t_plain = time.perf_counter() - start
    names = list(saes)
    # the reads the data needs: fit prompts, held-out prompts and their counterfactuals, in
    # full forwards of the held-out prompts (the lower bound above leaves them out)
    reads = (len(fit) + 2 * len(held_out)) / len(held_out)
    rows = {"n_saes": [], "evaluation_s": [], "lower_bound_s": [], "patched_forwards": [],
            "ratio": [], "lower_bound_with_reads_s": [], "ratio_with_reads": [],
            "patched_rows": [], "readout_s": [], "complete_lower_bound_s": [],
            "ratio_complete": []}
    for n in sizes:
        seconds, forwards, patched_rows = evaluate(names[:n])
        readout = readout_time(model, patched_rows)
        rows["patched_rows"].append(patched_rows)
        rows["readout_s"].append(readout)
        rows["complete_lower_bound_s"].append((forwards + reads) * t_plain + readout)
        rows["ratio_complete"].append(seconds / rows["complete_lower_bound_s"][-1])
        rows["n_saes"].append(n)
        rows["evaluation_s"].append(seconds)
        rows["patched_forwards"].append(forwards)
        rows["lower_bound_s"].append(forwards * t_plain)
        rows["ratio"].append(seconds / (forwards * t_plain))
        rows["lower_bound_with_reads_s"].append((forwards + reads) * t_plain)
        rows["ratio_with_reads"].append(seconds / ((forwards + reads) * t_plain))
        print(n, seconds, forwards * t_plain, flush=True)
    t_first = rows["evaluation_s"][0]
    added = [(t - t_first) / (n - rows["n_saes"][0]) for n, t in
             zip(rows["n_saes"][1:], rows["evaluation_s"][1:])]
    # adding one SAE to a finished run: the per-SAE cache scores it alone, without the ceiling
    t_one, forwards_one, _ = evaluate([names[-1]], ceiling=False)
    result = {"benchmark": "many_saes", "model": config.model, "task": "ioi",
              "attribute": "io", "cross_section": args.pairs.split(","),
              "residual_sites": residual, "saes": names[:max(sizes)],
              "sae_note": "random-direction TopK SAEs (tied encoder, zero biases) of the named "
                          "width and k, reached through the residual-to-sublayer "
                          "reconstruction (input mode): timing depends on shape and k only",
              "settings": {"n_fit": args.n_fit, "n_eval": len(held_out), "ks": ks,
                           "n_boot": args.n_boot, "batch_size": config.batch_size},
              "threads": torch.get_num_threads(),
              "load_average_1m_at_end": os.getloadavg()[0],
              "plain_forward_s": t_plain, **rows,
              "added_sae_s": added,
              "added_sae_note": "per SAE added to one evaluation: (evaluation_s[n] - "
                                "evaluation_s[1]) / (n - 1)",
              "add_one_sae_to_finished_run_s": t_one,
              "add_one_sae_to_finished_run_lower_bound_s": forwards_one * t_plain,
              "read_forwards": reads,
              "note": "evaluation includes reading activations (with every SAE's and floor's "
                      "codes computed in the same forwards), fitting the supervised "
                      "dictionary, all patched variants (one batched run_patched for every "
                      "method) and the bootstrap intervals; lower_bound_s counts the patched "
                      "runs' layers x tokens only, at the plain forward's speed; "
                      "lower_bound_with_reads_s adds the full forwards of the fit, held-out "
                      "and counterfactual prompts that the reads need"}
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
