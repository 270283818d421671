"""Dictionaries of known quality, to check that the metrics rank them in order.

A metric that cannot fail proves nothing, so each headline metric is checked against a
*ladder*: dictionaries whose quality is built in, one rung per share ``f`` in
:data:`SHARES` (docs/metrics.md, "Metrics validated by construction"):

- :class:`PlantedDictionary` (edits, F1, alignment): at every pair, the supervised
  features of the other attributes, and a latent for a share ``f`` of the attribute's values
  whose direction is that value's supervised feature and whose code is exactly the value's
  indicator. ``f = 1`` knows the attribute as the ceiling does; ``f = 0`` not at all.
- :func:`planted_sae` (the same through the residual-to-sublayer reconstruction): a residual
  SAE whose latents are the attribute's residual features at the token where the value lives,
  each firing where its value is, reaching a head through the frozen maps.
- :class:`Shrunk` (sufficiency, necessity): a coder's reconstruction keeping a share ``f`` of
  what it explains, the rest moved to the mean: ``â_f = mean + f (â - mean)``. Linear in
  ``f``, so any score normalised by the mean-ablation gap ranks it (sufficiency and
  necessity swapped would too); a share above 1 overshoots, where the two part.

In the tool's regime (a trained residual SAE at its real L0, its codes dense and summed
over the context, its latents distractors):

- :class:`WithPlanted` (edits, F1): a trained SAE's latents with planted latents of a share
  ``f`` of the attribute's values added, all reaching the heads through the reconstruction;
  its base the trained SAE without its latents that detect the attribute on the fit
  prompts (:class:`WithoutDetectors`), so that the planted latents are the only detectors
  of their values and best F1 rises with ``f``;
- :class:`Perturbed` (sufficiency, necessity against FVU): the clean activation plus an
  error of the same size at every rung (equal FVU), for a share of the prompts orthogonal
  to the task's subspace (noise), for the others inside it (the span of the supervised
  features at the site: the attribute's signal taken away): only the orthogonal error
  keeps sufficiency, and FVU cannot tell the rungs apart;
- the random SAE (:func:`random_rung`): the trained SAE's architecture with random weights,
  below the trained SAE on every headline metric; and sae_lens SAEs with random weights
  given as SAE directories (:func:`saved_random_saes`).

:func:`ladder` evaluates a ladder and :func:`ladder_summary` says, per metric, whether it
ranks the rungs in order (Spearman over the levels), whether the ``f = 0`` and ``f = 1``
intervals are apart, and where the floor sits at every rung (the paired interval of rung -
floor). Both work on any model and task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.stats import spearmanr

from ..dictionaries.saes import SparseAutoencoder
from ..dictionaries.supervised import MSEDictionary
from ..model.reads import read_sites
from . import metrics
from .coders import RANDOM, SUPERVISED, CrossSection, SiteCode, as_coder
from .paired import percentile_interval
from .scoring import evaluate_cross_section, pair_mean

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def planted_values(values: Sequence[str], share: float, seed: int = 0) -> list[str]:
    """The values a rung of share ``share`` plants: the first ``round(share * n)`` of one
    seeded order, so the rungs are nested (each holds the latents of the one below)."""
    order = [str(v) for v in np.random.default_rng(seed).permutation(sorted(map(str, values)))]
    return order[:round(share * len(order))]


class _CodedHere:
    """A coder whose codes are made here from the read's values at every pair: it reads
    nothing of its own and sends no job."""

    def serves(self, model, site) -> bool:
        return True

    def reads(self, model, pair) -> list:
        return []

    def jobs(self, model, pairs) -> list:
        return []


class PlantedDictionary(_CodedHere):
    """A coder (see :func:`sage_nn.evaluation.as_coder`) whose latents at each pair are the
    supervised features (:class:`~sage_nn.dictionaries.MSEDictionary`, fitted on ``train``)
    of every attribute but ``attribute``, and of ``attribute``'s planted values only
    (:func:`planted_values`); codes are the labels' indicators."""

    def __init__(self, train: Any, attribute: str, share: float, seed: int = 0):
        self.train, self.attribute, self.share, self.seed = train, attribute, share, seed

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        names = self.train.attribute_names
        labels_fit = self.train.attributes[names]
        planted = set(planted_values(labels_fit[self.attribute].unique(), self.share,
                                     self.seed))
        out = {}
        for pair in pairs:
            d = MSEDictionary(attributes=names).fit(values_fit[pair].numpy(), labels_fit)
            keep = np.array([a != self.attribute or str(v) in planted
                             for a, v in d.features_.feature.values])
            t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
            directions = t(d.components_[keep])
            code = lambda data: t(d.transform(np.zeros((len(data), d.components_.shape[1])),  # noqa
                                              data.attributes[names])[:, keep])
            codes, codes_cf = code(test), code(cf)
            a_hat = t(d.mean_) + codes @ directions
            out[pair] = SiteCode(values[pair], a_hat, values_cf[pair], codes, codes_cf,
                                 directions, codes_fit=code(self.train))
        return out


class Shrunk:
    """A coder whose every reconstruction keeps a share ``share`` of what ``coder``'s
    explains, the rest moved to the fit prompts' mean; its codes and directions (so its
    edits and F1) are ``coder``'s."""

    def __init__(self, coder: Any, share: float):
        self.coder, self.share = as_coder(coder), share

    def serves(self, model, site) -> bool:
        return self.coder.serves(model, site)

    def member(self, model, pair):
        """The controls of the shrunk coder's (:mod:`sage_nn.evaluation.controls`)."""
        member = getattr(self.coder, "member", None)
        return member(model, pair) if member is not None else ("site", None)

    def reads(self, model, pair) -> list:
        return self.coder.reads(model, pair)

    def jobs(self, model, pairs) -> list:
        return self.coder.jobs(model, pairs)

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        out = self.coder.codes(model, pairs, test, cf, values, values_cf, values_fit,
                               computed, remote)
        for pair, code in out.items():
            mean = values_fit[pair].mean(0)
            code.a_hat = mean + self.share * (code.a_hat - mean)
        return out


class WithPlanted:
    """A trained residual SAE's latents (``base``, a coder reaching heads through the
    reconstruction) with planted latents added (``planted``, e.g. a
    :class:`~sage_nn.evaluation.coders.ReconstructedSAE` of :func:`planted_sae`): at every
    pair their codes and directions side by side, the reconstruction the trained SAE's (the
    planted latents only add choices to the edits and the detectors). Its controls are the
    trained SAE's."""

    n_parts = 2

    def __init__(self, base: Any, planted: Any):
        self.base, self.planted = as_coder(base), as_coder(planted)

    def serves(self, model, site) -> bool:
        return self.base.serves(model, site) and self.planted.serves(model, site)

    def reads(self, model, pair) -> list:
        return list(dict.fromkeys(self.base.reads(model, pair)
                                  + self.planted.reads(model, pair)))

    def jobs(self, model, pairs) -> list:
        out = []
        for part, coder in enumerate((self.base, self.planted)):
            for job in coder.jobs(model, pairs):
                job.part = part
                out.append(job)
        return out

    def member(self, model, pair):
        return self.base.member(model, pair)

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        computed = computed or {}
        parts = [{pair: found[part] for pair, found in computed.items()} for part in (0, 1)]
        base = self.base.codes(model, pairs, test, cf, values, values_cf, values_fit,
                               parts[0], remote)
        planted = self.planted.codes(model, pairs, test, cf, values, values_cf, values_fit,
                                     parts[1], remote)
        out = {}
        for pair in pairs:
            b, p = base[pair], planted[pair]
            out[pair] = SiteCode(b.a, b.a_hat, b.a_cf, torch.cat([b.codes, p.codes], 1),
                                 torch.cat([b.codes_cf, p.codes_cf], 1),
                                 torch.cat([b.directions, p.directions]),
                                 codes_fit=torch.cat([b.codes_fit, p.codes_fit], 1),
                                 l0_own=b.l0_own)
        return out


class WithoutDetectors:
    """``coder`` with, at every pair, the latents that detect a value of ``attribute``
    removed: those whose best F1 on the fit prompts (``train``; :func:`~.metrics.latent_f1`,
    over thresholds of activity, the detector ``best_f1`` would choose) for any of its values
    exceeds ``threshold``. Removed means zeroed: their codes and directions are dropped and
    their part of the reconstruction with them (where the pair has latent directions).
    Chosen on the fit prompts only, so the held-out prompts score it as any dictionary. The
    base of the regime's planted rungs (:class:`WithPlanted`): a trained SAE that does not
    know the attribute, so that the planted latents added to it are the only detectors of
    their values. Its controls are ``coder``'s."""

    def __init__(self, coder: Any, train: Any, attribute: str, threshold: float):
        self.coder, self.train = as_coder(coder), train
        self.attribute, self.threshold = attribute, threshold
        #: per pair, the removed latents' indices and how many latents there were (filled
        #: by :meth:`codes`)
        self.removed: dict = {}
        self.latents: dict = {}

    def serves(self, model, site) -> bool:
        return self.coder.serves(model, site)

    def member(self, model, pair):
        member = getattr(self.coder, "member", None)
        return member(model, pair) if member is not None else ("site", None)

    def reads(self, model, pair) -> list:
        return self.coder.reads(model, pair)

    def jobs(self, model, pairs) -> list:
        return self.coder.jobs(model, pairs)

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        out = self.coder.codes(model, pairs, test, cf, values, values_cf, values_fit,
                               computed, remote)
        labels_fit = self.train.attributes[[self.attribute]]
        for pair, code in out.items():
            fitted = metrics.latent_f1(code.codes_fit.numpy(), labels_fit)
            best = np.max([f1 for f1, _ in fitted.values()], axis=0)
            drop = torch.as_tensor(best > self.threshold)
            self.removed[pair] = torch.nonzero(drop).ravel().tolist()
            self.latents[pair] = len(drop)
            if code.directions is not None and drop.any():
                part = code.codes[:, drop] @ code.directions[drop]
                scale = 1 if code.scale is None else code.scale[:, None]
                code.a_hat = code.a_hat - scale * part
                code.directions = code.directions[~drop]
            code.codes, code.codes_cf = code.codes[:, ~drop], code.codes_cf[:, ~drop]
            code.codes_fit = code.codes_fit[:, ~drop]
        return out


class Perturbed(_CodedHere):
    """The clean activation plus an error of the same size at every rung: at each pair, a
    share ``share`` of the prompts (the first of one seeded order, so the rungs are nested
    and every pair treats the same prompts alike) get ``e_out``, noise orthogonal to the
    task's subspace, the others ``e_in = -size P (a - mean)``, which takes that much of the
    signal in the task's subspace away (``P``: the projection on the span of the supervised
    features of every attribute, fitted at the pair on the fit prompts); ``e_out`` has
    ``e_in``'s norm, prompt by prompt. So every rung has the same FVU, and ``share = 1``
    puts every error outside the task's subspace. Its codes and directions are the
    supervised dictionary's."""

    def __init__(self, train: Any, share: float, seed: int = 0, size: float = 1.0):
        self.train, self.share, self.seed, self.size = train, share, seed, size

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        names = self.train.attribute_names
        labels_fit = self.train.attributes[names]
        out = {}
        for i, pair in enumerate(pairs):
            d = MSEDictionary(attributes=names).fit(values_fit[pair].numpy(), labels_fit)
            t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
            basis = torch.linalg.qr(t(d.components_).T.double()).Q  # [w, r]
            mean = t(d.mean_).double()
            a = values[pair].double()
            inside = self.size * ((a - mean) @ basis @ basis.T)
            g = torch.Generator().manual_seed(self.seed + i)
            noise = torch.randn(a.shape, generator=g, dtype=torch.float64)
            noise = noise - noise @ basis @ basis.T
            noise = noise / noise.norm(dim=1, keepdim=True).clamp(min=1e-12) * inside.norm(
                dim=1, keepdim=True)
            order = np.random.default_rng(self.seed).permutation(len(a))
            outside = torch.zeros(len(a), dtype=torch.bool)
            outside[torch.as_tensor(order[:round(self.share * len(a))])] = True
            a_hat = torch.where(outside[:, None], a + noise, a - inside)
            code = lambda data: t(d.transform(np.zeros((len(data), d.components_.shape[1])),  # noqa
                                              data.attributes[names]))
            out[pair] = SiteCode(values[pair], a_hat.float(), values_cf[pair], code(test),
                                 code(cf), t(d.components_), codes_fit=code(self.train))
        return out


def random_rung(model: Any, sae: SparseAutoencoder, train: Any, position: str,
                seed: int = 0, batch_size: int = 32) -> SparseAutoencoder:
    """The random-SAE rung: ``sae``'s sae_lens architecture with random weights
    (:func:`~sage_nn.dictionaries.random_sae.random_sae`), calibrated at ``sae``'s site on
    the fit prompts' rows at ``position``."""
    from ..dictionaries.random_sae import calibrate, random_sae
    from ..model.sites import Site

    site = Site(sae.layer, sae.kind, sae.heads[0] if sae.heads else None)
    (values,) = read_sites(model, [train], [(site, position)], batch_size=batch_size).values
    return calibrate(random_sae(sae, seed), sae, values[(site, position)])


def saved_random_saes(model: Any, layers: Sequence[int], root: Any, d_sae: int = 1024,
                      k: int = 32) -> dict:
    """sae_lens TopK and JumpReLU SAEs with sae_lens's own random weights (built with its
    config classes, seeded by layer) at ``L{layer}.resid_pre`` for each of ``layers``,
    saved as SAE directories under ``root`` and loaded back as a user's would be:
    ``{"random-topk": ReconstructedSAE, "random-jumprelu": ReconstructedSAE}``, to reach
    heads through the reconstruction. They must score below a trained SAE of that shape."""
    from pathlib import Path

    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    from ..dictionaries.saes import load_sae
    from ..model.sites import adapter
    from .coders import ReconstructedSAE

    d_in = adapter(model).d_model
    built = {}
    for name, cls, cfg in (("random-topk", TopKSAE, TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)),
                           ("random-jumprelu", JumpReLUSAE,
                            JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))):
        loaded = []
        for layer in layers:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(layer)
                sae = cls(cfg)
            sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_pre"
            sae.save_model(Path(root) / name / str(layer))
            loaded.append(load_sae(Path(root) / name / str(layer), model=model))
        built[name] = ReconstructedSAE(loaded)
    return built


def planted_sae(model: Any, train: Any, attribute: str, layer: int, position: str,
                share: float, seed: int = 0, batch_size: int = 32) -> SparseAutoencoder:
    """A residual SAE at ``L{layer}.resid_pre`` with a latent for each planted value of
    ``attribute`` (:func:`planted_values`): its decoder row is the value's supervised feature
    of the residual at ``position`` (the token where the value lives), its encoder the same
    direction scaled to read 1 there, with a JumpReLU threshold of 0.5, so it fires where its
    value is. Through the reconstruction its latents reach a head with their codes weighted
    by the attention to that token. (A rung without latents gets one that never fires.)"""
    from ..model.sites import Site

    site = Site(layer, "resid_pre")
    (values,) = read_sites(model, [train], [(site, position)], batch_size=batch_size).values
    acts = values[(site, position)].numpy()
    labels = train.attributes[[attribute]]
    d = MSEDictionary(attributes=[attribute]).fit(acts, labels)
    planted = set(planted_values(labels[attribute].unique(), share, seed))
    keep = np.array([str(v) in planted for _, v in d.features_.feature.values])
    features = torch.as_tensor(d.components_[keep], dtype=torch.float32)
    if not len(features):
        features = torch.zeros(1, acts.shape[1])
    norms = (features ** 2).sum(-1, keepdim=True).clamp(min=1e-12)
    return SparseAutoencoder((features / norms).T, torch.zeros(len(features)), features,
                             torch.as_tensor(d.mean_, dtype=torch.float32),
                             architecture="jumprelu", threshold=torch.full((len(features),), 0.5),
                             layer=layer, kind="resid_pre")


def ladder(model: Any, train: Any, test: Any, cross_section: CrossSection,
           rungs: Mapping[str, tuple[float, Any]], **kwargs) -> xr.Dataset:
    """Evaluate ``rungs`` (name -> ``(share, coder)``) at one cross-section, with the ceiling
    and each rung's floor (:func:`~sage_nn.evaluation.evaluate_cross_section`, ``kwargs``
    passed on). The result has a ``share`` coordinate along ``dictionary`` (NaN off rungs)."""
    results = evaluate_cross_section(model, train, test, cross_section,
                                     {name: coder for name, (_, coder) in rungs.items()},
                                     **kwargs)
    share = [rungs[str(d)][0] if str(d) in rungs else np.nan for d in results.dictionary.values]
    return results.assign_coords(share=("dictionary", share))


#: how a rung stands against its floor, worst to best
PLACES = ("below", "overlap", "above")


def floor_place(results: xr.Dataset, name: str, rung: str, k: int = 2) -> str | None:
    """Where ``rung`` stands against its floor on ``name`` (in goodness: sufficiency by its
    distance from 1): ``"above"``/``"below"`` when the paired interval of rung - floor
    (their shared bootstrap draws, ``<name>_boot``) excludes 0, else ``"overlap"``; a
    metric without replicates (an edit at one k) compares the two intervals."""
    floor = f"{RANDOM}:{rung}"
    if floor not in results.dictionary.values:
        return None
    good = (lambda x: 1 - np.abs(1 - x)) if name == "sufficiency" else (lambda x: x)  # noqa
    if f"{name}_boot" in results:
        boot = results[f"{name}_boot"]
        diff = good(boot.sel(dictionary=rung).values.ravel()) - good(
            boot.sel(dictionary=floor).values.ravel())
        lo, hi = percentile_interval(diff)
    else:
        ci = results[f"{name}_ci"]
        ci = ci.sel(k=k) if "k" in ci.dims else ci
        ends = lambda d: sorted(good(np.array([float(ci.sel(dictionary=d, bound=b).squeeze())  # noqa
                                               for b in ("low", "high")])))
        (r_lo, r_hi), (f_lo, f_hi) = ends(rung), ends(floor)
        lo, hi = r_lo - f_hi, r_hi - f_lo
    if np.isnan(lo):
        return None
    return "above" if lo > 0 else "below" if hi < 0 else "overlap"


def ladder_summary(results: xr.Dataset, metrics: Sequence[str], k: int = 2) -> pd.DataFrame:
    """Per metric (edits at ``k``), over the rungs of :func:`ladder`: the value at each
    share, ``spearman`` of value against share, ``apart`` (the ``f = 0`` and ``f = 1``
    95% intervals do not overlap; metrics without intervals: None), the floor of the ``f = 0``
    rung (``floor``) and whether it sits at or below that rung (``floor_not_above``: below
    its interval's top), the floor's place at every rung (``place f=...``:
    :func:`floor_place`) and whether those places rise with the rungs (``floor_monotone``:
    no rung stands lower against its floor than a rung below it), the ceiling, and
    ``in_ceiling_interval`` (the ``f = 1`` rung's value inside the ceiling's interval)."""
    rungs = results.dictionary.values[np.isfinite(results.share.values)]
    order = sorted(rungs, key=lambda d: float(results.share.sel(dictionary=d)))
    rows = {}
    for name in metrics:
        da = results[name].sel(k=k) if "k" in results[name].dims else results[name]
        ci = results.get(f"{name}_ci")
        ci = None if ci is None else (ci.sel(k=k) if "k" in ci.dims else ci)
        value = lambda d: float(pair_mean(da.sel(dictionary=d)).squeeze())  # noqa: E731
        shares = [float(results.share.sel(dictionary=d)) for d in order]
        values = [value(d) for d in order]
        row = {f"f={s:g}": v for s, v in zip(shares, values)}
        row["spearman"] = float(spearmanr(shares, values).statistic) \
            if np.isfinite(values).all() and np.ptp(values) > 0 else float("nan")
        low_top = high_bottom = None
        if ci is not None:
            low_top = float(ci.sel(dictionary=order[0], bound="high").squeeze())
            high_bottom = float(ci.sel(dictionary=order[-1], bound="low").squeeze())
            row["apart"] = bool(high_bottom > low_top)
        else:
            row["apart"] = None
        floor = value(f"{RANDOM}:{order[0]}")
        row["floor"] = floor
        row["floor_not_above"] = bool(floor <= (low_top if low_top is not None
                                                else values[0]) + 1e-9)
        places = [floor_place(results, name, d, k) if ci is not None else None for d in order]
        for share, place in zip(shares, places):
            row[f"place f={share:g}"] = place
        known = [PLACES.index(p) for p in places if p is not None]
        row["floor_monotone"] = bool(known) and all(a <= b for a, b in zip(known, known[1:]))
        if SUPERVISED in results.dictionary.values:
            row["ceiling"] = value(SUPERVISED)
            if ci is not None:
                lo, hi = (float(ci.sel(dictionary=SUPERVISED, bound=b).squeeze())
                          for b in ("low", "high"))
                row["in_ceiling_interval"] = bool(lo - 1e-9 <= values[-1] <= hi + 1e-9)
        rows[name] = row
    return pd.DataFrame(rows).T
