"""The ``sage`` command: a flag per RunConfig field, --remote wherever the model runs,
``sage tasks``, ``sage cache``, and a whole ``sage run`` on a tiny model."""

import dataclasses
import subprocess
import sys
import types
import typing

import pytest

from conftest import TINY_TASK, write_tiny_run_files
from sage_nn import open_run, tiny_random_model
from sage_nn.cli import _run_config, _suite_config, build_parser, main
from sage_nn.pipeline.config import RunConfig
from sage_nn.tasks.datasets import available_tasks, load_task


def parse_run(*argv):
    return _run_config(build_parser().parse_args(["run", *argv]))


def _example(name: str, hint):
    """A value of a field's type unlike its default, and its command-line words."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    one = [a for a in typing.get_args(hint) if a is not type(None)][0] if union else hint
    if name == "remote":
        return "http://example.org:5001", ["http://example.org:5001"]
    if typing.get_origin(one) is list:
        item = typing.get_args(one)[0]
        values = [3, 5] if item is int else ["io", "s"]
        return values, [str(v) for v in values]
    if one is bool:
        return False, None  # --no-FLAG
    if one is int:
        return 7, ["7"]
    if one is float:
        return 0.25, ["0.25"]
    return "x-" + name, ["x-" + name]


def test_every_runconfig_field_has_a_flag_that_sets_it():
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        value, words = _example(field.name, hints[field.name])
        flag = "--sae" if field.name == "saes" else "--" + field.name.replace("_", "-")
        argv = [flag.replace("--", "--no-", 1)] if words is None else [flag, *words]
        config = parse_run(*argv)
        assert getattr(config, field.name) == value, (field.name, argv)
        # and nothing else moved off its default
        others = {f.name for f in dataclasses.fields(RunConfig)} - {field.name}
        assert all(getattr(config, n) == getattr(RunConfig(), n) for n in others), argv
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "--sae-width" in help_text and "--n-discovery" in help_text


def test_existing_flag_names_and_the_config_file(tmp_path):
    config = parse_run("--sae", "train:topk", "--sae", "saes/L5", "--discovery-kinds", "z", "q",
                       "--select-kinds", "z", "resid_pre", "--target", "0.8", "--max-sites",
                       "24", "--run-dir", "runs/x", "--top-k", "3")
    assert config.saes == ["train:topk", "saes/L5"]
    assert (config.discovery_kinds, config.select_kinds) == (["z", "q"], ["z", "resid_pre"])
    assert (config.target, config.max_sites, config.run_dir, config.top_k) == \
        (0.8, 24, "runs/x", 3)
    assert parse_run("--sae", "a", "b").saes == ["a", "b"]
    path = tmp_path / "run.yaml"
    path.write_text("task: pronouns\nn_fit: 10\nks: [1, 2]\n")
    config = parse_run("--config", str(path), "--n-fit", "12")
    assert (config.task, config.n_fit, config.ks) == ("pronouns", 12, [1, 2])


def test_suite_defaults_yield_to_flags_and_the_config_file(tmp_path):
    """A suite trains on the mixed corpus for up to 600 steps unless told otherwise."""
    def suite(*argv):
        return _suite_config(build_parser().parse_args(["suite", *argv]))

    assert (suite().sae_corpus, suite().sae_steps) == ("builtin+task@positions", 600)
    assert suite("--sae-steps", "50").sae_steps == 50
    path = tmp_path / "c.yaml"
    path.write_text("sae_corpus: builtin\nsae_steps: 40\n")
    assert (suite("--config", str(path)).sae_corpus, suite("--config", str(path)).sae_steps) \
        == ("builtin", 40)
    assert parse_run().sae_steps == 300  # a run's own default


def test_remote_flag_values():
    assert parse_run().remote is False
    assert parse_run("--remote").remote is True                   # NDIF
    assert parse_run("--remote", "ndif").remote is True
    assert parse_run("--remote", "local").remote == "local"
    assert parse_run("--remote", "https://host:5001").remote == "https://host:5001"
    config = parse_run("--remote", "--no-wait", "--max-prompts-per-request", "64")
    assert (config.remote_blocking, config.max_prompts_per_request) == (False, 64)
    for command in ("discover", "task-check", "collect"):
        action = next(a for a in build_parser()._subparsers._group_actions[0]
                      .choices[command]._actions if a.dest == "remote")
        assert action.const == "ndif", command


def test_sage_tasks_lists_every_task_with_its_attributes():
    out = subprocess.run(["sage", "tasks"], capture_output=True, text=True, check=True).stdout
    assert "greater_than" in out
    for name in available_tasks():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert ", ".join(load_task(name).attribute_names) in line, line


def test_sage_cache_shows_sizes_and_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path))
    (tmp_path / "models" / "m1").mkdir(parents=True)
    (tmp_path / "models" / "m1" / "model.safetensors").write_bytes(b"\0" * 3 * 1024 * 1024)
    sae_dir = tmp_path / "saes" / "m1" / "topk-64-4096-seed0-abc" / "L0.resid_pre"
    sae_dir.mkdir(parents=True)
    (sae_dir / "sae_weights.safetensors").write_bytes(b"\0" * 2048)
    (tmp_path / "saes" / "m1" / "topk-64-4096-seed0-abc.lock").touch()
    main(["cache"])
    out = capsys.readouterr().out
    assert ".lock" not in out
    assert str(tmp_path) in out
    assert "models/m1" in out and "3.0 MB" in out
    assert "saes/m1/topk-64-4096-seed0-abc" in out and "2.0 KB" in out
    main(["cache", "--clear", "saes"])
    assert not (tmp_path / "saes").exists() and (tmp_path / "models" / "m1").exists()
    main(["cache", "--clear"])
    assert not (tmp_path / "models").exists() and tmp_path.exists()  # the root stays
    capsys.readouterr()
    main(["cache"])
    assert "total" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved as a HuggingFace directory, the tiny IOI task and a corpus."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_random_model("llama", seed=0)
    write_tiny_run_files(root, model)
    return root


def test_task_check_and_collect_run_through_remote_local(tiny, tmp_path, capsys):
    """``--remote local`` runs the passes through nnsight's simulation of NDIF: the same
    numbers as here; collect takes hook names as sites."""
    base = ["task-check", "--model", str(tiny / "model"), "--task", str(tiny / "tiny.yaml"),
            "--n", "8", "--split", "train"]
    main(base)
    here = capsys.readouterr().out
    main(base + ["--remote", "local"])
    assert capsys.readouterr().out == here and "clean" in here
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("when Mary and John went to the store , John gave a ball to\n")
    main(["collect", "--model", str(tiny / "model"), "--prompts", str(prompts), "--sites",
          "L0.z.h1", "blocks.1.hook_resid_post", "--out", str(tmp_path / "a.nc"),
          "--last-token", "--remote", "local"])
    out = capsys.readouterr().out
    assert "resid_post" in out and "z " in out


def test_sage_run_end_to_end_from_flags(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    main(["run", "--model", str(tiny / "model"), "--task", str(tiny / "tiny.yaml"),
          "--sae", "train:topk", "--run-dir", str(run_dir), "--n-fit", "24", "--n-eval", "16",
          "--n-discovery", "16", "--top-k", "2", "--n-boot", "50", "--sae-width", "64",
          "--sae-steps", "4", "--ks", "1", "2", "--batch-size", "16",
          "--sae-corpus", str(tiny / "corpus.txt"), "--attributes", "io"])
    out = capsys.readouterr().out
    assert "topk-64" in out and "report:" in out
    run = open_run(run_dir)
    assert run.config.sae_width == 64 and run.config.ks == [1, 2]
    assert list(run.results.attribute.values) == ["io"]
    assert (run.report_dir / "sage_nn_topk-64_eval_results.json").exists()


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sage_nn.cli", "run", "--config",
                           str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert done.returncode == 2 and "sage run: error:" in done.stderr


HEAVY = ("torch", "transformers", "sae_lens", "nnsight", "xarray")


def _imported_by(code: str) -> list[str]:
    """The heavy libraries a fresh ``python -c code`` imported (it prints them)."""
    script = (f"import sys\n{code}\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout.strip().splitlines()[-1])


def test_help_tasks_and_refused_runs_import_no_heavy_library(tmp_path):
    """``sage --help``, ``sage tasks`` and a run refused by validation answer without
    importing torch, transformers, sae_lens or nnsight (seconds on two cores, not 11)."""
    assert _imported_by("import sage_nn, sage_nn.cli") == []
    assert _imported_by("from sage_nn.cli import build_parser\n"
                        "build_parser().format_help()\n"
                        "build_parser()._subparsers._group_actions[0].choices['run']"
                        ".format_help()") == []
    assert _imported_by("from sage_nn.cli import main\nmain(['tasks'])") == []
    refused = (f"from sage_nn.cli import main\ntry:\n    main(['run', '--model', '/no/model', "
               f"'--sae', '/no/sae', '--run-dir', {str(tmp_path / 'run')!r}])\n"
               "except SystemExit as e:\n    assert e.code == 2\n")
    assert _imported_by(refused) == []
    assert not (tmp_path / "run").exists()


def test_the_package_names_load_on_first_use_and_sae_lens_comes_before_any_model():
    import sage_nn

    for name in sage_nn.__all__:
        assert getattr(sage_nn, name) is not None, name
    assert set(sage_nn.__all__) <= set(dir(sage_nn))
    assert sage_nn.pipeline.RunConfig is RunConfig  # submodules as attributes, as before
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        sage_nn.nope
    # a name that can run the model imports sae_lens first (nnsight's .save patch breaks
    # pydantic models imported after a trace: sage_nn/dictionaries/saes.py)
    assert _imported_by("import sage_nn\nsage_nn.load_task") == []
    assert "sae_lens" in _imported_by("import sage_nn\nsage_nn.collect")
    assert "sae_lens" in _imported_by("from sage_nn.model.loading import tiny_random_model\n"
                                      "tiny_random_model()")


def test_a_cold_run_prints_no_python_warning_and_each_sage_warning_once(tiny, tmp_path):
    """A cold ``sage run`` (no SAE cache, no matplotlib font cache) prints its own lines:
    no Python warning with its source line (transformers' FutureWarnings, matplotlib's
    notices), and each of sage_nn's warnings once, in the command line's words. The task
    ties two attributes (``io_again`` is ``io``): the ground truth warns at every site."""
    import os
    import re

    tied = TINY_TASK.replace("  s: {slot: S}\n", "  s: {slot: S}\n  io_again: {slot: IO}\n")
    (tmp_path / "tied.yaml").write_text(tied.replace("name: tiny-ioi", "name: tiny-tied"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAGE_NN_CACHE": str(tmp_path / "cache"),
           "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "sage_nn.cli", "run", "--model", str(tiny / "model"),
         "--task", str(tmp_path / "tied.yaml"), "--sae", "train:topk", "--run-dir",
         str(tmp_path / "run"), "--n-fit", "24", "--n-eval", "16", "--n-discovery", "16",
         "--top-k", "2", "--n-boot", "50", "--sae-width", "64", "--sae-steps", "4", "--ks",
         "1", "2", "--batch-size", "16", "--sae-corpus", str(tiny / "corpus.txt")],
        capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in (done.stdout + done.stderr).replace("\r", "\n").splitlines()
             if line.strip()]
    print("\n".join(line[:200] for line in lines if "it/s]" not in line))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [line for line in lines if re.search(r"\w+Warning: |\.py:\d+", line)]
    assert not [line for line in lines if "fontManager" in line or "deprecated" in line]
    said = [line for line in lines if line.startswith("sage run: warning: ")]
    assert len(said) == len(set(said)), said
    tied_up = [line for line in said if "attributes io, io_again change together" in line]
    assert len(tied_up) == 1 and "fix: more fit prompts (raise --n-fit)" in tied_up[0], said
    for attribute in ("io", "s", "io_again"):  # a random model: every effect is small
        assert sum(f"attribute {attribute!r}: changing it" in line for line in said) == 1
