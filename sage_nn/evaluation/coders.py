"""Every dictionary seen the same way at a (site, position) pair: a :class:`SiteCode` (its
directions at the site and its codes there on the held-out, counterfactual and fit prompts),
made by a *coder*: :class:`DirectSAE` (SAEs at their own sites), :class:`ReconstructedSAE`
(residual SAEs reaching sublayer sites through the residual-to-sublayer reconstruction),
:class:`Transcoders` (transcoders at the MLP output they write, coded from its input) and
:func:`supervised_code` (the ceiling); the controls of each SAE are built from these
(:mod:`sage_nn.evaluation.controls`). Each coder's ``kind`` is how a report labels its
dictionaries (:data:`KINDS`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..dictionaries.reconstruction import ResidualReconstruction
from ..dictionaries.saes import SparseAutoencoder
from ..dictionaries.supervised import MSEDictionary
from ..model.linear import mlp_norm, normalized
from ..model.sites import HEAD_KINDS, RESID_KINDS, Site, adapter
from . import metrics

SUPERVISED = "supervised"


RANDOM = "random"  # the floor's prefix: random:<SAE> (sage_nn.evaluation.controls)
#: The kinds of dictionaries, as a report labels them (a coder's ``kind``).
KINDS = {"direct": "SAE at the site", "reconstructed": "residual SAE through the reconstruction",
         "transcoder": "transcoder"}


@dataclass
class SiteCode:
    """One dictionary at one (site, position) pair, on n held-out prompts, their
    counterfactuals and the fit prompts.

    ``a, a_hat, a_cf [n, w]``; ``codes, codes_cf [n, L]`` and ``codes_fit [n_fit, L]``;
    ``directions [L, w]`` with an optional per-prompt ``scale [n]`` (a frozen norm) so latent
    ``j`` moves the site by ``scale * code_j * directions[j]``. The codes are the latents'
    codes *at the site*, the ones the edit moves, and every per-latent metric (L0, dead
    latents, F1) counts them: at a sublayer site reached through the reconstruction, the
    pattern-weighted sum of the residual SAE's codes over the source tokens.
    """

    a: torch.Tensor
    a_hat: torch.Tensor
    a_cf: torch.Tensor
    codes: torch.Tensor
    codes_cf: torch.Tensor
    directions: torch.Tensor | None
    scale: torch.Tensor | None = None
    codes_fit: torch.Tensor | None = None
    #: per-token L0 at the dictionary's own site (a residual SAE's at the residual stream),
    #: where that is not the L0 of ``codes`` at this pair (None: it is)
    l0_own: float | None = None

    def path(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy edit's path up to ``k`` latents (:func:`sage_nn.metrics.greedy_path`):
        its first ``k'`` steps are the edit at every ``k' <= k``."""
        return metrics.greedy_path(self.a, self.codes, self.codes_cf, self.directions,
                                   self.a_cf, k, self.scale)


def supervised_code(dictionary: MSEDictionary, a, attrs, a_cf, attrs_cf, a_fit,
                    attrs_fit) -> SiteCode:
    """The fitted supervised dictionary as a :class:`SiteCode` (unit or fitted weights)."""
    codes = np.asarray(dictionary.transform(a, attrs))
    codes_cf = np.asarray(dictionary.transform(a_cf, attrs_cf))
    t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    return SiteCode(t(a), t(dictionary.inverse_transform(codes)), t(a_cf), t(codes),
                    t(codes_cf), t(dictionary.components_),
                    codes_fit=t(dictionary.transform(a_fit, attrs_fit)))


def _at_site(model, sae: SparseAutoencoder, site: Site) -> bool:
    """Whether ``sae`` reads exactly ``site`` (one head of a q/k/v/z SAE)."""
    if site.kind in HEAD_KINDS:
        return (sae.layer, sae.kind, list(sae.heads or [])) == (site.layer, site.kind,
                                                                [site.head])
    return sae.kind not in HEAD_KINDS and adapter(model).same_tensor(
        Site(sae.layer, sae.kind), site)


def sae_code(sae: SparseAutoencoder, a, a_cf, a_fit) -> SiteCode:
    """An SAE at its own site as a :class:`SiteCode` (its codes of ``a``, ``a_cf`` and the
    fit rows ``a_fit``, its decoder as directions)."""
    with torch.no_grad():
        codes, codes_cf = sae.encode(a), sae.encode(a_cf)
        scale, _ = sae.decode_affine(a)
        return SiteCode(a, sae.decode(codes, a).float(), a_cf, codes.float(), codes_cf.float(),
                        sae.decoder().float(), scale.squeeze(-1).float(),
                        codes_fit=sae.encode(a_fit).float())


class DirectSAE:
    """SAEs evaluated at their own sites: a residual SAE at a residual site, or SAEs
    trained at sublayer sites (one per head for q/k/v/z), each serving its own site."""

    kind = KINDS["direct"]

    def __init__(self, saes: SparseAutoencoder | Sequence[SparseAutoencoder]):
        self.saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
        _no_transcoders(self.saes, type(self).__name__)

    def _sae(self, model, site: Site) -> int | None:
        return next((i for i, s in enumerate(self.saes) if _at_site(model, s, site)), None)

    def serves(self, model, site: Site) -> bool:
        return self._sae(model, site) is not None

    def member(self, model, pair) -> tuple[str, SparseAutoencoder]:
        """Where the controls of ``pair`` live: at the site, from its SAE
        (:mod:`sage_nn.evaluation.controls`)."""
        return "site", self.saes[self._sae(model, pair[0])]

    def reads(self, model, pair) -> list[tuple]:
        return []

    def jobs(self, model, pairs) -> list[tuple]:
        return []

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        return {pair: sae_code(self.saes[self._sae(model, pair[0])], values[pair],
                                values_cf[pair], values_fit[pair]) for pair in pairs}


class ReconstructedSAE:
    """Residual SAEs evaluated anywhere: directly at residual sites, and at sublayer sites
    through the residual-to-sublayer reconstruction. ``mode="input"`` (default) recomputes
    the site from the SAE's reconstruction of the residual feeding it, norm scale and
    attention pattern frozen, so each latent has a site-level direction; mlp_out has none
    (the MLP is nonlinear). ``mode="difference"`` takes attn_out/mlp_out as the difference of
    the two residual SAEs' reconstructions around the sublayer. Where there are no latent
    directions, edits are not defined (NaN)."""

    kind = KINDS["reconstructed"]

    def __init__(self, saes: Mapping[str, SparseAutoencoder] | Sequence[SparseAutoencoder],
                 batch_size: int = 16, mode: str = "input"):
        self.saes = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
        _no_transcoders(self.saes, type(self).__name__)
        self.batch_size, self.mode = batch_size, mode
        self._fitted = {}

    def _reconstruction(self, model) -> ResidualReconstruction:
        if id(model) not in self._fitted:
            frozen = self.mode == "input"
            self._fitted[id(model)] = ResidualReconstruction(
                self.saes, mode=self.mode, freeze_norm=frozen, freeze_pattern=frozen).fit(model)
        return self._fitted[id(model)]

    def _direct(self, model, site: Site) -> SparseAutoencoder | None:
        return next((s for s in self.saes if _at_site(model, s, site)), None)

    def serves(self, model, site: Site) -> bool:
        if site.kind in RESID_KINDS:
            return self._direct(model, site) is not None
        try:
            self._reconstruction(model)._plan([site])  # the residual SAEs the site needs
        except ValueError:
            return False
        return True

    def member(self, model, pair) -> tuple[str, SparseAutoencoder | None]:
        """Where the controls of ``pair`` live (:mod:`sage_nn.evaluation.controls`): a
        residual pair's at the site, from its SAE; a linear sublayer pair's at the residual
        feeding it (``"linear"``); elsewhere (mlp_out, difference mode) the floor at the
        pair itself and no random SAE."""
        site = pair[0]
        if site.kind in RESID_KINDS:
            return "site", self._direct(model, site)
        if self._linear(site):
            return "linear", self._reconstruction(model).source(site)
        return "site", None

    def _feed(self, model, pair) -> tuple[Site, str]:
        """The residual that feeds a site, at the site's token."""
        site, position = pair
        if self.mode == "input":
            source = self._reconstruction(model).source(site)
            return Site(source.layer, source.kind), position
        return Site(site.layer, "resid_pre" if site.kind == "attn_out" else "resid_mid"), position

    def reads(self, model, pair) -> list[tuple]:
        """Sites without latent directions take their codes from the residual feeding them
        at their token (mlp_out: the MLP reads that token only): read it."""
        site = pair[0]
        return [] if site.kind in RESID_KINDS or self._linear(site) else [self._feed(model, pair)]

    def _linear(self, site: Site) -> bool:
        """Whether ``site``'s codes follow from the clean run (:mod:`sage_nn.reads`)."""
        return self.mode == "input" and site.kind not in RESID_KINDS and site.kind != "mlp_out"

    def jobs(self, model, pairs) -> list:
        """What :func:`sage_nn.model.reads.read_sites` computes for this coder: per layer,
        the SAE feeding it and the linear sublayer sites it reaches there, at the pairs'
        positions (:class:`~sage_nn.model.reads.LinearJob`)."""
        recon, by_layer = self._reconstruction(model), {}
        for site, position in pairs:
            if self._linear(site):
                sites, positions = by_layer.setdefault(site.layer, ({}, {}))
                sites[site], positions[position] = None, None
        return [recon.linear_job(list(sites), list(positions))
                for _, (sites, positions) in sorted(by_layer.items())]

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        """Every pair's :class:`SiteCode`. Linear sublayer pairs take their codes and
        offsets from ``computed`` (``{pair: (codes, offset, codes_cf, offset_cf,
        codes_fit, maps)}``, from :func:`sage_nn.model.reads.read_sites` with
        :meth:`jobs`; ``maps``: the layer's frozen maps, read where the weights are).
        mlp_out and difference mode rebuild the site in a second forward per named
        position; their codes are the feeding residual SAE's at the site's token."""
        out, recon = {}, None
        nonlinear: dict[str, list[Site]] = {}
        for pair in pairs:
            site, pos = pair
            if site.kind in RESID_KINDS:
                out[pair] = sae_code(self._direct(model, site), values[pair],
                                      values_cf[pair], values_fit[pair])
                continue
            recon = self._reconstruction(model)
            if not self._linear(site):
                feed = self._feed(model, pair)
                source = self._direct(model, feed[0])
                nonlinear.setdefault(pos, []).append(site)
                out[pair] = [source.encode(v[feed]).float()
                             for v in (values, values_cf, values_fit)]
                continue
            codes, offset, codes_cf, _, codes_fit, maps = computed[pair]
            directions = recon.directions(site, maps).float()
            directions = directions.reshape(-1, directions.shape[-1])
            a_hat = codes.flatten(1) @ directions + offset
            out[pair] = SiteCode(values[pair], a_hat, values_cf[pair], codes.flatten(1),
                                 codes_cf.flatten(1), directions, codes_fit=codes_fit.flatten(1))
        if nonlinear:  # no latent directions here: the site is rebuilt by a second forward
            n, prompts = len(test), list(test.prompts) + list(cf.prompts)
            results = recon.run_at_each(
                [(prompts, np.concatenate([test.positions[pos], cf.positions[pos]]), sites, False)
                 for pos, sites in nonlinear.items()], batch_size=self.batch_size, remote=remote)
            for (pos, sites), res in zip(nonlinear.items(), results):
                for site in sites:
                    codes, codes_cf, codes_fit = out[(site, pos)]
                    out[(site, pos)] = SiteCode(values[(site, pos)], res.recon[site][:n].float(),
                                                values_cf[(site, pos)], codes, codes_cf, None,
                                                codes_fit=codes_fit)
        return out


def _no_transcoders(saes: list, coder: str) -> None:
    found = [s for s in saes if getattr(s, "transcoder", False)]
    if found:
        raise ValueError(f"{coder} evaluates SAEs at the site they read; {found[0]!r} is a "
                         "transcoder (it writes another site): evaluate it with Transcoders")


class Transcoders:
    """Transcoders evaluated as dictionaries of the MLP output they write (``L.mlp_out``):
    each latent's direction there is its decoder row, its codes come from the transcoder's
    input (``L.resid_mid``, or the MLP norm's normalised input, at the same token: the MLP
    reads that token only), and the reconstruction is ``codes @ W_dec + b_dec`` plus a skip
    transcoder's skip path, which is part of the reconstruction and never latents (edits
    move latents only). The input is read in the same forward as the sites; the codes are
    computed here from it (plain torch, nothing of the transcoder travels)."""

    kind = KINDS["transcoder"]

    def __init__(self, transcoders: SparseAutoencoder | Sequence[SparseAutoencoder]):
        self.saes = [transcoders] if isinstance(transcoders, SparseAutoencoder) \
            else list(transcoders)
        plain = [s for s in self.saes if not getattr(s, "transcoder", False)]
        if plain:
            raise ValueError(f"{plain[0]!r} is not a transcoder: evaluate SAEs with DirectSAE "
                             "or ReconstructedSAE")

    def _of(self, site: Site) -> SparseAutoencoder | None:
        return next((t for t in self.saes if (t.layer, t.kind) == (site.layer, site.kind)),
                    None)

    def serves(self, model, site: Site) -> bool:
        return site.head is None and self._of(site) is not None

    def _feed(self, pair) -> tuple[Site, str]:
        t = self._of(pair[0])
        return Site(t.input_layer, t.input_kind), pair[1]

    def reads(self, model, pair) -> list[tuple]:
        return [self._feed(pair)]

    def jobs(self, model, pairs) -> list:
        return []

    def codes(self, model, pairs, test, cf, values, values_cf, values_fit, computed=None,
              remote=None) -> dict:
        ad, out = adapter(model), {}
        for pair in pairs:
            t, feed = self._of(pair[0]), self._feed(pair)
            norm = mlp_norm(ad, model, t.input_layer) if t.input_form == "normalized" else None
            x, x_cf, x_fit = (v[feed] if norm is None else normalized(v[feed], *norm)
                              for v in (values, values_cf, values_fit))
            with torch.no_grad():
                codes = t.encode(x)
                out[pair] = SiteCode(values[pair], t.decode(codes, x).float(), values_cf[pair],
                                     codes.float(), t.encode(x_cf).float(),
                                     t.decoder().float(), codes_fit=t.encode(x_fit).float())
        return out


def as_coder(sae: Any) -> Any:
    """A :class:`SparseAutoencoder` (or a list of them) is evaluated at its own site(s),
    transcoders at the site they write (:class:`Transcoders`); anything with ``serves``,
    ``reads``, ``codes`` and ``floor`` (e.g. residual SAEs reaching sublayer sites through
    :class:`ReconstructedSAE`) is used as is."""
    if isinstance(sae, SparseAutoencoder) or (
            isinstance(sae, (list, tuple)) and all(isinstance(s, SparseAutoencoder) for s in sae)):
        members = [sae] if isinstance(sae, SparseAutoencoder) else list(sae)
        return Transcoders(members) if all(getattr(s, "transcoder", False) for s in members) \
            else DirectSAE(sae)
    return sae


@dataclass
class CrossSection:
    """The (site, named position) pairs where one attribute is computed."""

    attribute: str
    pairs: list[tuple[Site, str]]

    @property
    def labels(self) -> list[str]:
        return [f"{s}@{p}" for s, p in self.pairs]
