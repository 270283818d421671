"""A suite of tiny tasks on a tiny model: one run directory per task, SAEs trained once on
the mixed corpus, the gate, the joined Dataset, the score and its report, resuming."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import TINY_TASK, trained_tiny_model
from sage_nn.model.loading import TINY_WORDS
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.suite import run_suite

# The same prompts, a task of its own: only the io attribute, under another name.
SECOND_TASK = TINY_TASK.replace("name: tiny-ioi", "name: tiny-io").replace(
    "  s: {slot: S}\n", "")
# A task the trained model cannot do: the answer is the name it learned to leave.
BACKWARDS_TASK = TINY_TASK.replace("name: tiny-ioi", "name: tiny-backwards").replace(
    'answer: " {IO}"\ndistractor: " {S}"', 'answer: " {S}"\ndistractor: " {IO}"')


@pytest.fixture(scope="module")
def suite_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    with pytest.MonkeyPatch.context() as mp:  # trained SAEs go to a cache of this test's own
        mp.setenv("SAGE_NN_CACHE", str(root / "cache"))
        model, first = trained_tiny_model(root)
        (root / "second.yaml").write_text(SECOND_TASK)
        (root / "backwards.yaml").write_text(BACKWARDS_TASK)
        rng = np.random.default_rng(0)  # the built-in text's stand-in: the tiny words
        (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(TINY_WORDS, 80))
                                                      for _ in range(60)))
        yield root, model, first


def suite_config(root, **kw):
    kw = {"saes": ["train:topk"], **kw}
    return RunConfig(model="tiny-llama", run_dir=str(root / "suite"), n_fit=24, n_eval=16,
                     n_discovery=16, top_k=2, n_boot=50, sae_width=64, sae_steps=4, ks=[1, 2],
                     batch_size=16, sae_task_prompts=200,
                     sae_corpus=f"{root / 'corpus.txt'}+task@positions", **kw)


def test_a_suite_runs_each_task_trains_once_and_gates_the_task_the_model_cannot_do(
        suite_setup, monkeypatch):
    import sage_nn
    import sage_nn.dictionaries.training as training

    root, model, first = suite_setup
    trained = []
    real = training.train_saes

    def counting(model_, sites, *args, **kwargs):
        trained.append(list(sites))
        return real(model_, sites, *args, **kwargs)

    monkeypatch.setattr(training, "train_saes", counting)
    tasks = [str(first), str(root / "second.yaml"), str(root / "backwards.yaml")]
    suite = run_suite(suite_config(root), tasks=tasks, model=model, progress=False)

    # one training call for every task's sites; every task's run directory is a run
    assert len(trained) == 1 and trained[0]
    assert set(suite.runs) == {"tiny-ioi", "tiny-io"}
    for name in ("tiny-ioi", "tiny-io"):
        run = sage_nn.open_run(root / "suite" / name)
        assert "topk-64" in run.results.dictionary.values
        assert run.config.corpus_tasks == tasks  # one corpus: every task's prompts
    saes = [json.loads((root / "suite" / n / "saes.json").read_text()) for n in suite.runs]
    corpora = {s["topk-64"]["sae_cfg_dict"]["training"]["corpus"] for s in saes}
    assert len(corpora) == 1 and all(f"task:{t}@positions" in next(iter(corpora))
                                     for t in ("tiny-ioi", "tiny-io", "tiny-backwards"))

    # the gate: listed with its reason, never evaluated, out of the score
    tasks_table = suite.tasks
    reason = tasks_table.loc["tiny-backwards", "gate"]
    assert reason.startswith("the model does not do the task (held-out accuracy 0.")
    assert not (root / "suite" / "tiny-backwards" / "evaluation.nc").exists()
    assert suite.record["tasks"]["tiny-ioi"]["gate"] is None
    assert tasks_table.loc["tiny-ioi", "accuracy"] == 1.0
    ds = suite.results
    assert list(ds.gated.values) == [False, False, True]
    assert not ds.in_claims.sel(task="tiny-backwards").any()
    summary = (suite.report_dir / "summary.md").read_text()
    assert "| tiny-backwards | gated out |" in summary and "held-out accuracy" in summary
    assert "Higher is better" in summary and "What each task adds" in summary

    # the score is the mean over the attributes in claims of the mean gap closed
    items = [(t, a) for t in ds.task.values for a in ds.attribute.values
             if bool(ds.in_claims.sel(task=t, attribute=a))]
    assert items, ds.reason.values
    by_hand = np.mean([np.nanmean(ds.gap_closed.sel(sae="topk-64", task=t, attribute=a))
                       for t, a in items])
    assert suite.aggregate.loc["topk-64", "score"] == pytest.approx(by_hand)
    assert suite.aggregate.loc["topk-64", "n_attributes"] == len(items)
    low, high = suite.aggregate.loc["topk-64", ["score_low", "score_high"]]
    assert low <= by_hand <= high and low < high

    # the table, the SAEBench-shaped JSON per SAE
    import pandas as pd

    table = pd.read_csv(root / "suite" / "suite.csv")
    assert set(table.task) == {"tiny-ioi", "tiny-io", "tiny-backwards"}
    assert {"value", "ci_low", "ci_high", "ceiling", "floor", "gap_closed"} <= set(table.columns)
    doc = json.loads((suite.report_dir / "sage_nn_topk-64_eval_results.json").read_text())
    assert doc["eval_type_id"] == "sage_suite"
    assert doc["eval_result_metrics"]["aggregate"]["score"] == pytest.approx(by_hand)
    assert doc["eval_result_metrics"]["tiny-backwards"]["gated"] is True
    assert (suite.report_dir / "heatmap.png").exists()

    # a rerun with one SAE more: nothing of the first is computed again
    manifests = {n: json.loads((root / "suite" / n / "manifest.json").read_text())
                 for n in suite.runs}
    scored = {n: {p: p.stat().st_mtime_ns for p in (root / "suite" / n / "evaluation").glob(
        "topk-64-*.nc")} for n in suite.runs}
    trained.clear()
    more = run_suite(suite_config(root, saes=["train:topk", "train:topk:k=2"]), tasks=tasks,
                     model=model, progress=False)
    assert len(trained) == 1  # only the new SAE
    assert list(more.aggregate.index) == ["topk-64", "topk-64-k2"]
    assert more.aggregate.loc["topk-64", "score"] == pytest.approx(by_hand)
    for name in ("tiny-ioi", "tiny-io"):
        manifest = json.loads((root / "suite" / name / "manifest.json").read_text())
        assert [manifest[s] for s in ("task", "discovery")] == \
            [manifests[name][s] for s in ("task", "discovery")]
        assert len(scored[name]) == 1 and all(p.stat().st_mtime_ns == t
                                              for p, t in scored[name].items())
    assert (more.report_dir / "score_vs_l0.png").exists()  # k=2 against k=32


def test_the_score_orders_a_trained_sae_above_a_random_one(suite_setup, tmp_path):
    """SAEs of random weights at every residual site, given as a directory, score below
    the trained ones on the same suite."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    root, model, first = suite_setup
    random_dir = tmp_path / "random-saes"
    torch.manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        cfg = TopKSAEConfig(d_in=model.config.hidden_size, d_sae=64, k=8,
                            metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_pre"))
        TopKSAE(cfg).save_model(random_dir / f"L{layer}.resid_pre")
    config = dataclasses.replace(suite_config(root), run_dir=str(tmp_path / "suite"),
                                 sae_steps=40,
                                 saes=["train:topk", str(random_dir)])
    suite = run_suite(config, tasks=[str(first), str(root / "second.yaml")], model=model,
                      progress=False)
    scores = suite.aggregate.score
    assert scores["topk-64"] > scores["random-saes"], scores
    assert set(suite.agreement.index) == {"tiny-ioi", "tiny-io"}
