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
to that token and the norm's scale there. The tokens without a name carry the attributes too
(a name is copied forward by earlier layers): one more dictionary, fitted on all of them
pooled, gives latents coded by the prompt's indicator times the head's summed attention to
those tokens, so that an edit can move what they carry. Its reconstruction replaces the
named tokens' residual by the supervised one and keeps the other tokens clean: generous,
as a ceiling should be.

Computed here from the rows the read kept (:attr:`sage_nn.model.reads.Reads.inputs`); at
pairs it does not reach (``attn_out``, ``mlp_out``, a residual pair: there it is the site
ceiling, fitted where the SAE lives) it is the site ceiling.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import Ridge

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
        self._tokens_cache: dict = {}

    def reaches(self, pair: tuple) -> bool:
        site, position = pair
        return (site.kind in PATH_KINDS and site.layer in self.maps and any(
            site.layer in b and position in b[site.layer]["positions"]
            for b in self.inputs[1]))

    def named(self, k: int, layer: int, data: Any) -> dict:
        """Set ``k``'s residual rows at ``layer`` (every token the read kept), each with its
        prompt (``owner``), its class (``cls``: the index of its named position, or ``P``
        for a token without a name; a token two names share counts for the first), the
        norm's scale there (``s``), and per head the pattern weight from each query
        position (``w[head] [n_tokens, m]``); ``queries``, the query positions' names."""
        key = (k, layer)
        if key in self._rows:
            return self._rows[key]
        names = list(data.positions)
        norm = attention_norms(adapter(self.model), self.model, layer)[0]
        r, owner, cls, w, start, queries = [], [], [], {}, 0, None
        for batch in self.inputs[k]:
            if layer not in batch:
                start += len(next(iter(batch.values()))["cols"]) if batch else 0
                continue
            b = batch[layer]
            queries = b["positions"]
            mask, attn = b["mask"], b["attention_mask"]
            n, T = attn.shape
            lengths = attn.sum(-1)
            label = torch.full((n, T), len(names), dtype=torch.long)
            for j in reversed(range(len(names))):  # the first name wins a shared token
                pos = torch.as_tensor(np.asarray(data.positions[names[j]])[start:start + n])
                pos = torch.where(pos < 0, pos + lengths, pos)
                label[torch.arange(n), T - lengths + pos] = j
            prompt, col = mask.nonzero(as_tuple=True)  # the kept rows, in order
            r.append(b["taken"]["r"])
            owner.append(prompt + start)
            cls.append(label[prompt, col])
            for h, pattern in b["taken"].get("pattern", {}).items():
                w.setdefault(h, []).append(pattern[prompt, :, col])  # [n_tokens, m]
            start += n
        r = torch.cat(r).float()
        s = inv_scale(r, *norm)[..., 0] if norm is not None else torch.ones(len(r))
        out = {"r": r, "owner": torch.cat(owner), "cls": torch.cat(cls), "s": s,
               "w": {h: torch.cat(v).float() for h, v in w.items()}, "queries": queries,
               "names": names, "n": start}
        self._rows[key] = out
        return out

    def dictionaries(self, layer: int) -> list[MSEDictionary | None]:
        """Per named position and for the tokens without a name, the supervised dictionary
        of the fit prompts' residual there."""
        if layer not in self._fitted:
            rows = self.named(0, layer, self.train)
            labels = self.train.attributes[self.names].reset_index(drop=True)
            # the labels are the site ceiling's, which has warned of rare or confounded
            # values already: once is enough
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._fitted[layer] = [self._fit(rows, labels, c)
                                       for c in range(len(rows["names"]) + 1)]
        return self._fitted[layer]

    def _fit(self, rows: dict, labels, c: int) -> MSEDictionary | None:
        """The supervised dictionary of class ``c``'s rows (None: fewer than two)."""
        take = (rows["cls"] == c).numpy()
        if take.sum() <= 1:
            return None
        # thousands of token rows: least squares by the normal equations (a ridge far below
        # the one-hot design's scale), not the pseudo-inverse
        return MSEDictionary(attributes=self.names, weights="fitted",
                             solver=Ridge(alpha=1e-6, solver="cholesky")).fit(
            rows["r"][take].double().numpy(),
            labels.iloc[rows["owner"][take].numpy()].reset_index(drop=True))

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
        """One set's codes at ``pair`` (of the prompts ``rows``, in order) and the change
        the named tokens' supervised reconstruction makes there."""
        site, position = pair
        named = self.named(k, site.layer, data)
        if site.kind == "z":
            weight = named["w"][site.head][:, named["queries"].index(position)] * named["s"]
        else:  # q/k/v read the query token alone
            query = named["names"].index(position)
            weight = named["s"] * (named["cls"] == query)
        where = torch.full((named["n"],), -1, dtype=torch.long)
        where[torch.as_tensor(np.asarray(rows))] = torch.arange(len(rows))
        slot = where[named["owner"]]  # each token's row among ``rows`` (-1: not scored)
        kept = slot >= 0
        W = self._projection(site)
        codes, change = [], torch.zeros(len(rows), W.shape[1])
        for c, d in enumerate(self.dictionaries(site.layer)):
            if d is None:
                continue
            take = kept & (named["cls"] == c)
            per_token, error = self._tokens(k, site.layer, c, take, slot, labels, d, named)
            codes.append(torch.zeros(len(rows), per_token.shape[1]).index_add_(
                0, slot[take], weight[take, None] * per_token))
            if error is not None:  # a named token: its supervised reconstruction's error
                change.index_add_(0, slot[take], weight[take, None] * (error @ W))
        return torch.cat(codes, 1), change

    def _tokens(self, k, layer, c, take, slot, labels, d, named) -> tuple:
        """The supervised codes of class ``c``'s kept tokens of set ``k`` and (a named
        class) their reconstruction's error after the frozen norm's weight; the same for
        every head of the layer, so computed once per set of rows."""
        key = (k, layer, c, tuple(slot[take].tolist()))  # set k and its rows: the labels too
        if key not in self._tokens_cache:
            r = named["r"][take]
            owners = labels.iloc[slot[take].numpy()].reset_index(drop=True)
            per_token = np.asarray(d.transform(r.double().numpy(), owners))
            error = None
            if c < len(named["names"]):
                error = self._push(r - torch.as_tensor(d.inverse_transform(per_token),
                                                       dtype=torch.float32), layer)
            self._tokens_cache[key] = (torch.as_tensor(per_token).float(), error)
        return self._tokens_cache[key]

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
