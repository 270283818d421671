"""The path ceiling: the supervised dictionary fit where a residual SAE lives and pushed
through the same frozen reconstruction (docs/metrics.md, "The dictionaries compared").

A residual SAE reaches a head at the query token through the frozen attention pattern and
norm scale: each latent fires at the tokens of the residual stream, and reaches the head
weighted by how much the head attends to them. The site ceiling (``supervised``) is fitted
at the head itself, so it measures the SAE against what no residual dictionary can reach.
The path ceiling ``supervised:path`` is fitted where the SAE lives: at the residual stream
feeding the head, at each named position of the task (``IO``, ``S1``, ``END``, ...), one
:class:`~sage_nn.dictionaries.supervised.MSEDictionary` over the prompts' attribute values;
each of its features reaches the head as a latent whose direction is the feature pushed
through the frozen map and whose code is the prompt's indicator times the head's attention
to that token and the norm's scale there. Tokens without a name keep their clean residual
(the supervised dictionary has no labels there), so it is generous: a ceiling.

Computed here from the rows the read kept (:attr:`sage_nn.model.reads.Reads.inputs`); at
pairs it does not reach (``attn_out``, ``mlp_out``, a residual pair: there it is the site
ceiling, fitted where the SAE lives) it is the site ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..dictionaries.supervised import MSEDictionary
from ..model.linear import attention_norms, head_key, inv_scale
from ..model.sites import adapter
from .coders import SiteCode

PATH_CEILING = "supervised:path"
#: the sites the path ceiling reaches (elsewhere it is the site ceiling)
PATH_KINDS = ("q", "k", "v", "z")


class PathCeiling:
    """The path ceiling of one run's read: :meth:`codes` per attribute's pairs."""

    def __init__(self, model: Any, inputs: Sequence[list], maps: Mapping, train: Any):
        self.model, self.inputs, self.maps, self.train = model, inputs, maps, train
        self.names = list(train.attribute_names)
        self._rows: dict = {}
        self._fitted: dict = {}

    def reaches(self, pair: tuple) -> bool:
        site, position = pair
        return (site.kind in PATH_KINDS and site.layer in self.maps and any(
            site.layer in b and position in b[site.layer]["positions"]
            for b in self.inputs[1]))

    def named(self, k: int, layer: int, data: Any) -> dict:
        """Set ``k``'s residual at every named position of ``layer``'s read: ``r [n, P, d]``,
        ``present [n, P]`` (read, and not the token of an earlier name), the norm's scale
        ``s [n, P]``, the pattern rows ``w[head] [n, m, P]`` from the query positions, and
        the query positions' names."""
        key = (k, layer)
        if key in self._rows:
            return self._rows[key]
        names = list(data.positions)
        norm = attention_norms(adapter(self.model), self.model, layer)[0]
        r, present, w, start, queries = [], [], {}, 0, None
        for batch in self.inputs[k]:
            n = len(next(iter(batch.values()))["cols"]) if batch else 0
            if layer not in batch:
                start += n
                continue
            b = batch[layer]
            queries = b["positions"]
            mask, attn = b["mask"], b["attention_mask"]
            n, T = attn.shape
            lengths = attn.sum(-1)
            index = torch.full(mask.shape, -1, dtype=torch.long)
            index[mask] = torch.arange(int(mask.sum()))
            rows = torch.arange(n)
            cols = []
            for p in names:
                pos = torch.as_tensor(np.asarray(data.positions[p])[start:start + n])
                pos = torch.where(pos < 0, pos + lengths, pos)
                cols.append(T - lengths + pos)
            cols = torch.stack(cols, 1)  # [n, P]
            at = index[rows[:, None], cols]  # [n, P]: the kept row, or -1
            seen = torch.zeros_like(at, dtype=torch.bool)
            for j in range(len(names)):  # a token two names share counts once
                seen[:, j] = (cols[:, :j] == cols[:, j:j + 1]).any(1)
            ok = (at >= 0) & ~seen
            taken = b["taken"]
            r.append(torch.where(ok[..., None], taken["r"][at.clamp(min=0)], 0.0))
            present.append(ok)
            for h, pattern in taken.get("pattern", {}).items():
                w.setdefault(h, []).append(pattern[rows[:, None, None], torch.arange(
                    pattern.shape[1])[None, :, None], cols[:, None, :]])
            start += n
        r, present = torch.cat(r).float(), torch.cat(present)
        s = inv_scale(r, *norm)[..., 0] if norm is not None else torch.ones(r.shape[:2])
        out = {"r": r, "present": present, "s": s * present,
               "w": {h: torch.cat(v).float() for h, v in w.items()}, "queries": queries,
               "names": names}
        self._rows[key] = out
        return out

    def dictionaries(self, layer: int) -> list[MSEDictionary | None]:
        """Per named position, the supervised dictionary of the fit prompts' residual."""
        if layer not in self._fitted:
            rows = self.named(0, layer, self.train)
            labels = self.train.attributes[self.names].reset_index(drop=True)
            fitted = []
            for j in range(rows["r"].shape[1]):
                keep = rows["present"][:, j].numpy()
                fitted.append(MSEDictionary(attributes=self.names).fit(
                    rows["r"][keep, j].double().numpy(), labels[keep]) if keep.sum() > 1
                    else None)
            self._fitted[layer] = fitted
        return self._fitted[layer]

    def _projection(self, site) -> torch.Tensor:
        """``W [d_model, d_head]`` of the head's projection the site reads (z: its value)."""
        ad = adapter(self.model)
        if site.kind == "z":
            key = head_key("v", site.head // (ad.n_heads // ad.n_kv_heads))
        else:
            key = head_key(site.kind, site.head)
        return self.maps[site.layer]["proj"][key][0].float()

    def _push(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual vectors ``x [..., d]`` after the frozen norm's weight (before its scale)."""
        maps = self.maps[layer]
        if maps["layer_norm"]:
            x = x - x.mean(-1, keepdim=True)
        return x * maps["gamma"].float()

    def _side(self, k: int, data: Any, rows, pair, labels) -> tuple:
        """One set's site weights, codes and the reconstruction's change at ``pair``."""
        site, position = pair
        named = self.named(k, site.layer, data)
        r, s = named["r"][rows], named["s"][rows]
        if site.kind == "z":
            q = named["queries"].index(position)
            weight = named["w"][site.head][rows][:, q, :] * s  # [n, P]
        else:  # q/k/v read the query token alone
            weight = s * torch.as_tensor(np.array(named["names"]) == position)[None, :]
        W = self._projection(site)
        codes, change = [], torch.zeros(len(r), W.shape[1])
        for j, d in enumerate(self.dictionaries(site.layer)):
            if d is None:
                continue
            c = torch.as_tensor(np.asarray(d.transform(r[:, j].double().numpy(), labels)),
                                dtype=torch.float32)
            error = r[:, j] - torch.as_tensor(d.inverse_transform(c.double().numpy()),
                                              dtype=torch.float32)
            codes.append(weight[:, j:j + 1] * c)
            change += weight[:, j:j + 1] * (self._push(error, site.layer) @ W)
        return torch.cat(codes, 1), change

    def codes(self, pair: tuple, test: Any, cf: Any, keep: np.ndarray, a, a_cf,
              cf_set: int) -> SiteCode:
        """The path ceiling at one pair on the kept held-out rows (``a``, ``a_cf``: the site's
        clean values there), its counterfactuals (set ``cf_set``) and the fit prompts."""
        site = pair[0]
        W = self._projection(site)
        directions = torch.cat([self._push(torch.as_tensor(d.components_, dtype=torch.float32),
                                           site.layer) @ W
                                for d in self.dictionaries(site.layer) if d is not None])
        labels = test.attributes[self.names].iloc[keep].reset_index(drop=True)
        labels_cf = cf.attributes[self.names].iloc[keep].reset_index(drop=True)
        codes, change = self._side(1, test, keep, pair, labels)
        codes_cf, _ = self._side(cf_set, cf, keep, pair, labels_cf)
        codes_fit, _ = self._side(0, self.train, np.arange(len(self.train)), pair,
                                  self.train.attributes[self.names].reset_index(drop=True))
        return SiteCode(a, a - change, a_cf, codes, codes_cf, directions, codes_fit=codes_fit)
