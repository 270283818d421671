"""Writes notebooks/quickstart.ipynb (kept as code so the notebook's source is reviewable).

The committed notebook is executed with outputs: ``python notebooks/make_quickstart.py
--execute`` from the repository root, after ``sage quickstart`` (every stage is then read
from the run directory, so it executes in seconds; without it, the cells run the whole
quickstart).
"""

import nbformat as nbf

from _build import write

cells = [
    nbf.v4.new_markdown_cell("""# sage_nn quickstart, step by step

Ground-truth evaluation of sparse autoencoders on SmolLM2-135M and the IOI task, through the
public API only:

1. build the task's prompts and counterfactuals,
2. find where each attribute is computed: attribution patching proposes components (attention
   heads' outputs `z` at the task's named positions), and a cross-section is grown until
   patching all of it at once recovers 60% of the attribute's effect,
3. train SAEs there (cached after the first run): residual-stream SAEs, which reach the heads
   through the residual-to-sublayer reconstruction, and, for comparison, SAEs trained at the
   heads themselves,
4. score the SAEs against the supervised dictionary (ceiling) and random SAEs (floor),
5. write the report.

**Runtime.** After `sage quickstart` (same run directory and cache), every stage is read back
and the notebook runs in seconds; from an empty cache the `run` cell is the whole quickstart
(about 6 minutes on 2 CPU cores). Set `SAGE_NB_SMALL=1` for a small run with a few-step
training (the test suite does), whose numbers say little. What every number means:
`docs/metrics.md`."""),
    nbf.v4.new_code_cell("""%matplotlib inline
import os
import tempfile
import time

from IPython.display import Image, display

import sage_nn
from sage_nn.pipeline import RunConfig, run
from sage_nn.report import plot_comparison, plot_controllability

SMALL = os.environ.get("SAGE_NB_SMALL") == "1"
if SMALL:
    config = RunConfig(n_fit=24, n_eval=16, n_discovery=8, max_sites=4, sae_width=256,
                       sae_steps=30, n_boot=100, ks=[1, 2, 4], sae_task_prompts=512,
                       run_dir=tempfile.mkdtemp())
else:  # the quickstart's settings and run directory
    config = RunConfig(run_dir=os.environ.get("SAGE_NB_RUN_DIR", "runs/quickstart"))
config"""),
    nbf.v4.new_markdown_cell("""## 1. One call: task, discovery, SAEs, evaluation, report

Each stage is checkpointed in the run directory with a hash of its settings: a rerun reads
back what is done."""),
    nbf.v4.new_code_cell("""start = time.perf_counter()
result = run(config, progress=False)
print(f"run: {time.perf_counter() - start:.0f} s; stage seconds when computed: "
      f"{ {k: round(v) for k, v in sage_nn.open_run(config.run_dir).timings.items()} }")"""),
    nbf.v4.new_markdown_cell("""## 2. The task and where each attribute is computed

`open_run` reads a finished run back without the model."""),
    nbf.v4.new_code_cell("""r = sage_nn.open_run(config.run_dir)
{"accuracy": r.task["accuracy"], "n_fit": r.task["n_fit"], "n_eval": r.task["n_eval"],
 "first prompt": r.task["prompts"][0]}"""),
    nbf.v4.new_code_cell("""{a: (round(info["recovered"], 2), info["cross_section"])
 for a, info in r.discovery.summary().items()}  # joint exact patch: share of the effect"""),
    nbf.v4.new_code_cell("""# attribution scores, labeled by site and position; the heads' z as a (layer, head) grid:
# the best head per layer for io, at any position
from sage_nn.discovery import head_grid
z = head_grid(r.discovery.scores.score.sel(attribute="io"), "z")
z.max(["position", "head"]).to_pandas().tail(8)"""),
    nbf.v4.new_code_cell("""for png in sorted((r.path / "discovery").glob("*io*.png"))[:2]:
    display(Image(filename=str(png)))"""),
    nbf.v4.new_markdown_cell("""## 3. The SAEs

`train:topk`: residual TopK SAEs at the layers feeding the cross-sections' heads, reaching
them through the reconstruction; `train:topk@sites`: SAEs at the heads themselves, same
corpus and width. Each has a floor (`random:<name>`): the same SAE with random unit
directions, its L0 matched."""),
    nbf.v4.new_code_cell("""{name: (info["approach"], info["sites"]) for name, info in r.saes.items()}"""),
    nbf.v4.new_markdown_cell("""## 4. Scores against the ceiling and the floor

One labeled Dataset: `attribute, dictionary, k, pair`; `site` and `position` select pairs by
meaning."""),
    nbf.v4.new_code_cell("""r.headline()"""),
    nbf.v4.new_code_cell("""io = r.results.sel(attribute="io")
io.edit.to_pandas()  # edit accuracy (io's counterfactual changes the prediction), by k"""),
    nbf.v4.new_code_cell("""site = r.cross_sections["io"][0].split("@")[0]
r.results.fvu.sel(attribute="io", site=site).to_pandas()  # one head of the cross-section"""),
    nbf.v4.new_code_cell("""plot_comparison(r.results, "sufficiency")"""),
    nbf.v4.new_code_cell("""plot_controllability(r.results)"""),
    nbf.v4.new_markdown_cell("## 5. The report"),
    nbf.v4.new_code_cell("""print((r.report_dir / "summary.md").read_text()[:1500])"""),
]


if __name__ == "__main__":
    write(cells, "quickstart.ipynb", timeout=3600, description=__doc__.splitlines()[0])
