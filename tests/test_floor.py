"""The controls: the floor (random unit directions at the SAE's budget, encoded as a tied
random TopK SAE with one least-squares gain) and the random SAE (its sae_lens architecture
with random weights)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from sage_nn.dictionaries.floor import RandomDictionary, omp, random_directions, random_floor
from sage_nn.dictionaries.random_sae import calibrate, per_token_l0, random_sae
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.evaluation.coders import SiteCode
from sage_nn.evaluation.controls import site_controls


def data_like(n: int = 300, width: int = 64, seed: int = 1) -> torch.Tensor:
    """Activation-like rows: a large shared mean, anisotropic spread, heavy-ish tails."""
    g = torch.Generator().manual_seed(seed)
    mean = 3 * torch.randn(width, generator=g)
    mix = torch.randn(width, width, generator=g) * torch.logspace(0, -1.5, width)[:, None]
    z = torch.randn(n, width, generator=g) * (1 + torch.rand(n, 1, generator=g) * 3)
    return mean + z @ mix


def fvu(x, x_hat) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_omp_is_scikit_learns_orthogonal_matching_pursuit():
    dictionary = random_directions(256, 64, seed=0)
    x = data_like(100).double()
    codes = omp(x, dictionary, 8, chunk=16)
    expected = orthogonal_mp(dictionary.T.numpy(), x.T.numpy(), n_nonzero_coefs=8).T
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-8)
    assert (codes != 0).sum(1).eq(8).all()


def test_the_floor_is_a_tied_random_abstopk_sae_with_one_gain():
    """Per token the budget's best-correlated directions, coded by their correlation (signs
    kept) around the fit mean; one decoder gain for all, by least squares."""
    fit = data_like(300, seed=1)
    like = trained_like("topk")
    floor = random_floor(like, 8, seed=4, rows=fit)
    assert (floor.architecture, floor.k, floor.d_sae, floor.layer, floor.kind) == (
        "abstopk", 8, 256, 3, "resid_pre")
    x = data_like(20, seed=2)
    codes = floor.encode(x)
    corr = (x - fit.mean(0)) @ floor.W_enc
    for row in range(5):
        support = torch.nonzero(codes[row]).flatten()
        assert set(support.tolist()) == set(corr[row].abs().topk(8).indices.tolist())
        torch.testing.assert_close(codes[row, support], corr[row, support])
    gain = floor.W_dec.norm(dim=1)
    torch.testing.assert_close(gain, torch.full_like(gain, float(gain[0])))


def test_the_floor_is_not_exact_below_or_at_the_sites_width():
    """The old floor (OMP) reconstructed a 64-wide head from 32 of 1024 directions with FVU
    0.001; the tied random SAE leaves a real error, even with as many latents a token as the
    head has dimensions."""
    fit, held_out = data_like(300, seed=1), data_like(200, seed=2)
    for budget in (32, 64):
        floor = RandomDictionary(1024, budget, seed=3).fit(fit)
        assert 0.05 < fvu(held_out, floor.inverse_transform(floor.transform(held_out))) < 1
    old = omp(held_out.double() - fit.double().mean(0), random_directions(1024, 64, 3), 32)
    assert fvu(held_out, fit.double().mean(0) + old @ random_directions(1024, 64, 3)) < 0.01


def test_the_floor_is_never_worse_than_the_mean_on_its_rows():
    """The least-squares gain: on the rows it is fitted on, FVU <= 1 at any budget."""
    fit = data_like(300, seed=1)
    for n_nonzero in (1, 4, 32):
        floor = RandomDictionary(512, n_nonzero, seed=3).fit(fit)
        assert fvu(fit, floor.inverse_transform(floor.transform(fit))) <= 1.0, n_nonzero
        assert (floor.transform(fit) != 0).sum(1).eq(n_nonzero).all()


def test_the_floor_is_deterministic_per_seed():
    x = data_like(50)
    a, b, c = (RandomDictionary(128, 4, seed=s).fit(x) for s in (0, 0, 1))
    torch.testing.assert_close(a.components_, b.components_)
    assert not torch.allclose(a.components_, c.components_)
    norms = a.components_.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def trained_like(architecture: str, d: int = 64, width: int = 256) -> SparseAutoencoder:
    """An SAE of the architecture with fixed weights (what the controls are built for)."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(d, width, generator=g) / d ** 0.5
    extra = {"topk": {"k": 8}, "jumprelu": {"threshold": torch.full((width,), 0.4)}}
    return SparseAutoencoder(W, torch.zeros(width), W.T.clone(), torch.zeros(d),
                             architecture=architecture, layer=3, kind="resid_pre",
                             **extra.get(architecture, {}))


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard"])
def test_the_random_sae_is_sae_lens_own_architecture_at_the_saes_budget(architecture):
    """Built by sae_lens's config class (seeded: the same weights for the same seed), at the
    SAE's site and budget; sae_lens's initialisation alone is a blow-up (b_dec 0, a JumpReLU
    firing half its latents), calibrated it is never worse than the mean at its site."""
    import sae_lens

    sae, fit, held_out = trained_like(architecture), data_like(400, seed=1), data_like(200, seed=2)
    control = random_sae(sae, seed=5)
    assert (control.architecture, control.d_sae, control.k, control.layer, control.kind) == (
        sae.architecture, sae.d_sae, sae.k, sae.layer, sae.kind)
    torch.testing.assert_close(random_sae(sae, seed=5).W_dec, control.W_dec)
    assert not torch.allclose(random_sae(sae, seed=6).W_dec, control.W_dec)
    cls, config = {"topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                   "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
                   "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig)}[architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        built = cls(config(d_in=64, d_sae=256, **({"k": 8} if architecture == "topk" else {})))
    torch.testing.assert_close(built.W_enc.detach(), control.W_enc)  # sae_lens's own weights
    assert fvu(held_out, control.decode(control.encode(held_out), held_out)) > 1.5
    calibrate(control, sae, fit)
    recon = control.decode(control.encode(held_out), held_out)
    assert fvu(held_out, recon) < 1.0
    assert per_token_l0(control, fit) == pytest.approx(per_token_l0(sae, fit), rel=0.02)


def test_site_controls_keep_the_width_and_the_budget():
    sae = trained_like("topk")
    fit, held_out = data_like(300, seed=1), data_like(120, seed=2)
    with torch.no_grad():
        codes = sae.encode(held_out)
        code = SiteCode(held_out, sae.decode(codes), held_out, codes, codes, sae.decoder(),
                        codes_fit=sae.encode(fit))
    found = site_controls(code, sae, fit, seed=0, where="L3.resid_pre@END", n_seeds=2)
    assert set(found) == {"random", "random-sae"} and all(len(v) == 2 for v in found.values())
    for control in found.values():
        for c in control:
            assert c.codes.shape == code.codes.shape and c.directions.shape == (256, 64)
            assert float((c.codes != 0).sum(1).float().mean()) == pytest.approx(8, abs=0.5)
            assert fvu(held_out, c.a_hat) < 1
    assert not torch.allclose(found["random"][0].directions, found["random"][1].directions)
    again = site_controls(code, sae, fit, seed=0, where="L3.resid_pre@END", n_seeds=2)
    torch.testing.assert_close(again["random-sae"][1].codes, found["random-sae"][1].codes)
