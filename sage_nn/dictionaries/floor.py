"""The random floor: a dictionary without learned directions, at a dictionary's own site.

A floor keeps the shape of the dictionary it is the floor of (docs/metrics.md, "The
dictionaries compared"): as many latents, each a random **unit** direction at the site
(uniform on the sphere, from a seeded generator), and the dictionary's per-token budget (k,
or its measured per-token L0). Its codes (:func:`support_codes`): the ``k`` directions most
correlated with the input (around the fit rows' mean), chosen in one step as a TopK encoder
with tied random weights would choose them, and least-squares coefficients on that support.
Least squares can only lower the error of the mean alone, so the floor is never worse than
the mean (FVU at most 1, up to the gap between the fit rows' mean and the held-out rows');
and the support is not searched for, so it reconstructs exactly only where the budget
reaches the site's width. (Orthogonal matching pursuit, :func:`omp`, the floor before: at 32
of a 64-wide head's dimensions it reconstructs anything, FVU 0.001, so no metric of
fidelity could rank an SAE above it.)

:class:`RandomDictionary` is also an encoder :func:`~sage_nn.model.linear.linear_codes`
accepts (``encode``, ``decode_affine``, ``b_dec``), so a residual SAE's floor is coded at
the residual and reaches a head through the same frozen reconstruction as the SAE. It runs
here only: nothing of it travels to a server.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["RandomDictionary", "omp", "random_directions", "support_codes"]


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


def support_codes(x: torch.Tensor, dictionary: torch.Tensor, k: int,
                  chunk: int = 2048) -> torch.Tensor:
    """Codes ``[n, L]`` of ``x [n, w]`` over the unit rows of ``dictionary [L, w]``: per row,
    the ``k`` rows with the largest ``|<x, d_j>|`` (one step, no search), and the
    least-squares coefficients on them (at most ``w`` of them: then exact). Batched over
    rows in float32 (the normal equations by Cholesky, with a tiny ridge so that nearly
    dependent atoms stay solvable)."""
    x = x.float()
    dictionary = dictionary.to(x.dtype)
    n, width = x.shape
    k = min(k, width, len(dictionary))
    codes = torch.zeros(n, len(dictionary), dtype=x.dtype)
    if k <= 0:
        return codes
    # the Gram matrix once, when it is small (the atoms' inner products are then looked up)
    gram_all = dictionary @ dictionary.T if len(dictionary) <= 4096 else None
    ridge = 1e-6 * torch.eye(k, dtype=x.dtype)
    for start in range(0, n, chunk):
        corr = x[start:start + chunk] @ dictionary.T  # [m, L]
        support = corr.abs().topk(k, dim=1).indices  # [m, k]
        if gram_all is not None:
            gram = gram_all[support[:, :, None], support[:, None, :]]
        else:
            atoms = dictionary[support]  # [m, k, w]
            gram = atoms @ atoms.transpose(1, 2)
        factor, info = torch.linalg.cholesky_ex(gram + ridge)
        rhs = corr.gather(1, support)[..., None]
        if bool((info != 0).any()):  # numerically dependent atoms: least squares in float64
            coef = torch.linalg.lstsq(gram.double(), rhs.double()).solution.to(x.dtype)
        else:
            coef = torch.cholesky_solve(rhs, factor)
        codes[start:start + chunk].scatter_(1, support, coef[..., 0])
    return codes


class RandomDictionary(TransformerMixin, BaseEstimator):
    """A floor at one site: ``n_latents`` random unit directions, ``n_nonzero`` of them a row
    by :func:`support_codes`, around the mean of the rows it is fitted on.

    ``fit(A)`` sets ``mean_ [w]`` and ``components_ [n_latents, w]``; ``transform(A)`` gives
    the codes, ``inverse_transform(codes)`` the reconstruction ``mean_ + codes @
    components_``. Deterministic for a given ``seed``. As an encoder of
    :func:`~sage_nn.model.linear.linear_codes`: ``encode(x)``, ``b_dec``, ``decoder()`` and
    ``decode_affine(x)`` (no input normalisation)."""

    def __init__(self, n_latents: int, n_nonzero: int, seed: int = 0):
        self.n_latents, self.n_nonzero, self.seed = n_latents, n_nonzero, seed

    def fit(self, A, y=None) -> "RandomDictionary":
        A = torch.as_tensor(np.asarray(A), dtype=torch.float64)
        self.mean_ = A.mean(0)
        self.components_ = random_directions(self.n_latents, A.shape[1], self.seed)
        return self

    def transform(self, A) -> torch.Tensor:
        A = torch.as_tensor(np.asarray(A), dtype=torch.float32)
        return support_codes(A - self.mean_.float(), self.components_, self.n_nonzero)

    def inverse_transform(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
        return self.mean_.float() + codes @ self.components_.float()

    # -- as an encoder (linear_codes): codes of the residual rows, offset b_dec ----------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)

    @property
    def b_dec(self) -> torch.Tensor:
        return self.mean_.float()

    def decoder(self) -> torch.Tensor:
        return self.components_.float()

    def decode_affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(*x.shape[:-1], 1, dtype=torch.float32)
        return ones, torch.zeros_like(ones)
