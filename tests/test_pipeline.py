"""The end-to-end run on a tiny model: stage files, resume, corruption, determinism."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import xarray as xr

from conftest import TINY_TASK
from sage_nn import tiny_random_model
from sage_nn.model.loading import TINY_WORDS
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.resolve import trained_cache
from sage_nn.pipeline.rundir import RunDirectory
from sage_nn.pipeline.stages import run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:  # trained SAEs go to a cache of this test's own
        mp.setenv("SAGE_NN_CACHE", str(root / "cache"))
        yield _setup(root)


def _setup(root):
    (root / "tiny.yaml").write_text(TINY_TASK)  # words of the tiny tokenizer
    rng = np.random.default_rng(0)
    words = TINY_WORDS
    text = "\n\n".join(" ".join(rng.choice(words, 80)) for _ in range(60))
    (root / "corpus.txt").write_text(text)
    model = tiny_random_model("llama", seed=0)
    return root, model


def config(root, name, **kw):
    kw = {"saes": ["train:topk"], **kw}
    return RunConfig(model="tiny-llama", task=str(root / "tiny.yaml"), run_dir=str(root / name),
                     n_fit=24, n_eval=16, top_k=2, n_boot=50,
                     sae_width=64, sae_steps=4, ks=[1, 2, 4], batch_size=16,
                     sae_corpus=str(root / "corpus.txt"), **kw)


def test_run_writes_every_stage_and_resumes(setup, caplog):
    root, model = setup
    with caplog.at_level("INFO", logger="sage_nn"):
        first = run(config(root, "a"), model=model, progress=False)
    # each stage's line names the run's task (a suite says several)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert [line.split(":")[0] for line in said] == [
        f"stage {s} (tiny-ioi)" for s in ("task", "discovery", "saes", "evaluation", "report")]
    files = ["task.json", "discovery/scores.nc", "discovery/cross_sections.csv", "saes.json",
             "evaluation.nc", "report/summary.md", "manifest.json", "config.yaml"]
    for f in files:
        assert (first.run_dir / f).exists(), f
    res = first.results
    assert set(res.attribute.values) == {"io", "s"}
    assert {"supervised", "topk-64", "random:topk-64"} <= set(res.dictionary.values)
    assert all(v > 0 for v in first.timings.values())

    # a rerun recomputes nothing and reads the same numbers back
    again = run(config(root, "a"), model=model, progress=False)
    assert all(v == 0 for v in again.timings.values())
    xr.testing.assert_identical(again.results, first.results)

    # a corrupt stage file is detected and recomputed (and only what depends on it)
    ev = first.run_dir / "evaluation.nc"
    ev.write_bytes(ev.read_bytes()[:100])
    third = run(config(root, "a"), model=model, progress=False)
    assert third.timings["task"] == third.timings["discovery"] == 0
    assert third.timings["evaluation"] > 0
    xr.testing.assert_allclose(third.results, first.results)


def test_sae_dir_trained_here_carries_its_training_record(setup):
    """SAEs train_saes wrote, given as a directory (--sae DIR), show the corpus, steps,
    curves and convergence their cfg.json records, as trained ones do."""
    root, model = setup
    first = run(config(root, "a"), model=model, progress=False)  # trained (or cached) SAEs
    trained = json.loads((first.run_dir / "saes.json").read_text())["topk-64"]
    cache = next((root / "cache" / "saes").rglob("train_config.json")).parent
    given = run(config(root, "dir", saes=[str(cache)]), model=model, progress=False)
    listing = json.loads((given.run_dir / "saes.json").read_text())[cache.name]
    record, was = listing["sae_cfg_dict"]["training"], trained["sae_cfg_dict"]["training"]
    assert record["source"] == str(cache)
    assert record["corpus"] == was["corpus"] == str(root / "corpus.txt")
    for site, steps in was["steps_used"].items():
        assert record["steps_used"][site] == steps == 4
        assert record["held_out_curves"][site] == was["held_out_curves"][site]
        assert record["converged"][site] is False  # 4 steps: short of min_steps
    summary = (given.run_dir / "report" / "summary.md").read_text()
    assert f"| {cache.name} (not converged) | topk |" in summary
    assert str(root / "corpus.txt") in summary


def test_interrupted_run_resumes_from_last_finished_stage(setup, monkeypatch):
    root, model = setup
    import sage_nn.evaluation.scoring as evaluation

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(evaluation, "evaluate_cross_section", crash)
    with pytest.raises(KeyboardInterrupt):
        run(config(root, "b"), model=model, progress=False)
    manifest = RunDirectory(root / "b").manifest
    assert set(manifest) == {"task", "discovery", "saes"}
    monkeypatch.undo()
    resumed = run(config(root, "b"), model=model, progress=False)
    assert resumed.timings["task"] == resumed.timings["discovery"] == resumed.timings["saes"] == 0
    assert resumed.timings["evaluation"] > 0


def test_same_seed_same_numbers_other_settings_recompute(setup, monkeypatch):
    root, model = setup
    one = run(config(root, "c1"), model=model, progress=False)
    monkeypatch.setenv("SAGE_NN_CACHE", str(root / "cache2"))  # the SAEs are trained again
    two = run(config(root, "c2"), model=model, progress=False)
    assert any((root / "cache2" / "saes").rglob("cfg.json"))
    xr.testing.assert_identical(one.results, two.results)
    summary = json.loads((one.run_dir / "task.json").read_text())
    assert summary["n_fit"] == 24 and summary["n_eval"] == 16
    # a changed setting invalidates the stages that depend on it, not the ones before
    changed = run(dataclasses.replace(config(root, "c1"), n_boot=60), model=model,
                  progress=False)
    assert changed.timings["discovery"] == changed.timings["saes"] == 0
    assert changed.timings["evaluation"] > 0
    xr.testing.assert_identical(changed.results.sufficiency, one.results.sufficiency)


def test_config_file_round_trip_and_unknown_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: ioi\nn_fit: 10\ntop_k: 3\n")
    cfg = RunConfig.from_file(path, n_fit=12)
    assert (cfg.task, cfg.n_fit, cfg.top_k) == ("ioi", 12, 3)
    path.write_text("task: ioi\nnfit: 10\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nfit'\]"):
        RunConfig.from_file(path)


def test_unknown_sae_spec_is_explained():
    from sage_nn.pipeline.resolve import resolve_saes

    with pytest.raises(ValueError, match=r"--sae 'nonsense': not a directory with cfg.json"):
        resolve_saes("nonsense", None, [], RunConfig())


def test_task_corpus_is_disjoint_from_the_run_prompts(setup):
    from sage_nn.pipeline.config import run_prompts
    from sage_nn.pipeline.resolve import sae_corpus
    from sage_nn.dictionaries.corpus import Prompts

    root, model = setup
    cfg = dataclasses.replace(config(root, "t"), sae_corpus=f"{root / 'corpus.txt'}+task",
                              sae_task_prompts=300)
    text, prompts = sae_corpus(model, cfg)
    assert text == str(root / "corpus.txt") and isinstance(prompts, Prompts)
    full = run_prompts(model, cfg)[0]
    used = {p for d in [full, *full.counterfactuals.values()] for p in d.prompts}
    assert len(prompts.texts) > 10 and not used & set(prompts.texts)  # few combinations here
    assert sae_corpus(model, cfg)[1] == prompts  # the same seed, the same prompts
    (builtin,) = sae_corpus(model, dataclasses.replace(cfg, sae_corpus="builtin"))
    assert (builtin.source, builtin.max_docs) == ("builtin", 300)  # the prompt budget
    (named,) = sae_corpus(model, dataclasses.replace(cfg, sae_corpus="task@positions"))
    assert named.texts == prompts.texts and len(named.positions) == len(prompts.texts)


def test_default_run_grows_head_cross_sections_and_compares_both_approaches(setup):
    """The defaults: cross-sections of heads grown by their joint patch, residual SAEs
    through the reconstruction next to SAEs trained at the heads, one training stream."""
    root, model = setup
    cfg = dataclasses.replace(config(root, "d"), top_k=None, max_sites=3,
                              saes=["train:topk", "train:topk@sites"])
    result = run(cfg, model=model, progress=False)
    res = result.results
    assert {"topk-64", "topk-64@sites", "random:topk-64", "random:topk-64@sites"} <= set(
        res.dictionary.values)
    for attribute, sites in result.cross_sections.items():
        assert sites and all(".z.h" in s for s in sites), sites
        assert 1 <= len(sites) <= 3
    assert np.isfinite(res.recovered.values).all()
    assert {str(m) for m in res.edit_metric.values} <= {"accuracy", "success"}
    # the merged run keeps each SAE's ceiling whole (a fixed-width '' once cut it to 's')
    from sage_nn.report import roles

    assert (roles(res).ceiling_of("topk-64"), roles(res).ceiling_of("topk-64@sites")) == (
        "supervised:path", "supervised")
    listing = json.loads((result.run_dir / "saes.json").read_text())
    heads = {s.split("@")[0] for sites in result.cross_sections.values() for s in sites}
    assert set(listing["topk-64@sites"]["sites"]) == heads
    assert listing["topk-64@sites"]["n_saes_all_layers"] == 2 * 4  # every head of every layer
    assert all(s.endswith("resid_pre") for s in listing["topk-64"]["sites"])
    summary = (result.report / "summary.md").read_text()
    assert "Kinds of dictionary" in summary and "joint exact patch recovers" in summary
    assert "| residual SAE through the reconstruction |" in summary
    assert "| SAE at the site |" in summary
    # trained SAEs keep TRAINED_K_HEADS latents at a head and TrainConfig's k at the
    # residual (benchmarks/head_k.py); a k named in the spec holds at every site
    from sage_nn.dictionaries.training import TrainConfig
    from sage_nn.pipeline.resolve import TRAINED_K_HEADS, resolve_saes

    assert TRAINED_K_HEADS != TrainConfig.k
    head, resid = sorted(heads)[0], listing["topk-64"]["sites"][0]
    _, (at_head, at_resid) = resolve_saes("train:topk", model, [head, resid], cfg, False)
    assert (at_head.k, at_resid.k) == (TRAINED_K_HEADS, TrainConfig.k)
    _, (k4_head, k4_resid) = resolve_saes("train:topk:k=4", model, [head, resid], cfg, False)
    assert (k4_head.k, k4_resid.k) == (4, 4)
    cache = trained_cache("topk", model, cfg)[3]
    assert cache.name.startswith(f"topk-64-kh{TRAINED_K_HEADS}-")  # not a k=32 head's entry
    assert trained_cache("topk", model, cfg, {"k": 4})[3].name.startswith("topk-64-k4-")
    # the same head SAEs given as a directory are applied at their sites, scoring the same
    for site in listing["topk-64@sites"]["sites"]:
        shutil.copytree(cache / site, root / "mine" / site)
    again = run(dataclasses.replace(cfg, saes=[*cfg.saes, str(root / "mine")]), model=model,
                progress=False).results
    for metric in ("sufficiency", "necessity", "edit"):
        np.testing.assert_allclose(again[metric].sel(dictionary="mine"),
                                   again[metric].sel(dictionary="topk-64@sites"), atol=1e-5)


def test_sweep_specs_expand_to_named_saes(tmp_path):
    from sage_nn.pipeline.specs import expand_sae_specs

    assert expand_sae_specs(["train:topk:k=8,16", "train:topk:width=32,64@sites"]) == [
        "train:topk:k=8", "train:topk:k=16", "train:topk:width=32@sites",
        "train:topk:width=64@sites"]
    with pytest.raises(ValueError, match="KEY=V1"):
        expand_sae_specs(["train:topk:lr=1"])
    # a folder of SAE sets: each set is one SAE
    for name in ("a", "b"):
        (tmp_path / "sweep" / name / "L0.resid_pre").mkdir(parents=True)
        (tmp_path / "sweep" / name / "L0.resid_pre" / "cfg.json").write_text("{}")
    assert expand_sae_specs([str(tmp_path / "sweep")]) == [
        str(tmp_path / "sweep" / "a"), str(tmp_path / "sweep" / "b")]


def test_saes_are_cached_one_by_one(setup, monkeypatch):
    """A sweep spec names several SAEs; adding one to a finished run scores only it,
    removing one drops it from the results and the report."""
    import sage_nn.evaluation.scoring as evaluation

    root, model = setup
    scored = []
    real = evaluation.evaluate_cross_section

    def counting(*args, **kwargs):
        scored.append(sorted(args[4]) if len(args) > 4 else sorted(kwargs.get("saes") or {}))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_cross_section", counting)
    one = run(config(root, "sweep", saes=["train:topk:k=2"]), model=model, progress=False)
    assert set(one.results.dictionary.values) == {"supervised", "supervised:path",
                                                  "topk-64-k2", "random:topk-64-k2",
                                                  "random-sae:topk-64-k2"}
    first = sorted((one.run_dir / "evaluation").glob("topk-64-k2-*.nc"))
    assert len(first) == 1
    mtime = first[0].stat().st_mtime_ns
    assert scored and all(s == ["topk-64-k2"] for s in scored)

    scored.clear()
    two = run(config(root, "sweep", saes=["train:topk:k=2,4"]), model=model, progress=False)
    assert all(s == ["topk-64-k4"] for s in scored) and scored  # only the new SAE
    assert first[0].stat().st_mtime_ns == mtime
    assert list(two.results.dictionary.values) == [
        "supervised", "supervised:path", "topk-64-k2", "random:topk-64-k2",
        "random-sae:topk-64-k2", "topk-64-k4", "random:topk-64-k4", "random-sae:topk-64-k4"]
    kept = ["supervised", "supervised:path", "topk-64-k2", "random:topk-64-k2"]
    xr.testing.assert_identical(two.results.sel(dictionary=kept),
                                one.results.sel(dictionary=kept))
    # the same numbers as scoring both together in a fresh run
    both = run(config(root, "sweep-both", saes=["train:topk:k=2,4"]), model=model,
               progress=False)
    xr.testing.assert_allclose(both.results[["sufficiency", "necessity", "edit", "l0"]],
                               two.results[["sufficiency", "necessity", "edit", "l0"]],
                               rtol=1e-4, atol=1e-5)

    scored.clear()
    last = run(config(root, "sweep", saes=["train:topk:k=4"]), model=model, progress=False)
    assert not scored  # everything was cached
    assert list(last.results.dictionary.values) == ["supervised", "supervised:path",
                                                    "topk-64-k4", "random:topk-64-k4",
                                                    "random-sae:topk-64-k4"]
    summary = (last.report / "summary.md").read_text()
    assert "topk-64-k4" in summary and "topk-64-k2" not in summary


def documented_names() -> str:
    from pathlib import Path

    return (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()


def undocumented(names, doc: str) -> list[str]:
    """Names not written in backticks in ``doc``; an edit at a budget is documented as
    ``edit_k<k>``, a column of a metric as ``<metric>_low`` and so on."""
    import re

    suffixes = ("_above_floor", "_above_random_sae", "_random_sae", "_low", "_high",
                "_ceiling", "_floor", "_gap", "_ci", "_boot")
    missing = []
    for name in names:
        generic = re.sub(r"_k\d+", "_k<k>", str(name))
        if f"`{name}`" in doc or f"`{generic}`" in doc:
            continue
        base, suffix = next(((generic[:-len(s)], s) for s in suffixes if generic.endswith(s)),
                            (generic, None))
        if suffix and f"`<metric>{suffix}`" in doc and f"`{base}`" in doc:
            continue
        missing.append(str(name))
    return missing


def test_every_variable_and_column_a_run_writes_is_documented(setup):
    """docs/metrics.md defines every variable, coordinate and attribute of evaluation.nc and
    every column of the run's CSVs; a new one fails here until it is documented."""
    import pandas as pd

    import sage_nn

    root, model = setup
    result = run(config(root, "a"), model=model, progress=False)
    doc = documented_names()
    ds = sage_nn.open_run(result.run_dir).results
    names = [*ds.data_vars, *ds.coords, *ds.attrs]
    for path in (result.run_dir / "discovery" / "cross_sections.csv",
                 result.report / "comparison.csv"):
        names += list(pd.read_csv(path).columns)
    assert len(names) > 60
    assert undocumented(names, doc) == []
    # the check can fail: a name the docs do not have is caught
    assert undocumented(["edit_auc_low", "sufficiency_gap", "best_f1_above_random_sae",
                         "made_up_metric", "made_up_metric_low"], doc) == [
        "made_up_metric", "made_up_metric_low"]


def test_trained_saes_beside_given_ones_train_where_the_given_ones_serve(setup, tmp_path):
    """``--sae train:topk --sae DIR`` with DIR a sae_lens SAE at ``blocks.1.hook_resid_pre``:
    every --sae must serve every cross-section site, so discovery searches layer 1's heads
    (what DIR serves) and the trained SAEs are trained there, not wherever the effect is
    largest (which stopped the run: "cannot serve cross-section site L0...")."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    root, model = setup
    TopKSAE(TopKSAEConfig(d_in=model.config.hidden_size, d_sae=64, k=8, metadata=SAEMetadata(
        hook_name="blocks.1.hook_resid_pre"))).save_model(tmp_path / "given")
    both = run(dataclasses.replace(config(root, "both", saes=["train:topk", str(tmp_path /
                                                                       "given")]),
                                   n_boot=20, ks=[1]), model=model, progress=False)
    sites = [p.split("@")[0] for pairs in both.cross_sections.values() for p in pairs]
    assert sites and all(s.startswith("L1.") for s in sites), sites
    listing = json.loads((both.run_dir / "saes.json").read_text())
    assert listing["topk-64"]["sites"] == ["L1.resid_pre"]
    assert listing["given"]["sites"] == ["blocks.1.hook_resid_pre"]
    assert {"topk-64", "given"} <= set(both.results.dictionary.values)
    # each SAEBench JSON states what is known of its SAE: the run's training settings only
    # for the SAE the run trained; the given one's own shape, and no training record
    docs = {d["eval_result_unstructured"]["sae"]: d for d in (
        json.loads(p.read_text()) for p in both.report.glob("*_eval_results.json"))}
    given, trained = docs["given"], docs["topk-64"]
    assert not {"sae_width", "sae_steps", "sae_corpus", "sae_task_prompts"} & \
        set(given["eval_config"])
    assert given["eval_config"]["task"] == str(root / "tiny.yaml")
    assert (given["sae_cfg_dict"]["d_sae"], given["sae_cfg_dict"]["k"]) == (64, 8)
    assert "training" not in given["sae_cfg_dict"]
    assert trained["eval_config"]["sae_width"] == 64 and "training" in trained["sae_cfg_dict"]
