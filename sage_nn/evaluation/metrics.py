"""The SAGE metrics as plain functions of arrays (formulas: docs/metrics.md, "The metrics").

Everything here is model-free: the evaluation stage runs the interventions and hands the
resulting logit differences, codes and activations to these functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import xarray as xr

EDIT_KS = (1, 2, 4, 8, 16, 32)
INTERPRETABLE_F1 = 0.8
# Below this many logits, a change of the mean logit difference is too small to divide by
# (necessity's mean-ablation gap, edit success's counterfactual move): the ratio is NaN.
# Task logit differences are a few logits (IOI ~3), so 0.1 is a few percent of the effect.
MIN_LD_GAP = 0.1
# Edit accuracy needs the counterfactual to change the top prediction on this many prompts.
MIN_CHANGED = 10


# The five intervention metrics take prompts along the last axis; with more axes (the
# bootstrap's resamples) they return one value per row instead of a float.

def _value(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def _mean(x) -> np.ndarray:
    return np.mean(np.asarray(x, dtype=np.float64), -1)


def sufficiency(ld_patched: np.ndarray, ld_mean: np.ndarray, ld_clean: np.ndarray,
                min_gap: float = MIN_LD_GAP) -> float:
    """``(LD_â - LD_mean) / (LD_clean - LD_mean)`` (Makelov et al.'s ``get_logitdiff_loss``,
    with the sign kept): the share of what mean ablation takes away that the
    reconstruction keeps. 1: all of it; 0: no better than the mean; below 0: it moves the
    logit difference the wrong way. NaN when mean ablation moves the mean logit difference by
    less than ``min_gap`` logits (:func:`mean_ablation_reason`)."""
    gap = _mean(ld_clean) - _mean(ld_mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (_mean(ld_patched) - _mean(ld_mean)) / gap
    return _value(np.where(np.abs(gap) >= min_gap, value, np.nan))


def sufficiency_ratio(ld_patched: np.ndarray, ld_clean: np.ndarray) -> float:
    """``LD_â / LD_clean``, the plain ratio: it credits a reconstruction with whatever mean
    ablation leaves standing (on SmolLM2 IOI the mean-ablated io cross-section keeps 0.59
    of LD_clean), so it is kept for reference, not as a headline."""
    return _value(_mean(ld_patched) / _mean(ld_clean))


def necessity(ld_x: np.ndarray, ld_mean: np.ndarray, ld_clean: np.ndarray,
              min_gap: float = MIN_LD_GAP) -> float:
    """``1 - mean_i |LD_x,i - LD_mean,i| / mean_i |LD_clean,i - LD_mean,i|`` for ``x = mean
    + (a - â)``, prompt by prompt.

    1: removing what the dictionary explains leaves every prompt where mean-ablating
    everything leaves it; 0: as far from there as the clean run. The distance is taken per
    prompt before averaging: with the mean logit differences instead, a reconstruction whose
    errors push prompts both ways would read as if removing it removed everything (a random
    SAE at SmolLM2's heads, FVU 8-12, scored 0.86-0.91 so). NaN when mean ablation moves the
    mean logit difference by less than ``min_gap`` logits (the ratio would only amplify
    noise); :func:`mean_ablation_reason` says why.
    """
    gap = np.abs(_mean(ld_mean) - _mean(ld_clean))
    ld_mean = np.asarray(ld_mean, dtype=np.float64)
    total = _mean(np.abs(np.asarray(ld_clean, dtype=np.float64) - ld_mean))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = 1 - _mean(np.abs(np.asarray(ld_x, dtype=np.float64) - ld_mean)) / total
    return _value(np.where(gap >= min_gap, value, np.nan))  # also NaN for a NaN gap


def mean_ablation_reason(ld_mean: np.ndarray, ld_clean: np.ndarray,
                         min_gap: float = MIN_LD_GAP) -> str | None:
    """Why :func:`sufficiency` and :func:`necessity` are NaN for these logit differences
    (both divide by what mean ablation moves), or ``None`` if they are not."""
    return _small_move("mean ablation", ld_mean, ld_clean, min_gap)



def _small_move(what: str, ld: np.ndarray, ld_clean: np.ndarray, min_gap: float) -> str | None:
    """The reason a ratio over ``mean(ld) - mean(ld_clean)`` is NaN, or ``None``."""
    move = abs(np.mean(ld) - np.mean(ld_clean))
    if move >= min_gap:
        return None
    return f"NaN: {what} moves the logit difference by only {move:.3g} (below {min_gap:g} logits)"


def loss_increase(logp_patched: np.ndarray, logp_clean: np.ndarray) -> float:
    """Next-token loss increase (nats): mean ``-log p(answer)`` with the reconstruction
    spliced in, minus the clean one. 0: the splice costs the model nothing."""
    return _value(_mean(np.asarray(logp_clean) - np.asarray(logp_patched)))


def edit_accuracy(top1_edit: np.ndarray, top1_cf: np.ndarray,
                  top1_clean: np.ndarray) -> float:
    """Share of prompts whose top prediction after the edit equals that with the real
    counterfactual activation patched in, counted only over the prompts where that
    counterfactual prediction differs from the clean one; NaN when there are none
    (:func:`edit_accuracy_reason`).

    Its no-edit baseline is the same function with the clean run (what the edit starts
    from) as ``top1_edit``; the evaluation reports it next to every edit.
    """
    edit, cf, clean = (np.asarray(x) for x in (top1_edit, top1_cf, top1_clean))
    changed = cf != clean
    n_changed = changed.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _value(np.where(n_changed > 0, ((edit == cf) & changed).sum(-1) / n_changed,
                               np.nan))


def edit_accuracy_reason(top1_cf: np.ndarray, top1_clean: np.ndarray) -> str | None:
    """Why :func:`edit_accuracy` is NaN, or ``None`` if it is not."""
    if (np.asarray(top1_cf) != np.asarray(top1_clean)).any():
        return None
    return "NaN: the counterfactual never changes the top prediction"


def edit_success(ld_edit: np.ndarray, ld_clean: np.ndarray, ld_cf: np.ndarray,
                 min_gap: float = MIN_LD_GAP) -> float:
    """``(mean LD_edit - mean LD_clean) / (mean LD_cf - mean LD_clean)``: the share of the
    counterfactual's move of the logit difference that the edit achieves (1: all of it,
    0: none, negative: the wrong way). For attributes whose counterfactual never changes the
    top prediction (IOI ``s``, ``order``). NaN when ``|mean LD_cf - mean LD_clean|`` is below
    ``min_gap`` logits (:func:`edit_success_reason`).

    Its no-edit baseline is the same function with the clean run (what the edit starts
    from) as ``ld_edit``; the evaluation reports it next to every edit.
    """
    move = _mean(ld_cf) - _mean(ld_clean)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (_mean(ld_edit) - _mean(ld_clean)) / move
    return _value(np.where(np.abs(move) >= min_gap, value, np.nan))


def edit_success_reason(ld_clean: np.ndarray, ld_cf: np.ndarray,
                        min_gap: float = MIN_LD_GAP) -> str | None:
    """Why :func:`edit_success` is NaN, or ``None`` if it is not."""
    return _small_move("the counterfactual", ld_cf, ld_clean, min_gap)


def edit_metric(top1_clean: np.ndarray, top1_cf: np.ndarray,
                min_changed: int = MIN_CHANGED) -> str:
    """Which edit metric an attribute gets: ``"accuracy"`` when the counterfactual changes
    the top prediction on at least ``min_changed`` prompts (and on at least one), else
    ``"success"`` (e.g. IOI ``s``/``order``, where the answer stays IO).

    Accuracy is a share over the changed prompts only, so it needs enough of them to mean
    anything; lower ``min_changed`` for tiny test sets.
    """
    n_changed = int((np.asarray(top1_cf) != np.asarray(top1_clean)).sum())
    return "accuracy" if n_changed >= max(min_changed, 1) else "success"


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
    magnitude being the share of the clean code's weight (``Σ |c_j| ||d_j||``) removed.
    """
    chosen, coefs = greedy_path(a, codes, codes_cf, directions, target, k, scale)
    return (a + path_delta(chosen, coefs, directions),
            chosen, edit_magnitude(codes, chosen, coefs, directions, scale))


def greedy_path(a, codes, codes_cf, directions, target, k: int, scale=None):
    """:func:`greedy_edit`'s choices: ``chosen [n, k]`` latent ids (-1: none, the edit
    stopped) and ``coefs [n, k]``, each the chosen latent's move times the row's scale
    (0 for none). The first ``k' < k`` columns are the greedy edit at ``k'``: one path
    serves every k."""
    scale = torch.ones(len(a), dtype=a.dtype) if scale is None else scale.to(a.dtype)
    directions = directions.to(a.dtype)
    step = (codes_cf - codes).to(a.dtype) * scale[:, None]  # [n, L]: each latent's move
    # the residual's inner product with every direction, updated by the chosen direction's
    # row of the Gram matrix (no product with all directions per step)
    corr = (target - a) @ directions.T  # [n, L]
    gram = directions @ directions.T if len(directions) <= 8192 else None
    sq = (step ** 2) * directions.pow(2).sum(-1)  # ||δ_j||²
    blocked = step == 0
    chosen = torch.full((len(a), k), -1, dtype=torch.long)
    coefs = torch.zeros((len(a), k), dtype=a.dtype)
    rows = torch.arange(len(a))
    for i in range(k):
        # gain of candidate j: ||R||² - ||R - δ_j||² = 2 R·δ_j - ||δ_j||²
        gain = (2 * corr * step - sq).masked_fill(blocked, -torch.inf)
        best = gain.argmax(-1)
        top = gain[rows, best]
        ok = torch.isfinite(top) & (top > 0)
        coef = step[rows, best] * ok
        row = gram[best] if gram is not None else directions[best] @ directions.T
        corr -= coef[:, None] * row
        blocked[rows[ok], best[ok]] = True
        chosen[ok, i] = best[ok]
        coefs[:, i] = coef
    return chosen, coefs


def f1_path(codes, codes_cf, values, values_cf, ranked: dict, k: int, scale=None):
    """The interpretation-aware edit of Makelov et al. (``get_edit_using_f1_scores``): per
    prompt, remove the ``k`` latents with the best fit-prompt F1 for its clean value that are
    active in its clean code (at their clean codes), and add the ``k`` best for its
    counterfactual value that are active in the counterfactual code (at those codes).
    ``values``/``values_cf [n]`` are the attribute's values; ``ranked`` maps a value to its
    latents from best to worst fit F1 (:func:`ranked_latents`). Returns ``chosen, coefs
    [n, 2k]`` as :func:`greedy_path` does, removals and additions interleaved, so the first
    ``2k'`` columns are the edit at ``k' <= k``. Prompts whose value has no ranking move
    nothing."""
    n = len(codes)
    scale = torch.ones(n, dtype=codes.dtype) if scale is None else scale.to(codes.dtype)
    chosen = torch.full((n, 2 * k), -1, dtype=torch.long)
    coefs = torch.zeros((n, 2 * k), dtype=codes.dtype)
    for offset, sign, code, vals in ((0, -1.0, codes, values), (1, 1.0, codes_cf, values_cf)):
        vals = np.asarray(vals).astype(str)
        for value in np.unique(vals):
            if value not in ranked:
                continue
            rows = torch.as_tensor(np.nonzero(vals == value)[0])
            order = torch.as_tensor(ranked[value])  # [L], best first
            active = code[rows][:, order] != 0  # [m, L] in F1 order
            # the first k active entries of each row: rank them ahead, in F1 order
            key = active * (len(order) - torch.arange(len(order)))
            top = torch.topk(key, min(k, len(order)), dim=1)
            ok = top.values > 0
            ids = order[top.indices].masked_fill(~ok, -1)
            taken = code[rows[:, None], ids.clamp(min=0)] * ok * scale[rows, None] * sign
            chosen[rows[:, None], offset + 2 * torch.arange(ids.shape[1])] = ids
            coefs[rows[:, None], offset + 2 * torch.arange(ids.shape[1])] = taken
    return chosen, coefs


def path_delta(chosen: torch.Tensor, coefs: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``Σ_i coefs[:, i] * directions[chosen[:, i]]`` (``[n, w]``), in the path's order."""
    delta = torch.zeros(len(chosen), directions.shape[-1], dtype=directions.dtype)
    for i in range(chosen.shape[1]):
        delta += coefs[:, i, None] * directions[chosen[:, i].clamp(min=0)]
    return delta


def edit_magnitude(codes, chosen, coefs, directions, scale=None) -> torch.Tensor:
    """The share of the clean code's weight (``Σ |c_j| ||d_j||``) that an edit's moves
    (``chosen``/``coefs`` of a path, each coefficient a code change times the row's
    ``scale``) remove, per row: a latent moved towards 0 loses what it moved, one whose
    sign flips loses all of its weight."""
    scale = torch.ones(len(codes), dtype=codes.dtype) if scale is None else scale.to(codes.dtype)
    moved = chosen >= 0
    change = torch.zeros_like(codes).scatter_add_(
        1, chosen.clamp(min=0), (coefs / scale[:, None]).to(codes.dtype) * moved)
    edited = codes + change
    norms = directions.norm(dim=-1)
    kept = (edited * codes.sign()).clamp(min=0).minimum(codes.abs())
    weight = (codes.abs() * norms).sum(-1)
    removed = ((codes.abs() - kept) * norms).sum(-1)
    return torch.where(weight > 0, removed / weight, torch.zeros_like(weight))


def _activity(codes) -> np.ndarray:
    """How strongly each latent is active: ``|code|`` (SAE codes are >= 0; a floor's sparse
    codes have either sign)."""
    return np.abs(np.asarray(codes, dtype=np.float64))


def latent_f1(codes_fit: np.ndarray, labels_fit: pd.DataFrame) -> dict:
    """Per ``(attribute, value)`` of ``labels_fit``: each latent's best F1 on the fit
    prompts as a detector of "attribute = value", over thresholds ``t >= 0`` of "active:
    ``|code| > t``", and that threshold: ``{(attribute, value): (f1 [L], threshold [L])}``.

    ``t = 0`` is "active at all" (the reference's definition); a larger ``t`` matters where
    codes are not exactly sparse: at a site reached through the reconstruction a latent's
    code is a pattern-weighted sum over the source tokens, non-zero wherever it fires in
    the context. A latent never active on the fit prompts has F1 0 and threshold inf."""
    score = _activity(codes_fit)
    n, n_latents = score.shape
    order = np.argsort(-score, axis=0, kind="stable")
    ranked = np.take_along_axis(score, order, 0)
    below = np.vstack([ranked[1:], np.zeros((1, n_latents))])  # the next score: the cut
    valid = (ranked > below) & (ranked > 0)  # a cut between distinct scores, all active
    predicted = np.arange(1, n + 1)[:, None]
    cols = np.arange(n_latents)
    out = {}
    for attribute in labels_fit.columns:
        values = labels_fit[attribute].astype(str).to_numpy()
        names = sorted(set(values))
        step = max(1, 8_000_000 // max(1, n * n_latents))  # values at once, in bounded memory
        for first in range(0, len(names), step):
            chunk = names[first:first + step]
            positive = values[:, None] == np.asarray(chunk)[None, :]  # [n, V]
            # these values at once: true positives above each cut, per latent's own order
            hits = np.cumsum(positive[order], 0, dtype=np.int32)  # [n, L, V]
            f1 = np.where(valid[..., None],
                          2 * hits / (predicted[..., None] + positive.sum(0)), 0.0)
            best = f1.argmax(0)  # [L, V]
            for j, value in enumerate(chunk):
                top = f1[best[:, j], cols, j]
                out[attribute, value] = (top, np.where(top > 0, below[best[:, j], cols],
                                                       np.inf))
    return out


def ranked_latents(fitted: dict, attribute: str) -> dict[str, np.ndarray]:
    """Per value of ``attribute``, its latents from best to worst fit F1 (:func:`latent_f1`)."""
    return {value: np.argsort(-f1, kind="stable") for (a, value), (f1, _) in fitted.items()
            if a == attribute}


def detectors(fitted: dict, codes: np.ndarray, labels: pd.DataFrame):
    """Each value's detector (its best fit-prompt latent and threshold, :func:`latent_f1`)
    applied to ``codes``: ``(keys, latents, thresholds, active [V, n], positive [V, n])``,
    one row per ``(attribute, value)`` key of ``fitted``."""
    keys = list(fitted)
    latents = [int(np.argmax(f1)) for f1, _ in fitted.values()]
    thresholds = [float(cut[j]) for (_, cut), j in zip(fitted.values(), latents)]
    score = _activity(codes)
    active = np.stack([score[:, j] > t for j, t in zip(latents, thresholds)])
    positive = np.stack([(labels[a].astype(str) == v).to_numpy() for a, v in keys])
    return keys, latents, thresholds, active, positive


def detector_f1(active: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """F1 of detectors ``active [..., V, n]`` against ``positive [V, n]`` (prompts last),
    per detector; NaN for a value with no positive prompt."""
    tp = (active & positive).sum(-1)
    n_pos = positive.sum(-1)
    with np.errstate(invalid="ignore"):
        f1 = 2 * tp / np.maximum(active.sum(-1) + n_pos, 1)
    return np.where(n_pos > 0, f1, np.nan)


def mean_detector_f1(active: np.ndarray, positive: np.ndarray) -> float:
    """The mean over pairs of the mean over values of :func:`detector_f1`, for detectors
    ``active [P, V, n]`` at ``P`` pairs: what ``best_f1`` averages to over a cross-section
    (a statistic of the prompts, for :func:`bootstrap`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without some value
        return float(np.nanmean(np.nanmean(detector_f1(active, positive), -1)))


def interpretability(codes_fit: np.ndarray, labels_fit: pd.DataFrame, codes_test: np.ndarray,
                     labels_test: pd.DataFrame, threshold: float = INTERPRETABLE_F1,
                     fitted: dict | None = None) -> xr.Dataset:
    """Precision/recall/F1 of "latent active" against "attribute = value", out of sample.

    For each (attribute, value) seen in ``labels_fit``, the latent and its activity
    threshold with the best F1 on the fit prompts are chosen (:func:`latent_f1`: ``latent``,
    ``activity_threshold``, its F1 there ``fit_f1``), and ``best_f1``, ``precision`` and
    ``recall`` are that detector's on the held-out prompts (choosing and scoring on the
    same prompts overstates: with many latents one fits any labels by chance).
    ``best_f1`` is NaN for a value absent from the held-out prompts.
    ``share_interpretable`` (per attribute): share of values whose held-out F1 is
    ``≥ threshold``, over the values with a held-out F1. ``fitted``: :func:`latent_f1` of
    these fit codes, when already computed.
    """
    fitted = latent_f1(codes_fit, labels_fit) if fitted is None else fitted
    keys, latents, thresholds, active, positive = detectors(fitted, codes_test, labels_test)
    tp = (active & positive).sum(-1)
    table = pd.DataFrame({
        "attribute": [a for a, _ in keys], "value": [v for _, v in keys],
        "best_f1": detector_f1(active, positive), "latent": latents,
        "activity_threshold": thresholds,
        "precision": tp / np.maximum(active.sum(-1), 1),
        "recall": np.where(positive.any(-1), tp / np.maximum(positive.sum(-1), 1), np.nan),
        "fit_f1": [float(f1[j]) for (f1, _), j in zip(fitted.values(), latents)],
    }).set_index(["attribute", "value"])
    out = xr.Dataset.from_dataframe(table)
    scored = table.best_f1.notna()
    share = (table.best_f1 >= threshold).astype(float).where(scored).groupby(
        level="attribute").mean()
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
    """Mean number of non-zero codes per row."""
    return float((np.asarray(codes) != 0).sum(-1).mean())


def dead_share(codes: np.ndarray) -> float:
    """Share of latents never active (never non-zero) on these prompts."""
    return float((~(np.asarray(codes) != 0).any(0)).mean())


def bootstrap(statistic: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval of ``statistic(*arrays)``, resampling prompts (the
    last axis of every array) with replacement. Resamples where the statistic is NaN (e.g.
    necessity's gap falls below ``min_gap``) are left out; ``(nan, nan)`` if all are, or if
    the statistic itself is NaN on the data (an interval around an undefined value would
    read as a measurement). All resamples go through ``statistic`` at once when it takes
    a resample axis (as this module's metrics do), else one by one."""
    if np.isnan(statistic(*arrays)):
        return float("nan"), float("nan")
    arrays = [np.asarray(x) for x in arrays]
    n = arrays[0].shape[-1]
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    values = None
    if all(x.ndim == 1 for x in arrays):
        try:
            values = np.asarray(statistic(*(x[idx] for x in arrays)), dtype=np.float64)
        except (TypeError, ValueError, IndexError):  # a statistic of one resample only
            pass
    if values is None or values.shape != (n_boot,):
        values = np.array([statistic(*(x[..., i] for x in arrays)) for i in idx],
                          dtype=np.float64)
    if np.isnan(values).all():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
