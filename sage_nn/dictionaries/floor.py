"""The random floor: the best a dictionary without learned directions can do at a site.

A floor keeps the shape of the dictionary it is the floor of (docs/metrics.md, "The
dictionaries compared"): as many latents, each a random **unit** direction at the site
(uniform on the sphere, from a seeded generator), and the dictionary's mean L0 on the fit
prompts. Its codes are the best sparse codes over those directions: orthogonal matching
pursuit, around the fit prompts' mean, ``n_nonzero`` latents a row, each row's coefficients
the least-squares fit on the latents it chose. Least squares can only lower the error of
the mean alone, so the floor is never worse than the mean (its FVU is at most 1, up to
the gap between the fit prompts' mean and the held-out prompts'), and it is a floor, not
a blow-up: a random SAE encoding with its own nonlinearity (a TopK of 32 random directions
in a 64-wide head) reconstructs a vector several times larger than the signal.

Where the matched L0 reaches the site's width the floor reconstructs exactly (OMP chooses
``width`` directions a row).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["RandomDictionary", "omp", "random_directions"]


def random_directions(n_latents: int, width: int, seed: int) -> torch.Tensor:
    """``[n_latents, width]`` random unit vectors, the same for the same seed on any machine
    (drawn in float64 on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_latents, width, generator=g, dtype=torch.float64)
    return directions / directions.norm(dim=-1, keepdim=True)


def omp(x: torch.Tensor, dictionary: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """Orthogonal matching pursuit: codes ``[n, L]`` of ``x [n, w]`` over the unit rows of
    ``dictionary [L, w]``, at most ``k`` non-zero a row (at most ``w``: then exact). Each step
    adds the row's latent most correlated with its residual, which is kept orthogonal to the
    chosen latents (Gram-Schmidt); the codes are the least-squares fit on the chosen latents.
    Batched over rows in torch (scikit-learn's ``SparseCoder`` solves the same problem, but
    builds the ``[L, L]`` Gram matrix: 2 GB for a 16k-latent dictionary)."""
    x, dictionary = x.double(), dictionary.double()
    n, width = x.shape
    codes = torch.zeros(n, len(dictionary), dtype=torch.float64)
    k = min(k, width, len(dictionary))
    for start in range(0, n if k > 0 else 0, chunk):
        target = x[start:start + chunk]
        m, rows = len(target), torch.arange(len(target))
        residual = target.clone()
        basis = torch.zeros(m, k, width, dtype=torch.float64)  # orthonormal, per row
        chosen = torch.zeros(m, k, dtype=torch.long)
        taken = torch.zeros(m, len(dictionary), dtype=torch.bool)
        for i in range(k):
            best = (residual @ dictionary.T).abs().masked_fill(taken, -1.0).argmax(1)
            taken[rows, best] = True
            chosen[:, i] = best
            atom = dictionary[best]
            atom = atom - torch.einsum("mi,miw->mw", torch.einsum("miw,mw->mi", basis[:, :i],
                                                                  atom), basis[:, :i])
            basis[:, i] = atom / atom.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            residual = residual - (residual * basis[:, i]).sum(-1, keepdim=True) * basis[:, i]
        # the chosen atoms are basis^T R with R upper triangular: least squares is R c = Q x
        R = torch.einsum("miw,mjw->mij", basis, dictionary[chosen]).triu()
        coef = torch.linalg.solve_triangular(R, torch.einsum("miw,mw->mi", basis, target)[..., None],
                                             upper=True)[..., 0]
        codes[start:start + chunk].scatter_(1, chosen, coef)
    return codes


class RandomDictionary(TransformerMixin, BaseEstimator):
    """A floor at one site: ``n_latents`` random unit directions, ``n_nonzero`` of them a row
    by :func:`omp`, around the mean of the rows it is fitted on.

    ``fit(A)`` sets ``mean_ [w]`` and ``components_ [n_latents, w]``; ``transform(A)`` gives
    the codes, ``inverse_transform(codes)`` the reconstruction ``mean_ + codes @
    components_``. Deterministic for a given ``seed``."""

    def __init__(self, n_latents: int, n_nonzero: int, seed: int = 0):
        self.n_latents, self.n_nonzero, self.seed = n_latents, n_nonzero, seed

    def fit(self, A, y=None) -> "RandomDictionary":
        A = torch.as_tensor(np.asarray(A), dtype=torch.float64)
        self.mean_ = A.mean(0)
        self.components_ = random_directions(self.n_latents, A.shape[1], self.seed)
        return self

    def transform(self, A) -> torch.Tensor:
        A = torch.as_tensor(np.asarray(A), dtype=torch.float64)
        return omp(A - self.mean_, self.components_, self.n_nonzero)

    def inverse_transform(self, codes) -> torch.Tensor:
        return self.mean_ + torch.as_tensor(codes, dtype=torch.float64) @ self.components_
