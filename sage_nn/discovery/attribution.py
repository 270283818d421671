"""Attribution patching: every site of a grid scored per task attribute, in one request.

One module because attribution is one method: its estimator, the traced kernels it sends
(plain torch, shipped to a server as they are) and the persistence of its scores change
together.

For attribute ``A``, clean prompt ``x``, counterfactual ``x'`` and the clean logit
difference ``m`` (always with the clean prompt's answer/distractor)::

    delta_A(s, t) = mean over prompts of (a_s,t(x') - a_s,t(x)) . dm/da_s,t |_x
    score_A(s, t) = delta_A(s, t) / mean(m(x') - m(x))

``delta`` estimates the change in logit difference from patching the counterfactual value
into site ``s`` at named position ``t`` (the value is taken at the position's own token in
each prompt); ``score`` is that as a fraction of the total counterfactual effect, so a site
that carries the whole effect scores 1. An attribute whose total effect is below
``min_effect`` (logits) is flagged ``small_effect``: its fractions divide by a near-zero
number, so read its raw ``delta`` instead (rankings are the same).

Each batch costs one counterfactual forward (all attributes stacked along the batch) and one
clean forward+backward; every site of the grid is scored from them, never a pass per site.

Where the linear estimate is known to fail, sites are patched exactly instead: the residual
stream at a named position whose *token* the counterfactual replaces or moves (the
``changed_token`` coordinate; IOI's IO name for ``io``, both names for the order swap).
There the change is a whole token, and the heads that later read it interact: on SmolLM2
IOI the stream at the IO token carries 0.93-0.98 of the io effect at layers 9-22 when
patched, while attribution says about 0.1, and no single head that reads it carries more
than 0.3. Those sites are few (one residual tensor per layer and changed token) and cheap
to patch: one forward per layer serves every changed token of every attribute, and skips
the blocks below the patch (nnsight's ``skip``, fed the clean stream), so a sweep over L
layers costs about L/2 forwards. ``exact_residuals=False`` turns this off; the ``exact``
variable marks those cells.

The optional integrated-gradients variant (``ig_steps``, see :class:`AttributionPatching`)
replaces ``dm/da |_x`` by its mean over a few points between ``x`` and ``x'``, each one
forward+backward that still scores every site.

One name per residual tensor: block ``L``'s output ``L.resid_post`` *is* block ``L+1``'s input
``L+1.resid_pre``, so scoring both would list one tensor twice (and a top-k cross-section
could spend two of its k slots on it). The grid keeps ``resid_pre`` (layer 0's is the
embeddings) and drops ``L.resid_post`` whenever ``L+1.resid_pre`` is in the grid, so by
default only the last block's ``resid_post`` (the stream that feeds the unembedding)
remains. ``resid_pre`` is the name the rest of sage_nn keys residual SAEs by (the residual
that feeds a layer's attention sites; :mod:`sage_nn.reconstruction` serves ``L.resid_post``
from ``L+1.resid_pre``), so a residual site of a cross-section and the residual that feeds a
sublayer site of the same layer resolve to one SAE.

Scores are an ``xarray.Dataset`` with dims ``(attribute, site, position)``. ``site`` holds
the names of the grid's real sites only (``L9.z.h3``, ``L9.attn_out``, ``L0.resid_pre``;
the grammar of :class:`sage_nn.Site`), so ``scores.score.sel(site="L9.z.h3")`` reads as it
says, with ``layer``, ``kind`` and ``head`` coordinates along it (``head`` is NaN for the
kinds that are not per head) for ``scores.where(scores.kind == "z", drop=True)`` or
``groupby("layer")``. :func:`head_grid` lays one per-head kind out as a ``(layer, head)``
grid; :func:`ranked` lists the sites as a table.


Scores are saved as netCDF (:func:`save_scores`, :func:`load_scores`); :mod:`sage_nn.discovery`
turns them into cross-sections.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..common.notes import SageWarning
from ..model.activations import batches, encode, model_device
from ..model.patching import logit_diff, patched_blocks, patched_forward, plan_batch
from ..model.remote import run_kernel
from ..model.sites import (
    HEAD_KINDS,
    KINDS,
    Site,
    adapter,
    blocks_of,
    channels,
    n_heads_of,
    site_tensor,
    weightless,
)

log = logging.getLogger("sage_nn")
SCORES_FORMAT = "sage_nn.discovery/2"  # /1: a (layer, kind, head) grid, head -1 off heads
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post")


# -- attribution patching -------------------------------------------------------------

class SmallEffectWarning(SageWarning):
    """An attribute whose total effect is below ``min_effect``: its scores (deltas over a
    small total) are unreliable."""


class AttributionPatching:
    """Attribution-patching scores of every (site, named position) for each attribute.

    Hyperparameters: ``kinds`` / ``layers`` / ``positions`` / ``attributes`` restrict the
    grid (default: everything the model and dataset have); ``batch_size`` prompts per
    forward; ``min_effect`` (logits) is the smallest |total effect| worth normalising by.
    ``exact_residuals`` (default True) patches the residual-stream sites exactly at each
    named position whose token the attribute's counterfactual replaces or moves (see the
    module docstring); the ``exact`` variable of the result marks them. ``ig_steps`` = 0
    (default) takes the gradient at the clean run (one clean forward+backward per batch).
    ``ig_steps`` = k > 0 averages it over k points along the
    straight line from the clean to the counterfactual embeddings (integrated gradients on
    the input, as EAP-IG); each point is one forward+backward of all attributes' prompts that
    still scores every site, so it costs about k x attributes clean passes. It needs each
    counterfactual to have as many tokens as its clean prompt. It is not the default: it did
    not rank single-site patches better on SmolLM2 IOI (benchmarks/results/discovery.json;
    Spearman vs exact patching over each method's top 50 of the full grid, k = 2, both
    without exact residuals): io -0.03 (plain 0.27), s -0.60 (plain 0.70) on 6 prompts;
    io 0.46 (0.65), s -0.01 (0.78) on 8.
    It moves every changed token at once, so it credits sites along that joint path: it
    sees that the IO token's residual stream carries the io effect (about 0.9 vs exact
    0.93-1.0, where plain attribution says 0.10-0.13 for layers 9-23), but it gets the sign
    of patching S1 alone wrong for s (+1.43 vs exact -1.22: S1 and S2 interact).

    Fitted: ``scores_`` (Dataset over ``(attribute, site, position)``: ``score``,
    ``delta``, ``exact`` and the per-attribute effects), ``effects_`` (a table per
    attribute).
    """

    def __init__(self, kinds: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 positions: Sequence[str] | None = None,
                 attributes: Sequence[str] | None = None, batch_size: int = 16,
                 min_effect: float = 1.0, exact_residuals: bool = True, ig_steps: int = 0,
                 progress: bool = False):
        self.kinds = kinds
        self.layers = layers
        self.positions = positions
        self.attributes = attributes
        self.batch_size = batch_size
        self.min_effect = min_effect
        self.exact_residuals = exact_residuals
        self.ig_steps = ig_steps
        self.progress = progress

    # grid -------------------------------------------------------------------------
    def _grid(self, ad, dataset):
        kinds = list(ad.kinds() if self.kinds is None else self.kinds)
        for kind in kinds:
            if kind not in ad.kinds():
                raise ValueError(f"kind {kind!r} is not available for this model; available: "
                                 f"{', '.join(ad.kinds())}")
        kinds.sort(key=KINDS.index)
        layers = list(range(ad.n_layers)) if self.layers is None else sorted(self.layers)
        bad = [l for l in layers if not 0 <= l < ad.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range; the model has layers "
                             f"0..{ad.n_layers - 1}")
        positions = list(dataset.positions if self.positions is None else self.positions)
        missing = [p for p in positions if p not in dataset.positions]
        if missing or not positions:
            raise ValueError(f"unknown named positions {missing}; the dataset {dataset.name!r} "
                             f"has {sorted(dataset.positions)}")
        attributes = list(dataset.attribute_names if self.attributes is None else self.attributes)
        missing = [a for a in attributes if a not in dataset.counterfactuals]
        if missing or not attributes:
            raise ValueError(f"attributes {missing} have no counterfactuals in dataset "
                             f"{dataset.name!r}; it has {sorted(dataset.counterfactuals)}")
        return kinds, layers, positions, attributes

    def fit(self, model: Any, dataset: Any, remote: Any = None) -> "AttributionPatching":
        """Score every grid site for every attribute of ``dataset``. ``remote`` runs the
        forward and backward passes elsewhere (see :mod:`sage_nn.remote`)."""
        ad = adapter(model)
        kinds, layers, positions, attributes = self._grid(ad, dataset)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ig_steps < 0:
            raise ValueError(f"ig_steps must be >= 0 (0: plain attribution patching), got "
                             f"{self.ig_steps}")
        grid = [(layer, kind) for layer in layers for kind in kinds
                if not _aliased(layer, kind, layers, kinds)]
        n = len(dataset.prompts)
        sites = _grid_sites(ad, grid)
        where = _site_slices(sites)
        device = model_device(model)
        # The exact sweep: (attribute, position) pairs whose token changes, and the residual
        # tensors (streams) their grid's residual sites resolve to.
        changed_token = np.zeros((len(attributes), len(positions)), bool)
        for a, attribute in enumerate(attributes):
            changed_token[a, _changed_positions(model, dataset, attribute, positions)] = True
        changed = [(int(a), int(p)) for a, p in zip(*np.nonzero(changed_token))]
        residual = [key for key in grid if key[1] in RESIDUAL_KINDS]
        streams = sorted({_stream(*key) for key in residual}) if (
            self.exact_residuals and changed) else []
        delta = np.zeros((len(attributes), len(sites), len(positions)))
        clean_sum, cf_sum = 0.0, np.zeros(len(attributes))
        swept = np.zeros((len(streams), len(changed)))
        chunks = (_prepare_batch(model, dataset, attributes, positions, grid, idx, device,
                                 self.ig_steps, streams, changed)
                  for idx in batches(n, self.batch_size, self.progress and "attribution"))
        methods = set()
        for contrib, ld, cf_ld, sweep, how in run_kernel(model, _attribute, chunks, remote,
                                                         stage="attribution",
                                                         shapes=attribution_bytes):
            methods.add(how)
            for key, c in contrib.items():
                c = c.double().cpu().numpy()  # [attribute, position(, heads)]
                delta[:, where[key], :] += c.transpose(0, 2, 1) if c.ndim == 3 else c[:, None]
            clean_sum += float(ld.sum())
            cf_sum += cf_ld.double().cpu().numpy().reshape(len(attributes), -1).sum(1)
            if streams:
                swept += sweep.double().cpu().numpy()
        delta /= n
        clean_ld, cf_ld = clean_sum / n, cf_sum / n
        # where the request ran without a backward pass (NDIF's sandbox) every site was
        # patched exactly (:func:`_exact_contributions`)
        exact = np.full(delta.shape, "exact" in methods)
        for key in residual if streams else []:
            i, j = where[key].start, streams.index(_stream(*key))
            for c, (a, p) in enumerate(changed):
                delta[a, i, p] = swept[j, c] / n - clean_ld
                exact[a, i, p] = True
        total = cf_ld - clean_ld
        small = np.abs(total) < self.min_effect
        safe = np.where(total == 0, np.inf, total)
        score = delta / safe[:, None, None]
        for a, s in zip(attributes, small):
            if s:
                effect, others = total[attributes.index(a)], [o for o in attributes if o != a]
                warnings.warn(SmallEffectWarning(
                    f"attribute {a!r}: total counterfactual effect {effect:+.3f} is below "
                    f"min_effect={self.min_effect}; its normalised scores are unreliable, use "
                    "the raw deltas",
                    cli=f"attribute {a!r}: changing it moves the logit difference by only "
                        f"{effect:+.3f} (below {self.min_effect}), so its attribution scores "
                        "are unreliable and its cross-section may be poor; fix: read its "
                        "results with care" + (f", or leave it out (--attributes "
                                               f"{' '.join(others)})" if others else ""),
                    key=a), stacklevel=2)
        dims = ("attribute", "site", "position")
        self.scores_ = xr.Dataset(
            {"score": (dims, score), "delta": (dims, delta), "exact": (dims, exact),
             "counterfactual_logit_diff": ("attribute", cf_ld),
             "total_effect": ("attribute", total), "small_effect": ("attribute", small)},
            coords={"attribute": attributes, **_site_coords(sites), "position": positions,
                    "changed_token": (("attribute", "position"), changed_token)},
            attrs={"format": SCORES_FORMAT, "model": str(model.config._name_or_path),
                   "task": str(getattr(dataset, "name", "")), "n_prompts": n,
                   "clean_logit_diff": clean_ld, "min_effect": self.min_effect,
                   "ig_steps": int(self.ig_steps), "exact_residuals": int(bool(streams)),
                   "method": ("exact activation patching of every site (the server ran "
                              "the request without a backward pass, as NDIF's sandbox does)"
                              if "exact" in methods else
                              "attribution patching" if not self.ig_steps else
                              f"attribution patching, integrated gradients ({self.ig_steps} "
                              "steps on the embeddings)")
                   + ("; residual stream at changed tokens patched exactly" if streams else "")
                   + "; score = delta / total_effect"})
        if "exact" in methods:
            log.info("discovery: the server ran without a backward pass (NDIF's sandbox), so "
                     "every site was patched exactly instead of scored by attribution")
        self.effects_ = effects_table(self.scores_)
        return self

    def save(self, path: str | Path) -> Path:
        return save_scores(self.scores_, path)


def _grid_sites(ad, grid: Sequence[tuple[int, str]]) -> list[Site]:
    """The real sites of the ``(layer, kind)`` grid, in grid order, heads ascending."""
    return [Site(layer, kind, h) for layer, kind in grid
            for h in (range(ad.n_heads_of(kind)) if kind in HEAD_KINDS else [None])]


def _site_slices(sites: Sequence[Site]) -> dict[tuple[int, str], slice]:
    """Where each ``(layer, kind)`` sits along the ``site`` dimension (heads contiguous)."""
    where = {}
    for i, s in enumerate(sites):
        key = (s.layer, s.kind)
        where[key] = slice(where[key].start if key in where else i, i + 1)
    return where


def _site_coords(sites: Sequence[Site]) -> dict:
    return {"site": [str(s) for s in sites], "layer": ("site", [s.layer for s in sites]),
            "kind": ("site", [s.kind for s in sites]),
            "head": ("site", [np.nan if s.head is None else float(s.head) for s in sites])}


def _aliased(layer: int, kind: str, layers: Sequence[int], kinds: Sequence[str]) -> bool:
    """``L.resid_post`` is ``L+1.resid_pre``: score that tensor once, by its resid_pre name."""
    return kind == "resid_post" and "resid_pre" in kinds and layer + 1 in layers


def _stream(layer: int, kind: str) -> int:
    """The residual stream ``R_j`` (block ``j``'s input; ``R_n`` the last block's output)
    whose exact patch equals patching this residual site. ``L.resid_mid`` maps to
    ``R_L+1``: the MLP works token by token, so patching the counterfactual's resid_mid at a
    token recomputes exactly the counterfactual's ``L+1.resid_pre`` there, and nothing else
    reads resid_mid."""
    return layer if kind == "resid_pre" else layer + 1


def _changed_positions(model, dataset, attribute, positions) -> list[int]:
    """Indices of the named positions where, in any prompt, the counterfactual has another
    token or has it at another place (IOI's order swap moves both names): the patched value
    is then another token's stream, or the same token's from another position and context.
    Tokenizer only, no model run."""
    cf = dataset.counterfactuals[attribute]
    clean, counter = encode(model, dataset.prompts), encode(model, cf.prompts)

    def token_and_place(batch, data, pos):  # the token id, and its index in the prompt
        col = batch.index(data.positions[pos])
        return batch.inputs["input_ids"].gather(1, col[:, None])[:, 0], col - batch.offsets

    return [i for i, pos in enumerate(positions)
            if any(bool((x != y).any()) for x, y in zip(token_and_place(clean, dataset, pos),
                                                         token_and_place(counter, cf, pos)))]


def _rows_cols(batch, positions_per_row: Sequence[np.ndarray], device):
    cols = torch.stack([batch.index(p) for p in positions_per_row], 1).to(device)
    rows = torch.arange(cols.shape[0], device=device)[:, None]
    return rows, cols


def _prepare_batch(model, dataset, attributes, positions, grid, idx, device, ig_steps,
                   streams, changed):
    """One batch of clean prompts and their counterfactuals, tokenized, with the rows and
    columns of the named positions: the arguments of :func:`_attribute`."""
    cfs = [dataset.counterfactuals[a] for a in attributes]
    clean = encode(model, [dataset.prompts[i] for i in idx], device)
    cf = encode(model, [c.prompts[i] for c in cfs for i in idx], device)
    if ig_steps:
        _check_aligned(clean, cf, attributes, idx)
    clean_at = _rows_cols(clean, [dataset.positions[p][idx] for p in positions], device)
    cf_at = _rows_cols(cf, [np.concatenate([c.positions[p][idx] for c in cfs])
                            for p in positions], device)
    answer = torch.as_tensor(np.tile(dataset.answer_ids[idx], len(cfs)), device=device)
    distractor = torch.as_tensor(np.tile(dataset.distractor_ids[idx], len(cfs)), device=device)
    return (clean.inputs, cf.inputs, grid, clean_at, cf_at, answer, distractor, len(cfs),
            ig_steps, streams, changed)


def attribution_bytes(model, arch, clean_inputs, cf_inputs, grid, clean_at, cf_at, answer,
                      distractor, n_attr, ig_steps, streams, changed, seen=None) -> int:
    """The bytes :func:`_attribute` returns for one batch, from shapes (in the model's
    dtype): every grid site's contribution per attribute and position, the logit
    differences, the exact sweep."""
    b, positions = len(clean_inputs["input_ids"]), clean_at[1].shape[1]
    floats = sum(n_attr * positions * (n_heads_of(arch, kind) if kind in HEAD_KINDS else 1)
                 for _, kind in grid)
    floats += b + n_attr * b + len(streams) * len(changed)
    return floats * next(model._module.parameters()).element_size()


def _attribute(model, arch, clean_inputs, cf_inputs, grid, clean_at, cf_at, answer,
               distractor, n_attr, ig_steps, streams, changed):
    """One batch (a remote kernel): every grid site's summed contribution per attribute
    (``{(layer, kind): [attribute, position(, head)]}``), the clean logit differences, the
    counterfactual ones (``[attribute * batch]``) and the exact sweep's summed logit
    differences (``[stream, changed pair]``, see :func:`_residual_sweep`)."""
    b = len(clean_inputs["input_ids"])
    keys = [_stream_key(arch, j) for j in streams]
    read = sorted(set(grid) | set(keys), key=lambda k: (k[0], KINDS.index(k[1])))  # run order
    exact = weightless(model)  # NDIF's sandbox: a request there runs no backward pass
    cf_values, cf_ld, cf_embed = _forward(model, arch, cf_inputs, read, *cf_at, answer,
                                          distractor, embeddings=ig_steps > 0 and not exact)
    sweep = _residual_sweep(model, arch, clean_inputs, streams, changed, clean_at[1], cf_values,
                            answer[:b], distractor[:b]) if streams else None
    if exact:
        contrib, ld = _exact_contributions(model, arch, clean_inputs, grid, clean_at[1],
                                           cf_values, answer[:b], distractor[:b], n_attr)
        return contrib, ld, cf_ld, sweep, "exact"
    if not ig_steps:
        values, grads, ld = _forward_backward(model, arch, clean_inputs, grid, *clean_at,
                                              answer[:b], distractor[:b])
        grads = {key: g.repeat(n_attr, 1, 1) for key, g in grads.items()}
    else:
        values, ld, embed = _forward(model, arch, clean_inputs, grid, *clean_at, answer[:b],
                                     distractor[:b], embeddings=True)
        # Integrated gradients: the mean gradient at k midpoints of the straight line from
        # the clean to the counterfactual embeddings; each step is one forward+backward of
        # every attribute's interpolated batch and scores all sites at once.
        inputs = {k: t.repeat(n_attr, 1) for k, t in clean_inputs.items()}
        cols = clean_at[1].repeat(n_attr, 1)  # the clean tokens: the batch is aligned
        rows = torch.arange(len(cols), device=cols.device)[:, None]
        embed = embed.repeat(n_attr, 1, 1)
        grads = {}
        for alpha in [(step + 0.5) / ig_steps for step in range(ig_steps)]:
            mix = embed + alpha * (cf_embed - embed)
            _, step, _ = _forward_backward(model, arch, inputs, grid, rows, cols, answer,
                                           distractor, embeddings=mix)
            for key, g in step.items():
                grads[key] = grads.get(key, 0) + g / ig_steps
    contrib = {}
    for key in grid:
        # (a(x') - a(x)) . grad, per attribute, summed over prompts and over each head's dims
        c = (cf_values[key] - values[key].repeat(n_attr, 1, 1)) * grads[key]
        if key[1] in HEAD_KINDS:
            c = c.unflatten(-1, (n_heads_of(arch, key[1]), arch["d_head"]))
        contrib[key] = c.sum(-1).unflatten(0, (n_attr, b)).sum(1)
    return contrib, ld, cf_ld, sweep, "attribution"


def _exact_contributions(model, arch, inputs, grid, cols, cf_values, answer, distractor,
                         n_attr, max_rows: int = 256):
    """Where no backward pass runs (NDIF's sandbox): every grid site's contribution
    measured by exact activation patching instead of estimated, in the same shape as the
    gradient's (``{(layer, kind): [attribute, position(, head)]}``, summed over prompts):
    the logit difference with that site's counterfactual value written at that position,
    minus the clean one. Each (site, position, attribute) is a variant of the batch; they
    share forwards and recompute only the blocks they change (:func:`patched_blocks`).
    Returns the contributions and the clean logit differences."""
    b, P = cols.shape
    T = inputs["input_ids"].shape[1]
    batch = {"inputs": inputs, "offsets": torch.zeros(b, dtype=torch.long),
             "lengths": torch.full((b,), T, dtype=torch.long)}  # positions are the columns
    positions = cols.cpu().numpy()
    variants, where = [], []
    for layer, kind in grid:
        heads = list(range(n_heads_of(arch, kind))) if kind in HEAD_KINDS else [None]
        width = arch["d_head"] if kind in HEAD_KINDS else arch["d_model"]
        for a in range(n_attr):
            for p in range(P):
                value = cf_values[(layer, kind)][a * b:(a + 1) * b, p]  # [b, heads * width]
                for i, head in enumerate(heads):
                    variants.append([((layer, kind, head), positions[:, p],
                                      value[:, i * width:(i + 1) * width])])
                    where.append(((layer, kind), a, p, head))
    groups, members, _ = plan_batch(arch, batch, np.arange(b), variants, max_rows,
                                    inputs["input_ids"].device, None)
    outs = patched_blocks(model, arch, inputs, groups, answer, distractor)
    clean = outs[0][0].float()
    sums = torch.zeros(len(variants), dtype=torch.float64)
    for (ld, _, _), chunk in zip(outs[1:], members):
        sums[chunk] += (ld.float().reshape(b, -1) - clean[:, None]).sum(0).double().cpu()
    contrib = {}
    for (key, a, p, head), total in zip(where, sums.tolist()):
        shape = (n_attr, P) + ((n_heads_of(arch, key[1]),) if head is not None else ())
        at = contrib.setdefault(key, torch.zeros(shape, dtype=torch.float64))
        at[(a, p) + ((head,) if head is not None else ())] = total
    return contrib, clean


def _stream_key(arch: dict, j: int) -> tuple[int, str]:
    """The site naming residual stream ``R_j``."""
    return (j, "resid_pre") if j < arch["n_layers"] else (j - 1, "resid_post")


def _residual_sweep(model, arch, inputs, streams, changed, cols, cf_values, answer,
                    distractor):
    """Exact patching of each residual stream ``R_j`` at each changed (attribute, position)
    pair: the summed logit difference per (stream, pair). One forward per stream serves every
    pair (row block ``c`` is the batch with pair ``c``'s counterfactual value written in), and
    skips the blocks below the patch, whose output is the clean stream anyway: stacking all
    streams in one forward would run every block for each, about twice the compute."""
    b = len(inputs["input_ids"])
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):
        clean = {}
        for j in streams:
            if j > 0:
                clean[j] = site_tensor(model, arch, *_stream_key(arch, j))
        clean.save()
    rows = torch.arange(len(changed) * b, device=cols.device)
    at = torch.cat([cols[:, p] for _, p in changed])
    tiled = {k: t.repeat(len(changed), 1) for k, t in inputs.items()}
    answer, distractor = answer.repeat(len(changed)), distractor.repeat(len(changed))
    out = []
    for j in streams:
        values = torch.cat([cf_values[_stream_key(arch, j)][a * b:(a + 1) * b, p]
                            for a, p in changed])
        if j == 0:  # the embeddings: nothing to skip
            chans = torch.arange(arch["d_model"], device=rows.device)
            writes, skip = {(0, "resid_pre"): [(rows, at, chans, values)]}, None
        else:
            hidden = clean[j].repeat(len(changed), 1, 1)
            hidden[rows, at] = values.to(hidden.dtype)
            writes, skip = {}, (j, hidden)
        ld = patched_forward(model, arch, tiled, writes, answer, distractor, skip=skip)[0]
        out.append(ld.float().unflatten(0, (len(changed), b)).sum(1))
    return torch.stack(out)


def _check_aligned(clean, cf, attributes, idx):
    lengths = clean.lengths.repeat(len(attributes))
    bad = np.flatnonzero((cf.lengths != lengths).cpu().numpy())
    if len(bad):
        i = bad[0]
        raise ValueError(
            f"ig_steps > 0 interpolates the embeddings of each clean prompt and its "
            f"counterfactual token by token, so they need the same number of tokens; attribute "
            f"{attributes[i // len(idx)]!r}, prompt {idx[i % len(idx)]} has "
            f"{int(lengths[i])} clean and {int(cf.lengths[i])} counterfactual tokens. Use "
            "ig_steps=0 (plain attribution patching) for this dataset")


def _forward(model, arch, inputs, grid, rows, cols, answer, distractor, embeddings=False):
    """Every grid tensor at (rows, cols) (``[row, position, channels]``), the logit
    differences and, with ``embeddings``, layer 0's whole input."""
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):  # the last token's
        values = {}
        if embeddings:
            values["embeddings"] = site_tensor(model, arch, 0, "resid_pre")
        for layer, kind in grid:
            t = site_tensor(model, arch, layer, kind)[..., channels(arch, kind)]
            values[(layer, kind)] = t[rows, cols]
        values.save()
        ld = logit_diff(model.output.logits[:, -1], answer, distractor).save()
    return values, ld, values.pop("embeddings", None)


def _forward_backward(model, arch, inputs, grid, rows, cols, answer, distractor,
                      embeddings=None):
    """One forward and one backward: every grid tensor and its gradient of the summed logit
    difference, at (rows, cols). ``embeddings`` replace layer 0's input when given."""
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1):
        block0 = blocks_of(model, arch)[0]
        if embeddings is not None:
            first = embeddings.detach().requires_grad_(True)
            block0.input = first
        else:
            # Gradients w.r.t. activations only: a frozen model gets its graph from here.
            first = block0.input
            if not first.requires_grad:
                first.requires_grad_(True)
        tensors = [first if key == (0, "resid_pre") else site_tensor(model, arch, *key)
                   for key in grid]
        ld = logit_diff(model.output.logits[:, -1], answer, distractor)
        grads = torch.autograd.grad(ld.sum(), tensors, allow_unused=True)
        values, out = {}, {}
        for key, t, g in zip(grid, tensors, grads):
            ch = channels(arch, key[1])
            values[key] = t.detach()[..., ch][rows, cols]
            out[key] = torch.zeros_like(values[key]) if g is None else g[..., ch][rows, cols]
        values.save()
        out.save()
        ld = ld.detach().save()
    return values, out, ld


def effects_table(scores: xr.Dataset) -> pd.DataFrame:
    """Per attribute: clean and counterfactual logit difference, total effect, flag."""
    return pd.DataFrame({
        "clean_logit_diff": scores.attrs["clean_logit_diff"],
        "counterfactual_logit_diff": scores.counterfactual_logit_diff.values,
        "total_effect": scores.total_effect.values,
        "small_effect": scores.small_effect.values.astype(bool),
    }, index=pd.Index(scores.attribute.values, name="attribute"))


# -- persistence --------------------------------------------------------------------

def save_scores(scores: xr.Dataset, path: str | Path) -> Path:
    """Write attribution scores to netCDF (``.nc``)."""
    path = Path(path)
    if path.suffix != ".nc":
        raise ValueError(f"scores path {path}: use a .nc file")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = scores.assign_coords(changed_token=scores.changed_token.astype("int8"))
    out = out.assign(small_effect=out.small_effect.astype("int8"), exact=out.exact.astype("int8"))
    out.to_netcdf(path, engine="h5netcdf")
    return path


def load_scores(path: str | Path) -> xr.Dataset:
    """Read :func:`save_scores`'s file (also the older ``(layer, kind, head)`` grid)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"scores file {path} does not exist")
    ds = xr.load_dataset(path, engine="h5netcdf")
    if ds.attrs.get("format") == "sage_nn.discovery/1":
        ds = _from_grid(ds)
    elif ds.attrs.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not a sage_nn discovery scores file")
    ds = ds.assign_coords(changed_token=ds.changed_token.astype(bool))
    return ds.assign(small_effect=ds.small_effect.astype(bool), exact=ds.exact.astype(bool))


def _from_grid(ds: xr.Dataset) -> xr.Dataset:
    """A format-1 file (a ``(layer, kind, head)`` grid with ``head = -1`` off heads and an
    ``is_site`` mask) as the ``site`` layout."""
    layers, kinds = [int(l) for l in ds.layer.values], [str(k) for k in ds.kind.values]
    is_site = ds.is_site.astype(bool)
    if "layer" not in is_site.dims:  # written before residual aliases were dropped
        alias = xr.DataArray([[_aliased(l, k, layers, kinds) for k in kinds] for l in layers],
                             dims=("layer", "kind"), coords={"layer": layers, "kind": kinds})
        is_site = (is_site & ~alias).transpose("layer", "kind", "head")
    if "changed_token" not in ds.coords:  # written before changed tokens were marked
        ds = ds.assign_coords(changed_token=(("attribute", "position"), np.zeros(
            (ds.sizes["attribute"], ds.sizes["position"]), bool)))
    if "exact" not in ds:  # written before residuals were patched exactly
        ds = ds.assign(exact=xr.zeros_like(ds.score, dtype="int8"))
    cells = [(l, k, int(h)) for l in layers for k in kinds for h in ds["head"].values
             if is_site.sel(layer=l, kind=k, head=h)]
    sites = [Site(l, k, h if k in HEAD_KINDS else None) for l, k, h in cells]
    out = {name: (("attribute", "site", "position"), np.stack(
              [ds[name].sel(layer=l, kind=k, head=h).values for l, k, h in cells], axis=1))
           for name in ("score", "delta", "exact")}
    rest = ds.drop_vars(["score", "delta", "exact", "is_site", "layer", "kind", "head"])
    return rest.assign_coords(_site_coords(sites)).assign(out).assign_attrs(
        format=SCORES_FORMAT)
