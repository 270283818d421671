"""The controls of an SAE, where the SAE lives (docs/metrics.md, "The dictionaries compared").

Two controls per SAE, each over several seeds, each built at the SAE's *own* site with its
width and its per-token budget, and reaching the evaluated pairs the way the SAE does:

- the **floor** ``random:<SAE>``: random unit directions, encoded as a TopK SAE with tied
  random weights would (:func:`~sage_nn.dictionaries.floor.random_floor`): what a
  dictionary of this width and budget gets without learned directions;
- the **random SAE** ``random-sae:<SAE>``: the SAE's own sae_lens architecture with random
  weights, encoded the same way (:mod:`sage_nn.dictionaries.random_sae`): what the SAE's
  architecture and budget get without training.

An SAE at its own site (a head's SAE, a residual SAE at a residual pair) gets both at that
site, fitted on the fit prompts' rows there. A residual SAE reaching heads through the
reconstruction gets both at the residual stream feeding them, fitted on every token the
reconstruction reads of the fit prompts, coded here from those rows
(:attr:`sage_nn.model.reads.Reads.inputs`) and pushed through the same frozen maps
(:func:`~sage_nn.model.linear.linear_codes`). Where an SAE has no directions at a pair
(``mlp_out``) and for transcoders, the floor is built at the pair itself, and there is no
random SAE.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..dictionaries.floor import random_floor
from ..dictionaries.random_sae import CONTROLLED, calibrate, per_token_l0, random_sae
from ..model.linear import attention_norms, linear_codes, site_directions
from ..model.sites import Site, adapter, site_key
from . import metrics
from .coders import SiteCode, sae_code

FLOOR = "random"
RANDOM_SAE = "random-sae"
CONTROLS = (FLOOR, RANDOM_SAE)
#: control seeds per SAE: each control's value is their mean, its interval draws one per
#: bootstrap resample
N_CONTROL_SEEDS = 3


def control_seed(seed: int, where: str, i: int) -> int:
    """The seed of control ``i`` at ``where`` (a site or pair name): the run's seed and the
    place, so a control does not depend on which other SAEs or pairs are evaluated."""
    return seed + 7919 * i + zlib.crc32(where.encode()) % (1 << 30)


def control_name(control: str, sae: str, i: int | None = None) -> str:
    """``random:topk-1024`` (a control over its seeds), ``random:topk-1024#1`` (one seed)."""
    return f"{control}:{sae}" + ("" if i is None else f"#{i}")


def placement(coder: Any, model: Any, pair: tuple) -> tuple[str, Any]:
    """Where a coder's controls live for ``pair``: ``("linear", SAE)`` for a residual SAE
    reaching it through the frozen reconstruction, else ``("site", SAE or None)`` (None: no
    random SAE there)."""
    member = getattr(coder, "member", None)
    return member(model, pair) if member is not None else ("site", None)


def site_controls(code: SiteCode, sae: Any, a_fit: torch.Tensor, seed: int,
                  where: str, n_seeds: int) -> dict[str, list[SiteCode]]:
    """Both controls of one pair at its own site, per seed: the floor (``code``'s width, its
    per-token L0 on the fit prompts), and, when ``sae`` is given and controllable, its
    random SAE (:func:`sae_code`)."""
    budget = round(metrics.l0(code.codes_fit.numpy()))
    like = sae if sae is not None else _Shape(code.codes.shape[1])
    out = {FLOOR: [], RANDOM_SAE: []}
    for i in range(n_seeds):
        s = control_seed(seed, where, i)
        out[FLOOR].append(sae_code(random_floor(like, budget, s, a_fit), code.a, code.a_cf,
                                   a_fit))
        if sae is not None and sae.architecture in CONTROLLED:
            control = calibrate(random_sae(sae, s), sae, a_fit)
            out[RANDOM_SAE].append(sae_code(control, code.a, code.a_cf, a_fit))
    if not out[RANDOM_SAE]:
        del out[RANDOM_SAE]
    return out


class _Shape:
    """What a floor takes of a dictionary without an SAE of its own at the pair (a
    transcoder's, a reconstruction's at mlp_out): its width."""

    def __init__(self, d_sae: int):
        self.d_sae, self.layer, self.kind, self.heads, self.hook_name = d_sae, None, None, \
            None, None


class LinearControls:
    """The controls of residual SAEs reaching heads through the frozen reconstruction, for
    every layer of a read kept with ``keep_inputs``: built at the residual from the fit
    prompts' rows, coded here for every set (:meth:`codes`), once per layer and seed
    whatever the number of attributes."""

    def __init__(self, model: Any, inputs: Sequence[list], maps: Mapping, seed: int,
                 n_seeds: int):
        self.model, self.inputs, self.maps = model, inputs, maps
        self.seed, self.n_seeds = seed, n_seeds
        self._built: dict = {}
        self._coded: dict = {}

    def rows(self, k: int, layer: int) -> torch.Tensor:
        """Every residual row the reconstruction read at ``layer`` of set ``k``."""
        return torch.cat([b[layer]["taken"]["r"] for b in self.inputs[k] if layer in b])

    def own_l0(self, sae: Any, layer: int) -> float:
        """The SAE's per-token L0 at its own site, on the held-out prompts' rows (set 1)."""
        key = ("l0", id(sae), layer)
        if key not in self._coded:
            self._coded[key] = per_token_l0(sae, self.rows(1, layer))
        return self._coded[key]

    def encoders(self, sae: Any, layer: int) -> dict[str, list]:
        """Per control, one encoder per seed, fitted on the fit prompts' rows (set 0)."""
        key = (id(sae), layer)
        if key not in self._built:
            rows = self.rows(0, layer)
            budget = round(per_token_l0(sae, rows))
            where = f"L{layer}.{sae.kind}"
            built = {FLOOR: [random_floor(sae, budget, control_seed(self.seed, where, i),
                                          rows) for i in range(self.n_seeds)]}
            if sae.architecture in CONTROLLED:
                built[RANDOM_SAE] = [calibrate(random_sae(sae, control_seed(self.seed, where, i)),
                                               sae, rows) for i in range(self.n_seeds)]
            self._built[key] = built
        return self._built[key]

    def codes(self, encoder: Any, k: int, layer: int) -> dict:
        """``{(site, position): (codes [n, L] (attn_out: [n, H, L]), offset [n, w])}`` of
        ``encoder`` on set ``k`` at every site and position the layer's read covers."""
        key = (id(encoder), k, layer)
        if key not in self._coded:
            ad = adapter(self.model)
            norm = attention_norms(ad, self.model, layer)[0]
            parts: dict = {}
            for batch in self.inputs[k]:
                if layer not in batch:
                    continue
                b = batch[layer]
                with torch.no_grad():
                    found = linear_codes(ad.spec, encoder.encoder(), norm, b["taken"],
                                         b["mask"], b["cols"], self.maps[layer],
                                         [site_key(s) for s in b["sites"]])
                for key, (c, off) in found.items():
                    site = Site(*key)
                    for m, position in enumerate(b["positions"]):
                        parts.setdefault((site, position), []).append((c[:, m], off[:, m]))
            self._coded[key] = {pair: (torch.cat([c for c, _ in v]).float(),
                                       torch.cat([o for _, o in v]).float())
                                for pair, v in parts.items()}
        return self._coded[key]

    def site_codes(self, sae: Any, pair: tuple, a, a_cf, cf_set: int,
                   keep) -> dict[str, list[SiteCode]]:
        """Both controls at one pair reached through the reconstruction, per seed."""
        site, _ = pair
        layer = site.layer
        out = {}
        for control, encoders in self.encoders(sae, layer).items():
            out[control] = []
            for encoder in encoders:
                codes, offset = self.codes(encoder, 1, layer)[pair]
                codes_cf, _ = self.codes(encoder, cf_set, layer)[pair]
                codes_fit, _ = self.codes(encoder, 0, layer)[pair]
                codes, offset, codes_cf = codes[keep], offset[keep], codes_cf[keep]
                directions = site_directions(adapter(self.model).spec, self.maps[layer],
                                             encoder.decoder(), site_key(site)).float()
                directions = directions.reshape(-1, directions.shape[-1])
                flat = codes.flatten(1)
                own = self.own_l0(encoder, layer)
                out[control].append(SiteCode(a, flat @ directions + offset, a_cf, flat,
                                             codes_cf.flatten(1), directions,
                                             codes_fit=codes_fit.flatten(1), l0_own=own))
        return out

