"""Every sae_lens 6.54 inference class read into sage_nn's plain-torch SparseAutoencoder.

Each class is built from sae_lens's own config class with random weights, and checked three
ways on random inputs: copied from the live object (``from_sae_lens``), written with
``save_model`` and read back by sae_lens (``SAE.load_from_disk``), and read by sage_nn's
loader (``load_sae`` on the directory, checked against a tiny llama). The temporal SAE is
refused, naming its class and why, before anything runs.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sae_lens
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata

from sage_nn.common.formats import REFUSED_ARCHITECTURES, SAE_ARCHITECTURES
from sage_nn.dictionaries.saes import from_sae_lens, load_sae
from sage_nn.model.loading import tiny_random_model

D, D_SAE = 32, 96  # the tiny llama's d_model
SAE_HOOK = "blocks.1.hook_resid_pre"
TRANSCODER_IN, TRANSCODER_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"

# class name -> (config options, site checked against the model); every inference class
# of sae_lens 6.54 (the training-only BatchTopK and Matryoshka save as JumpReLU)
CLASSES = {
    "StandardSAE": ({"normalize_activations": "layer_norm"}, (1, "resid_pre")),
    "TopKSAE": ({"k": 7, "rescale_acts_by_decoder_norm": True}, (1, "resid_pre")),
    "AbsTopKSAE": ({"k": 7}, (1, "resid_pre")),
    "JumpReLUSAE": ({}, (1, "resid_pre")),
    "GatedSAE": ({"normalize_activations": "constant_norm_rescale"}, (1, "resid_pre")),
    "MatchingPursuitSAE": ({"residual_threshold": 0.5, "max_iterations": 12},
                           (1, "resid_pre")),
    "Transcoder": ({"d_out": D, "apply_b_dec_to_input": False}, (1, "mlp_out")),
    "SkipTranscoder": ({"d_out": D, "apply_b_dec_to_input": False,
                        "normalize_activations": "layer_norm"}, (1, "mlp_out")),
    "JumpReLUTranscoder": ({"d_out": D, "apply_b_dec_to_input": False}, (1, "mlp_out")),
    "JumpReLUSkipTranscoder": ({"d_out": D, "apply_b_dec_to_input": False}, (1, "mlp_out")),
}


def build(name: str, seed: int = 0, **extra):
    """A sae_lens SAE of class ``name`` with random weights (biases and thresholds so that
    some latents fire and some do not)."""
    cls = getattr(sae_lens, name)
    cfg_cls = getattr(sae_lens, f"{name}Config")
    options, _ = CLASSES.get(name, ({}, None))
    transcoder = "Transcoder" in name
    meta = SAEMetadata(hook_name=TRANSCODER_IN if transcoder else SAE_HOOK,
                       **({"hook_name_out": TRANSCODER_OUT} if transcoder else {}))
    sae = cls(cfg_cls(d_in=D, d_sae=D_SAE, metadata=meta, **{**options, **extra}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sae.named_parameters():
            scale = 0.3 if p.ndim == 1 else (0.2 if pname == "W_skip" else 1.0)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        if isinstance(getattr(sae, "threshold", None), torch.nn.Parameter):
            sae.threshold.abs_()
        if name == "MatchingPursuitSAE":  # unit dictionary rows, as it is trained
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    return sae


def assert_same(ours, ref, x):
    """Codes, decode and forward of ``ours`` equal sae_lens's ``ref`` on ``x``."""
    with torch.no_grad():
        codes_ref, codes = ref.encode(x), ours.encode(x)
        assert codes.shape == (*x.shape[:-1], D_SAE)
        assert (codes != 0).any() and (codes == 0).any()  # sparse, not trivial
        torch.testing.assert_close(codes, codes_ref, rtol=1e-5, atol=1e-5)
        skip = getattr(ref, "W_skip", None) is not None
        # sae_lens's decode leaves a skip transcoder's skip path to forward
        recon = ours.decode(codes, x) - (ours.skip(x) if skip else 0)
        torch.testing.assert_close(recon, ref.decode(codes_ref), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_every_inference_class_is_known():
    """The table covers sae_lens's inference architectures: each is read or refused."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    known = set(SAE_ARCHITECTURES) | set(REFUSED_ARCHITECTURES)
    assert set(SAE_CLASS_REGISTRY) <= known, set(SAE_CLASS_REGISTRY) - known
    assert {getattr(sae_lens, c)(getattr(sae_lens, f"{c}Config")(
        d_in=4, d_sae=8, **({"k": 2} if "TopK" in c else {}),
        **({"d_out": 4, "apply_b_dec_to_input": False} if "Transcoder" in c else {}))
    ).cfg.architecture() for c in CLASSES} == set(SAE_ARCHITECTURES)


@pytest.mark.parametrize("name", list(CLASSES))
def test_class_reads_as_sae_lens_runs_it(name, tmp_path):
    ref = build(name)
    x = torch.randn(4, 9, D) * 2 + 0.5
    ours = from_sae_lens(ref)
    assert ours.architecture == ref.cfg.architecture()
    assert_same(ours, ref, x)
    # saved the sae_lens way, read back by sae_lens and by sage_nn's loader
    ref.save_model(tmp_path / "sae")
    back = SAE.load_from_disk(tmp_path / "sae")
    assert type(back).__name__ == name
    assert_same(from_sae_lens(back), ref, x)
    loaded = load_sae(tmp_path / "sae", model=tiny_random_model("llama"))
    assert (loaded.layer, loaded.kind) == CLASSES[name][1]
    assert_same(loaded, ref, x)
    if loaded.transcoder:  # reads the MLP's normalised input at layer 1
        assert (loaded.input_layer, loaded.input_kind, loaded.input_form) == \
            (1, "resid_mid", "normalized")


def test_transcoder_inputs_and_outputs():
    from sage_nn.dictionaries.saes import transcoder_sites

    assert transcoder_sites("blocks.3.hook_mlp_in", None) == {
        "input_layer": 3, "input_kind": "resid_mid", "input_form": "site", "layer": 3,
        "kind": "mlp_out"}
    assert transcoder_sites("model.layers.2.post_attention_layernorm.input",
                            "model.layers.2.mlp")["input_kind"] == "resid_mid"
    with pytest.raises(ValueError, match="transcoders of one MLP"):
        transcoder_sites("blocks.3.hook_mlp_in", "blocks.4.hook_mlp_out")
    with pytest.raises(ValueError, match="transcoders of the MLP, reading"):
        transcoder_sites("blocks.3.hook_resid_pre", "blocks.3.hook_mlp_out")


def test_temporal_sae_is_refused_with_its_reason(tmp_path):
    from sae_lens import TemporalSAE, TemporalSAEConfig

    ref = TemporalSAE(TemporalSAEConfig(d_in=D, d_sae=D_SAE, n_heads=2, bottleneck_factor=4,
                                        kval_topk=4, metadata=SAEMetadata(hook_name=SAE_HOOK)))
    with pytest.raises(ValueError, match=r"^TemporalSAE: .*'temporal'.*earlier tokens"):
        from_sae_lens(ref)
    ref.save_model(tmp_path / "temporal")
    with pytest.raises(ValueError, match=r"TemporalSAE: .*earlier tokens") as err:
        load_sae(tmp_path / "temporal")
    assert "\n" not in str(err.value)


def test_unsupported_architecture_directory_is_a_problem_before_loading(tmp_path):
    """The run's input checks name it too (from cfg.json, before any weights load)."""
    import json

    from sage_nn.pipeline.checks import sae_problems

    ref = build("Transcoder")
    ref.save_model(tmp_path / "tc")
    assert sae_problems(str(tmp_path / "tc")) == []
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "temporal"}))
    [problem] = sae_problems(str(tmp_path / "tc"))
    assert "earlier tokens" in problem and "fix:" in problem
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**cfg, "d_out": 16}))
    [problem] = sae_problems(str(tmp_path / "tc"))
    assert "d_out=16" in problem and "W_dec" in problem


def test_every_class_loads_through_the_offline_release_path(tmp_path, monkeypatch):
    """``load_sae(RELEASE, SAE_ID)``: sae_lens's ``SAE.from_pretrained`` reading each class
    from a HuggingFace-hub cache (hub offline), in a release of a registry file named by
    ``$SAGE_NN_SAE_REGISTRY``."""
    import huggingface_hub.constants

    repo, sha = "sage-test/every-class", "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(sha)
    entries = []
    for i, name in enumerate(CLASSES):
        build(name, seed=i).save_model(hub / "snapshots" / sha / name)
        entries.append(f"    - {{id: {name}, path: {name}}}")
    (tmp_path / "registry.yaml").write_text(
        f"every-class:\n  repo_id: {repo}\n  conversion_func: null\n  saes:\n"
        + "\n".join(entries) + "\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAGE_NN_SAE_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from sage_nn.dictionaries.releases import register

    register()
    model = tiny_random_model("llama")
    x = torch.randn(3, 5, D)
    for i, name in enumerate(CLASSES):
        ours = load_sae("every-class", name, model=model)
        assert (ours.layer, ours.kind) == CLASSES[name][1]
        assert_same(ours, build(name, seed=i), x)
    # what a release's SAEs serve, from their configs alone: a transcoder the mlp_out it writes
    from sage_nn.dictionaries.releases import spec_sites
    from sage_nn.pipeline.resolve import release_saes

    assert spec_sites("every-class:StandardSAE") == [SAE_HOOK]
    assert spec_sites("every-class:*Transcoder") == ["transcoder:L1.mlp_out"] * 4
    # a glob loads one transcoder per MLP whose input (L1.resid_mid) a cross-section needs
    name, [tc] = release_saes("every-class:*Transcoder", model, ["L1.resid_mid"])
    assert name == "*Transcoder" and tc.architecture == "transcoder"


def test_new_encoders_run_on_a_server_that_cannot_import_sage_nn(tmp_path):
    """Residual SAEs of the architectures added here (matching pursuit's data-dependent
    loop, AbsTopK's signed codes, gated), encoded inside the read's trace on a server
    that cannot import sage_nn or sae_lens and gets no code as bytecode (sage_nn's
    SimulatedServer; the real server's tier is tests/test_ndif.py), give the local
    numbers."""
    import numpy as np
    import xarray as xr
    from conftest import tiny_task_dataset

    from sage_nn.evaluation.coders import CrossSection, ReconstructedSAE
    from sage_nn.evaluation.scoring import evaluate_cross_section
    from sage_nn.model.remote import Remote
    from sage_nn.model.servers import SimulatedServer
    from sage_nn.model.sites import Site

    model, full = tiny_task_dataset(tmp_path, n=24)
    fit, test = full.subset(np.arange(16)), full.subset(np.arange(16, 24))
    saes = {name: ReconstructedSAE([from_sae_lens(build(name), model=model)])
            for name in ("MatchingPursuitSAE", "AbsTopKSAE", "GatedSAE")}
    cs = CrossSection("io", [(Site(1, "z", 0), "END"), (Site(1, "q", 1), "END")])

    def evaluate(remote):
        return evaluate_cross_section(model, fit, test, cs, saes, ks=[1], n_boot=5,
                                      remote=remote)

    remote = Remote(SimulatedServer(model), placement="server")
    there = evaluate(remote)
    assert {p["placement"] for p in remote.placements} == {"server"}
    assert (there.l0.sel(dictionary="AbsTopKSAE") > 0).all()
    xr.testing.assert_allclose(evaluate(None), there, rtol=1e-4, atol=1e-5)
