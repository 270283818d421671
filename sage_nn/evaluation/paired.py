"""Paired bootstrap replicates (docs/metrics.md, "Intervals and verdicts").

Every dictionary of an attribute is resampled on the *same* draws: the same held-out prompts
(:func:`resamples`), the same fit prompts for choices made on them (:func:`fit_resamples`),
and, for a control over several seeds, one seed per draw (:func:`seed_draws`). So the
replicates of two dictionaries can be subtracted draw by draw: SAE − floor and ceiling − SAE
get intervals of their own (:func:`difference_interval`), which carry the prompts both were
measured on, the floor's seed and the detector's choice. The draws depend only on the run's
seed and the number of prompts: an SAE scored alone (the pipeline's per-SAE cache) gets the
same draws as in a run with others.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

#: candidate detectors per attribute value among which each resample chooses (the best by
#: fit-prompt F1): the latent that wins on all fit prompts is nearly always among them
N_CANDIDATES = 8


def resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` held-out prompt indices (the draws
    :func:`sage_nn.evaluation.metrics.bootstrap` makes)."""
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def fit_resamples(n_fit: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_fit]`` fit prompt indices, drawn apart from :func:`resamples`."""
    return np.random.default_rng([seed, 1]).integers(0, n_fit, (n_boot, n_fit))


def seed_draws(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot]``: the control seed each resample uses."""
    return np.random.default_rng([seed, 2]).integers(0, n_seeds, n_boot)


def weights(idx: np.ndarray, n: int) -> np.ndarray:
    """``[n_boot, n]`` how often each prompt is drawn (float32: counts are exact)."""
    flat = (idx + n * np.arange(len(idx))[:, None]).ravel()
    return np.bincount(flat, minlength=n * len(idx)).reshape(len(idx), n).astype(np.float32)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of replicates (NaN ones left out; ``(nan, nan)`` if all are)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def over_seeds(replicates: Sequence[np.ndarray], draws: np.ndarray) -> np.ndarray:
    """One control's replicates over its seeds: draw ``b`` takes seed ``draws[b]``'s."""
    stacked = np.stack([np.asarray(r, dtype=np.float64) for r in replicates])  # [S, B, ...]
    return stacked[draws, np.arange(stacked.shape[1])]


def curve_area(values: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """The area under an edit-vs-k curve on a log2 k axis, over the span of ``ks`` (so a
    flat curve at ``v`` has area ``v``): trapezoids, the last axis of ``values`` over
    ``ks``. One k: its value."""
    values = np.asarray(values, dtype=np.float64)
    if len(ks) == 1:
        return values[..., 0]
    x = np.log2(np.asarray(ks, dtype=np.float64))
    widths = np.diff(x)
    mids = (values[..., 1:] + values[..., :-1]) / 2
    return (mids * widths).sum(-1) / (x[-1] - x[0])


def difference_interval(a: np.ndarray, b: np.ndarray,
                        level: float = 0.95) -> tuple[float, float]:
    """The interval of ``a - b`` over paired replicates (draws where both are defined)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return percentile_interval(diff, level)


def verdict(a: np.ndarray, b: np.ndarray) -> str | None:
    """``"above"`` when the paired interval of ``a - b`` lies above 0, ``"below"`` when it
    lies below, ``"overlap"`` when it holds 0; None without replicates."""
    lo, hi = difference_interval(a, b)
    if np.isnan(lo):
        return None
    return "above" if lo > 0 else "below" if hi < 0 else "overlap"


def detector_replicates(codes_fit: np.ndarray, labels_fit, codes: np.ndarray, labels,
                        fitted: dict, idx: np.ndarray, idx_fit: np.ndarray,
                        n_candidates: int = N_CANDIDATES) -> np.ndarray:
    """``[n_boot]`` best F1 (the mean over values) with the detector chosen inside each
    resample: per value, among its ``n_candidates`` best fit-prompt detectors (latent and
    threshold, :func:`sage_nn.evaluation.metrics.latent_f1`), the one with the best F1 on
    the resampled fit prompts, scored on the resampled held-out prompts. Every value's
    candidates at once: three products of the draws' prompt counts with the prompts'
    indicators."""
    score_fit, score = np.abs(np.asarray(codes_fit)), np.abs(np.asarray(codes))
    w_fit, w = weights(idx_fit, len(score_fit)), weights(idx, len(score))
    n_values = len(fitted)
    active_fit, active, positive_fit, positive = [], [], [], []
    for (attribute, value), (f1, cut) in fitted.items():
        top = np.argsort(-f1, kind="stable")[:n_candidates]
        top = np.resize(top, n_candidates)  # fewer latents than candidates: repeated
        active_fit.append(score_fit[:, top] > cut[top])  # [n_fit, M]
        active.append(score[:, top] > cut[top])
        positive_fit.append((labels_fit[attribute].astype(str) == value).to_numpy())
        positive.append((labels[attribute].astype(str) == value).to_numpy())

    def f1_of(w_, act, pos):  # act [n, V, M], pos [n, V] -> [B, V, M]
        act, pos = np.stack(act, 1).astype(np.float32), np.stack(pos, 1).astype(np.float32)
        tp = (w_ @ (act * pos[..., None]).reshape(len(act), -1)).reshape(len(w_), n_values, -1)
        pred = (w_ @ act.reshape(len(act), -1)).reshape(tp.shape)
        n_pos = (w_ @ pos)[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_pos > 0, 2 * tp / np.maximum(pred + n_pos, 1e-12), np.nan)

    chosen = np.nan_to_num(f1_of(w_fit, active_fit, positive_fit), nan=-1).argmax(-1)
    held_out = np.take_along_axis(f1_of(w, active, positive), chosen[..., None], -1)[..., 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without some value
        return np.nanmean(held_out, -1)


def chance_f1(labels, attribute: str) -> float:
    """The best F1 of a detector that knows nothing: always on, ``2p / (1 + p)`` for a value
    held by a share ``p`` of the prompts, averaged over the attribute's values (0.667 on a
    balanced binary attribute)."""
    values = labels[attribute].astype(str)
    p = values.value_counts(normalize=True).to_numpy()
    return float(np.mean(2 * p / (1 + p)))

