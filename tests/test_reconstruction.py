import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sage_nn.model.activations import encode
from sage_nn.model.loading import tiny_random_model
from sage_nn.dictionaries.reconstruction import ResidualReconstruction
from sage_nn.evaluation import metrics
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.model.sites import Site, adapter

ARCHS = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]
PROMPTS = ["when Mary and John went to the store , John gave a drink to",
           "the ball", "Alice said she was in the park ."]


def token_fvu(recon, clean) -> float:
    """FVU over every token of ``[..., width]`` tensors."""
    width = clean.shape[-1]
    return metrics.fvu(clean.reshape(-1, width).float().numpy(),
                       recon.reshape(-1, width).float().numpy())


def identity_sae(d, layer, kind):
    """d_sae = 2d, W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(d)
    return SparseAutoencoder(torch.cat([eye, -eye], 1), torch.zeros(2 * d),
                             torch.cat([eye, -eye], 0), torch.zeros(d), layer=layer, kind=kind)


def random_sae(d, layer, kind, seed, arch="standard"):
    g = torch.Generator().manual_seed(seed)
    d_sae = 3 * d
    return SparseAutoencoder(torch.randn(d, d_sae, generator=g) / d ** 0.5,
                             torch.randn(d_sae, generator=g) * 0.1,
                             torch.randn(d_sae, d, generator=g) / d ** 0.5,
                             torch.randn(d, generator=g) * 0.1, architecture=arch,
                             k=8 if arch == "topk" else None, layer=layer, kind=kind)


def residual_saes(model, make):
    ad = adapter(model)
    kinds = ["resid_pre"] + ([] if ad.parallel else ["resid_mid"])
    saes = [make(ad.d_model, l, k) for l in range(ad.n_layers) for k in kinds]
    return saes + [make(ad.d_model, ad.n_layers - 1, "resid_post")]


def clean_logits(model, prompts):
    batch = encode(model, prompts)
    with torch.no_grad(), model.trace(batch.inputs):
        logits = model.output.logits.save()
    return logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("freeze", [(False, False), (True, True)], ids=["live", "frozen"])
def test_perfect_sae_reconstructs_every_site_exactly(arch, freeze):
    model = tiny_random_model(arch)
    ad = adapter(model)
    rec = ResidualReconstruction(residual_saes(model, identity_sae), mode="input",
                                 freeze_norm=freeze[0], freeze_pattern=freeze[1]).fit(model)
    sites = ad.all_sites(kinds=["q", "k", "v", "z", "attn_out", "mlp_out"])
    result = rec.run(PROMPTS, sites)
    assert set(result.recon) == set(sites)
    for s in sites:
        torch.testing.assert_close(result.recon[s], result.clean[s], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.logits, clean_logits(model, PROMPTS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gemma2"])
def test_difference_mode_perfect_and_random(arch):
    model = tiny_random_model(arch)
    ad = adapter(model)
    sites = ad.all_sites(kinds=["attn_out", "mlp_out"])
    perfect = ResidualReconstruction(residual_saes(model, identity_sae), "difference").fit(model)
    result = perfect.run(PROMPTS, sites)
    for s in sites:
        torch.testing.assert_close(result.recon[s], result.clean[s], rtol=1e-4, atol=1e-5)
    # a random SAE: the reconstruction is exactly SAE_mid(r_mid) - SAE_pre(r_pre)
    saes = residual_saes(model, lambda d, l, k: random_sae(d, l, k, seed=l * 3 + len(k)))
    rec = ResidualReconstruction(saes, "difference").fit(model)
    site = Site(0, "attn_out")
    out = rec.run(PROMPTS, [site])
    batch = encode(model, PROMPTS)
    with torch.no_grad(), model.trace(batch.inputs):
        r_pre = ad.tensor(model, 0, "resid_pre").clone().save()
        r_mid = ad.tensor(model, 0, "resid_mid").clone().save()
    expected = rec.by_site_[(0, "resid_mid")](r_mid) - rec.by_site_[(0, "resid_pre")](r_pre)
    torch.testing.assert_close(out.recon[site], expected, rtol=1e-4, atol=1e-5)
    assert token_fvu(out.recon[site], out.clean[site]) > 0.01  # the SAE is not perfect


@pytest.mark.parametrize("arch", ARCHS)
def test_input_mode_matches_running_the_layer_on_the_reconstruction(arch):
    """Unfrozen input mode = the sublayer run on SAE(resid_pre); other sites stay clean."""
    model = tiny_random_model(arch)
    ad = adapter(model)
    sae = random_sae(ad.d_model, 1, "resid_pre", seed=1)
    rec = ResidualReconstruction([sae], "input").fit(model)
    sites = [Site(1, "z", 2), Site(1, "attn_out")] + ([Site(1, "mlp_out")] if ad.parallel else [])
    out = rec.run(PROMPTS, sites)
    batch = encode(model, PROMPTS)
    with torch.no_grad(), model.trace(batch.inputs):
        r = ad.tensor(model, 1, "resid_pre")
        r[:] = sae(r.clone())
        z = ad.tensor(model, 1, "z")[..., ad.channels("z", 2)].clone().save()
        a = ad.tensor(model, 1, "attn_out").clone().save()
        m = ad.tensor(model, 1, "mlp_out").clone().save() if ad.parallel else None
    torch.testing.assert_close(out.recon[Site(1, "z", 2)], z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.recon[Site(1, "attn_out")], a, rtol=1e-4, atol=1e-5)
    if ad.parallel:
        torch.testing.assert_close(out.recon[Site(1, "mlp_out")], m, rtol=1e-4, atol=1e-5)
    assert token_fvu(out.recon[Site(1, "attn_out")], out.clean[Site(1, "attn_out")]) > 0.01


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sae_arch", ["standard", "topk"])
def test_directions_sum_to_the_frozen_reconstruction(arch, sae_arch):
    model = tiny_random_model(arch)
    ad = adapter(model)
    sae = random_sae(ad.d_model, 1, "resid_pre", seed=2, arch=sae_arch)
    rec = ResidualReconstruction([sae], "input", freeze_norm=True, freeze_pattern=True).fit(model)
    sites = [Site(1, "q", 1), Site(1, "k", 1), Site(1, "v", 0), Site(1, "z", 3), Site(1, "attn_out")]
    out = rec.run(PROMPTS, sites, with_codes=True)
    for s in sites:
        D = rec.directions(s)
        codes = out.codes[s]
        if s.kind == "attn_out":
            assert D.shape == (ad.n_heads, sae.d_sae, ad.d_model)
            linear = torch.einsum("nthd,hde->nte", codes, D)
        else:
            assert D.shape == (sae.d_sae, ad.d_head)
            linear = codes @ D
        torch.testing.assert_close(linear + out.offsets[s], out.recon[s], rtol=1e-3, atol=1e-4)
        assert token_fvu(out.recon[s], out.clean[s]) > 1e-3  # a random SAE changes the site


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", ["server", "here"])
def test_codes_read_from_the_clean_run_equal_the_reconstruction(arch, placement):
    """sage_nn.reads computes each site's codes and offset from one clean forward (no
    scratch rows), in the kernel (placement "server") or here from the residual and pattern
    rows the kernel returns ("here"): the same numbers as the two-row reconstruction, at
    the prompts' last token, for several SAEs in one read; and the frozen maps the read
    returns give the directions read off the weights here."""
    from types import SimpleNamespace

    from sage_nn.model.reads import read_sites
    from sage_nn.model.remote import Remote

    model = tiny_random_model(arch)
    ad = adapter(model)
    sites = [Site(1, "q", 1), Site(1, "v", 0), Site(1, "z", 3), Site(1, "attn_out")]
    data = SimpleNamespace(prompts=PROMPTS, positions={"END": np.full(len(PROMPTS), -1)})
    recs = [ResidualReconstruction([random_sae(ad.d_model, 1, "resid_pre", seed=seed)], "input",
                                   freeze_norm=True, freeze_pattern=True).fit(model)
            for seed in (2, 3)]
    read = read_sites(model, [data], [(s, "END") for s in sites],
                      [rec.linear_job(sites, ["END"]) for rec in recs],
                      remote=Remote(placement=placement))
    values, codes = read.values, read.codes
    for j, rec in enumerate(recs):
        for s in sites:  # one site per run: the others' splices would change its layer
            out = rec.run(PROMPTS, [s], with_codes=True)
            c, off = codes[0][(j, s, "END")]
            torch.testing.assert_close(c, out.codes[s][:, -1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(off, out.offsets[s][:, -1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(rec.directions(s, read.maps[1]), rec.directions(s))
    clean = {}  # made outside the trace: nnsight hands back what was saved into it
    with torch.no_grad(), model.trace(encode(model, PROMPTS).inputs):
        for s in sites:
            t = ad.tensor(model, 1, s.kind)
            clean[s] = (t[:, -1, ad.channels(s.kind, s.head)] if s.head is not None
                        else t[:, -1]).save()
    for s in sites:
        torch.testing.assert_close(values[0][(s, "END")], clean[s], rtol=1e-4, atol=1e-5)


def test_errors_name_the_fix():
    llama, neox = tiny_random_model("llama"), tiny_random_model("gpt_neox")
    rec = ResidualReconstruction([identity_sae(32, 0, "resid_pre")]).fit(llama)
    with pytest.raises(ValueError, match="needs an SAE at L1.resid_pre"):
        rec.run(PROMPTS, ["L1.z.h0"])
    with pytest.raises(ValueError, match="needs an SAE at L0.resid_mid"):
        rec.run(PROMPTS, ["L0.mlp_out"])
    diff = ResidualReconstruction(residual_saes(neox, identity_sae), "difference").fit(neox)
    with pytest.raises(ValueError, match="parallel attention and MLP.*use input mode"):
        diff.run(PROMPTS, ["L0.attn_out"])
    with pytest.raises(ValueError, match="freeze_norm=True"):
        rec.directions("L0.z.h0")
    frozen = ResidualReconstruction([identity_sae(32, 0, "resid_pre")], freeze_norm=True).fit(llama)
    with pytest.raises(ValueError, match="freeze_pattern=True"):
        frozen.directions("L0.z.h0")
    with pytest.raises(ValueError, match="unknown reconstruction mode"):
        ResidualReconstruction([], mode="output")
    with pytest.raises(ValueError, match="not a residual-stream SAE"):
        ResidualReconstruction([identity_sae(32, 0, "mlp_out")]).fit(llama)


@pytest.mark.slow
def test_smollm2_perfect_sae_and_sdpa_message():
    from sage_nn.model.loading import load_model

    model = load_model()
    ad = adapter(model)
    saes = [identity_sae(ad.d_model, 3, "resid_pre"), identity_sae(ad.d_model, 3, "resid_mid")]
    rec = ResidualReconstruction(saes, freeze_norm=True, freeze_pattern=True).fit(model)
    sites = [Site(3, "z", h) for h in range(ad.n_heads)] + [Site(3, "attn_out"), Site(3, "mlp_out")]
    out = rec.run(["When Mary and John went to the store, John gave a drink to"], sites)
    for s in sites:
        torch.testing.assert_close(out.recon[s], out.clean[s], rtol=1e-4, atol=1e-4)
    # site codes need the pattern, which only eager attention returns: the kernel switches
    # to it (as it must on a server) and gives the model its own back
    impl = model._module.config._attn_implementation
    out = rec.run(["a b c"], [Site(3, "z", 0)], with_codes=True)
    assert model._module.config._attn_implementation == impl
    D = rec.directions(Site(3, "z", 0))
    torch.testing.assert_close(out.codes[Site(3, "z", 0)] @ D + out.offsets[Site(3, "z", 0)],
                               out.recon[Site(3, "z", 0)], rtol=1e-3, atol=1e-4)
