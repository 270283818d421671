"""The random floor: a dictionary without learned directions, at a dictionary's own site.

A floor keeps the shape of the dictionary it is the floor of (docs/metrics.md, "The
dictionaries compared"): as many latents, each a random **unit** direction at the site
(uniform on the sphere, from a seeded generator), and the dictionary's per-token budget
(its k, or its measured per-token L0). It encodes as a TopK SAE with tied random weights
would: per token, the ``budget`` directions most correlated with the input (around the
fit rows' mean), each coded by that correlation (signs kept: AbsTopK), and it decodes with
one gain for all latents, fitted by least squares on the fit rows. So it is an SAE
(:func:`random_floor`: architecture ``abstopk``, ``W_enc = D^T``, ``W_dec = gain D``,
``b_dec`` the mean), encoded and pushed through a reconstruction exactly as any SAE; it is
never worse than the mean on the rows it is fitted on (the gain 0 is the mean), and it
reconstructs exactly only where the budget reaches the site's width. (Orthogonal matching
pursuit, :func:`omp`, the floor before: at 32 of a 64-wide head's dimensions it
reconstructs anything, FVU 0.001, so no metric of fidelity could rank an SAE above it.)

:class:`RandomDictionary` is the same floor as a scikit-learn estimator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["RandomDictionary", "omp", "random_directions", "random_floor"]


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


def random_floor(like: Any, budget: int, seed: int, rows: torch.Tensor) -> Any:
    """The floor of SAE ``like`` as a :class:`~sage_nn.dictionaries.saes.SparseAutoencoder`
    at ``like``'s site: ``like.d_sae`` random unit directions (seeded), AbsTopK of
    ``budget`` on the correlations with the input around the mean of ``rows [n, d_in]``
    (its own site's fit rows), one decoder gain by least squares on those rows."""
    from .saes import SparseAutoencoder

    rows = rows.float()
    width = rows.shape[1]
    directions = random_directions(like.d_sae, width, seed).float()
    mean = rows.mean(0)
    budget = max(1, min(int(budget), like.d_sae))
    floor = SparseAutoencoder(directions.T.contiguous(), torch.zeros(like.d_sae),
                              directions.clone(), mean, architecture="abstopk", k=budget,
                              layer=like.layer, kind=like.kind, heads=like.heads,
                              hook_name=like.hook_name)
    with torch.no_grad():
        part = floor.encode(rows) @ floor.W_dec  # the latents' part, gain 1
        norm = float((part ** 2).sum())
        gain = float(((rows - mean) * part).sum()) / norm if norm > 0 else 0.0
        floor.W_dec.mul_(gain)
    return floor


class RandomDictionary(TransformerMixin, BaseEstimator):
    """A floor at one site as an estimator: :func:`random_floor` of ``n_latents`` directions
    and ``n_nonzero`` a row, fitted on ``A``. ``fit(A)`` sets ``floor_`` (the SAE),
    ``mean_ [w]`` and ``components_ [n_latents, w]`` (its unit directions);
    ``transform(A)`` gives the codes, ``inverse_transform(codes)`` the reconstruction.
    Deterministic for a given ``seed``."""

    def __init__(self, n_latents: int, n_nonzero: int, seed: int = 0):
        self.n_latents, self.n_nonzero, self.seed = n_latents, n_nonzero, seed

    def fit(self, A, y=None) -> "RandomDictionary":
        A = torch.as_tensor(np.asarray(A), dtype=torch.float32)
        shape = type("Shape", (), {"d_sae": self.n_latents, "layer": None, "kind": None,
                                   "heads": None, "hook_name": None})
        self.floor_ = random_floor(shape, self.n_nonzero, self.seed, A)
        self.mean_ = self.floor_.b_dec.detach().clone()
        self.components_ = random_directions(self.n_latents, A.shape[1], self.seed)
        return self

    def transform(self, A) -> torch.Tensor:
        with torch.no_grad():
            return self.floor_.encode(torch.as_tensor(np.asarray(A), dtype=torch.float32))

    def inverse_transform(self, codes) -> torch.Tensor:
        with torch.no_grad():
            return self.floor_.decode(torch.as_tensor(np.asarray(codes), dtype=torch.float32))
