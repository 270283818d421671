"""The SAGE metrics as plain functions of arrays (formulas: DESIGN.md, "Metrics").

Everything here is model-free: the evaluation stage runs the interventions and hands the
resulting logit differences, codes and activations to these functions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import xarray as xr

EDIT_KS = (1, 2, 4, 8, 16, 32)
INTERPRETABLE_F1 = 0.8


def sufficiency(ld_patched: np.ndarray, ld_clean: np.ndarray) -> float:
    """``LD_â / LD_clean``: the task survives replacing activations by their reconstruction."""
    return float(np.mean(ld_patched) / np.mean(ld_clean))


def necessity(ld_x: np.ndarray, ld_mean: np.ndarray, ld_clean: np.ndarray) -> float:
    """``1 - |LD_mean - LD_x| / |LD_mean - LD_clean|`` for ``x = mean + (a - â)``.

    1: removing what the dictionary explains hurts as much as mean-ablating everything.
    """
    total = abs(np.mean(ld_mean) - np.mean(ld_clean))
    return float(1 - abs(np.mean(ld_mean) - np.mean(ld_x)) / total)


def loss_increase(logp_patched: np.ndarray, logp_clean: np.ndarray) -> float:
    """Next-token loss increase (nats): mean ``-log p(answer)`` with the reconstruction
    spliced in, minus the clean one. 0: the splice costs the model nothing."""
    return float(np.mean(np.asarray(logp_clean) - np.asarray(logp_patched)))


def edit_accuracy(top1_edit: np.ndarray, top1_counterfactual: np.ndarray) -> float:
    """Share of prompts whose top prediction after the edit equals that under the real
    counterfactual activation."""
    return float(np.mean(np.asarray(top1_edit) == np.asarray(top1_counterfactual)))


def greedy_edit(
    a: torch.Tensor,
    codes: torch.Tensor,
    codes_cf: torch.Tensor,
    directions: torch.Tensor,
    target: torch.Tensor,
    k: int,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edit ``a`` towards ``target`` by moving at most ``k`` latents to their counterfactual value.

    Each latent ``j`` active in either code is a candidate: setting it from ``codes[j]`` to
    ``codes_cf[j]`` adds ``(codes_cf[j] - codes[j]) * directions[j]`` (this removes a clean
    latent or adds a counterfactual one). Greedily take the candidate that most reduces
    ``||target - a - chosen||``. ``scale [n]`` multiplies every direction per prompt (a
    frozen norm's scale). Shapes: ``a, target [n, w]``, codes ``[n, L]``, directions ``[L, w]``.

    Returns ``(edited [n, w], chosen [n, k] latent ids or -1, magnitude [n])``, the
    magnitude being the share of the clean code's weight (``Σ c_j ||d_j||``) removed.
    """
    scale = torch.ones(len(a), dtype=a.dtype) if scale is None else scale.to(a.dtype)
    norms = directions.norm(dim=-1)  # [L]
    step = (codes_cf - codes).to(a.dtype)  # [n, L]
    residual = (target - a).clone()
    edited = a.clone()
    taken = torch.zeros_like(step, dtype=torch.bool)
    chosen = torch.full((len(a), k), -1, dtype=torch.long)
    rows = torch.arange(len(a))
    for i in range(k):
        # gain of candidate j: ||R||² - ||R - δ_j||² = 2 R·δ_j - ||δ_j||²
        proj = (residual @ directions.T) * step * scale[:, None]
        gain = 2 * proj - (step * scale[:, None] * norms) ** 2
        gain = gain.masked_fill(taken | (step == 0), -torch.inf)
        best = gain.argmax(-1)
        ok = torch.isfinite(gain[rows, best]) & (gain[rows, best] > 0)
        delta = (step[rows, best] * scale)[:, None] * directions[best] * ok[:, None]
        edited += delta
        residual -= delta
        taken[rows[ok], best[ok]] = True
        chosen[ok, i] = best[ok]
    weight = (codes.clamp(min=0) * norms).sum(-1)
    removed = ((codes - codes_cf).clamp(min=0) * norms * taken).sum(-1)
    magnitude = torch.where(weight > 0, removed / weight, torch.zeros_like(weight))
    return edited, chosen, magnitude


def interpretability(codes: np.ndarray, labels: pd.DataFrame,
                     threshold: float = INTERPRETABLE_F1) -> xr.Dataset:
    """Precision/recall/F1 of "latent active" against "attribute = value".

    Returns, per (attribute, value): the best F1 over latents, that latent, its precision
    and recall; and per attribute the share of values whose best F1 ≥ ``threshold``.
    """
    active = np.asarray(codes) > 0  # [n, L]
    n_active = active.sum(0)
    rows = []
    for attribute in labels.columns:
        for value in sorted(labels[attribute].astype(str).unique()):
            y = (labels[attribute].astype(str) == value).to_numpy()
            tp = y.astype(np.float64) @ active  # [L]
            f1 = 2 * tp / np.maximum(n_active + y.sum(), 1)
            best = int(np.argmax(f1))
            rows.append(dict(attribute=attribute, value=value, best_f1=f1[best], latent=best,
                             precision=tp[best] / max(n_active[best], 1),
                             recall=tp[best] / max(y.sum(), 1)))
    table = pd.DataFrame(rows).set_index(["attribute", "value"])
    out = xr.Dataset.from_dataframe(table)
    share = table.best_f1.ge(threshold).groupby(level="attribute").mean()
    return out.assign(share_interpretable=("attribute", share.reindex(out.attribute.values).values))


def feature_alignment(features: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """For each supervised feature, the best |cosine| with any latent direction."""
    f = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    d = directions / np.maximum(np.linalg.norm(directions, axis=-1, keepdims=True), 1e-12)
    return np.abs(f @ d.T).max(-1)


def fvu(a: np.ndarray, a_hat: np.ndarray) -> float:
    """Fraction of variance unexplained: ``||a - â||² / ||a - mean(a)||²``."""
    a, a_hat = np.asarray(a, np.float64), np.asarray(a_hat, np.float64)
    return float(((a - a_hat) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())


def l0(codes: np.ndarray) -> float:
    return float((np.asarray(codes) > 0).sum(-1).mean())


def dead_share(codes: np.ndarray) -> float:
    """Share of latents never active on these prompts."""
    return float((~(np.asarray(codes) > 0).any(0)).mean())


def bootstrap(statistic: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval of ``statistic(*arrays)``, resampling prompts (the
    last axis of every array) with replacement."""
    rng = np.random.default_rng(seed)
    n = np.asarray(arrays[0]).shape[-1]
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        values.append(statistic(*(np.asarray(x)[..., idx] for x in arrays)))
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
