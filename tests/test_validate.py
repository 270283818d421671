"""Every input a run needs is checked before the first forward: one line per problem, each
naming the problem and its fix, all at once, in seconds, from run() and from the CLI."""

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from conftest import TINY_TASK
from sage_nn import tiny_random_model
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.stages import run
from sage_nn.tasks.datasets import load_task
from sage_nn.pipeline.validate import InvalidRunError, check, validate
from sage_nn.pipeline.checks import model_problems

# A valid task too small for the default sizes: 7 names, IO != S, 2 train templates (one
# more held out) make 7 * 6 * 2 = 84 distinct train prompts, fewer than 96 + 96.
SMALL_TASK = """
name: small
vocab:
  names: [Mary, John, Alice, Bob, Tom, Anna, he]
slots: {IO: names, S: names}
distinct: [[IO, S]]
templates:
  - id: went
    text: "when {IO} and {S} went to the store , {S} gave a ball to"
  - id: then
    text: "then {IO} and {S} went to the park , {S} said it to"
  - id: held
    text: "after {IO} and {S} went to the school , {S} gave a book to"
attributes:
  io: {slot: IO}
  s: {slot: S}
answer: " {IO}"
distractor: " {S}"
positions:
  IO: {slot: IO}
  S2: {slot: S, occurrence: 2}
  END: last
split:
  test_templates: [held]
"""


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", seed=0)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_TASK)
    return path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{fn.__name__}: {seconds:.2f} s")
    return out, seconds


def one_line_with_fix(problems):
    assert problems
    for p in problems:
        assert "\n" not in p and "; fix: " in p, p


def test_the_small_task_counts_its_prompts_and_never_repeats_them(small, model):
    spec = load_task(small)
    assert spec.count_prompts(model, "train") == 7 * 6 * 2
    assert spec.count_prompts(model, "test") == 7 * 6
    assert spec.count_prompts(model, "train", cap=10) == 10
    ds = spec.build(model, n=84, seed=0, split="train", unique=True)
    assert len(set(ds.prompts)) == 84  # every prompt the split can make, once
    with pytest.raises(ValueError, match="the train split makes 84 distinct prompts, fewer "
                                         "than the 85 asked for"):
        spec.build(model, n=85, seed=0, split="train", unique=True)


def test_fit_and_eval_prompts_never_overlap(tmp_path, model):
    from sage_nn.pipeline.config import run_prompts

    (tmp_path / "tiny.yaml").write_text(TINY_TASK)  # 90 train prompts: repeats were likely
    cfg = RunConfig(task=str(tmp_path / "tiny.yaml"), n_fit=50, n_eval=40)
    full, fit, held_out = run_prompts(model, cfg)
    assert len(set(full.prompts)) == 90
    assert not set(fit.prompts) & set(held_out.prompts)


def test_a_task_too_small_for_the_run_is_refused_with_the_numbers(small, model, tmp_path):
    cfg = RunConfig(task=str(small), run_dir=str(tmp_path / "run"))
    problems, seconds = timed(validate, cfg, model=model)
    assert problems == [
        "task small makes 84 distinct train prompts, fewer than n_fit + n_eval = 96 + 96 = "
        "192, so fit and eval would repeat prompts; fix: n_fit + n_eval <= 84 (e.g. "
        "n_fit=42, n_eval=42), or add vocabulary values or templates"]
    assert seconds < 10
    # sizes that fit leave the task corpus 84 - 60 prompts (fewer: counterfactuals are
    # left out too), under one training batch of the named positions
    (problem,) = validate(dataclasses.replace(cfg, n_fit=40, n_eval=20), model=model)
    assert problem.startswith("sae_corpus 'task@positions' holds ") and \
        "less than one training batch (1024 tokens)" in problem and \
        "fix: sae_corpus='builtin'" in problem, problem
    (problem,) = validate(dataclasses.replace(cfg, n_fit=50, n_eval=34), model=model)
    assert problem.startswith("sae_corpus 'task@positions' is empty: every distinct prompt "
                              "of task small is among the 50 + 34 fit and eval prompts"), problem
    assert validate(dataclasses.replace(cfg, n_fit=50, n_eval=34, sae_corpus="builtin"),
                    model=model) == []
    # run() stops before it writes anything
    with pytest.raises(InvalidRunError, match="makes 84 distinct train prompts"):
        run(cfg, model=model, progress=False)
    assert not (tmp_path / "run").exists()


def bad_inputs(tmp_path):
    """One bad value per field the user may get wrong, and the start of its message."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    sae_no_cfg = tmp_path / "empty_sae"
    sae_no_cfg.mkdir()
    sae_bad_json = tmp_path / "bad_sae"
    sae_bad_json.mkdir()
    (sae_bad_json / "cfg.json").write_text("{not json")
    sae_wide = tmp_path / "wide_sae"
    sae_wide.mkdir()
    (sae_wide / "cfg.json").write_text(json.dumps(
        {"architecture": "topk", "d_in": 999, "d_sae": 8, "k": 2,
         "metadata": {"hook_name": "blocks.0.hook_resid_pre"}}))
    (sae_wide / "sae_weights.safetensors").write_bytes(b"")
    no_model_dir = tmp_path / "no_model"
    no_model_dir.mkdir()
    return {
        "n_fit": (0, "n_fit=0: must be a positive integer"),
        "n_eval": (-3, "n_eval=-3: must be a positive integer"),
        "ks": ([1, 0], "ks=[1, 0]: must be a non-empty list of positive integers"),
        "target": (1.5, "target=1.5: must be a share of the effect in (0, 1]"),
        "max_sites": (0, "max_sites=0: must be a positive integer"),
        "top_k": (-1, "top_k=-1: must be a positive integer or None"),
        "reconstruction": ("inptu", "reconstruction='inptu': unknown mode"),
        "select_kinds": (["zz"], "select_kinds=['zz']: unknown kind(s) ['zz']"),
        "sae_corpus": ("/no/corpus.txt", "sae_corpus part '/no/corpus.txt': no such file"),
        "remote": ("ndfi", "remote='ndfi': unknown"),
        "remote_transport": ("float16", "remote_transport='float16': unknown dtype; fix: "
                                        "'float32' or 'bfloat16'"),
        "dtype": ("float8", "dtype='float8': unknown"),
        "model": ("/no/model", "model '/no/model': no such file or directory, and not a hub id"),
        "model_dir": (str(no_model_dir), f"model '{no_model_dir}': not a HuggingFace model "
                                         "directory (no config.json)"),
        "hub_id": ("someorg/some-model", "model 'someorg/some-model': a hub id, but the hub "
                                         "is disabled (HF_HUB_OFFLINE=1)"),
        "task": ("no-such-task", "task='no-such-task': no task 'no-such-task'"),
        "attributes": (["io", "nope"], "attribute 'nope' is not an attribute of task"),
        "run_dir": (str(not_a_dir / "run"), f"run_dir '{not_a_dir / 'run'}': {not_a_dir} is "
                                            "not writable"),
        "sae_path": ("/no/sae", "--sae '/no/sae': no such directory"),
        "sae_arch": ("train:relu", "--sae 'train:relu': cannot train architecture 'relu'"),
        "sae_no_cfg": (str(sae_no_cfg), f"--sae '{sae_no_cfg}': the directory holds no "
                                        "cfg.json"),
        "sae_bad_json": (str(sae_bad_json), f"--sae '{sae_bad_json}': cfg.json is not readable"),
        "sae_width": (str(sae_wide), f"--sae '{sae_wide}': width d_in=999 does not fit site "
                                     "L0.resid_pre"),
        "sae_release": ("no-such-release:x", "--sae 'no-such-release:x': unknown sae_lens "
                                             "release"),
        "sae_id": ("gpt2-small-res-jb:nope", "--sae 'gpt2-small-res-jb:nope': release "
                                             "'gpt2-small-res-jb' has no SAE 'nope'"),
        "sae_offline": ("gpt2-small-res-jb:blocks.0.hook_resid_pre",
                        "--sae 'gpt2-small-res-jb:blocks.0.hook_resid_pre': the hub is "
                        "disabled (HF_HUB_OFFLINE=1) and the HF cache does not hold"),
    }


def config_with(tmp_path, key, value):
    cfg = RunConfig(task="ioi", run_dir=str(tmp_path / "run"), saes=["train:topk"],
                    sae_corpus="builtin")
    if key in ("model_dir", "hub_id"):
        key = "model"
    if key.startswith("sae_") and key != "sae_corpus":
        return dataclasses.replace(cfg, saes=[value])
    return dataclasses.replace(cfg, **{key: value})


def test_each_bad_input_gets_its_one_line_message(tmp_path, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key, (value, start) in bad_inputs(tmp_path).items():
        cfg = config_with(tmp_path, key, value)
        # the tiny model stands in for config.model, except where the model is the input
        problems = validate(cfg, model=None if key in ("model", "model_dir", "hub_id")
                            else model)
        one_line_with_fix(problems)
        assert any(p.startswith(start) for p in problems), (key, problems)


def test_every_problem_is_reported_at_once_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = bad_inputs(tmp_path)
    cfg = RunConfig(model="/no/model", task=str(tmp_path / "missing.yaml"),
                    saes=["/no/sae", "train:relu", "no-such-release:x"], n_fit=0, ks=[0],
                    target=0, reconstruction="inptu", sae_corpus="/no/corpus.txt",
                    remote="ndfi", run_dir=cases["run_dir"][0])
    with pytest.raises(InvalidRunError) as err:
        _, seconds = timed(check, cfg)
    problems = err.value.problems
    one_line_with_fix(problems)
    starts = ["n_fit=0", "ks=[0]", "target=0", "reconstruction='inptu'", "remote='ndfi'",
              "model '/no/model'", "--sae '/no/sae'", "--sae 'train:relu'",
              "--sae 'no-such-release:x'", "sae_corpus part '/no/corpus.txt'",
              f"run_dir '{cfg.run_dir}'", f"task='{cfg.task}'"]
    assert [next(p for p in problems if p.startswith(s)) for s in starts]
    assert len(problems) == len(starts), problems
    start = time.perf_counter()
    with pytest.raises(InvalidRunError):
        run(cfg, progress=False)  # the same, from run(), before the model loads
    seconds = time.perf_counter() - start
    print(f"run() refused {len(problems)} problems in {seconds:.2f} s")
    assert seconds < 10


def test_a_good_config_passes_and_the_default_is_checked_quickly(tmp_path, model):
    (tmp_path / "tiny.yaml").write_text(TINY_TASK)
    cfg = RunConfig(task=str(tmp_path / "tiny.yaml"), run_dir=str(tmp_path / "run"),
                    n_fit=24, n_eval=16, saes=["train:topk", "train:topk@sites"],
                    sae_corpus="builtin")
    assert validate(cfg, model=model) == []
    problems, seconds = timed(validate, RunConfig(run_dir=str(tmp_path / "default")))
    assert problems == [] and seconds < 10
    assert model_problems("smollm2-135m") == []


def test_the_cli_prints_one_line_per_problem_and_exits_2(tmp_path):
    env_cmd = [sys.executable, "-m", "sage_nn.cli"]
    start = time.perf_counter()
    out = subprocess.run(env_cmd + ["run", "--sae", "/no/sae", "--model", "/no/model",
                                    "--n-fit", "0", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=_offline_env())
    seconds = time.perf_counter() - start
    print(f"sage run refused in {seconds:.1f} s (Python start and imports included)")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines == [
        "sage run: error: n_fit=0: must be a positive integer; fix: e.g. n_fit=96 (prompts "
        "to fit dictionaries on)",
        "sage run: error: model '/no/model': no such file or directory, and not a hub id "
        "(org/name); fix: check the path, or give 'smollm2-135m' or a hub id",
        "sage run: error: --sae '/no/sae': no such directory; fix: give an SAE directory, "
        "'train:ARCH' (topk, standard, batchtopk, matryoshka_batchtopk, jumprelu, gated; "
        "optionally '@sites'), or 'RELEASE:SAE_ID'"]
    out = subprocess.run(env_cmd + ["task-check", "--model", "someorg/some-model", "--task",
                                    "ioi"], capture_output=True, text=True, env=_offline_env())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("sage task-check: error: model 'someorg/some-model': a hub "
                                 "id, but the hub is disabled"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _offline_env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}
