"""Scoring dictionaries at a cross-section: the supervised ceiling, SAEs, a random floor.

Every method is seen the same way at each (site, position) pair of a cross-section, as a
:class:`SiteCode`: the clean activations, the method's reconstruction, its codes for the
clean and the counterfactual prompts, and its latent directions at the site. From these,
one batched run of patched variants gives every intervention metric at once::

    clean | mean-ablation | counterfactual | per method: sufficiency, necessity, edit@k

Patched values are computed from the clean run's activations at every pair of the
cross-section (Makelov et al.'s protocol), so all variants share one set of forwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from sklearn.base import clone

from . import metrics
from .dictionaries import MSEDictionary
from .interventions import Patch, run_patched, site_values
from .reconstruction import ResidualReconstruction
from .saes import SparseAutoencoder
from .sites import RESID_KINDS, Site, adapter

SUPERVISED = "supervised"
RANDOM = "random"


@dataclass
class SiteCode:
    """One method at one (site, position) pair, on n clean prompts and their counterfactuals.

    ``a, a_hat, a_cf [n, w]``; ``codes, codes_cf [n, L]``; ``directions [L, w]`` with an
    optional per-prompt ``scale [n]`` (a frozen norm) so latent ``j`` moves the site by
    ``scale * code_j * directions[j]``.
    """

    a: torch.Tensor
    a_hat: torch.Tensor
    a_cf: torch.Tensor
    codes: torch.Tensor
    codes_cf: torch.Tensor
    directions: torch.Tensor | None
    scale: torch.Tensor | None = None

    def edit(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.directions is None:  # no linear latent directions here: no sparse edit
            return self.a, torch.full((len(self.a),), torch.nan)
        edited, _, magnitude = metrics.greedy_edit(self.a, self.codes, self.codes_cf,
                                                   self.directions, self.a_cf, k, self.scale)
        return edited, magnitude


def supervised_code(dictionary: MSEDictionary, a, attrs, a_cf, attrs_cf) -> SiteCode:
    """The fitted supervised dictionary as a :class:`SiteCode` (unit or fitted weights)."""
    codes = np.asarray(dictionary.transform(a, attrs))
    codes_cf = np.asarray(dictionary.transform(a_cf, attrs_cf))
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    return SiteCode(t(a), t(dictionary.inverse_transform(codes)), t(a_cf), t(codes),
                    t(codes_cf), t(dictionary.components_))


def random_sae_like(sae: SparseAutoencoder, seed: int = 0) -> SparseAutoencoder:
    """The floor: ``sae`` with its directions replaced by random unit ones.

    Same shape and decoder bias (so SAE and floor differ only in what the SAE learned as
    directions), tied encoder, and a TopK nonlinearity with ``k`` set to the tested SAE's
    (or 32) so its L0 is comparable."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(sae.d_sae, sae.d_in, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return SparseAutoencoder(W_dec.T.clone(), torch.zeros(sae.d_sae), W_dec,
                             sae.b_dec.detach().float(),
                             architecture="topk", k=min(sae.k or 32, sae.d_sae), layer=sae.layer,
                             kind=sae.kind, heads=sae.heads)


class DirectSAE:
    """An SAE evaluated at its own site (a residual SAE at a residual cross-section site)."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae

    def serves(self, model, site: Site) -> bool:
        return adapter(model).same_tensor(Site(self.sae.layer, self.sae.kind), site)

    def reads(self, model, pair) -> list[tuple]:
        return []

    def codes(self, model, pairs, test, cf, values, values_cf, remote=None) -> dict:
        return {pair: self.code(values[pair], values_cf[pair]) for pair in pairs}

    def code(self, a: torch.Tensor, a_cf: torch.Tensor) -> SiteCode:
        sae = self.sae
        with torch.no_grad():
            codes, codes_cf = sae.encode(a), sae.encode(a_cf)
            scale, _ = sae.decode_affine(a)
            return SiteCode(a, sae.decode(codes, a).float(), a_cf, codes.float(),
                            codes_cf.float(), sae.decoder().float(), scale.squeeze(-1).float())

    def floor(self, seed: int) -> "DirectSAE":
        return DirectSAE(random_sae_like(self.sae, seed))


class ReconstructedSAE:
    """Residual SAEs evaluated anywhere: directly at residual sites, and at sublayer sites
    through the residual-to-sublayer reconstruction (input mode, frozen norm and pattern),
    where each latent has a site-level direction. mlp_out has none (the MLP is nonlinear):
    there the codes are the feeding SAE's and edits are not defined (NaN)."""

    def __init__(self, saes: Mapping[str, SparseAutoencoder] | Sequence[SparseAutoencoder],
                 batch_size: int = 16):
        self.saes = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
        self.batch_size = batch_size
        self._fitted = {}

    def _reconstruction(self, model) -> ResidualReconstruction:
        if id(model) not in self._fitted:
            self._fitted[id(model)] = ResidualReconstruction(
                self.saes, mode="input", freeze_norm=True, freeze_pattern=True).fit(model)
        return self._fitted[id(model)]

    def _direct(self, model, site: Site) -> SparseAutoencoder | None:
        same = adapter(model).same_tensor
        return next((s for s in self.saes if same(Site(s.layer, s.kind), site)), None)

    def serves(self, model, site: Site) -> bool:
        if site.kind in RESID_KINDS:
            return self._direct(model, site) is not None
        try:
            self._reconstruction(model).source(site)  # the residual SAE feeding the site
        except ValueError:
            return False
        return True

    def reads(self, model, pair) -> list[tuple]:
        """mlp_out's codes are those of the residual SAE feeding the MLP: read its input."""
        site, position = pair
        if site.kind != "mlp_out":
            return []
        return [(Site(site.layer, self._reconstruction(model).source(site).kind), position)]

    def codes(self, model, pairs, test, cf, values, values_cf, remote=None) -> dict:
        """Every pair's :class:`SiteCode`; the sublayer pairs' reconstructions (each pair its
        own forwards, test and counterfactual prompts together) in one request remotely."""
        out = {}
        for pair in pairs:
            if pair[0].kind in RESID_KINDS:
                out[pair] = DirectSAE(self._direct(model, pair[0])).code(values[pair],
                                                                         values_cf[pair])
        sublayer = [pair for pair in pairs if pair not in out]
        if not sublayer:
            return out
        recon, n = self._reconstruction(model), len(test)
        prompts = list(test.prompts) + list(cf.prompts)
        jobs = [(prompts, np.concatenate([test.positions[pos], cf.positions[pos]]), [site],
                 site.kind != "mlp_out") for site, pos in sublayer]
        results = recon.run_at_each(jobs, batch_size=self.batch_size, remote=remote)
        for (site, pos), res in zip(sublayer, results):
            a_hat = res.recon[site][:n].float()
            if site.kind != "mlp_out":
                codes = res.codes[site].flatten(1).float()
                directions = recon.directions(site).float()
                directions = directions.reshape(-1, directions.shape[-1])  # attn_out: (head, latent)
            else:  # no linear latent directions through the MLP: the feeding SAE's codes
                (feed,) = self.reads(model, (site, pos))
                source = recon.source(site)
                codes = torch.cat([source.encode(values[feed]), source.encode(values_cf[feed])])
                codes, directions = codes.float(), None
            out[(site, pos)] = SiteCode(values[(site, pos)], a_hat, values_cf[(site, pos)],
                                        codes[:n], codes[n:], directions)
        return out

    def floor(self, seed: int) -> "ReconstructedSAE":
        return ReconstructedSAE([random_sae_like(s, seed) for s in self.saes], self.batch_size)


def as_coder(sae: Any) -> Any:
    """A :class:`SparseAutoencoder` is evaluated at its own site; anything with ``serves``,
    ``reads``, ``codes`` and ``floor`` (e.g. residual SAEs reaching sublayer sites through
    :class:`ReconstructedSAE`) is used as is."""
    return DirectSAE(sae) if isinstance(sae, SparseAutoencoder) else sae


def _seen_values_only(train: Any, test: Any, attribute: str) -> Any:
    """Drop test rows whose (or whose counterfactual's) attribute values the supervised
    dictionary never saw: it has no feature for them."""
    names = train.attribute_names
    seen = {a: set(train.attributes[a]) for a in names}
    keep = np.ones(len(test), dtype=bool)
    for table in (test.attributes, test.counterfactuals[attribute].attributes):
        for a in names:
            keep &= table[a].isin(seen[a]).to_numpy()
    if not keep.any():
        raise ValueError(f"no test prompt of {test.name!r} has attribute values seen in the "
                         "training prompts: build both from the same vocabulary (e.g. the "
                         "train split, held-out prompts)")
    return test if keep.all() else test.subset(np.nonzero(keep)[0])


@dataclass
class CrossSection:
    """The (site, named position) pairs where one attribute is computed."""

    attribute: str
    pairs: list[tuple[Site, str]]

    @property
    def labels(self) -> list[str]:
        return [f"{s}@{p}" for s, p in self.pairs]


def evaluate_cross_section(
    model: Any,
    train: Any,
    test: Any,
    cross_section: CrossSection,
    saes: Mapping[str, Any] | None = None,
    *,
    dictionaries: Mapping[str, Any] | None = None,
    ks: Sequence[int] = metrics.EDIT_KS,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    remote: Any = None,
) -> xr.Dataset:
    """All SAGE metrics of the supervised dictionary, each SAE and the random floor.

    ``train``/``test`` are task datasets (the dictionary is fitted on ``train``, all metrics
    are measured on ``test`` and its counterfactual for the attribute). ``saes`` maps a
    name to a :class:`SparseAutoencoder` (evaluated at its own site) or to a coder (see
    :func:`as_coder`); each must serve every site of the cross-section. Returns a Dataset
    over ``dictionary`` (and ``k``, ``pair``); ``random:NAME`` is NAME's floor.
    ``dictionaries`` maps names to unfitted supervised estimators (default
    ``{"supervised": MSEDictionary()}``), each fitted per pair; the first one is the
    reference for feature alignment.
    """
    attribute, pairs = cross_section.attribute, cross_section.pairs
    test = _seen_values_only(train, test, attribute)
    cf = test.counterfactuals[attribute]
    coders = {name: as_coder(sae) for name, sae in (saes or {}).items()}
    for name, coder in coders.items():
        for site, _ in pairs:
            if not coder.serves(model, site):
                raise ValueError(f"SAE {name!r} cannot serve cross-section site {site}: "
                                 "place it at that site, or reach sublayer sites through a "
                                 "residual-to-sublayer reconstruction")
    # every activation any method needs, for all three prompt sets: one read
    extra = [p for c in coders.values() for pair in pairs for p in c.reads(model, pair)]
    a_train, a_test, a_cf = site_values(model, [train, test, cf], list(dict.fromkeys(pairs + extra)),
                                        batch_size=batch_size, remote=remote)
    attrs, attrs_cf = test.attributes[train.attribute_names], cf.attributes[train.attribute_names]

    dictionaries = dictionaries or {SUPERVISED: MSEDictionary()}
    codes_by_method: dict[str, dict[tuple, SiteCode]] = {}
    features = {}
    for name, estimator in dictionaries.items():
        codes_by_method[name] = {}
        for pair in pairs:
            dictionary = clone(estimator).set_params(attributes=train.attribute_names).fit(
                a_train[pair].numpy(), train.attributes[train.attribute_names])
            features.setdefault(pair, dictionary.components_)
            codes_by_method[name][pair] = supervised_code(
                dictionary, a_test[pair].numpy(), attrs, a_cf[pair].numpy(), attrs_cf)
    for name, coder in coders.items():
        codes_by_method[name] = coder.codes(model, pairs, test, cf, a_test, a_cf, remote)
        codes_by_method[f"{RANDOM}:{name}"] = coder.floor(seed).codes(
            model, pairs, test, cf, a_test, a_cf, remote)

    out, magnitudes = _run_variants(model, test, pairs, codes_by_method, a_train, a_cf, ks,
                                    batch_size, remote)
    per_method = [_intervention_metrics(out, method, ks, magnitudes, n_boot, seed)
                  | _code_metrics(codes_by_method[method], features, attrs[[attribute]])
                  for method in codes_by_method]
    dims = {"sufficiency": ("dictionary",), "sufficiency_ci": ("dictionary", "bound"),
            "loss_increase": ("dictionary",), "loss_increase_ci": ("dictionary", "bound"),
            "necessity": ("dictionary",), "necessity_ci": ("dictionary", "bound"),
            "edit_accuracy": ("dictionary", "k"), "edit_accuracy_ci": ("dictionary", "k", "bound"),
            "edit_magnitude": ("dictionary", "k")}
    ds = xr.Dataset(
        {key: (dims.get(key, ("dictionary", "pair")), [m[key] for m in per_method])
         for key in per_method[0]},
        coords={"dictionary": list(codes_by_method), "k": list(ks), "pair": cross_section.labels,
                "bound": ["low", "high"]},
        attrs={"n_prompts": len(test),
               "clean_logit_diff": float(out.logit_diff.sel(variant="clean").mean()),
               "mean_ablated_logit_diff": float(out.logit_diff.sel(variant="mean").mean()),
               "clean_answer_logprob": float(out.answer_logprob.sel(variant="clean").mean()),
               "mean_ablated_answer_logprob":
                   float(out.answer_logprob.sel(variant="mean").mean())},
    )
    return ds.expand_dims(attribute=[attribute])


def _run_variants(model, test, pairs, codes_by_method, a_train, a_cf, ks, batch_size, remote):
    """One batched run: clean, mean-ablated, counterfactual-patched, and per method its
    reconstruction (sufficiency), mean + error (necessity) and sparse edits."""
    positions = {pair: test.positions[pair[1]] for pair in pairs}

    def variant(values: Mapping[tuple, torch.Tensor]) -> list[Patch]:
        return [Patch(site, positions[(site, pos)], values[(site, pos)], f"{site}@{pos}")
                for site, pos in pairs]

    means = {p: a_train[p].mean(0).expand_as(a_cf[p]) for p in pairs}
    variants, names, magnitudes = [[], variant(means), variant(a_cf)], ["clean", "mean", "cf"], {}
    for method, codes in codes_by_method.items():
        variants.append(variant({p: c.a_hat for p, c in codes.items()}))
        variants.append(variant({p: means[p] + c.a - c.a_hat for p, c in codes.items()}))
        names += [f"{method}|sufficiency", f"{method}|necessity"]
        if any(c.directions is None for c in codes.values()):
            continue  # no sparse edit without latent directions at every pair
        for k in ks:
            edits = {p: c.edit(k) for p, c in codes.items()}
            variants.append(variant({p: e[0] for p, e in edits.items()}))
            names.append(f"{method}|edit{k}")
            magnitudes[method, k] = float(torch.stack([e[1] for e in edits.values()]).mean())
    return run_patched(model, test, variants, names=names, batch_size=batch_size,
                       remote=remote), magnitudes


def _intervention_metrics(out: xr.Dataset, method: str, ks, magnitudes, n_boot, seed) -> dict:
    ld, top1 = out.logit_diff, out.top1
    clean, mean = ld.sel(variant="clean").values, ld.sel(variant="mean").values
    suff = ld.sel(variant=f"{method}|sufficiency").values
    nec = ld.sel(variant=f"{method}|necessity").values
    logp = [out.answer_logprob.sel(variant=v).values for v in (f"{method}|sufficiency", "clean")]
    row = {"sufficiency": metrics.sufficiency(suff, clean),
           "sufficiency_ci": metrics.bootstrap(metrics.sufficiency, suff, clean,
                                               n_boot=n_boot, seed=seed),
           "loss_increase": metrics.loss_increase(*logp),
           "loss_increase_ci": metrics.bootstrap(metrics.loss_increase, *logp,
                                                 n_boot=n_boot, seed=seed),
           "necessity": metrics.necessity(nec, mean, clean),
           "necessity_ci": metrics.bootstrap(metrics.necessity, nec, mean, clean,
                                             n_boot=n_boot, seed=seed),
           "edit_accuracy": [], "edit_accuracy_ci": [], "edit_magnitude": []}
    cf_top = top1.sel(variant="cf").values
    for k in ks:
        if (method, k) not in magnitudes:
            row["edit_accuracy"].append(np.nan)
            row["edit_accuracy_ci"].append((np.nan, np.nan))
            row["edit_magnitude"].append(np.nan)
            continue
        edit_top = top1.sel(variant=f"{method}|edit{k}").values
        row["edit_accuracy"].append(metrics.edit_accuracy(edit_top, cf_top))
        row["edit_accuracy_ci"].append(metrics.bootstrap(metrics.edit_accuracy, edit_top,
                                                         cf_top, n_boot=n_boot, seed=seed))
        row["edit_magnitude"].append(magnitudes[method, k])
    return row


def _code_metrics(codes: Mapping[tuple, SiteCode], features, labels) -> dict:
    """Per pair: FVU, L0, dead latents, interpretability, alignment with supervised features."""
    row = {k: [] for k in ("fvu", "l0", "dead", "best_f1", "share_interpretable", "alignment")}
    for pair, code in codes.items():
        c = code.codes.numpy()
        interp = metrics.interpretability(c, labels)
        row["fvu"].append(metrics.fvu(code.a.numpy(), code.a_hat.numpy()))
        row["l0"].append(metrics.l0(c))
        row["dead"].append(metrics.dead_share(c))
        row["best_f1"].append(float(interp.best_f1.mean()))
        row["share_interpretable"].append(float(interp.share_interpretable.mean()))
        row["alignment"].append(np.nan if code.directions is None else float(
            metrics.feature_alignment(features[pair], code.directions.numpy()).mean()))
    return row
