"""The release path: ``sage run --sae RELEASE:ID_GLOB`` on SAEs sae_lens loads itself.

No mock: real sae_lens SAEs (random weights, for a tiny llama saved as a HuggingFace
folder) are written into a HuggingFace-hub cache layout (``models--ORG--REPO/snapshots/SHA``,
``refs/main``) under a release of a registry file named by ``$SAGE_NN_SAE_REGISTRY``, and a
``sage`` process with ``HF_HUB_OFFLINE=1`` loads them through ``SAE.from_pretrained``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_TASK
from sage_nn import open_run, tiny_random_model
from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.specs import discovery_restriction
from sage_nn.dictionaries.serving import served_sites

REPO = "sage-test/tiny-res"
SHA = "0123456789abcdef0123456789abcdef01234567"
RELEASE = "tiny-res"
# id -> (architecture, extra config): one of each kind a release may hold
SAES = {"blocks.0.hook_resid_pre": ("standard", {}),
        "blocks.0.hook_resid_post": ("jumprelu", {}),
        "blocks.1.hook_resid_pre": ("topk", {"k": 4}),
        "blocks.1.hook_resid_post": ("standard", {})}


def _sae(arch: str, extra: dict, d_in: int, hook: str, seed: int):
    from sae_lens import (JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                          TopKSAE, TopKSAEConfig)

    cls, cfg_cls = {"standard": (StandardSAE, StandardSAEConfig),
                    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
                    "topk": (TopKSAE, TopKSAEConfig)}[arch]
    cfg = cfg_cls(d_in=d_in, d_sae=48, **extra)
    cfg.metadata.hook_name = hook
    torch.manual_seed(seed)
    sae = cls(cfg)
    with torch.no_grad():  # random, not sae_lens's zero biases: every latent behaves
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if name.startswith("b_") else 0.3))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
    return sae


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny llama as a HF folder, the tiny task, and a sae_lens release of 4 SAEs in a
    HF-hub cache under ``hf/``, registered in ``registry.yaml``."""
    root = tmp_path_factory.mktemp("release")
    model = tiny_random_model("llama", seed=0)
    model._module.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "tiny.yaml").write_text(TINY_TASK)
    repo = root / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    entries = []
    for i, (sae_id, (arch, extra)) in enumerate(SAES.items()):
        folder = f"saes/{sae_id}"
        _sae(arch, extra, model.config.hidden_size, sae_id, i).save_model(
            repo / "snapshots" / SHA / folder)
        entries.append(f"    - {{id: {sae_id}, path: {folder}}}")
    (root / "registry.yaml").write_text(
        f"{RELEASE}:\n  repo_id: {REPO}\n  model: tiny-llama\n  conversion_func: null\n"
        "  saes:\n" + "\n".join(entries) + "\n")
    return root


def _env(root) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
            "HF_HUB_CACHE": str(root / "hf" / "hub"),
            "SAGE_NN_SAE_REGISTRY": str(root / "registry.yaml"),
            "SAGE_NN_CACHE": str(root / "cache")}


@pytest.fixture
def offline_release(release, monkeypatch):
    """This process sees the release too (for validate, without a subprocess)."""
    import huggingface_hub.constants

    for key, value in _env(release).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(release / "hf" / "hub"))
    return release


def test_sites_served_by_residual_saes():
    # blocks.4.hook_resid_post is L5.resid_pre: it feeds layer 5's heads and attention
    served = served_sites(["blocks.4.hook_resid_post"], n_layers=8, parallel=False)
    assert {(5, "z"), (5, "q"), (5, "attn_out"), (5, "resid_pre"), (4, "resid_post")} <= served
    assert (5, "mlp_out") not in served and (4, "z") not in served
    assert (5, "mlp_out") in served_sites(["L5.resid_pre"], 8, parallel=True)
    assert served_sites(["L5.resid_mid"], 8, parallel=False) == {(5, "resid_mid"), (5, "mlp_out")}
    assert served_sites(["blocks.7.hook_resid_post"], 8, False) == {(7, "resid_post")}
    diff = served_sites(["L5.resid_pre", "L5.resid_mid", "L6.resid_pre"], 8, False, "difference")
    assert {(5, "attn_out"), (5, "mlp_out")} <= diff and (5, "z") not in diff
    # every --sae must serve each cross-section site: the layers all of them serve
    config = RunConfig(saes=["L3.resid_pre", "L5.resid_pre"])
    sites = {"L3.resid_pre": ["L3.resid_pre", "L5.resid_pre"], "L5.resid_pre": ["L5.resid_pre"]}
    assert discovery_restriction(config, 8, False, sites) == ([5], ["z"])
    assert discovery_restriction(RunConfig(saes=["train:topk", "x"]), 8, False) is None


def test_kinds_no_sae_serves_are_named_with_the_sae_that_would_serve_them(tmp_path, caplog):
    """``--select-kinds z mlp_out`` with an SAE at one layer's resid_pre: mlp_out is dropped,
    and the run says so, naming the SAE that would serve it (resid_mid of that layer)."""
    from sage_nn.pipeline.stages import served_restriction

    def sae_dir(hook):
        path = tmp_path / hook
        path.mkdir()
        (path / "cfg.json").write_text(json.dumps({"d_in": 32, "d_sae": 48,
                                                   "metadata": {"hook_name": hook}}))
        return str(path)

    model = tiny_random_model("llama", seed=0)
    pre = sae_dir("blocks.1.hook_resid_pre")
    with caplog.at_level("INFO", logger="sage_nn"):
        found = served_restriction(RunConfig(saes=[pre], select_kinds=["z", "mlp_out"]), model)
    assert found == ([1], ["z"])
    assert caplog.messages == [
        "discovery restricted to what the SAEs serve: layers [1], kinds ['z']",
        "--select-kinds z mlp_out: no --sae serves mlp_out, so cross-sections hold only z "
        "(layers [1]); mlp_out needs an SAE at blocks.L.hook_resid_mid for each layer L it "
        "should cover (e.g. blocks.1.hook_resid_mid); fix: add --sae with such SAEs, or leave "
        "mlp_out out of --select-kinds"]
    assert caplog.records[-1].levelname == "WARNING"
    caplog.clear()  # with that SAE added (in the same --sae folder of SAEs), nothing drops
    both = tmp_path / "both"
    both.mkdir()
    for hook in ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"):
        (both / hook).mkdir()
        (both / hook / "cfg.json").write_text((tmp_path / "blocks.1.hook_resid_pre" /
                                               "cfg.json").read_text())
    with caplog.at_level("INFO", logger="sage_nn"):
        found = served_restriction(RunConfig(saes=[str(both)], select_kinds=["z", "mlp_out"]), model)
    assert found == ([1], ["z", "mlp_out"]) and len(caplog.messages) == 1, caplog.messages


def test_release_globs_and_unservable_runs_fail_before_the_model_loads(offline_release):
    from sage_nn.dictionaries.releases import expand, hook_names
    from sage_nn.pipeline.validate import validate

    root = offline_release
    assert expand(f"{RELEASE}:blocks.*.hook_resid_post") == (
        RELEASE, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert hook_names(f"{RELEASE}:blocks.0.*")["blocks.0.hook_resid_pre"] == \
        "blocks.0.hook_resid_pre"
    base = dict(model=str(root / "model"), task=str(root / "tiny.yaml"), n_fit=24, n_eval=16,
                run_dir=str(root / "runs" / "unused"))
    assert validate(RunConfig(saes=[f"{RELEASE}:blocks.*"], **base)) == []
    # the top layer's resid_post feeds no head: nothing a cross-section may hold (z)
    problems = validate(RunConfig(saes=[f"{RELEASE}:blocks.1.hook_resid_post"], **base))
    assert len(problems) == 1 and "serve no cross-section site" in problems[0], problems
    assert "fix:" in problems[0] and "\n" not in problems[0]
    # ... but it is one with the residual stream selectable
    assert validate(RunConfig(saes=[f"{RELEASE}:blocks.1.hook_resid_post"],
                              select_kinds=["resid_post"], **base)) == []
    # two SAEs that serve different layers have no cross-section site in common
    problems = validate(RunConfig(saes=[f"{RELEASE}:blocks.0.hook_resid_pre",
                                        f"{RELEASE}:blocks.1.hook_resid_pre"], **base))
    assert any("serve no cross-section site" in p for p in problems), problems
    problems = validate(RunConfig(saes=[f"{RELEASE}:blocks.9.*"], **base))
    assert any("has no SAE id matching" in p for p in problems), problems
    problems = validate(RunConfig(saes=["no-such-release:x"], **base))
    assert any("unknown sae_lens release" in p for p in problems), problems
    # not in the HF cache while offline: said before anything loads
    (root / "hf2" / "hub").mkdir(parents=True, exist_ok=True)
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_CACHE = str(root / "hf2" / "hub")
    problems = validate(RunConfig(saes=[f"{RELEASE}:blocks.0.hook_resid_post"], **base))
    assert any("HF_HUB_OFFLINE=1" in p and "HF cache" in p for p in problems), problems


def test_sage_run_on_a_release_glob_offline_through_sae_lens(release):
    """``sage run --sae RELEASE:GLOB --sae RELEASE:ID`` in a fresh offline process: the
    SAEs load through sae_lens's SAE.from_pretrained from the HF cache, discovery only
    searches layer 1 (the one layer both serve), and the run finishes with both SAEs."""
    run_dir = release / "runs" / "glob"
    argv = [sys.executable, "-m", "sage_nn.cli", "run", "--model", str(release / "model"),
            "--task", str(release / "tiny.yaml"),
            "--sae", f"{RELEASE}:blocks.*.hook_resid_post", f"{RELEASE}:blocks.1.hook_resid_pre",
            "--run-dir", str(run_dir), "--n-fit", "24", "--n-eval", "16",
            "--n-discovery", "16", "--top-k", "2", "--n-boot", "50", "--ks", "1", "2",
            "--batch-size", "16", "--attributes", "io"]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(release), timeout=900)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    run = open_run(run_dir)
    names = [str(d) for d in run.results.dictionary.values]
    assert "blocks.*.hook_resid_post" in names and "blocks.1.hook_resid_pre" in names
    assert "random:blocks.*.hook_resid_post" in names
    assert all(s.startswith("L1.") for s in run.cross_sections["io"]), run.cross_sections
    # attribution scores every layer (so a report can say where an effect lies); only the
    # cross-sections are restricted to what the SAEs serve
    assert set(run.discovery.scores.layer.values) == {0, 1}
    saes = json.loads((run_dir / "saes.json").read_text())
    glob = saes["blocks.*.hook_resid_post"]
    # of the glob's two SAEs only blocks.0.hook_resid_post (= L1.resid_pre) is needed
    assert glob["n_saes"] == 1 and glob["sites"] == ["blocks.0.hook_resid_post"], glob
    assert glob["sae_cfg_dict"]["hook_name"] == "blocks.0.hook_resid_post", glob
    assert glob["sae_lens_ids"] == ["blocks.0.hook_resid_post"], glob
    assert glob["sae_cfg_dict"]["architecture"] == "jumprelu"
    # the JumpReLU SAE's floor keeps its L0 (matched on the fit prompts)
    l0 = run.results.l0.sel(attribute="io")
    sae_l0 = float(l0.sel(dictionary="blocks.*.hook_resid_post").mean())
    assert sae_l0 > 0 and abs(float(l0.sel(dictionary="random:blocks.*.hook_resid_post")
                                     .mean()) - sae_l0) <= 0.25 * sae_l0, l0.values
    assert saes["blocks.1.hook_resid_pre"]["sae_cfg_dict"]["hook_name"] == \
        "blocks.1.hook_resid_pre"
    assert (run.report_dir /
            "tiny-res_blocks.1.hook_resid_pre_eval_results.json").exists(), \
        sorted(p.name for p in run.report_dir.iterdir())
    assert "SAE.from_pretrained" not in done.stderr  # loaded, not failed over


def test_unservable_release_run_fails_with_one_line(release):
    argv = [sys.executable, "-m", "sage_nn.cli", "run", "--model", str(release / "model"),
            "--task", str(release / "tiny.yaml"), "--sae", f"{RELEASE}:blocks.1.hook_resid_post",
            "--run-dir", str(release / "runs" / "bad"), "--n-fit", "24", "--n-eval", "16"]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(release), timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "serve no cross-section site" in done.stderr and "fix:" in done.stderr
    assert not (release / "runs" / "bad" / "task.json").exists()
