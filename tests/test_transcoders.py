"""Transcoders as dictionaries of the MLP output they write, on a tiny llama: codes from the
MLP's normalised input at the same token, directions their decoder rows at mlp_out, the
skip path part of the reconstruction; discovery restricted to what they serve; a whole run."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TASK, tiny_task_dataset
from sae_lens import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata

from sage_nn.dictionaries.saes import from_sae_lens
from sage_nn.evaluation.coders import CrossSection, Transcoders, as_coder
from sage_nn.evaluation.scoring import _seen_rows, evaluate_cross_section
from sage_nn.model.sites import Site

D = 32  # the tiny llama's d_model


def transcoder(layer: int, skip: bool = True, seed: int = 0, d_sae: int = 64):
    """A sae_lens (JumpReLU skip) transcoder of ``layer``'s MLP with random weights,
    reading TransformerLens' ``ln2.hook_normalized`` and writing ``hook_mlp_out``."""
    cls, cfg_cls = (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig) if skip else \
        (Transcoder, TranscoderConfig)
    meta = SAEMetadata(hook_name=f"blocks.{layer}.ln2.hook_normalized",
                       hook_name_out=f"blocks.{layer}.hook_mlp_out")
    tc = cls(cfg_cls(d_in=D, d_sae=d_sae, d_out=D, apply_b_dec_to_input=False, metadata=meta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.2))
        if skip:
            tc.threshold.copy_(torch.rand(d_sae, generator=g) * 0.2)
    return tc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, full = tiny_task_dataset(tmp_path_factory.mktemp("task"), n=48)
    return model, full.subset(np.arange(32)), full.subset(np.arange(32, 48))


def _mlp_in_and_out(model, data, position: str, layer: int):
    """The MLP's input residual (resid_mid) and output at ``position``, read with plain
    PyTorch hooks on the HuggingFace module (not sage_nn's reads)."""
    hf = model._module
    block = hf.model.layers[layer]
    got = {}
    h1 = block.post_attention_layernorm.register_forward_hook(
        lambda m, i, o: got.__setitem__("mid", i[0]))
    h2 = block.mlp.register_forward_hook(lambda m, i, o: got.__setitem__("out", o))
    enc = model.tokenizer(list(data.prompts), return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            hf(**enc)
    finally:
        h1.remove()
        h2.remove()
    rows = torch.arange(len(data.prompts))
    cols = torch.as_tensor(np.asarray(data.positions[position]))
    if model.tokenizer.padding_side == "left":  # positions count real tokens
        cols = cols + (enc["attention_mask"] == 0).sum(1)
    eps = block.post_attention_layernorm.variance_epsilon
    mid = got["mid"][rows, cols]
    normalized = mid * torch.rsqrt(mid.pow(2).mean(-1, keepdim=True) + eps)  # ln2.hook_normalized
    return normalized, got["out"][rows, cols]


def test_transcoder_at_mlp_out_is_coded_from_the_mlp_input(setup):
    model, fit, held_out = setup
    ref = transcoder(1)
    ours = from_sae_lens(ref, model=model)
    assert isinstance(as_coder(ours), Transcoders)
    site = Site(1, "mlp_out")
    out = evaluate_cross_section(model, fit, held_out, CrossSection("io", [(site, "END")]),
                                 {"tc": ours}, ks=[1, 4], n_boot=20).squeeze("attribute")
    tc = out.sel(dictionary="tc")
    scored = held_out.subset(_seen_rows(fit, held_out, "io"))
    x, a = _mlp_in_and_out(model, scored, "END", 1)
    with torch.no_grad():
        codes, a_hat = ref.encode(x), ref(x)  # sae_lens: its forward adds the skip path
    l0 = float((codes != 0).sum(-1).float().mean())
    assert 0 < l0 < 64
    assert float(tc.l0.squeeze()) == pytest.approx(l0)
    fvu = float(((a - a_hat) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())
    assert float(tc.fvu.squeeze()) == pytest.approx(fvu, rel=1e-4)
    assert np.isfinite(float(out.sel(dictionary="random:tc").fvu.squeeze()))


def test_skip_path_alone_reconstructs_with_no_latent(setup):
    """A skip transcoder whose latents never fire: L0 0, and its reconstruction is the
    skip path (W_skip = 0 and b_dec = the mean MLP output: exactly mean ablation)."""
    model, fit, held_out = setup
    ref = transcoder(1)
    _, a_fit = _mlp_in_and_out(model, fit, "END", 1)
    with torch.no_grad():
        ref.b_enc.fill_(-1e3)
        ref.W_skip.zero_()
        ref.b_dec.copy_(a_fit.mean(0))
    out = evaluate_cross_section(model, fit, held_out,
                                 CrossSection("io", [(Site(1, "mlp_out"), "END")]),
                                 {"tc": from_sae_lens(ref, model=model)}, ks=[1],
                                 n_boot=10).squeeze("attribute")
    tc = out.sel(dictionary="tc")
    assert float(tc.l0.squeeze()) == 0.0
    assert float(tc.sufficiency_ratio) == pytest.approx(
        float(out.mean_ablated_logit_diff / out.clean_logit_diff), rel=1e-3)


def test_a_transcoder_serves_only_the_mlp_it_writes(setup):
    model, fit, held_out = setup
    ours = from_sae_lens(transcoder(1), model=model)
    coder = as_coder([ours])
    assert coder.serves(model, Site(1, "mlp_out"))
    assert not coder.serves(model, Site(0, "mlp_out"))
    assert not coder.serves(model, Site(1, "resid_mid"))
    with pytest.raises(ValueError, match="cannot serve cross-section site L0.mlp_out"):
        evaluate_cross_section(model, fit, held_out,
                               CrossSection("io", [(Site(0, "mlp_out"), "END")]),
                               {"tc": ours}, ks=[1])


def test_transcoders_and_saes_are_not_mixed():
    from sage_nn.dictionaries.saes import SparseAutoencoder
    from sage_nn.evaluation.coders import DirectSAE, ReconstructedSAE
    from sage_nn.pipeline.config import RunConfig
    from sage_nn.pipeline.resolve import coder_for

    tc = from_sae_lens(transcoder(1))
    sae = SparseAutoencoder(torch.zeros(D, 4), torch.zeros(4), torch.zeros(4, D),
                            torch.zeros(D), layer=1, kind="resid_mid")
    with pytest.raises(ValueError, match="mixes transcoders and SAEs"):
        coder_for([sae, tc], False, RunConfig())
    with pytest.raises(ValueError, match="is a transcoder"):
        ReconstructedSAE([tc])
    with pytest.raises(ValueError, match="is a transcoder"):
        DirectSAE([tc])
    assert coder_for([tc], False, RunConfig()).kind == "transcoder"
    assert coder_for([sae], False, RunConfig()).kind == "residual SAE through the reconstruction"
    mlp = SparseAutoencoder(torch.zeros(D, 4), torch.zeros(4), torch.zeros(4, D),
                            torch.zeros(D), layer=1, kind="mlp_out")
    assert coder_for([mlp], False, RunConfig()).kind == "SAE at the site"


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """The tiny task and a directory of two transcoders (layers 0 and 1), saved the sae_lens
    way."""
    root = tmp_path_factory.mktemp("transcoder-run")
    (root / "tiny.yaml").write_text(TINY_TASK)
    for layer in (0, 1):
        transcoder(layer, seed=layer).save_model(root / "tcs" / f"layer{layer}")
    return root


def test_discovery_is_restricted_to_what_transcoders_serve(run_root, caplog):
    from sage_nn import tiny_random_model
    from sage_nn.pipeline.config import RunConfig
    from sage_nn.pipeline.stages import served_restriction

    model = tiny_random_model("llama", seed=0)
    config = RunConfig(saes=[str(run_root / "tcs")], select_kinds=["z", "mlp_out"])
    with caplog.at_level("INFO", logger="sage_nn"):
        assert served_restriction(config, model) == ([0, 1], ["mlp_out"])
    assert caplog.messages[-1] == (
        f"--select-kinds z mlp_out: --sae {run_root / 'tcs'} (transcoders) serve only the "
        "mlp_out they write, so cross-sections hold only mlp_out (layers [0, 1]); fix: leave "
        "z out of --select-kinds, or compare z in a run without transcoders")
    one = RunConfig(saes=[str(run_root / "tcs" / "layer1")], select_kinds=["mlp_out"])
    assert served_restriction(one, model) == ([1], ["mlp_out"])


def test_a_run_evaluates_transcoders_and_labels_their_kind(run_root, monkeypatch):
    from sage_nn import tiny_random_model
    from sage_nn.pipeline.config import RunConfig
    from sage_nn.pipeline.stages import run

    monkeypatch.setenv("SAGE_NN_CACHE", str(run_root / "cache"))
    config = RunConfig(model="tiny-llama", task=str(run_root / "tiny.yaml"),
                       run_dir=str(run_root / "run"), n_fit=24, n_eval=16, top_k=2,
                       n_boot=20, ks=[1, 2], batch_size=16, saes=[str(run_root / "tcs")],
                       select_kinds=["mlp_out"], discovery_kinds=["mlp_out"])
    result = run(config, model=tiny_random_model("llama", seed=0), progress=False)
    for sites in result.cross_sections.values():
        assert sites and all(".mlp_out@" in s for s in sites), sites
    assert {"tcs", "random:tcs"} <= set(result.results.dictionary.values)
    fvu = result.results.fvu  # each attribute's pairs (NaN at the other's)
    scored = np.isfinite(fvu.sel(dictionary="supervised").values)
    assert scored.any()
    assert (np.isfinite(fvu.sel(dictionary="tcs").values) == scored).all()
    listing = json.loads((result.run_dir / "saes.json").read_text())["tcs"]
    assert listing["approach"] == "transcoder"
    assert listing["sites"] == ["blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out",
                                "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"]
    summary = (result.report / "summary.md").read_text()
    assert "| tcs | transcoder |" in summary


def test_a_run_trains_transcoders_where_the_cross_sections_are(run_root, monkeypatch, caplog):
    """``train:skip_transcoder``: one per cross-section mlp_out, cached like trained SAEs
    (a second run loads them), discovery limited to mlp_out, the report's kind."""
    from sage_nn import tiny_random_model
    from sage_nn.pipeline.config import RunConfig
    from sage_nn.pipeline.stages import run

    monkeypatch.setenv("SAGE_NN_CACHE", str(run_root / "cache"))
    from sage_nn.model.loading import TINY_WORDS

    rng = np.random.default_rng(0)
    (run_root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(TINY_WORDS, 80))
                                                      for _ in range(60)))
    model = tiny_random_model("llama", seed=0)

    def config(name):
        return RunConfig(model="tiny-llama", task=str(run_root / "tiny.yaml"),
                         run_dir=str(run_root / name), n_fit=24, n_eval=16, top_k=2,
                         n_boot=20, ks=[1, 2], batch_size=16, sae_width=64, sae_steps=2,
                         sae_corpus=str(run_root / "corpus.txt"),
                         saes=["train:skip_transcoder:k=4"], select_kinds=["z", "mlp_out"])

    result = run(config("trained"), model=model, progress=False)
    mlp = sorted({s.split("@")[0] for sites in result.cross_sections.values() for s in sites})
    assert mlp and all(s.endswith(".mlp_out") for s in mlp), mlp
    listing = json.loads((result.run_dir / "saes.json").read_text())
    [(name, info)] = listing.items()
    assert name == "skip_transcoder-64-k4" and info["approach"] == "transcoder"
    assert len(info["sites"]) == len(mlp)
    cached = list((run_root / "cache" / "saes").glob("*/skip_transcoder-64-k4-*-tc2-*/L*.mlp_out"))
    assert sorted(p.name for p in cached) == mlp
    caplog.clear()  # the first run's messages (logged if an earlier test left INFO on)
    with caplog.at_level("INFO", logger="sage_nn"):
        again = run(config("again"), model=model, progress=False)  # from the cache
    assert not [m for m in caplog.messages if m.startswith("training ")], caplog.messages
    np.testing.assert_allclose(again.results.fvu.sel(dictionary=name).values,
                               result.results.fvu.sel(dictionary=name).values)
