"""Evaluation throughput against plain forward throughput, on the same prompts.

Reuses a finished run directory (default: the quickstart's, `sage quickstart` first): its
config, cross-sections and cached SAEs (resolved as the run resolved them, so point
``SAGE_NN_CACHE`` at the cache the run used). Times `evaluate_cross_section` for every
attribute (all metrics, all cross-section sites, ceiling, SAEs and floors) and a plain
HuggingFace forward of the same held-out prompts (the last token's logits, all the task
reads: the strictest baseline), in one process; writes
benchmarks/results/evaluation.json with two ratios: evaluation time over the plain forward,
and over its lower bound, the plain forward's time times the layers x tokens that the
patched runs must compute (the clean run, and per variant only the block its patches can
change: ``patched_forwards`` in the results' attrs, in full forwards of the prompts).
Two more figures: that bound plus the forwards the read needs, and plus the patched rows'
readout (unembedding, log-softmax, argmax; measured here on as many rows), which the
layers x tokens bound leaves out and which on SmolLM2's 49k vocabulary costs more than the
last few layers at one token.
"""

import argparse
import json
import os
import time
from pathlib import Path

from sage_nn.pipeline.runs import NotARunError, finished_stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, and the run directory checked (read only, nothing created) before the
    heavy imports below and the run's SAEs are resolved (trained, if the cache lacks them)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/quickstart")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a shared CPU")
    args = parser.parse_args(argv)
    try:
        finished_stages(args.run_dir, ("task", "discovery", "saes"))
    except NotARunError as err:
        parser.exit(2, f"benchmarks/evaluation.py: error: --run-dir {args.run_dir}: {err}; fix: "
                       "run `sage quickstart` first (it writes runs/quickstart), or give "
                       "another run's --run-dir\n")
    return args


if __name__ == "__main__":
    ARGS = parse_args()

import torch  # noqa: E402 (after the input check)

from sage_nn import load_model  # noqa: E402
from sage_nn.model.activations import batches, encode
from sage_nn.evaluation.coders import CrossSection, DirectSAE, ReconstructedSAE
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.pipeline.config import RunConfig, run_prompts
from sage_nn.pipeline.resolve import resolve_saes
from sage_nn.dictionaries.serving import residual_sites_for
from sage_nn.pipeline.specs import trained_sites
from sage_nn.model.sites import Site, adapter


def main(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RunConfig.from_file(Path(args.run_dir) / "config.yaml")
    import pandas as pd

    table = pd.read_csv(Path(args.run_dir) / "discovery" / "cross_sections.csv")
    pairs = {a: [(Site.parse(s), str(p)) for s, p in zip(t.site, t.position)]
             for a, t in table.groupby("attribute", sort=False)}
    model = load_model(config.model)
    _, fit, held_out = run_prompts(model, config)  # the run's own fit and held-out prompts
    every = [p for ps in pairs.values() for p in ps]
    needed = residual_sites_for(every, adapter(model).parallel)
    saes = {}
    for spec in config.saes:
        at_sites = spec.endswith("@sites")
        name, members = resolve_saes(spec, model, trained_sites(spec, needed, every), config)
        saes[name] = (DirectSAE(members) if at_sites
                      else ReconstructedSAE(members, batch_size=config.batch_size))
    model._module.set_attn_implementation("eager")

    def plain():
        with torch.no_grad():
            for idx in batches(len(held_out), config.batch_size):
                model._module(**encode(model, [held_out.prompts[i] for i in idx]).inputs,
                              logits_to_keep=1)  # what the task reads: the last token

    plain()  # warm-up
    start = time.perf_counter()
    plain()
    t_plain = time.perf_counter() - start
    start = time.perf_counter()
    out = evaluate_cross_section(model, fit, held_out,
                                 [CrossSection(a, ps) for a, ps in pairs.items()], saes,
                                 ks=config.ks, n_boot=config.n_boot, seed=config.seed,
                                 batch_size=config.batch_size)
    forwards = out.attrs["patched_forwards"]
    t_eval = time.perf_counter() - start
    t_readout = readout_time(model, out.attrs["patched_rows"])
    n = len(held_out)
    lower_bound = forwards * t_plain
    # the reads the data needs: fit, held-out and each attribute's counterfactual prompts
    reads = (len(fit) + len(held_out) * (1 + len(pairs))) / n
    with_reads = (forwards + reads) * t_plain
    result = {"benchmark": "evaluation", "run_dir": args.run_dir, "prompts": n,
              "load_average_1m_at_end": os.getloadavg()[0], "threads": torch.get_num_threads(),
              "sae_corpus": config.sae_corpus,
              "attributes": list(pairs), "cross_sections": {a: [f"{s}@{p}" for s, p in ps]
                                                            for a, ps in pairs.items()},
              "saes": list(saes), "ks": config.ks, "n_boot": config.n_boot,
              "plain_forward_s": t_plain, "evaluation_s": t_eval,
              "plain_prompts_per_s": n / t_plain, "evaluation_prompts_per_s": n / t_eval,
              "ratio_evaluation_over_plain_time": t_eval / t_plain,
              "patched_forwards": forwards, "lower_bound_s": lower_bound,
              "ratio_evaluation_over_lower_bound": t_eval / lower_bound,
              "read_forwards": reads, "lower_bound_with_reads_s": with_reads,
              "ratio_evaluation_over_lower_bound_with_reads": t_eval / with_reads,
              "patched_rows": out.attrs["patched_rows"], "readout_s": t_readout,
              "lower_bound_with_reads_and_readout_s": with_reads + t_readout,
              "ratio_evaluation_over_lower_bound_with_reads_and_readout":
                  t_eval / (with_reads + t_readout),
              "note": "evaluation (all attributes and SAEs in one call) includes one read "
                      "(fit prompts, where the floors' L0 is matched; held-out and "
                      "counterfactual prompts, with every SAE's and floor's codes computed "
                      "in the same forwards), fitting the dictionaries, all patched variants "
                      "and the bootstrap intervals; the lower bound counts the patched runs' "
                      "layers x tokens only; the lower bound with reads adds the full "
                      "forwards the read needs; the readout is the unembedding, "
                      "log-softmax and argmax of every patched row's last token (the "
                      "metrics need the answer's log-probability and the top token), "
                      "which the layers x tokens bound does not count"}
    out = Path(__file__).parent / "results" / "evaluation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def readout_time(model, rows: int, chunk: int = 256) -> float:
    """Seconds to read out ``rows`` last-token states: unembedding, log-softmax, argmax."""
    head = model._module.get_output_embeddings()
    hidden = torch.randn(chunk, head.in_features)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, rows, chunk):
            logits = head(hidden[:min(chunk, rows - first)])
            logits.log_softmax(-1), logits.argmax(-1)
    return time.perf_counter() - start


if __name__ == "__main__":
    main(ARGS)
