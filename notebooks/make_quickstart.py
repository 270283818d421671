"""Writes notebooks/quickstart.ipynb (kept as code so the notebook's source is reviewable)."""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell("""# sage_nn quickstart, step by step

Ground-truth evaluation of a sparse autoencoder on SmolLM2-135M and the IOI task:

1. build the task's prompts and counterfactuals,
2. find where each attribute is computed: attribution patching proposes components (attention
   heads' outputs `z` at the task's named positions), and a cross-section is grown until
   patching all of it at once recovers 60% of the attribute's effect,
3. train SAEs there (cached after the first run): residual-stream SAEs, which reach the heads
   through the residual-to-sublayer reconstruction, and, for comparison, SAEs trained at the
   heads themselves,
4. score the SAEs against the supervised dictionary (ceiling) and random SAEs (floor),
5. write the report.

`sage quickstart` does all of this in one call. Set `SAGE_NB_SMALL=1` for a fast, small run
(the test suite does)."""),
    nbf.v4.new_code_cell("""import os
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import Image, Markdown, display

import sage_nn
from sage_nn.discovery import DiscoveryConfig, discover
from sage_nn.evaluation import CrossSection, DirectSAE, ReconstructedSAE, evaluate_cross_section
from sage_nn.pipeline import RunConfig, resolve_saes, residual_sites_for, trained_sites
from sage_nn.report import headline_table, write_report
from sage_nn.sites import Site
from sage_nn.tasks import check_task, load_task

SMALL = os.environ.get("SAGE_NB_SMALL") == "1"
config = RunConfig(n_fit=24 if SMALL else 96, n_eval=16 if SMALL else 48,
                   n_discovery=8 if SMALL else 32,
                   max_sites=4 if SMALL else 16, sae_width=256 if SMALL else 1024,
                   sae_steps=30 if SMALL else 300, n_boot=100 if SMALL else 1000,
                   ks=[1, 2, 4] if SMALL else [1, 2, 4, 8, 16, 32],
                   sae_task_prompts=512 if SMALL else 2048,
                   run_dir=tempfile.mkdtemp() if SMALL else "runs/notebook")
out = Path(config.run_dir)
config"""),
    nbf.v4.new_markdown_cell("## 1. The model and the task"),
    nbf.v4.new_code_cell("""model = sage_nn.load_model(config.model)
spec = load_task(config.task)
full = spec.build(model, n=config.n_fit + config.n_eval, seed=config.seed, split="train")
fit = full.subset(np.arange(config.n_fit))
held_out = full.subset(np.arange(config.n_fit, len(full)))
print(fit.prompts[0], "->", fit.answers[0])
fit.attributes.head()"""),
    nbf.v4.new_code_cell("""check_task(model, spec, n=32 if SMALL else 128, split="test")"""),
    nbf.v4.new_markdown_cell("""## 2. Where is each attribute computed?

Attribution patching scores every head at every named position (`kinds=None` scores every
site kind, for heatmaps of the whole model). A cross-section is made of components, heads' `z` by
default: candidates come from attribution, and the set grows by what patching all of it at
once (exactly) recovers of the attribute's effect, up to 60% or `max_sites` sites. The
residual stream is not a cross-section: late in the model it carries every effect."""),
    nbf.v4.new_code_cell("""found = discover(model, fit.subset(np.arange(min(config.n_discovery, len(fit)))),
                 DiscoveryConfig(kinds=["z"], max_sites=config.max_sites),  # the heads
                 out_dir=out / "discovery")
pairs = {a: [(Site.parse(s), p) for s, p in zip(t.site, t.position)]
         for a, t in found.cross_sections.items()}
{a: (info["recovered"], info["cross_section"]) for a, info in found.summary().items()}"""),
    nbf.v4.new_code_cell("""found.result.score.sel(attribute="io").max("position")  # labeled: select by meaning"""),
    nbf.v4.new_code_cell("""for png in sorted((out / "discovery").glob("*io*.png"))[:2]:
    display(Image(filename=str(png)))"""),
    nbf.v4.new_markdown_cell("""## 3. SAEs where the task is computed

Residual SAEs at the layers feeding the cross-sections' heads, and SAEs trained at the heads
themselves, on the same corpus and at the same width (`train:topk@sites`)."""),
    nbf.v4.new_code_cell("""every = [p for ps in pairs.values() for p in ps]
needed = residual_sites_for(every, sage_nn.adapter(model).parallel)
resolve_saes("train:topk", model, needed + trained_sites("train:topk@sites", needed, every),
             config)  # one activation stream trains both kinds
name, members = resolve_saes("train:topk", model, needed, config)
site_name, site_members = resolve_saes("train:topk@sites", model,
                                       trained_sites("train:topk@sites", needed, every), config)
saes = {name: ReconstructedSAE(members), site_name: DirectSAE(site_members)}
{n: len(m) for n, m in ((name, members), (site_name, site_members))}"""),
    nbf.v4.new_markdown_cell("## 4. Score the SAE against the ceiling and the floor"),
    nbf.v4.new_code_cell("""import xarray as xr

model._module.set_attn_implementation("eager")  # the reconstruction reads attention patterns
results = xr.concat([evaluate_cross_section(model, fit, held_out, CrossSection(a, ps), saes,
                                            ks=config.ks, n_boot=config.n_boot)
                     for a, ps in pairs.items()], "attribute", join="outer")
headline_table(results)"""),
    nbf.v4.new_code_cell("""results.edit.sel(attribute="io").to_pandas()  # edit success or accuracy (edit_metric), by k"""),
    nbf.v4.new_markdown_cell("## 5. The report"),
    nbf.v4.new_code_cell("""report = write_report(results, out / "report", discovery_dir=out / "discovery")
for png in sorted((out / "report").glob("*.png")):
    display(Image(filename=str(png)))
display(Markdown(f"Report: `{out / 'report' / 'summary.md'}`"))"""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {
    "name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, Path(__file__).with_name("quickstart.ipynb"))
