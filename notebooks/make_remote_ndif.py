"""Writes notebooks/remote_ndif.ipynb (kept as code so the notebook's source is reviewable).

The notebook needs an NDIF API key and the HuggingFace hub, so CI does not execute it; the
same code paths run offline in tests/test_remote.py through nnsight's local backend and a
fresh server-like process.
"""

import nbformat as nbf

from _build import write

cells = [
    nbf.v4.new_markdown_cell("""# SAE evaluation on NDIF: Llama 3.1 8B with Llama Scope

The same ground-truth evaluation as the quickstart, on a model too large for a laptop.
Everything that runs the model goes to NDIF, one request per stage (or per
`max_prompts` prompts): task check, attribution patching, validation, activations at the
cross-sections, patched runs. Only reduced results come back (logit differences, scores,
activations at a few (site, token) pairs). The SAEs are Llama Scope's public residual SAEs
(`llama_scope_lxr_8x`, 32k latents at every layer's resid_post), loaded here with sae_lens
and shipped to NDIF as plain torch.

**API key.** nnsight reads it from the `NDIF_API_KEY` environment variable or from its own
config (`nnsight login` in a shell, or `nnsight.login()` in Python). Do not paste it into the notebook; sage_nn never
writes it anywhere. Llama 3.1 is gated: your HuggingFace token needs access to
`meta-llama/Llama-3.1-8B` for its config and tokenizer."""),
    nbf.v4.new_code_cell("""import os

import nnsight
import numpy as np

from sage_nn import load_model
from sage_nn.discovery import DiscoveryConfig, discover
from sage_nn.evaluation import CrossSection, ReconstructedSAE, evaluate_cross_section
from sage_nn.model.remote import Remote
from sage_nn.report import headline_table, write_report
from sage_nn.dictionaries.saes import load_sae
from sage_nn.model.sites import Site
from sage_nn.tasks import load_task, logit_diffs

assert nnsight.CONFIG.API.APIKEY, "set NDIF_API_KEY (or run: nnsight login)"
MODEL = "meta-llama/Llama-3.1-8B"
print(nnsight.ndif.status())  # is the model deployed right now?"""),
    nbf.v4.new_markdown_cell("""## The model and the task

`remote=True` builds the model on the meta device: config and tokenizer only, no weights.
Prompts and counterfactuals are built here with the tokenizer."""),
    nbf.v4.new_code_cell("""model = load_model(MODEL, remote=True)
remote = Remote(True, max_prompts=64)  # at most 64 prompt rows per request; retried on drops

task = load_task("ioi")
fit = task.build(model, n=96, seed=0, split="train")
held_out = task.build(model, n=48, seed=1, split="train")  # other prompts, same vocabulary
ld = logit_diffs(model, held_out, remote=remote).to_pandas()
print(f"accuracy {float((ld['clean'] > 0).mean()):.2f}, mean logit difference by condition:")
ld.mean()"""),
    nbf.v4.new_markdown_cell("""## Where is each attribute computed?

Attribution patching over the residual stream at the task's named positions: one request.
Llama Scope's SAEs are residual SAEs, so the cross-sections are chosen among residual sites
(`L.resid_pre` is the same tensor as `L-1.resid_post`, where Llama Scope's SAEs sit)."""),
    nbf.v4.new_code_cell("""# from layer 1: Llama Scope has no SAE on the embeddings (L0.resid_pre)
settings = DiscoveryConfig(kinds=["resid_pre"], layers=range(1, 32), attributes=["io", "s"],
                           top_k=2, batch_size=16)
found = discover(model, fit.subset(np.arange(32)), settings, out_dir="runs/ndif/discovery",
                 remote=remote)
for attribute, table in found.cross_sections.items():
    print(attribute, found.validation[attribute])
    display(table[["site", "position", "score", "exact_delta"]])"""),
    nbf.v4.new_markdown_cell("""## The SAEs

One Llama Scope SAE per residual tensor of the cross-sections: `l{L}r_8x` reads
`blocks.L.hook_resid_post`, which is `L+1.resid_pre`. sae_lens downloads them here; sage_nn
converts them to plain torch (no sae_lens object is ever sent to NDIF)."""),
    nbf.v4.new_code_cell("""layers = sorted({Site.parse(s).layer for table in found.cross_sections.values()
                 for s in table["site"]})
saes = [load_sae("llama_scope_lxr_8x", f"l{layer - 1}r_8x", model=model) for layer in layers]
coder = {"llama-scope-8x": ReconstructedSAE(saes)}
[(s.layer, s.kind, s.d_sae) for s in saes]"""),
    nbf.v4.new_markdown_cell("""## Scores against the supervised ceiling and the random floor

All attributes at once: one read of the fit, held-out and counterfactual prompts at the
cross-sections (the floors' L0 is matched on the fit prompts there; with `max_prompts`, a
few requests), then every patched variant — clean, mean-ablated, counterfactual, and per
dictionary sufficiency, necessity and sparse edits for each k (one request)."""),
    nbf.v4.new_code_cell("""sections = [CrossSection(attribute, [(Site.parse(s), p)
                                     for s, p in zip(table["site"], table["position"])])
            for attribute, table in found.cross_sections.items()]
results = evaluate_cross_section(model, fit, held_out, sections, coder,
                                 ks=[1, 2, 4, 8, 16, 32], remote=remote)
print(remote.requests)  # (stage, prompt rows) of every request sent
headline_table(results)"""),
    nbf.v4.new_code_cell("""summary = write_report(results, "runs/ndif/report", discovery_dir="runs/ndif/discovery",
                       config={"model": MODEL, "task": "ioi", "saes": "llama_scope_lxr_8x"})
print(summary.read_text())"""),
]


if __name__ == "__main__":  # --execute needs an NDIF API key
    write(cells, "remote_ndif.ipynb", description=__doc__.splitlines()[0])
