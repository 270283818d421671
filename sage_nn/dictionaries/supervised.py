"""Supervised feature dictionaries: the ground truth at one cross-section.

Activations ``a(p)`` at one site and position, and the task attributes ``c_i(p)`` of each
prompt, give one feature vector ``u_{i,v}`` per (attribute, value) (docs/metrics.md, "The
dictionaries compared")::

    MeanDictionary   u_{i,v} = mean(a | c_i = v) - mean(a)
    MSEDictionary    U = argmin ||a - mean(a) - C U||^2, C the one-hot design of all attributes
    reconstruction   â(p) = mean(a) + sum_i w_i(p) u_{i, c_i(p)}, w = 1 or fitted per example
    edit i: v -> v'  a' = a - w_i u_{i,v} + w_i u_{i,v'}

Both are scikit-learn transformers. Data come as an ``xarray.DataArray`` (sample dim x
feature dim) with the attributes as coordinates on the sample dim (what
``activations.collect(...)[kind].sel(layer=..., position=...)`` gives), or as an array plus an
attribute table passed as ``y``. Attribute values are compared as strings.

The ``*_torch`` functions are plain torch so that traced interventions (possibly run
remotely) can use a fitted dictionary without sklearn: ``mean, features = d.to_torch()`` and
``active = d.active_features(table)`` outside the trace, then :func:`reconstruct_torch`,
:func:`fit_weights_torch` and :func:`edit_torch` inside it.

Documented behaviour on degenerate data:

- an attribute with a single value in the fitting data raises ``ValueError`` (its feature
  cannot be told apart from the mean); drop it with ``attributes=[...]``;
- a value seen fewer than ``min_count`` times is fitted from those examples alone and
  raises :class:`RareValueWarning`;
- attributes confounded in the fitting data (the one-hot design is rank deficient beyond
  the one redundancy per attribute that every one-hot design has) raise
  :class:`ConfoundedAttributesWarning` naming them: their features are not separable; the
  MSE dictionary then returns the minimum-norm least-squares solution (pseudo-inverse),
  which splits the shared effect among them;
- NaN or inf in activations or missing attribute labels raise ``ValueError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import OneHotEncoder
from sklearn.utils.validation import check_is_fitted, validate_data

from ..common.notes import SageWarning

#: Prompt coordinates written by ``collect``/tasks that are bookkeeping, not attributes.
NON_ATTRIBUTES = ("text", "n_tokens", "template", "split")


class RareValueWarning(SageWarning):
    """An attribute value has fewer than ``min_count`` examples in the fitting data."""


class ConfoundedAttributesWarning(SageWarning):
    """Attributes whose values co-vary in the fitting data: their features are not separable."""


# -- plain torch, usable inside traces ------------------------------------------------------

def reconstruct_torch(mean: torch.Tensor, features: torch.Tensor, active: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean + sum_i w_i features[active_i]``.

    ``active`` [..., n_attributes] holds feature indices (:meth:`active_features`),
    ``weights`` [..., n_attributes] defaults to 1. Returns [..., d].
    """
    f = features[active]  # [..., n_attributes, d]
    if weights is None:
        return mean + f.sum(-2)
    return mean + (weights.unsqueeze(-1) * f).sum(-2)


def fit_weights_torch(a: torch.Tensor, mean: torch.Tensor, features: torch.Tensor,
                      active: torch.Tensor) -> torch.Tensor:
    """Per-example least-squares weights of the active features: [..., n_attributes].

    Minimum-norm solution, so collinear active features share weight: the normal
    equations with a ridge far below the features' scale (batched Cholesky; a
    pseudo-inverse where that fails), which is fast for many rows.
    """
    g = features[active]  # [..., n_attributes, d]
    gram = g @ g.transpose(-1, -2)
    rhs = (g @ (a - mean).unsqueeze(-1))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)[..., None, None]
    factor, info = torch.linalg.cholesky_ex(gram + ridge * eye)
    if bool((info != 0).any()):
        return (torch.linalg.pinv(g.transpose(-1, -2)) @ (a - mean).unsqueeze(-1)).squeeze(-1)
    return torch.cholesky_solve(rhs, factor).squeeze(-1)


def edit_torch(a: torch.Tensor, features: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """``a - w features[old] + w features[new]`` for feature indices ``old``/``new`` [...]."""
    delta = features[new] - features[old]
    if weight is not None:
        delta = weight.unsqueeze(-1) * delta
    return a + delta


# -- input handling -------------------------------------------------------------------------

def _table(y: Any, n: int) -> pd.DataFrame:
    """An attribute table from a DataFrame, mapping, Series or 1-/2-D array."""
    if isinstance(y, pd.DataFrame):
        table = y
    elif isinstance(y, pd.Series):
        table = y.to_frame(y.name if y.name is not None else "y")
    elif isinstance(y, Mapping):
        table = pd.DataFrame({str(k): np.asarray(v) for k, v in y.items()})
    else:
        arr = np.asarray(y)
        if arr.ndim == 1:
            table = pd.DataFrame({"y": arr})
        elif arr.ndim == 2:
            table = pd.DataFrame(arr, columns=[f"a{j}" for j in range(arr.shape[1])])
        else:
            raise ValueError(f"attribute labels must be a table (DataFrame) or a 1-D/2-D array, "
                             f"got an array of shape {arr.shape}")
    table = table.reset_index(drop=True)
    if len(table) != n:
        raise ValueError(f"{len(table)} rows of attribute labels for {n} samples of activations: "
                         "pass one row of attributes per sample")
    return table


class _Input:
    """Activations as a float array, the attribute table, and how to label outputs."""

    def __init__(self, X: Any, y: Any):
        self.array_like = None
        if isinstance(X, xr.DataArray):
            if X.ndim != 2:
                raise ValueError(
                    f"activations must be 2-D (samples x features), got dims {X.dims}: select one "
                    "site and position first, e.g. ds.resid_post.sel(layer=9, position='END')")
            self.array_like = X
            self.sample_dim, self.feature_dim = X.dims
            self.A = X.values
            if y is None:
                coords = {name: c.values for name, c in X.coords.items()
                          if c.dims == (self.sample_dim,) and name != self.sample_dim}
                y = pd.DataFrame(coords)
                self.from_coords = True
            else:
                self.from_coords = False
        else:
            self.sample_dim, self.feature_dim = "sample", "d"
            self.A = X
            self.from_coords = False
        self.y = y

    def table(self, n: int) -> pd.DataFrame | None:
        return None if self.y is None else _table(self.y, n)

    def wrap(self, values: np.ndarray, dim: str, coord: Any = None) -> Any:
        """Label ``values`` like the input: samples keep their coordinates."""
        if self.array_like is None:
            return values
        samples = self.array_like[self.sample_dim]
        coords = {k: c for k, c in samples.coords.items()}
        out = xr.DataArray(values, dims=(self.sample_dim, dim), coords=coords)
        return out if coord is None else out.assign_coords(coord)


def _check_finite(A: np.ndarray) -> None:
    A = np.asarray(A)
    if A.dtype.kind in "fc" and not np.isfinite(A).all():
        rows = np.flatnonzero(~np.isfinite(A).all(axis=tuple(range(1, A.ndim))))
        raise ValueError(
            f"activations contain NaN or inf in {len(rows)} sample(s) (rows {rows[:10].tolist()}): "
            "drop those samples (e.g. positions past a prompt's end) or collect in float32")


# -- the estimators -------------------------------------------------------------------------

class _SupervisedDictionary(TransformerMixin, BaseEstimator):
    """Shared fit/transform machinery; subclasses compute ``components_`` in ``_features``."""

    def __init__(self, attributes: Sequence[str] | None = None, weights: str = "unit",
                 min_count: int = 2):
        self.attributes = attributes
        self.weights = weights
        self.min_count = min_count

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # the attribute labels (or coordinates)
        tags.input_tags.allow_nan = False
        return tags

    # fitting ----------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None):
        """Fit on activations ``X`` [n, d] with attribute labels ``y`` (or coordinates of ``X``)."""
        if self.weights not in ("unit", "fitted"):
            raise ValueError(f"weights={self.weights!r}: use 'unit' (w_i = 1) or 'fitted' "
                             "(per-example least squares over the active features)")
        inp = _Input(X, y)
        _check_finite(inp.A)
        A = validate_data(self, inp.A, reset=True, dtype=np.float64, ensure_min_samples=2)
        table = inp.table(len(A))
        if table is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None: y holds "
                "the attribute labels; pass fit(X, y) with y a table "
                "(one row per sample, one column per attribute), or an xarray.DataArray whose "
                "attributes are coordinates on its sample dim")
        names = self._attribute_names(table, inp.from_coords)
        labels = self._labels(table, names)
        for name in names:
            values = labels[name].unique()
            if len(values) < 2:
                raise ValueError(
                    f"attribute {name!r} has the single value {values[0]!r} in the fitting data, so "
                    "its feature cannot be told apart from the mean: drop it (attributes=[...]) or "
                    "fit on data where it varies")
        self.attributes_ = names
        self.encoder_ = OneHotEncoder(sparse_output=False, dtype=np.float64).fit(labels)
        self.categories_ = self.encoder_.categories_
        self.feature_dim_ = inp.feature_dim
        C = self.encoder_.transform(labels)
        self.value_counts_ = pd.Series(C.sum(0).astype(int), index=self._feature_index())
        self._warn_degenerate(C)
        self.mean_ = A.mean(0)
        self.components_ = self._features(A - self.mean_, C)
        self.features_ = xr.DataArray(
            self.components_, dims=("feature", self.feature_dim_),
            coords=xr.Coordinates.from_pandas_multiindex(self._feature_index(), "feature"),
            name="features")
        return self

    def _features(self, centered: np.ndarray, C: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _attribute_names(self, table: pd.DataFrame, from_coords: bool) -> list[str]:
        if self.attributes is not None:
            names = [self.attributes] if isinstance(self.attributes, str) else list(self.attributes)
            missing = [a for a in names if a not in table.columns]
            if missing:
                raise ValueError(f"attributes {missing} not found among the labels "
                                 f"{list(map(str, table.columns))}")
            return [str(a) for a in names]
        names = [str(c) for c in table.columns if str(c) not in NON_ATTRIBUTES]
        if not names:
            where = "coordinates on the sample dim" if from_coords else "columns of y"
            raise ValueError(f"no attribute labels found ({where}: {list(table.columns)}); pass "
                             "attributes=[...] naming them, or labels as y")
        return names

    @staticmethod
    def _labels(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
        sub = table[names]
        if sub.isna().to_numpy().any():
            bad = [n for n in names if sub[n].isna().any()]
            raise ValueError(f"attribute labels are missing (NaN/None) for {bad}: every sample "
                             "needs a value for every attribute")
        return sub.astype(str).reset_index(drop=True)

    def _feature_index(self) -> pd.MultiIndex:
        return pd.MultiIndex.from_tuples(
            [(a, str(v)) for a, cats in zip(self.attributes_, self.categories_) for v in cats],
            names=["attribute", "value"])

    def _warn_degenerate(self, C: np.ndarray) -> None:
        rare = self.value_counts_[self.value_counts_ < self.min_count]
        if len(rare):
            shown = ", ".join(f"{a}={v} ({n}x)" for (a, v), n in list(rare.items())[:10])
            warnings.warn(RareValueWarning(
                f"{len(rare)} attribute value(s) seen fewer than min_count={self.min_count} "
                f"times: {shown}; their features are fitted from those examples alone (noisy)",
                cli=f"{len(rare)} attribute value(s) occur fewer than {self.min_count} times "
                    f"among the {len(C)} prompts the ground truth is fitted on ({shown}), so "
                    "their supervised features are noisy; fix: more fit prompts (raise "
                    "--n-fit)", key="rare"), stacklevel=3)
        # One-hot with the first value of each attribute dropped, plus an intercept, is full
        # rank unless attributes co-vary; its null space names the confounded attributes.
        blocks = np.cumsum([0] + [len(c) for c in self.categories_])
        keep = [j for j in range(C.shape[1]) if j not in set(blocks[:-1])]
        D = np.column_stack([np.ones(len(C)), C[:, keep]])
        # V is square whenever there are at least as many rows as columns: no full U needed
        _, s, vt = np.linalg.svd(D, full_matrices=len(D) < D.shape[1])
        tol = s.max() * max(D.shape) * np.finfo(float).eps
        rank = int((s > tol).sum())
        if rank < D.shape[1]:
            null = np.abs(vt[rank:]).max(0)[1:]  # per kept column
            owner = np.searchsorted(blocks, np.asarray(keep), side="right") - 1
            involved = sorted({self.attributes_[o] for o, z in zip(owner, null) if z > 1e-8})
            warnings.warn(ConfoundedAttributesWarning(
                f"the attribute design is rank deficient (rank {rank} < {D.shape[1]}): "
                f"attributes {involved} are confounded in the fitting data, so their features "
                "are not separable (the MSE dictionary returns the minimum-norm solution); "
                "sample their values independently",
                cli=f"attributes {', '.join(involved)} change together among the {len(C)} "
                    "prompts the ground truth is fitted on, so their supervised features "
                    "cannot be told apart (the effect they share is split between them); "
                    "fix: more fit prompts (raise --n-fit); if they stay tied, the task ties "
                    "them and their results should be read together",
                key=",".join(involved)), stacklevel=3)

    # coding -----------------------------------------------------------------------------

    def active_features(self, attributes: Any) -> np.ndarray:
        """Index (into ``features_``) of each sample's active feature, [n, n_attributes]."""
        check_is_fitted(self)
        table = attributes if isinstance(attributes, pd.DataFrame) else _table(attributes, len(attributes))
        return self._active(self._labels_for(table))

    def _labels_for(self, table: pd.DataFrame) -> pd.DataFrame:
        missing = [a for a in self.attributes_ if a not in table.columns]
        if missing:
            raise ValueError(f"attribute labels {missing} are missing; this dictionary was fitted "
                             f"on attributes {self.attributes_}")
        return self._labels(table, self.attributes_)

    def _active(self, labels: pd.DataFrame) -> np.ndarray:
        return np.stack([self._feature_of(i, labels[name].to_numpy())
                         for i, name in enumerate(self.attributes_)], 1).astype(np.int64)

    def _feature_of(self, i: int, values: np.ndarray) -> np.ndarray:
        """Feature index of attribute ``i`` taking ``values`` (strings)."""
        cats = self.categories_[i]
        codes = pd.Categorical(values, categories=cats).codes
        if (codes < 0).any():
            unseen = sorted({str(v) for v in values[codes < 0]})
            raise ValueError(f"attribute {self.attributes_[i]!r} has value(s) {unseen[:10]} not "
                             f"seen in fit; known values: {list(cats)[:20]}")
        return codes + sum(len(c) for c in self.categories_[:i])

    def _prepare(self, X: Any, y: Any):
        """Validated activations, active feature indices and the input wrapper."""
        check_is_fitted(self)
        inp = _Input(X, y)
        _check_finite(inp.A)
        A = validate_data(self, inp.A, reset=False, dtype=np.float64)
        table = inp.table(len(A))
        if table is None:
            raise ValueError(
                f"{type(self).__name__}.transform needs the attribute labels of the samples: "
                "pass transform(X, y) with y the attribute table, or an xarray.DataArray with "
                "the attributes as coordinates")
        return A, self._active(self._labels_for(table)), inp

    def _weights(self, A: np.ndarray, active: np.ndarray, chunk: int = 4096) -> np.ndarray:
        if self.weights == "unit":
            return np.ones(active.shape, dtype=np.float64)
        mean, feats = self.to_torch(dtype=torch.float64)
        out = [fit_weights_torch(torch.tensor(A[s:s + chunk]), mean, feats,
                                 torch.from_numpy(active[s:s + chunk])).numpy()
               for s in range(0, len(A), chunk)]
        return np.concatenate(out) if out else np.zeros(active.shape)

    def _codes(self, A: np.ndarray, active: np.ndarray) -> np.ndarray:
        codes = np.zeros((len(A), len(self.components_)))
        np.put_along_axis(codes, active, self._weights(A, active), axis=1)
        return codes

    def transform(self, X: Any, y: Any = None) -> Any:
        """Per-sample codes [n, n_features]: the weight of each active feature, 0 elsewhere."""
        A, active, inp = self._prepare(X, y)
        codes = self._codes(A, active)
        return inp.wrap(codes, "feature",
                        xr.Coordinates.from_pandas_multiindex(self._feature_index(), "feature"))

    def fit_transform(self, X: Any, y: Any = None, **fit_params) -> Any:
        return self.fit(X, y, **fit_params).transform(X, y)

    def inverse_transform(self, codes: Any) -> Any:
        """Reconstruction ``mean_ + codes @ components_`` (codes from :meth:`transform`)."""
        check_is_fitted(self)
        values = np.asarray(codes.values if isinstance(codes, xr.DataArray) else codes, dtype=float)
        if values.ndim != 2 or values.shape[1] != len(self.components_):
            raise ValueError(f"codes must have shape (n_samples, {len(self.components_)}), got "
                             f"{values.shape}: pass the output of transform")
        rec = self.mean_ + values @ self.components_
        if isinstance(codes, xr.DataArray):
            sample_dim = codes.dims[0]
            coords = {k: c for k, c in codes[sample_dim].coords.items()}
            return xr.DataArray(rec, dims=(sample_dim, self.feature_dim_), coords=coords)
        return rec

    def reconstruct(self, X: Any, y: Any = None) -> Any:
        """``inverse_transform(transform(X, y))``."""
        return self.inverse_transform(self.transform(X, y))

    def score(self, X: Any, y: Any = None) -> float:
        """Explained variance of the reconstruction, ``1 - |a - â|² / |a - mean_|²``."""
        A, active, _ = self._prepare(X, y)
        rec = self.mean_ + self._codes(A, active) @ self.components_
        return float(1 - ((A - rec) ** 2).sum() / ((A - self.mean_) ** 2).sum())

    def edit(self, X: Any, attributes: Any, attribute: str, new_value: Any) -> Any:
        """Change ``attribute`` to ``new_value`` (one value, or one per sample).

        ``a' = a - w u_{attribute, old} + w u_{attribute, new}`` with ``w`` the sample's weight
        of that feature (1 for ``weights='unit'``). A DataArray comes back with its
        attribute coordinate updated.
        """
        A, active, inp = self._prepare(X, attributes)
        if attribute not in self.attributes_:
            raise ValueError(f"cannot edit {attribute!r}: this dictionary was fitted on "
                             f"attributes {self.attributes_}")
        i = self.attributes_.index(attribute)
        new_labels = np.broadcast_to(np.asarray(new_value, dtype=object), (len(A),)).astype(str)
        new = self._feature_of(i, new_labels)
        w = self._weights(A, active)[:, i]
        edited = A + w[:, None] * (self.components_[new] - self.components_[active[:, i]])
        if inp.array_like is None:
            return edited
        out = inp.array_like.copy(data=edited.astype(inp.array_like.dtype, copy=False))
        if attribute in out.coords:
            out = out.assign_coords({attribute: (inp.sample_dim, new_labels)})
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray([f"{a}={v}" for a, v in self._feature_index()], dtype=object)

    # plain torch for traces ---------------------------------------------------------------

    def to_torch(self, dtype: torch.dtype = torch.float32,
                 device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [d], features [n_features, d])`` for :func:`reconstruct_torch` & co."""
        check_is_fitted(self)
        return (torch.as_tensor(self.mean_, dtype=dtype, device=device),
                torch.as_tensor(self.components_, dtype=dtype, device=device))


class MeanDictionary(_SupervisedDictionary):
    """Features are conditional means: ``u_{i,v} = mean(a | c_i = v) - mean(a)``.

    Parameters
    ----------
    attributes : names of the attributes to use; default all labels except the bookkeeping
        columns ``text, n_tokens, template, split``.
    weights : ``"unit"`` (w_i = 1) or ``"fitted"`` (per-example least squares over the
        active features) for transform, reconstruction and edits.
    min_count : values seen fewer times warn (:class:`RareValueWarning`).

    Attributes
    ----------
    mean_ [d], components_ [n_features, d], features_ (xarray, dims ``feature`` (a
    MultiIndex over ``attribute``, ``value``; ``features_.unstack("feature")`` gives
    (d, attribute, value)) and the feature dim), attributes_, categories_, value_counts_,
    encoder_ (the fitted OneHotEncoder).
    """

    def _features(self, centered: np.ndarray, C: np.ndarray) -> np.ndarray:
        return (C.T @ centered) / C.sum(0)[:, None]


class MSEDictionary(_SupervisedDictionary):
    """Least-squares features: multi-output linear regression of the centred activations on
    the one-hot design of all attributes.

    ``solver`` is any linear sklearn regressor exposing ``coef_`` (default
    ``LinearRegression``: the minimum-norm solution, i.e. the pseudo-inverse; ``Ridge(alpha)``
    shrinks). The dictionary centres the activations itself, so the solver's
    ``fit_intercept`` is set to False. Other parameters and attributes as
    :class:`MeanDictionary`, plus ``solver_`` (the fitted regressor).
    """

    def __init__(self, attributes: Sequence[str] | None = None, weights: str = "unit",
                 min_count: int = 2, solver: Any = None):
        super().__init__(attributes=attributes, weights=weights, min_count=min_count)
        self.solver = solver

    def _features(self, centered: np.ndarray, C: np.ndarray) -> np.ndarray:
        solver = clone(self.solver) if self.solver is not None else LinearRegression()
        if "fit_intercept" in solver.get_params():
            solver.set_params(fit_intercept=False)
        self.solver_ = solver.fit(C, centered)
        coef = getattr(self.solver_, "coef_", None)
        if coef is None:
            raise ValueError(f"solver {type(solver).__name__} has no coef_: use a linear "
                             "regressor (LinearRegression, Ridge, Lasso, ...)")
        return np.asarray(coef, dtype=np.float64).reshape(centered.shape[1], C.shape[1]).T.copy()
