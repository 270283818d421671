"""``sage_nn.open_run``: a finished run read back from its directory, without the model."""

import json
import shutil

import numpy as np
import pytest
import xarray as xr

from conftest import TINY_TASK
from sage_nn import open_run, tiny_random_model
from sage_nn.model.loading import TINY_WORDS
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.stages import run
from sage_nn.pipeline.runs import NotARunError


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run (tiny llama, top-2 cross-sections, 64-latent TopK SAEs, a few seconds)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "tiny.yaml").write_text(TINY_TASK)
    rng = np.random.default_rng(0)  # a corpus of the tiny tokenizer's words
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(TINY_WORDS, 80))
                                                  for _ in range(60)))
    config = RunConfig(model="tiny-llama", task=str(root / "tiny.yaml"),
                       run_dir=str(root / "run"), saes=["train:topk"], n_fit=24, n_eval=16,
                       top_k=2, n_boot=50, sae_width=64, sae_steps=4, ks=[1, 2],
                       batch_size=16, sae_corpus=str(root / "corpus.txt"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAGE_NN_CACHE", str(root / "cache"))
        result = run(config, model=tiny_random_model("llama", seed=0), progress=False)
    return root, config, result


def test_open_run_reads_back_what_the_run_returned(finished):
    root, config, result = finished
    opened = open_run(root / "run")
    xr.testing.assert_identical(opened.results, result.results)
    assert opened.cross_sections == result.cross_sections
    assert opened.config == config
    assert opened.report_dir == result.report and (opened.report_dir / "summary.md").exists()
    assert set(opened.discovery.cross_sections) == set(result.cross_sections)
    assert "score" in opened.discovery.scores
    assert opened.saes["topk-64"]["spec"] == "train:topk"
    assert opened.task["n_eval"] == 16 and set(opened.timings) >= {"task", "evaluation"}
    assert ("io", "topk-64") in opened.headline().index
    assert "tiny-llama" in repr(opened)


def test_open_run_says_what_is_not_a_finished_run(finished, tmp_path):
    root, _, _ = finished
    with pytest.raises(NotARunError, match="is not a directory"):
        open_run(tmp_path / "nowhere")
    with pytest.raises(NotARunError, match=r"not a sage_nn run directory \(no manifest.json\)"):
        open_run(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(root / "run", partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["evaluation"], manifest["report"]  # as an interrupted run leaves it
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NotARunError, match=r"stage\(s\) evaluation, report did not finish"):
        open_run(partial)
    lost = tmp_path / "lost"
    shutil.copytree(root / "run", lost)
    (lost / "evaluation.nc").unlink()
    with pytest.raises(NotARunError, match=r"evaluation.nc of a finished stage are missing"):
        open_run(lost)
