"""Remote execution, offline: every stage through nnsight's ``remote="local"`` backend and
through :class:`~sage_nn.model.remote.SimulatedServer`, the strict in-process simulation of
an NDIF server, with the local numbers back.

The simulated server runs each request against its own model (the client may hold a
weightless twin on the meta device, as a remote model is held) and enforces what a real
server needs: a request holds only plain data and plain functions (bytecode or a class
shipped by value raises ``ShippedByValueError``), and it leaves the server's model as it
found it (no attribute written, config unchanged). Those rules are tested here too. The
real NDIF server (the ``ndif`` package, ``scripts/ndif/local_ndif.py``), non-blocking jobs
included, is tested in ``tests/test_ndif.py``."""

import json
import logging

import httpx
import nnsight
import numpy as np
import pytest
import torch
import xarray as xr
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteError

from conftest import tiny_task_dataset
from sage_nn import tiny_random_model
from sage_nn.model.activations import collect
from sage_nn.discovery.attribution import AttributionPatching
from sage_nn.discovery.stage import DiscoveryConfig, discover
from sage_nn.discovery.growth import grow_cross_sections
from sage_nn.evaluation.coders import CrossSection, ReconstructedSAE
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.model.patching import Patch, run_patched
from sage_nn.model.reads import read_sites
from sage_nn.model.remote import CODE_ALLOWANCE, Remote, run_kernel
from sage_nn.model.servers import ShippedByValueError, SimulatedServer, WeightReadError
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.model.sites import Site
from sage_nn.tasks.datasets import logit_diffs

SITES = ["L0.resid_post", "L1.z.h0", "L1.mlp_out"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for this module: the tiny model's matrices are too small to
    gain from more, and on a busy machine more threads make each forward several times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny llama and its fit and test prompts, and the server's model: the same
    weights in another model (a :class:`SimulatedServer` freezes its parameters)."""
    model, full = tiny_task_dataset(tmp_path_factory.mktemp("task"), n=24)
    server_model = tiny_random_model("llama", seed=4)
    here, there = model._module.state_dict(), server_model._module.state_dict()
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)
    return model, full.subset(np.arange(16)), full.subset(np.arange(16, 24)), server_model


def random_sae(layer: int, kind: str, d: int, seed: int, width: int = 64) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, width, generator=g) / d ** 0.5
    return SparseAutoencoder(W, torch.zeros(width), W.T.clone(), torch.zeros(d),
                             architecture="topk", k=8, layer=layer, kind=kind)


def evaluate(model, fit, test, remote, sites=((1, "z", 0), (1, "attn_out"))):
    """A cross-section read through residual SAEs of layer 1: by default at sites linear
    in their codes (read in one request); ``mlp_out`` is rebuilt by a second forward."""
    d = model.config.hidden_size
    saes = {"res": ReconstructedSAE([random_sae(1, "resid_pre", d, 0),
                                     random_sae(1, "resid_mid", d, 1)])}
    cs = CrossSection("io", [(Site(*s), "END") for s in sites])
    return evaluate_cross_section(model, fit, test, cs, saes, ks=[1, 2], n_boot=10,
                                  remote=remote)


def patched(model, data, remote):
    variants = [[], [Patch("L1.z.h0", data.positions["END"], torch.ones(len(data), 8))]]
    return run_patched(model, data, variants, batch_size=4, remote=remote)


def test_stages_give_the_local_numbers_through_nnsight_local_backend(setup):
    model, fit, test, _ = setup
    remote = Remote("local", max_prompts=8)
    xr.testing.assert_identical(collect(model, fit, SITES, batch_size=8, progress=False),
                                collect(model, fit, SITES, batch_size=8, progress=False,
                                        remote=remote))
    xr.testing.assert_identical(patched(model, fit, None), patched(model, fit, remote))
    xr.testing.assert_identical(logit_diffs(model, fit), logit_diffs(model, fit, remote=remote))
    xr.testing.assert_identical(evaluate(model, fit, test, None),
                                evaluate(model, fit, test, remote))
    config = DiscoveryConfig(kinds=["z", "resid_pre", "mlp_out"], top_k=3, batch_size=8)
    here, there = discover(model, fit, config), discover(model, fit, config, remote=remote)
    xr.testing.assert_identical(here.scores, there.scores)
    assert here.validation == there.validation
    # 16 prompts at most 8 per request: the collect above took two requests
    assert [(r.kernel, r.rows) for r in remote.requests[:2]] == [("collect", 8), ("collect", 8)]


def test_stages_round_trip_through_the_strict_simulated_server(setup):
    """Requests serialized with nothing shipped as bytecode or by class, run against the
    server's model from a client without weights: the local numbers come back."""
    model, fit, test, server_model = setup
    server, client = SimulatedServer(server_model), weightless(model)
    remote = Remote(server)
    xr.testing.assert_allclose(collect(model, fit, SITES, progress=False),
                               collect(client, fit, SITES, progress=False, remote=remote),
                               rtol=1e-5, atol=1e-6)
    xr.testing.assert_allclose(evaluate(model, fit, test, None),
                               evaluate(client, fit, test, remote), rtol=1e-4, atol=1e-5)
    scores = AttributionPatching(kinds=["z", "resid_pre", "mlp_out"], ig_steps=1)
    there = scores.fit(client, fit, remote=remote).scores_
    xr.testing.assert_allclose(scores.fit(model, fit).scores_, there, rtol=1e-4, atol=1e-6)
    assert there.exact.any()  # the exact sweep (blocks skipped by nnsight) ran there too
    # the server's parameters are frozen, as NDIF's: the kernel asked for its gradients
    assert not any(p.requires_grad for p in server_model._module.parameters())
    assert float(abs(there.delta.where(~there.exact)).max()) > 1e-6
    # the adaptive search, decided on the server in one request
    grown = grow_cross_sections(client, fit, there, max_sites=3, remote=remote)
    for a, (table, summary) in grow_cross_sections(model, fit, there, max_sites=3).items():
        assert grown[a][0].site.tolist() == table.site.tolist()
        assert grown[a][1]["recovered"] == pytest.approx(summary["recovered"], rel=1e-4)
    assert remote.requests[-1].kernel == "grow"
    assert len(server.result_bytes) == len(remote.requests) > 1
    # what comes back is reduced: less than the request that asked for it, for evaluation
    assert sum(server.result_bytes[1:]) < sum(server.request_bytes[1:])


@pytest.mark.parametrize("backend", ["local", "simulated"])
def test_a_site_rebuilt_by_a_second_forward_gives_the_local_numbers_remotely(setup, backend):
    """mlp_out through residual SAEs is not linear in their codes: the evaluation rebuilds
    it in a second forward (the ``reconstruct`` kernel), which must run remotely too."""
    model, fit, test, server_model = setup
    sites = ((1, "z", 0), (1, "mlp_out"))
    client, remote = (model, Remote("local")) if backend == "local" else \
        (weightless(model), Remote(SimulatedServer(server_model)))
    there = evaluate(client, fit, test, remote, sites)
    assert "reconstruct" in [r.kernel for r in remote.requests]
    xr.testing.assert_allclose(evaluate(model, fit, test, None, sites), there, rtol=1e-4,
                               atol=1e-5)


def test_evaluation_requests_follow_the_data_not_the_number_of_attributes_or_saes(setup):
    """One read (fit prompts, where the floors' L0 is matched, then held-out and
    counterfactual prompts with every SAE's and floor's codes), then every variant
    patched: two requests, for one SAE or three and for two attributes, and the same
    numbers as here; with requests capped at fewer rows, the floors are calibrated here
    between the fit read and the rest, to the same numbers."""
    model, fit, test, server_model = setup
    d = model.config.hidden_size
    sections = [CrossSection("io", [(Site(1, "z", 0), "END")]),
                CrossSection("s", [(Site(1, "z", 1), "END"), (Site(0, "resid_post"), "END")])]
    for n_saes in (1, 3):
        saes = {f"sae{i}": ReconstructedSAE([random_sae(1, "resid_pre", d, i)])
                for i in range(n_saes)}
        remote = Remote("local")
        there = evaluate_cross_section(model, fit, test, sections, saes, ks=[1, 2, 4],
                                       n_boot=10, remote=remote)
        assert [r.kernel for r in remote.requests] == ["read", "patch"], n_saes
        assert set(there.dictionary.values) >= {"sae0", "random:sae0"}
    here = evaluate_cross_section(model, fit, test, sections, saes, ks=[1, 2, 4], n_boot=10)
    xr.testing.assert_identical(here, there)
    capped = Remote("local", max_prompts=8)
    split = evaluate_cross_section(model, fit, test, sections, saes, ks=[1, 2, 4], n_boot=10,
                                   batch_size=8, remote=capped)
    assert [(r.kernel, r.rows) for r in capped.requests[:2]] == [("read", 8), ("read", 8)]
    assert len(capped.requests) > 3 and all(r.rows <= 8 for r in capped.requests)
    xr.testing.assert_allclose(here, split, rtol=1e-5, atol=1e-7)
    # bfloat16 transport: about half the bytes each way, the numbers to bf16 precision
    # (through the strict simulated server, from a client without weights)
    server, client, sizes = SimulatedServer(server_model), weightless(model), {}
    for transport in ("float32", "bfloat16"):
        server.request_bytes.clear(), server.result_bytes.clear()
        half = evaluate_cross_section(client, fit, test, sections, saes, ks=[1, 2, 4], n_boot=10,
                                      remote=Remote(server, transport=transport))
        sizes[transport] = list(server.result_bytes), sum(server.request_bytes)
        if transport == "float32":
            xr.testing.assert_allclose(here, half, rtol=1e-4, atol=1e-6)
    assert len(server.result_bytes) == 2  # read, patch
    # the read's activations and residual rows go in bf16; the patched runs' readouts
    # (logit differences, log-probabilities, top tokens) stay float32 and integer
    (read16, patch16), (read32, patch32) = sizes["bfloat16"][0], sizes["float32"][0]
    assert read16 < 0.6 * read32 and patch16 <= patch32, sizes
    assert sizes["bfloat16"][1] < sizes["float32"][1]
    # (this random model's logit differences are thousandths of a logit: compare what the
    # reads carry, not ratios of those)
    np.testing.assert_allclose(half.fvu.values, here.fvu.values, rtol=0.02, atol=1e-3)
    np.testing.assert_allclose(half.l0.values, here.l0.values, rtol=0.1)
    with pytest.raises(ValueError, match="transport 'float16': use 'float32' or 'bfloat16'"):
        Remote("local", transport="float16")


def _ships_a_site(model, arch, inputs, site):
    with model.trace(inputs):
        out = model.output.logits[:, -1, site.head].save()
    return out


def _ships_a_function(model, arch, inputs, function):
    with model.trace(inputs):
        out = model.output.logits[:, -1, 0].save()
    return [out, function]


def _writes_to_the_model(model, arch, inputs):
    model._module.foo = 1
    with model.trace(inputs):
        out = model.output.logits[:, -1, 0].save()
    return out


def _reads_a_weight(model, arch, inputs):
    with model.trace(inputs):
        out = (model.model.norm.weight * model.model.norm.output).sum().save()
    return out


def _plain(model, arch, inputs, site):
    layer, kind, head = site
    with model.trace(inputs):
        out = model.output.logits[:, -1, head].save()
    return [out, arch["n_layers"], layer, kind]


def test_the_simulated_server_refuses_classes_shipped_by_value_writes_and_weight_reads():
    """The strict simulation's rules, each seen failing: a sage_nn dataclass instance in a
    chunk (its class would travel by value, its methods as bytecode), a function without
    source (a dataclass's generated method: bytecode), a kernel that leaves an attribute
    on the server's model (shared by every user) and one that reads a weight inside its
    trace (a sandbox's model has none) are refused; a kernel given the site as a
    plain (layer, kind, head) key runs, with the server's numbers."""
    server_model = tiny_random_model("llama", seed=4)
    client, server = weightless(server_model), SimulatedServer(server_model)
    inputs = {"input_ids": torch.tensor([[2, 3, 4]])}
    with pytest.raises(ShippedByValueError, match=r"ships class sage_nn\.model\.sites\.Site "
                                                  "by value"):
        list(run_kernel(client, _ships_a_site, [(inputs, Site(1, "z", 2))], Remote(server)))
    with pytest.raises(ShippedByValueError, match=r"ships sage_nn\.model\.sites\.Site\.__init__ "
                                                  r"as bytecode \(it has no source"):
        list(run_kernel(client, _ships_a_function, [(inputs, Site.__init__)], Remote(server)))
    assert server.result_bytes == []  # refused before they ran
    (out,) = run_kernel(client, _plain, [(inputs, (1, "z", 2))], Remote(server))
    with torch.no_grad():
        expected = server_model._module(**inputs).logits[:, -1, 2]
    torch.testing.assert_close(out[0], expected)
    assert out[1:] == [server_model.config.num_hidden_layers, 1, "z"]
    assert len(server.result_bytes) == 1
    with pytest.raises(RuntimeError, match=r"the request wrote to the server's model \(shared "
                                           r"by every user\): model\.foo$"):
        list(run_kernel(client, _writes_to_the_model, [(inputs,)], Remote(server)))
    assert server_model._module.foo == 1 and not hasattr(client._module, "foo")
    with pytest.raises(WeightReadError, match=r"reads LlamaRMSNorm\.weight inside its trace: "
                                              r"in NDIF's sandbox the model is on the meta"):
        list(run_kernel(client, _reads_a_weight, [(inputs,)], Remote(server)))


class FlakyBackend(LocalSimulationBackend):
    """The local simulation behind a connection that drops the first ``failures`` times."""

    def __init__(self, model, failures, error=lambda: ConnectionError("reset by peer")):
        super().__init__(model)
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self, tracer):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()
        return super().__call__(tracer)


def _unreachable():  # how nnsight reports a failed POST
    try:
        raise httpx.ConnectError("connection refused")
    except httpx.ConnectError as cause:
        raise RemoteError("Failed to send request: connection refused") from cause


def test_a_dropped_connection_is_retried_and_a_real_error_is_not(setup):
    model, fit, _, _ = setup
    flaky = FlakyBackend(model, failures=2)
    out = patched(model, fit, Remote(flaky, retries=2, backoff_s=0))
    xr.testing.assert_identical(out, patched(model, fit, None))
    assert flaky.calls == 3
    refused = FlakyBackend(model, failures=1, error=_unreachable)
    patched(model, fit, Remote(refused, retries=1, backoff_s=0))
    assert refused.calls == 2
    with pytest.raises(ConnectionError):
        patched(model, fit, Remote(FlakyBackend(model, failures=3), retries=2, backoff_s=0))
    broken = FlakyBackend(model, failures=1, error=lambda: ValueError("bad request"))
    with pytest.raises(ValueError):
        patched(model, fit, Remote(broken, retries=2, backoff_s=0))
    assert broken.calls == 1


def test_directions_of_a_weightless_model_ask_for_the_maps_read_on_the_server():
    """An NDIF model has no weights here: directions come from the frozen maps a read
    brings back (evaluate_cross_section passes them itself)."""
    from sage_nn.dictionaries.reconstruction import ResidualReconstruction

    model = tiny_random_model("llama")
    model._module.to("meta")
    recon = ResidualReconstruction([random_sae(1, "resid_pre", model.config.hidden_size, 0)],
                                   freeze_norm=True, freeze_pattern=True).fit(model)
    with pytest.raises(ValueError, match=r"the model's weights are not here \(a remote model "
                                         r"is held without them\): pass the layers' frozen "
                                         "maps read on the server"):
        recon.directions("L1.z.h0")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A pipeline run here on test_pipeline's tiny setup, with its SAE cache
    (``root/cache``): the remote runs compare with it and reuse the SAEs it trained."""
    from sage_nn.pipeline.stages import run
    from test_pipeline import _setup, config

    with pytest.MonkeyPatch.context() as mp:
        root, model = _setup(tmp_path_factory.mktemp("pipeline"))
        mp.setenv("SAGE_NN_CACHE", str(root / "cache"))
        here = run(config(root, "here"), model=model, progress=False)
    assert (root / "cache" / "saes").is_dir()
    return root, model, here


def test_a_remote_pipeline_run_matches_the_local_one_and_stores_no_api_key(
        local_run, monkeypatch, caplog):
    from sage_nn.pipeline.stages import run
    from test_pipeline import config

    key = "ndif-key-that-must-not-be-stored"
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", key)
    monkeypatch.setenv("NDIF_API_KEY", key)
    root, model, here = local_run
    monkeypatch.setenv("SAGE_NN_CACHE", str(root / "cache"))
    caplog.set_level(logging.INFO, logger="sage_nn")
    remote = Remote("local")
    there = run(config(root, "there", remote="local"), model=model, progress=False,
                remote=remote)
    xr.testing.assert_identical(here.results, there.results)
    assert {r.kernel for r in remote.requests} >= {"patch", "attribution", "read"}
    # the run says what it sent: every request in its directory, one line a stage
    logged = [json.loads(line) for line in (root / "there" / "requests.jsonl").open()]
    requests = [r for r in logged if r["type"] == "request"]
    assert [(r["stage"], r["kernel"]) for r in requests] == [
        (r.stage, r.kernel) for r in remote.requests]
    assert {r["stage"] for r in requests} == {"task", "discovery", "evaluation"}
    assert all(r["up"] > 0 and r["down"] > 0 and r["seconds"] > 0 for r in requests)
    assert not (root / "here" / "requests.jsonl").exists()
    said = [m for m in caplog.messages if m.startswith("remote ")]
    assert said[0].startswith("remote task: 1 request (patch), ") and len(said) == 3
    assert said[-1].startswith("remote evaluation: 2 requests (read, patch)")
    for path in (root / "there").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def weightless(model):
    """``model``'s twin as a remote model is held here: on the meta device, no weights."""
    client = tiny_random_model(model.config.model_type, seed=0,
                               n_layers=model.config.num_hidden_layers)
    client._module.to("meta")
    return client


def sage_nn_attributes(model) -> list[str]:
    """``module.name`` for every attribute, parameter, buffer or submodule of the model's
    modules whose name says sage_nn (what a request must never leave on a server's model)."""
    return sorted(f"{name or 'model'}.{a}" for name, m in model._module.named_modules()
                  for a in {*vars(m), *m._parameters, *m._buffers, *m._modules}
                  if "sage_nn" in a.lower())


def hooks(model) -> dict:
    """How many hooks of each kind each of the model's modules has."""
    return {(name, a): len(v) for name, m in model._module.named_modules()
            for a, v in vars(m).items() if "hooks" in a and isinstance(v, dict)}


def test_a_client_without_weights_runs_the_reconstruction_on_the_servers_model(
        local_run, monkeypatch):
    """The SAGE method on a model that is not here: a full run with head cross-sections and
    residual TopK SAEs reaching them through the reconstruction, on a client holding the
    model on the meta device, gives the local run's numbers; the run records where each
    SAE was encoded, with the bytes each placement needed; the server's model is left as
    it was (no sage_nn attribute on any module, its config unchanged)."""
    from sage_nn.pipeline.stages import run
    from test_pipeline import config

    root, model, here = local_run
    here = here.results
    monkeypatch.setenv("SAGE_NN_CACHE", str(root / "cache"))
    assert {str(s).split(".")[1] for s in here.site.values} == {"z"}  # heads, the default
    client, server_model = weightless(model), tiny_random_model("llama", seed=0)
    config_before, hooks_before = server_model.config.to_dict(), hooks(server_model)
    assert config_before["num_hidden_layers"] == 2 and len(config_before) > 20
    assert len(hooks_before) > 50  # every module's hook tables, whatever they hold
    server = SimulatedServer(server_model)
    remote = Remote(server)
    there = run(config(root, "weightless", remote="local"), model=client, progress=False,
                remote=remote).results
    xr.testing.assert_allclose(here, there, rtol=1e-4, atol=1e-6)
    # every request of the run went through the server, and left its model as it was
    assert len(server.request_bytes) == len(remote.requests) >= 4
    assert sage_nn_attributes(server_model) == []
    assert server_model.config.to_dict() == config_before
    assert hooks(server_model) == hooks_before  # no hook left behind
    # what the check sees on a model that kept sage_nn's state (as the old code did)
    server_model._module.model.layers[1].mlp._sage_nn_architecture = {}
    assert sage_nn_attributes(server_model) == ["model.layers.1.mlp._sage_nn_architecture"]
    assert all(p.device.type == "meta" for p in client._module.parameters())
    kernels = [(r.stage, r.kernel) for r in remote.requests]
    assert [k for k in kernels if k[0] != "discovery"] == [
        ("task", "patch"), ("evaluation", "read"), ("evaluation", "patch")]
    logged = [json.loads(line) for line in (root / "weightless" / "requests.jsonl").open()]
    placed = [r for r in logged if r["type"] == "placement"]
    assert {p["layer"] for p in placed} == {int(str(s)[1]) for s in here.site.values}
    for p in placed:  # tiny SAEs: their encoders cost less than the residual rows, but the
        # controls and the path ceiling need those rows: encoded here, from them
        assert p["placement"] == "here" and 0 < p["server_bytes"] < p["here_bytes"], p


def mixed_widths(model, fit, test, remote):
    """Heads of two layers read through residual SAEs of two widths: at 64 latents the
    encoder costs fewer bytes than the residual rows, at 4096 more (``auto`` splits where
    the rows are not needed anyway)."""
    d = model.config.hidden_size
    saes = {"res": ReconstructedSAE([random_sae(0, "resid_pre", d, 0),
                                     random_sae(1, "resid_pre", d, 1, width=4096)])}
    cs = CrossSection("io", [(Site(0, "z", 0), "END"), (Site(1, "z", 1), "END")])
    return evaluate_cross_section(model, fit, test, cs, saes, ks=[1, 2], n_boot=10,
                                  remote=remote), saes["res"].jobs(model, cs.pairs)


def test_a_client_without_weights_gets_the_same_numbers_wherever_the_saes_are_encoded(setup):
    """Encoded on the server or here, forced or chosen by bytes, in float32 or bfloat16:
    the numbers are the local run's (bf16: to its rounding); the choice is the cheaper."""
    model, fit, test, server_model = setup
    here, _ = mixed_widths(model, fit, test, None)
    client, server = weightless(model), SimulatedServer(server_model)
    reads = {}
    for transport in ("float32", "bfloat16"):
        for placement in ("server", "here", "auto"):
            remote = Remote(server, placement=placement, transport=transport)
            there, jobs = mixed_widths(client, fit, test, remote)
            assert [r.kernel for r in remote.requests] == ["read", "patch"]
            reads[placement, transport] = remote.requests[0]
            chosen = [p["placement"] for p in remote.placements]
            # the controls need the residual rows: "auto" codes both SAEs here from them
            assert chosen == (["here", "here"] if placement == "auto" else [placement] * 2)
            assert all(min(p["server_bytes"], p["here_bytes"]) > 0 for p in remote.placements)
            if transport == "float32":
                xr.testing.assert_allclose(here, there, rtol=1e-4, atol=1e-6)
            else:  # what the reads carry, to bf16 rounding (a random SAE's TopK flips at
                # it; this random model's logit differences are too small for their ratios)
                np.testing.assert_allclose(there.fvu, here.fvu, rtol=0.05, atol=1e-3)
                np.testing.assert_allclose(there.l0, here.l0, rtol=0.1)
    # encoded here, the read uploads no encoder (the wide one's is most of the upload) and
    # brings the residual rows back without 4096 codes a token
    server_read, here_read = reads["server", "float32"], reads["here", "float32"]
    assert here_read.up < 0.05 * server_read.up and here_read.down < server_read.down
    auto = reads["auto", "float32"]
    assert (auto.up, auto.down) == (here_read.up, here_read.down)
    assert reads["auto", "bfloat16"].down < 0.6 * auto.down  # the rows and codes in bf16
    # where the rows are not needed (a read alone), "auto" puts each SAE where it is cheaper
    remote = Remote(server, placement="auto")
    read_sites(client, [test], [], jobs, batch_size=len(test), remote=remote)
    assert [p["placement"] for p in remote.placements] == ["server", "here"]
    for p in remote.placements:
        assert p["placement"] == ("here" if p["here_bytes"] < p["server_bytes"] else "server")


def test_settings_that_cannot_run_remotely_are_refused_before_anything_runs(tmp_path):
    from sage_nn.pipeline.config import RunConfig
    from sage_nn.pipeline.stages import run

    with pytest.raises(ValueError, match="needs a jobs file"):
        Remote(True, blocking=False)
    with pytest.raises(ValueError, match="backend True or a host URL"):
        Remote("local", blocking=False, jobs=tmp_path / "jobs.json")
    with pytest.raises(ValueError, match="give trained SAEs"):
        run(RunConfig(remote=True, saes=["train:topk"], run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_bfloat16_transport_sends_sae_encoders_in_half_precision_once(setup):
    """Encoded on the server, a read request carries each SAE's encoder (the bulk of its
    upload): once for two jobs that share it, half the bytes in bfloat16, nothing here
    changed; its bytes are logged as the planner counts them."""
    from sage_nn.model.reads import LinearJob, read_sites

    model, fit, _, _ = setup
    sae = random_sae(1, "resid_pre", model.config.hidden_size, 0)
    wide = SparseAutoencoder(torch.cat([sae.W_enc] * 32, 1), torch.zeros(2048),
                             torch.cat([sae.W_dec] * 32), sae.b_dec, architecture="topk", k=8,
                             layer=1, kind="resid_pre")
    sent = {}
    for transport in ("float32", "bfloat16"):
        for jobs in (1, 2):
            remote = Remote("local", transport=transport, placement="server")
            read_sites(model, [fit], [], [LinearJob(wide, [Site(1, "z", h)], ["END"])
                                          for h in range(jobs)], remote=remote)
            sent[transport, jobs] = remote.requests[0].up
    encoder = 32 * 2048 * 4  # W_enc in float32
    assert encoder < sent["float32", 1] < 1.2 * encoder
    assert sent["float32", 2] == sent["float32", 1]  # one encoder for both jobs
    assert sent["bfloat16", 1] < 0.55 * sent["float32", 1]
    assert wide.W_enc.dtype == torch.float32


def test_sparse_edits_go_dense_where_a_split_would_send_their_directions_again(setup,
                                                                             monkeypatch):
    """Sparse edits carry their clean values and directions once a request. In one request
    they are fewer bytes than dense values and go sparse; under a limit that splits the
    batch, every request would carry them again, and they go dense. Either way the run
    sends the fewer bytes of the two (each measured by forcing it) and the numbers are the
    local run's."""
    from sage_nn.model import patching
    from sage_nn.model.patching import LatentEdit

    model, fit, _, server_model = setup
    n, d = len(fit.prompts), model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    base, directions = torch.randn(n, d, generator=g), torch.randn(8, d, generator=g)
    ks = [1, 2, 4, 8]  # one greedy path's prefixes, over a few shared latents
    edits = LatentEdit.prefixes(base, torch.randint(0, 8, (n, 8), generator=g),
                                torch.randn(n, 8, generator=g), directions, ks)
    sparse = [[Patch("L1.resid_pre", fit.positions["END"], e)] for e in edits.values()]
    dense = [[Patch("L1.resid_pre", fit.positions["END"], e.dense())] for e in edits.values()]
    here = run_patched(model, fit, [[]] + dense).logit_diff.values

    def sent(variants, limit, forced=False):
        if forced:  # the edits as they are, whatever that costs
            monkeypatch.setattr(patching, "_cheaper_parts",
                                lambda groups, members, budget, _: patching._within(
                                    groups, members, budget))
        remote = Remote(SimulatedServer(server_model), max_request_bytes=limit)
        there = run_patched(weightless(model), fit, [[]] + variants, remote=remote,
                            max_rows=n)  # a group a variant: a split may part them
        monkeypatch.undo()
        np.testing.assert_allclose(there.logit_diff.values, here, rtol=1e-5, atol=1e-5)
        assert all(r.up <= remote.payload_budget for r in remote.requests), remote.requests
        return len(remote.requests), sum(r.up for r in remote.requests)

    one = 16 << 20
    split = CODE_ALLOWANCE + 8 * 1024 + 2 * n * d * 4  # the prompts and about two values
    assert sent(sparse, one, forced=True)[1] < sent(dense, one)[1]
    assert sent(sparse, one) == sent(sparse, one, forced=True)
    assert sent(dense, split)[1] < sent(sparse, split, forced=True)[1]
    assert sent(sparse, split) == sent(dense, split) and sent(dense, split)[0] > 1


def test_a_stage_over_the_servers_request_limit_is_split_into_requests_under_it(setup):
    """A patched run whose values are more than a request may carry goes as several
    requests (a batch's variants split too), each under the limit, with the same numbers;
    a request still over it is refused before it is sent, naming the fix."""
    from sage_nn.model.servers import RequestTooLargeError

    model, fit, test, server_model = setup
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    variants = [[Patch(f"L{layer}.resid_pre", fit.positions["END"],
                       torch.randn(len(fit.prompts), d, generator=g))] for layer in (0, 1) * 32]
    here = run_patched(model, fit, [[]] + variants).logit_diff.values
    limit = CODE_ALLOWANCE + 100_000  # about two groups of 16 variants a request
    remote = Remote(SimulatedServer(server_model), max_request_bytes=limit)
    there = run_patched(weightless(model), fit, [[]] + variants, remote=remote)
    np.testing.assert_allclose(there.logit_diff.values, here, rtol=1e-5, atol=1e-5)
    assert len(remote.requests) > 1  # one request would have carried them all
    assert all(r.up <= remote.payload_budget for r in remote.requests), remote.requests
    assert sum(r.up for r in remote.requests) > remote.payload_budget  # too much for one
    with pytest.raises(RequestTooLargeError, match=r"over the server's limit of 0\.00 MB.*"
                       r"nothing was sent: fix: send fewer prompts a request"):
        from sage_nn.model.servers import NDIFBackend

        backend = NDIFBackend("tiny", host="http://127.0.0.1:9", max_request_bytes=1)
        with model.session(backend=backend):  # nothing listens there: it must not be sent
            nnsight.save(torch.zeros(1))
