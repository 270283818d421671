"""Conformance with the real NDIF server: the ``ndif`` package's own server code, brought up
on this machine by ``scripts/ndif/local_ndif.py`` (Python 3.12, its own environment), and
this Python (3.11) as the client.

A small pipeline (IOI ``io`` on SmolLM2: the task, discovery on heads, evaluation with a
residual SAE through the reconstruction and SAEs at the heads) runs trusted (in the model's
process) and sandboxed (in a runner holding a meta copy of the model, where no backward pass
runs), and its numbers equal the local run's. The server's model is left as it was found,
a failing request says which stage and request failed, and a job submitted without waiting
is collected later. ``.ci/run`` sets the server's environment up (``local_ndif.py setup``);
without it these tests are skipped with that fix.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "ndif" / "local_ndif.py"
# Discovery on 2 prompts (one of each IOI order, 17 and 14 tokens: padded): in the sandbox
# every head of every layer is patched exactly, at each prompt and position, which costs
# about 30 s a prompt on 2 CPU cores; the comparison needs the path, not the prompts.
SETTINGS = dict(task="ioi", attributes=["io"], n_fit=16, n_eval=16, n_discovery=2,
                discovery_kinds=["z"], ks=[1, 2], n_boot=20, batch_size=16, seed=0,
                control_seeds=1)  # one seed of each control: the numbers, not the spread
LAYER = 29  # the residual SAE's and the head SAEs' layer: discovery searches its heads


def _local_ndif(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def server():
    status = json.loads(_local_ndif("status").stdout)
    if not Path(status["home"], "venv", "bin", "python").exists():
        pytest.skip(f"no NDIF environment at {status['home']}: run "
                    f"`python {SCRIPT.relative_to(ROOT)} setup` (.ci/run does)")
    started = not status["api"]
    if started:
        up = _local_ndif("up")
        assert up.returncode == 0, up.stdout + up.stderr
    yield status["url"]
    if started:
        _local_ndif("down")


def _random_sae(d_in: int, d_sae: int, hook: str, seed: int, directory: Path) -> None:
    """A sae_lens TopK SAE with its own random weights (seeded), saved as sae_lens saves."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=16,
                                metadata=SAEMetadata(hook_name=hook)))
    sae.save_model(str(directory))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The embedded model's directory (the server loads it from there: it shares this
    host), and two SAE sets: a residual SAE at the layer's input, and SAEs at its heads."""
    from sage_nn.model.loading import smollm2_dir

    root = tmp_path_factory.mktemp("ndif")
    for name, d_in, sites in (("residual", 576, [f"L{LAYER}.resid_pre"]),
                              ("heads", 64, [f"L{LAYER}.z.h{h}" for h in range(9)])):
        for i, site in enumerate(sites):
            _random_sae(d_in, 256, site, seed=i, directory=root / name / site)
    return root, str(smollm2_dir())


def _config(root, model, name, remote):
    from sage_nn.pipeline.config import RunConfig

    return RunConfig(model=model, run_dir=str(root / name), remote=remote,
                     saes=[str(root / "residual")], **SETTINGS)


@pytest.fixture(scope="module")
def here(setup):
    """The model loaded here from the server's directory, once: the local reference runs
    share it."""
    from sage_nn.model.loading import load_model

    return load_model(setup[1])


@pytest.fixture(scope="module")
def local(setup, here):
    from sage_nn.pipeline.stages import run

    root, model = setup
    return run(_config(root, model, "local", False), model=here, progress=False)


@pytest.fixture(scope="module")
def remote_runs(server, setup):
    """The same run on the server, trusted and sandboxed (each its own run directory)."""
    from sage_nn.model.remote import Remote
    from sage_nn.pipeline.stages import run

    root, model = setup
    return {name: run(_config(root, model, name, server), remote=Remote(server, trusted=trusted),
                      progress=False)
            for name, trusted in (("trusted", True), ("sandboxed", False))}


@pytest.mark.parametrize("name", ["trusted", "sandboxed"])
def test_every_stage_on_the_real_server_gives_the_local_numbers(setup, local, remote_runs, name):
    from sage_nn.discovery.attribution import load_scores

    root, _ = setup
    there = remote_runs[name]
    # the sandbox ranks candidates by exact patching, not by attribution: the same heads
    # may come in another order
    assert sorted(there.cross_sections["io"]) == sorted(local.cross_sections["io"])
    assert all(str(p).startswith(f"L{LAYER}.z.") for p in there.cross_sections["io"])
    xr.testing.assert_allclose(there.results.sortby("pair"), local.results.sortby("pair"),
                               rtol=1e-5, atol=1e-5)
    assert np.isfinite(local.results.fvu.sel(dictionary="residual")).all()  # numbers, not NaN
    method = load_scores(root / name / "discovery" / "scores.nc").attrs["method"]
    # no backward pass runs in NDIF's sandbox: there every head was patched exactly
    assert method.startswith("exact") == (name == "sandboxed")
    logged = [json.loads(line) for line in (root / name / "requests.jsonl").open()]
    requests = [r for r in logged if r["type"] == "request"]
    assert {r["stage"] for r in requests} == {"task", "discovery", "evaluation"}
    for r in requests:  # what crossed the wire, as the server saw it
        assert r["wire_up"] > 0 and r["wire_down"] > 0 and r["seconds"] > 0, r


@pytest.fixture(scope="module")
def heads(setup, local, here):
    """The run's cross-section evaluated with the residual SAE through the reconstruction
    and SAEs at the heads themselves: the evaluation, and its numbers here (computed once,
    the reference of both modes)."""
    from sage_nn.dictionaries.training import load_trained
    from sage_nn.evaluation.coders import CrossSection, DirectSAE, ReconstructedSAE
    from sage_nn.evaluation.scoring import evaluate_cross_section
    from sage_nn.model.sites import Site
    from sage_nn.pipeline.config import run_prompts

    root, path = setup
    pairs = [(Site.parse(p.split("@")[0]), p.split("@")[1]) for p in local.cross_sections["io"]]
    _, fit, test = run_prompts(here, _config(root, path, "heads", False))

    def evaluate(model, remote):
        saes = {"residual": ReconstructedSAE(list(load_trained(root / "residual", model).values())),
                "heads": DirectSAE(list(load_trained(root / "heads", model).values()))}
        return evaluate_cross_section(model, fit, test, CrossSection("io", pairs), saes,
                                      ks=[1, 2], n_boot=20, control_seeds=1, remote=remote)

    return evaluate, evaluate(here, None)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "sandboxed"])
def test_saes_at_the_heads_beside_the_residual_sae_give_the_local_numbers(server, setup, heads,
                                                                          trusted):
    """The heads fixture's evaluation on the server, in one read, then the patches (with
    the controls, two requests under NDIF's 1 MiB), gives its local numbers."""
    from sage_nn.model.loading import load_model
    from sage_nn.model.remote import Remote

    evaluate, local_numbers = heads
    remote = Remote(server, trusted=trusted)
    there = evaluate(load_model(setup[1], remote=True), remote)
    xr.testing.assert_allclose(there, local_numbers, rtol=1e-5, atol=1e-5)
    assert np.isfinite(there.fvu.sel(dictionary="heads")).all()
    kernels = [r.kernel for r in remote.requests]  # the patches split under NDIF's limit
    assert kernels[0] == "read" and set(kernels[1:]) == {"patch"} and len(kernels) <= 3, kernels
    assert all(r.up <= remote.max_request_bytes for r in remote.requests)


def test_the_servers_model_is_left_as_it_was_found(server, setup, remote_runs):
    """After the runs, nothing of sage_nn's is on the server's model, and its attention
    runs as it did (sage_nn reads the pattern without switching it to eager)."""
    import nnsight

    from sage_nn.model.loading import load_model
    from sage_nn.model.servers import NDIFBackend

    model = load_model(setup[1], remote=True)
    with model.session(backend=NDIFBackend(model.to_model_key(), host=server, trusted=True)):
        hf = model._module  # the server's own model: a trusted request runs beside it
        found = {"left": sorted(f"{n}.{a}" for n, m in hf.named_modules() for a in vars(m)
                                if "sage" in a.lower()),
                 "attention": hf.config._attn_implementation}
        nnsight.save(found)
    assert found["attention"] == "sdpa"
    assert found["left"] == []


def test_a_failing_request_names_its_stage_and_request(server, setup):
    from sage_nn.model.loading import load_model
    from sage_nn.model.remote import Remote, RemoteRequestError, run_kernel

    def broken(model, arch, inputs):
        with model.trace(inputs):
            hidden = model.model.layers[0].output
            hidden.save()
        raise ValueError(f"a kernel that fails on the server, {tuple(hidden.shape)}")

    model = load_model(setup[1], remote=True)
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3).long()}
    remote = Remote(server, trusted=True, stage="evaluation")
    with pytest.raises(RemoteRequestError, match=r"^evaluation: request 1 \(broken, 1 prompts\) "
                       r"failed on the server: ValueError: a kernel that fails on the server, "
                       r"\(1, 3, 576\)$"):
        list(run_kernel(model, broken, [(inputs,)], remote))


def test_a_job_submitted_without_waiting_is_collected_later(server, setup, here, tmp_path):
    import time

    from sage_nn.model.loading import load_model
    from sage_nn.model.patching import run_patched
    from sage_nn.model.remote import Remote, RemotePending
    from sage_nn.tasks.datasets import load_task

    model = load_model(setup[1], remote=True)
    data = load_task("ioi").build(model, n=8, seed=1, split="train")
    local = run_patched(here, data, [[]]).logit_diff.values
    remote = Remote(server, trusted=True, blocking=False, jobs=tmp_path / "jobs.json")
    with pytest.raises(RemotePending):
        run_patched(model, data, [[]], remote=remote)
    job = next(iter(json.loads((tmp_path / "jobs.json").read_text()).values()))
    for _ in range(120):  # the same call collects once the job has finished
        try:
            out = run_patched(model, data, [[]], remote=remote)
            break
        except RemotePending as pending:
            assert pending.job_ids == [job]  # collected, never resubmitted
            time.sleep(1)
    np.testing.assert_allclose(out.logit_diff.values, local, rtol=1e-5, atol=1e-5)
