"""A suite of tiny tasks on a tiny model: one run directory per task, SAEs trained once on
the mixed corpus, the gate, the joined Dataset, the score and its report, resuming."""

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
# A task added to a finished suite (the same prompts under a third name).
LATER_TASK = TINY_TASK.replace("name: tiny-ioi", "name: tiny-later")
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
        (root / "later.yaml").write_text(LATER_TASK)
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


class Counting:
    """train_saes, counting its calls (the sites of each)."""

    def __init__(self):
        from sage_nn.dictionaries import training

        self.calls, self.real = [], training.train_saes

    def __call__(self, model, sites, *args, **kwargs):
        self.calls.append(list(sites))
        return self.real(model, sites, *args, **kwargs)


@pytest.fixture(scope="module")
def first_suite(suite_setup):
    from sage_nn.dictionaries import training

    root, model, first = suite_setup
    tasks = [str(first), str(root / "second.yaml"), str(root / "backwards.yaml")]
    with pytest.MonkeyPatch.context() as mp:
        trained = Counting()
        mp.setattr(training, "train_saes", trained)
        suite = run_suite(suite_config(root), tasks=tasks, model=model, progress=False)
    return suite, tasks, trained.calls


def test_a_suite_runs_each_task_trains_once_and_gates_the_task_the_model_cannot_do(
        suite_setup, first_suite):
    import sage_nn

    root = suite_setup[0]
    suite, tasks, trained = first_suite
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
    assert reason.startswith("the model does not do the task well (held-out accuracy 0.")
    assert not (root / "suite" / "tiny-backwards" / "evaluation.nc").exists()
    assert suite.record["tasks"]["tiny-ioi"]["gate"] is None
    assert tasks_table.loc["tiny-ioi", "gate"] is None
    assert tasks_table.loc["tiny-ioi", "accuracy"] == 1.0
    ds = suite.results
    assert list(ds.gated.values) == [False, False, True]
    # each task's own attributes, no NaN union: tiny-io has only io; a gated task none
    assert ds.attribute.sel(task="tiny-io").values.tolist() == ["io"]
    assert ds.attribute.sel(task="tiny-ioi").values.tolist() == ["io", "s"]
    assert "tiny-backwards" not in ds.task.values
    # the ceiling's and the floor's intervals and every k, as each run's evaluation.nc has
    one = ds.sel(sae="topk-64", task="tiny-ioi", attribute="io")
    run_io = suite.runs["tiny-ioi"].results.sel(attribute="io")
    assert list(ds.k.values) == [1, 2]
    from sage_nn.report import roles

    ceiling = roles(suite.runs["tiny-ioi"].results).ceiling_of("topk-64")
    assert ceiling == "supervised:path"  # a residual SAE's: the ceiling on its path
    for field, method in (("ceiling", ceiling), ("floor", "random:topk-64")):
        for k in (1, 2):
            ci = run_io.edit_ci.sel(dictionary=method, k=k)
            assert float(one[f"{field}_low"].sel(metric="edit", k=k)) == pytest.approx(
                float(ci.sel(bound="low")), nan_ok=True)
            assert float(one[f"{field}_high"].sel(metric="edit", k=k)) == pytest.approx(
                float(ci.sel(bound="high")), nan_ok=True)
    assert float(one.value.sel(metric="edit", k=1)) == pytest.approx(
        float(run_io.edit.sel(dictionary="topk-64", k=1)), nan_ok=True)
    # the gap closed is the report's: none where the paired interval of ceiling - floor
    # does not lie above 0 (the value alone would give one)
    from sage_nn.report import sae_metrics

    report = sae_metrics(suite.runs["tiny-ioi"].results, "topk-64", "io")
    for metric in ds.attrs["headline"].split(","):
        assert float(one.gap_closed.sel(metric=metric, k=2)) == pytest.approx(
            report[f"{metric}_gap_closed"] if report[f"{metric}_gap_closed"] is not None
            else np.nan, nan_ok=True), metric
    summary = (suite.report_dir / "summary.md").read_text()
    assert "| tiny-backwards | gated out |" in summary and "held-out accuracy" in summary
    assert "Higher is better" in summary and "What each task adds" in summary

    # the score is the mean over the attributes in claims of the mean gap closed
    items = [(t, a) for t, a, c in zip(ds.task.values, ds.attribute.values,
                                        ds.in_claims.values) if c]
    assert items, ds.reason.values
    heads = ds.attrs["headline"].split(",")  # the edits over k, not at each k too
    assert {"edit_auc", "edit"} <= set(ds.metric.values) and "edit" not in heads
    by_hand = np.mean([np.nanmean(ds.gap_closed.sel(sae="topk-64", task=t, attribute=a,
                                                    k=ds.edit_k, metric=heads))
                       for t, a in items])
    assert suite.aggregate.loc["topk-64", "score"] == pytest.approx(by_hand)
    assert suite.aggregate.loc["topk-64", "n_attributes"] == len(items)
    low, high = suite.aggregate.loc["topk-64", ["score_low", "score_high"]]
    assert low <= by_hand <= high and low < high

    # the table, the SAEBench-shaped JSON per SAE
    import pandas as pd

    table = pd.read_csv(root / "suite" / "suite.csv")
    assert set(table.task) == {"tiny-ioi", "tiny-io", "tiny-backwards"}
    assert {"value", "ci_low", "ci_high", "ceiling", "ceiling_low", "ceiling_high", "floor",
            "floor_low", "floor_high", "gap_closed", "k"} <= set(table.columns)
    assert set(table[table.metric == "edit"].k) == {1, 2}
    assert table[table.metric == "sufficiency"].k.isna().all()
    assert not ((table.task == "tiny-io") & (table.attribute == "s")).any()
    doc = json.loads((suite.report_dir / "sage_nn_topk-64_eval_results.json").read_text())
    assert doc["eval_type_id"] == "sage_suite"
    assert doc["eval_result_metrics"]["aggregate"]["score"] == pytest.approx(by_hand)
    assert doc["eval_result_metrics"]["tiny-backwards"]["gated"] is True
    assert (suite.report_dir / "heatmap.png").exists()

    # trained SAEs shown trained: one record over every task's sites, in the summary too
    per_task = [set(s["topk-64"]["sae_cfg_dict"]["training"]["steps_used"]) for s in saes]
    assert set(doc["sae_cfg_dict"]["training"]["steps_used"]) == set.union(*per_task)
    assert "## SAEs" in summary and "| topk-64 | topk |" in summary
    assert ("| topk-64 (not converged) |" in summary) == (
        not all(doc["sae_cfg_dict"]["training"]["converged"].values()))



def test_a_task_and_an_sae_added_later_compute_only_what_is_new(suite_setup, first_suite,
                                                                monkeypatch):
    """A rerun with one SAE and one task more: nothing of the first is computed again, the
    SAE corpus stays the recorded one."""
    import sage_nn
    from sage_nn.dictionaries import training

    root, model, _ = suite_setup
    suite, tasks, _ = first_suite
    before = suite.results.gap_closed.sel(sae="topk-64").values.copy()
    manifests = {n: json.loads((root / "suite" / n / "manifest.json").read_text())
                 for n in suite.runs}
    scored = {n: {p: p.stat().st_mtime_ns for p in (root / "suite" / n / "evaluation").glob(
        "topk-64-*.nc")} for n in suite.runs}
    trained = Counting()
    monkeypatch.setattr(training, "train_saes", trained)
    more = run_suite(suite_config(root, saes=["train:topk", "train:topk:k=2"]),
                     tasks=[*tasks, str(root / "later.yaml")], model=model, progress=False)
    assert len(trained.calls) == 1  # only the new SAE: the new task's sites are tiny-ioi's
    assert list(more.aggregate.index) == ["topk-64", "topk-64-k2"]
    assert set(more.runs) == {"tiny-ioi", "tiny-io", "tiny-later"}
    assert more.record["corpus_tasks"] == tasks
    assert more.record["tasks"]["tiny-later"]["in_corpus"] is False
    assert sage_nn.open_run(root / "suite" / "tiny-later").config.corpus_tasks == tasks
    for name in ("tiny-ioi", "tiny-io"):
        manifest = json.loads((root / "suite" / name / "manifest.json").read_text())
        assert [manifest[s] for s in ("task", "discovery")] == \
            [manifests[name][s] for s in ("task", "discovery")]
        assert len(scored[name]) == 1 and all(p.stat().st_mtime_ns == t
                                              for p, t in scored[name].items())
    assert (more.report_dir / "score_vs_l0.png").exists()  # k=2 against k=32
    again = more.results.gap_closed.sel(sae="topk-64")
    first_tasks = np.isin(again.task.values, ["tiny-ioi", "tiny-io"])
    np.testing.assert_array_equal(again.values[first_tasks], before)


def suite_of(gaps: dict, gated=(), out_of_claims=()):
    """A suite Dataset of the shape suite_dataset writes: ``gaps[sae][task]`` the gap
    closed of every metric at the task's two attributes at k = 2 (floor 0, ceiling 1,
    value = gap, intervals +-0.05)."""
    import xarray as xr

    from sage_nn.report.suite import item_index
    from sage_nn.report.tables import HEADLINE

    saes, tasks = list(gaps), list(next(iter(gaps.values())))
    items = [(t, a) for t in tasks for a in ("a", "b")]
    metrics = list(HEADLINE)
    gap = np.array([[[[gaps[s][t] + 0.01 * (a == "b")] for _ in metrics] for t, a in items]
                    for s in saes])
    dims = ("sae", "item", "metric", "k")
    in_claims = np.array([(t, a) not in out_of_claims and t not in gated for t, a in items])
    value = gap  # floor 0, ceiling 1: the value is the gap closed
    fields = {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05,
              "ceiling": np.ones_like(value), "ceiling_low": np.ones_like(value),
              "ceiling_high": np.ones_like(value), "floor": np.zeros_like(value),
              "floor_low": np.zeros_like(value), "floor_high": np.zeros_like(value),
              "gap_closed": gap}
    return item_index(xr.Dataset(
        {**{name: (dims, v) for name, v in fields.items()},
         "l0": (dims[:2], np.full(gap.shape[:2], 8.0)), "in_claims": ("item", in_claims),
         "reason": ("item", np.where(in_claims, "", "small effect")),
         "gated": ("tasks", np.array([t in gated for t in tasks])),
         "gate_reason": ("tasks", np.array(["no" if t in gated else "" for t in tasks]))},
        coords={"sae": saes, "task": ("item", [t for t, _ in items]),
                "attribute": ("item", [a for _, a in items]), "metric": metrics, "k": [2],
                "tasks": tasks}).assign_attrs(edit_k=2))


def test_an_sae_set_lists_the_training_of_every_task_sites():
    from sage_nn.pipeline.suite import join_sae_info

    def entry(site, fvu):
        return {"spec": "train:topk", "sae_cfg_dict": {"hook_name": [site], "training": {
            "corpus": "c", "held_out_fvu": {site: fvu}, "converged": {site: True}}}}

    joined = join_sae_info(entry("L1.resid_pre", 0.1), entry("L2.resid_pre", 0.2))
    cfg = joined["sae_cfg_dict"]
    assert cfg["hook_name"] == ["L1.resid_pre", "L2.resid_pre"]
    assert cfg["training"]["held_out_fvu"] == {"L1.resid_pre": 0.1, "L2.resid_pre": 0.2}
    assert cfg["training"]["corpus"] == "c" and joined["spec"] == "train:topk"


def test_the_score_orders_saes_by_gap_closed_and_leaves_gated_tasks_out():
    from sage_nn.report.suite import aggregate

    ds = suite_of({"good": {"t1": 0.8, "t2": 0.7, "t3": 0.9, "bad": 5.0},
                   "poor": {"t1": 0.2, "t2": 0.1, "t3": 0.3, "bad": 9.0}},
                  gated=("bad",), out_of_claims=(("t3", "b"),))
    table = aggregate(ds, n_boot=200, seed=0)
    # by hand: t1 a/b, t2 a/b, t3 a (t3 b out of claims, the gated task out)
    assert table.loc["good", "score"] == pytest.approx(np.mean([0.8, 0.81, 0.7, 0.71, 0.9]))
    assert table.loc["poor", "n_attributes"] == 5
    assert table.loc["good", "score_low"] > table.loc["poor", "score_high"]  # ordered
    assert table.loc["good", "score_low"] < table.loc["good", "score"] < \
        table.loc["good", "score_high"]
    again = aggregate(ds, n_boot=200, seed=0)
    assert again.equals(table)  # seeded
    alone = aggregate(ds.sel(sae=["poor"]), n_boot=200, seed=0)  # not moved by the others
    assert alone.loc["poor"].equals(table.loc["poor"])
    assert not aggregate(ds, n_boot=200, seed=1).score_low.equals(table.score_low)


def test_each_task_ranking_is_compared_with_the_other_tasks():
    from sage_nn.report.suite import rank_agreement

    # t1-t3 rank x > y > z; t4 reverses it
    ds = suite_of({"x": {"t1": 0.9, "t2": 0.8, "t3": 0.85, "t4": 0.1},
                   "y": {"t1": 0.5, "t2": 0.5, "t3": 0.5, "t4": 0.5},
                   "z": {"t1": 0.1, "t2": 0.2, "t3": 0.15, "t4": 0.9}})
    agreement = rank_agreement(ds)
    assert agreement.loc["t1", "spearman_vs_others"] == pytest.approx(1.0)
    assert agreement.loc["t4", "spearman_vs_others"] == pytest.approx(-1.0)
    assert (agreement.n_saes == 3).all()


def test_sage_suite_takes_tasks_not_task(capsys):
    """Its help lists only the flags it takes, with the defaults it uses (a suite's corpus,
    step cap and directory); --task and --dry-run, given anyway, say what to use."""
    import re

    from sage_nn.cli import main

    with pytest.raises(SystemExit):
        main(["suite", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"--task\b(?!s)", text) and "--dry-run" not in text
    assert "--tasks TASK" in text
    for default in ("(default: 600)", "(default: builtin+task@positions)",
                    "(default: runs/suite)"):
        assert default in text, default
    with pytest.raises(SystemExit) as exit_:
        main(["suite", "--task", "ioi"])
    assert exit_.value.code == 2
    assert "sage suite takes --tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["suite", "--dry-run"])
    assert "sage suite has no --dry-run" in capsys.readouterr().err


def test_sage_suite_lists_every_task_gated_out_and_scores_none(tmp_path, monkeypatch, capsys):
    """The command on a tiny random model, which does no task: every task is gated out
    with its reason, before any discovery or training, and the suite still reads back."""
    from conftest import write_tiny_run_files

    import sage_nn
    from sage_nn import tiny_random_model
    from sage_nn.cli import main

    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    write_tiny_run_files(tmp_path, tiny_random_model("llama", seed=0))
    (tmp_path / "second.yaml").write_text(SECOND_TASK)
    main(["suite", "--model", str(tmp_path / "model"), "--tasks", str(tmp_path / "tiny.yaml"),
          str(tmp_path / "second.yaml"), "--sae", "train:topk", "--run-dir",
          str(tmp_path / "suite"), "--n-fit", "24", "--n-eval", "16", "--sae-width", "64",
          "--sae-steps", "4", "--sae-corpus", f"{tmp_path / 'corpus.txt'}+task@positions",
          "--min-accuracy", "1.01"])
    out = capsys.readouterr().out
    assert "tiny-ioi: gated out: the model does not do the task" in out
    assert "tiny-io: gated out" in out
    suite = sage_nn.open_suite(tmp_path / "suite")
    assert suite.results.gated.values.all() and suite.runs == {}
    assert not (tmp_path / "suite" / "tiny-ioi" / "discovery").exists()
    assert not (tmp_path / "cache" / "saes").exists()  # nothing trained
    assert "| tiny-ioi | gated out |" in (suite.report_dir / "summary.md").read_text()


def test_the_prompt_budget_holds_for_the_built_in_text_and_an_unbalanced_mix_is_warned(
        tmp_path):
    """``--sae-task-prompts`` bounds the built-in text too (its first documents), so small
    settings train on a small corpus; at the default budget the built-in text is whole and
    named and hashed as before (cached SAEs stay valid). Task parts far apart in size (a
    task that makes few distinct prompts) are warned about, with the fix."""
    import dataclasses
    import warnings

    from sage_nn import tiny_random_model
    from sage_nn.common.notes import SageWarning
    from sage_nn.dictionaries.corpus import Text, corpus_hash, corpus_units, load_texts
    from sage_nn.dictionaries.training import TrainConfig
    from sage_nn.pipeline.resolve import sae_corpus

    model = tiny_random_model("llama", seed=0)
    (tmp_path / "big.yaml").write_text(TINY_TASK)
    few = TINY_TASK.replace("name: tiny-ioi", "name: tiny-few").replace(
        "names: [Mary, John, Alice, Bob, Tom, Anna]", "names: [Mary, John, Alice, Bob]")
    (tmp_path / "few.yaml").write_text(few)
    mixed = RunConfig(task=str(tmp_path / "big.yaml"), sae_corpus="builtin+task@positions",
                      n_fit=4, n_eval=4, sae_task_prompts=200,
                      corpus_tasks=[str(tmp_path / "big.yaml"), str(tmp_path / "few.yaml")])
    with pytest.warns(SageWarning, match=r"unbalanced: task:tiny-ioi@positions\[\d+\], "
                      r"task:tiny-few@positions\[\d+\].*fix: --sae-task-prompts \d+"):
        sae_corpus(model, mixed)
    builtin = sae_corpus(model, dataclasses.replace(mixed, sae_task_prompts=40))[0]
    assert isinstance(builtin, Text) and builtin.capped() and len(builtin.texts()) == 40
    whole = len(corpus_units(model, "builtin", TrainConfig()))
    assert len(corpus_units(model, builtin, TrainConfig())) < whole / 2
    assert corpus_hash(builtin) != corpus_hash("builtin")
    default = Text("builtin", RunConfig().sae_task_prompts)
    assert len(load_texts("builtin")) < RunConfig().sae_task_prompts
    assert str(default) == "builtin" and corpus_hash(default) == corpus_hash("builtin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SageWarning)  # one task: nothing to balance
        sae_corpus(model, RunConfig(task=str(tmp_path / "big.yaml"), n_fit=4, n_eval=4,
                                    sae_task_prompts=40))
