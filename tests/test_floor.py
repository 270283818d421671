"""The random floor: random unit directions, the dictionary's L0, the best sparse codes."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from sage_nn.evaluation.coders import SiteCode, floor_code
from sage_nn.dictionaries.floor import RandomDictionary, omp, random_directions


def data_like(n: int = 300, width: int = 64, seed: int = 1) -> torch.Tensor:
    """Activation-like rows: a large shared mean, anisotropic spread, heavy-ish tails."""
    g = torch.Generator().manual_seed(seed)
    mean = 3 * torch.randn(width, generator=g)
    mix = torch.randn(width, width, generator=g) * torch.logspace(0, -1.5, width)[:, None]
    z = torch.randn(n, width, generator=g) * (1 + torch.rand(n, 1, generator=g) * 3)
    return mean + z @ mix


def test_omp_is_scikit_learns_orthogonal_matching_pursuit():
    dictionary = random_directions(256, 64, seed=0)
    x = data_like(100).double()
    codes = omp(x, dictionary, 8, chunk=16)
    expected = orthogonal_mp(dictionary.T.numpy(), x.T.numpy(), n_nonzero_coefs=8).T
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-8)
    assert (codes != 0).sum(1).eq(8).all()


def test_omp_at_the_sites_width_reconstructs_exactly():
    dictionary = random_directions(256, 16, seed=2)
    x = data_like(40, width=16).double()
    codes = omp(x, dictionary, 100)  # more than the width: capped, and exact
    assert (codes != 0).sum(1).max() == 16
    torch.testing.assert_close(codes @ dictionary, x)


def test_the_floor_is_never_worse_than_the_mean():
    """Per row, the floor's error is at most the mean's: FVU <= 1, at any L0."""
    fit, held_out = data_like(300, seed=1), data_like(200, seed=2)
    mean = fit.double().mean(0)
    for n_nonzero in (1, 4, 32):
        floor = RandomDictionary(512, n_nonzero, seed=3).fit(fit)
        recon = floor.inverse_transform(floor.transform(held_out))
        error = ((held_out - recon) ** 2).sum(1)
        assert (error <= ((held_out - mean) ** 2).sum(1) + 1e-9).all(), n_nonzero
        assert (floor.transform(held_out) != 0).sum(1).eq(n_nonzero).all()


def test_the_floor_is_deterministic_per_seed():
    x = data_like(50)
    a, b, c = (RandomDictionary(128, 4, seed=s).fit(x) for s in (0, 0, 1))
    torch.testing.assert_close(a.components_, b.components_)
    assert not torch.allclose(a.components_, c.components_)
    norms = a.components_.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def blow_up_code(a: torch.Tensor, a_fit: torch.Tensor, n_latents: int = 256, k: int = 32):
    """What the old floor was: a TopK of ``k`` random tied unit directions encoding with its
    own nonlinearity, which reconstructs a vector several times larger than the signal."""
    directions = random_directions(n_latents, a.shape[1], seed=9).float()

    def encode(x):
        pre = x @ directions.T
        top = pre.topk(k, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp(min=0))

    codes = encode(a)
    return SiteCode(a, codes @ directions, a, codes, codes, directions,
                    codes_fit=encode(a_fit))


def test_floor_code_keeps_the_shape_and_l0_and_is_a_floor_not_a_blow_up():
    fit, held_out = data_like(300, seed=1), data_like(120, seed=2)
    code = blow_up_code(held_out, fit)
    fvu = lambda x, x_hat: float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())  # noqa
    assert fvu(held_out, code.a_hat) > 1.2  # the old floor: worse than the mean
    floor = floor_code(code, fit, seed=0)
    assert floor.codes.shape == code.codes.shape and floor.directions.shape == (256, 64)
    l0 = float((code.codes_fit != 0).sum(1).float().mean())
    assert float((floor.codes != 0).sum(1).float().mean()) == pytest.approx(round(l0))
    assert fvu(held_out, floor.a_hat) < 1
    again = floor_code(code, fit, seed=0)
    torch.testing.assert_close(again.codes, floor.codes)
