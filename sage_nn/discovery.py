"""Discovery: attribution patching per attribute finds a task's cross-sections.

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

A cross-section is a set of components (by default per-head ``z``) whose *joint* exact patch
recovers a share of the attribute's total effect: :func:`grow_cross_sections` (the default of
:func:`discover`) takes its candidates from attribution and decides by exact joint patching,
in four model runs shared by every attribute and one request remotely. On SmolLM2 IOI (16 prompts) it finds
io: 6 heads at END (L29.h1, L23.h7/h0/h2/h1/h4) recovering 0.63; s: 3 heads (L24.h5,
L23.h0/h7) 0.66; order: L20.h0 alone, 2.6 (it overshoots the small total effect), in 18 s
on 2 idle CPU cores. The top-|score| pick (:func:`select_cross_section`) stays available
as ``top_k`` / ``coverage``.

Scores are an ``xarray.Dataset`` with dims ``(attribute, site, position)``. ``site`` holds
the names of the grid's real sites only (``L9.z.h3``, ``L9.attn_out``, ``L0.resid_pre``;
the grammar of :class:`sage_nn.Site`), so ``scores.score.sel(site="L9.z.h3")`` reads as it
says, with ``layer``, ``kind`` and ``head`` coordinates along it (``head`` is NaN for the
kinds that are not per head) for ``scores.where(scores.kind == "z", drop=True)`` or
``groupby("layer")``. :func:`head_grid` lays one per-head kind out as a ``(layer, head)``
grid; :func:`ranked` lists the sites as a table.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from .activations import batches, encode, model_device
from .growth import measure_growth
from .interventions import Patch, _patched_forward, logit_diff, run_patched, site_values
from .remote import run_kernel
from .sites import HEAD_KINDS, KINDS, Site, adapter

SCORES_FORMAT = "sage_nn.discovery/2"  # /1: a (layer, kind, head) grid, head -1 off heads
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post")


# -- attribution patching -------------------------------------------------------------

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
        for contrib, ld, cf_ld, sweep in run_kernel(model, _attribute, chunks, remote,
                                                    stage="attribution"):
            for key, c in contrib.items():
                c = c.double().cpu().numpy()  # [attribute, position(, heads)]
                delta[:, where[key], :] += c.transpose(0, 2, 1) if c.ndim == 3 else c[:, None]
            clean_sum += float(ld.sum())
            cf_sum += cf_ld.double().cpu().numpy().reshape(len(attributes), -1).sum(1)
            if streams:
                swept += sweep.double().cpu().numpy()
        delta /= n
        clean_ld, cf_ld = clean_sum / n, cf_sum / n
        exact = np.zeros(delta.shape, bool)
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
                warnings.warn(f"attribute {a!r}: total counterfactual effect "
                              f"{total[attributes.index(a)]:+.3f} is below min_effect="
                              f"{self.min_effect}; its normalised scores are unreliable, use "
                              "the raw deltas", stacklevel=2)
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
                   "method": ("attribution patching" if not self.ig_steps else
                              f"attribution patching, integrated gradients ({self.ig_steps} "
                              "steps on the embeddings)")
                   + ("; residual stream at changed tokens patched exactly" if streams else "")
                   + "; score = delta / total_effect"})
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


def _attribute(model, clean_inputs, cf_inputs, grid, clean_at, cf_at, answer, distractor,
               n_attr, ig_steps, streams, changed):
    """One batch (a remote kernel): every grid site's summed contribution per attribute
    (``{(layer, kind): [attribute, position(, head)]}``), the clean logit differences, the
    counterfactual ones (``[attribute * batch]``) and the exact sweep's summed logit
    differences (``[stream, changed pair]``, see :func:`_residual_sweep`)."""
    ad = adapter(model)
    b = len(clean_inputs["input_ids"])
    keys = [_stream_key(ad, j) for j in streams]
    read = sorted(set(grid) | set(keys), key=lambda k: (k[0], KINDS.index(k[1])))  # run order
    cf_values, cf_ld, cf_embed = _forward(model, ad, cf_inputs, read, *cf_at, answer,
                                          distractor, embeddings=ig_steps > 0)
    sweep = _residual_sweep(model, ad, clean_inputs, streams, changed, clean_at[1], cf_values,
                            answer[:b], distractor[:b]) if streams else None
    if not ig_steps:
        values, grads, ld = _forward_backward(model, ad, clean_inputs, grid, *clean_at,
                                              answer[:b], distractor[:b])
        grads = {key: g.repeat(n_attr, 1, 1) for key, g in grads.items()}
    else:
        values, ld, embed = _forward(model, ad, clean_inputs, grid, *clean_at, answer[:b],
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
            _, step, _ = _forward_backward(model, ad, inputs, grid, rows, cols, answer,
                                           distractor, embeddings=mix)
            for key, g in step.items():
                grads[key] = grads.get(key, 0) + g / ig_steps
    contrib = {}
    for key in grid:
        # (a(x') - a(x)) . grad, per attribute, summed over prompts and over each head's dims
        c = (cf_values[key] - values[key].repeat(n_attr, 1, 1)) * grads[key]
        if key[1] in HEAD_KINDS:
            c = c.unflatten(-1, (ad.n_heads_of(key[1]), ad.d_head))
        contrib[key] = c.sum(-1).unflatten(0, (n_attr, b)).sum(1)
    return contrib, ld, cf_ld, sweep


def _stream_key(ad, j: int) -> tuple[int, str]:
    """The site naming residual stream ``R_j``."""
    return (j, "resid_pre") if j < ad.n_layers else (j - 1, "resid_post")


def _residual_sweep(model, ad, inputs, streams, changed, cols, cf_values, answer, distractor):
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
                clean[j] = ad.tensor(model, *_stream_key(ad, j))
        clean.save()
    rows = torch.arange(len(changed) * b, device=cols.device)
    at = torch.cat([cols[:, p] for _, p in changed])
    tiled = {k: t.repeat(len(changed), 1) for k, t in inputs.items()}
    answer, distractor = answer.repeat(len(changed)), distractor.repeat(len(changed))
    out = []
    for j in streams:
        values = torch.cat([cf_values[_stream_key(ad, j)][a * b:(a + 1) * b, p]
                            for a, p in changed])
        if j == 0:  # the embeddings: nothing to skip
            chans = torch.arange(ad.d_model, device=rows.device)
            writes, skip = {(0, "resid_pre"): [(rows, at, chans, values)]}, None
        else:
            hidden = clean[j].repeat(len(changed), 1, 1)
            hidden[rows, at] = values.to(hidden.dtype)
            writes, skip = {}, (j, hidden)
        ld = _patched_forward(model, tiled, writes, answer, distractor, skip=skip)[0]
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


def _forward(model, ad, inputs, grid, rows, cols, answer, distractor, embeddings=False):
    """Every grid tensor at (rows, cols) (``[row, position, channels]``), the logit
    differences and, with ``embeddings``, layer 0's whole input."""
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):  # the last token's
        values = {}
        if embeddings:
            values["embeddings"] = ad.tensor(model, 0, "resid_pre")
        for layer, kind in grid:
            t = ad.tensor(model, layer, kind)[..., ad.channels(kind)]
            values[(layer, kind)] = t[rows, cols]
        values.save()
        ld = logit_diff(model.output.logits[:, -1], answer, distractor).save()
    return values, ld, values.pop("embeddings", None)


def _forward_backward(model, ad, inputs, grid, rows, cols, answer, distractor,
                      embeddings=None):
    """One forward and one backward: every grid tensor and its gradient of the summed logit
    difference, at (rows, cols). ``embeddings`` replace layer 0's input when given."""
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1):
        block0 = ad.blocks(model)[0]
        if embeddings is not None:
            first = embeddings.detach().requires_grad_(True)
            block0.input = first
        else:
            # Gradients w.r.t. activations only: a frozen model gets its graph from here.
            first = block0.input
            if not first.requires_grad:
                first.requires_grad_(True)
        tensors = [first if key == (0, "resid_pre") else ad.tensor(model, *key) for key in grid]
        ld = logit_diff(model.output.logits[:, -1], answer, distractor)
        grads = torch.autograd.grad(ld.sum(), tensors, allow_unused=True)
        values, out = {}, {}
        for key, t, g in zip(grid, tensors, grads):
            ch = ad.channels(key[1])
            values[key] = t.detach()[..., ch][rows, cols]
            out[key] = torch.zeros_like(values[key]) if g is None else g[..., ch][rows, cols]
        values.save()
        out.save()
        ld = ld.detach().save()
    return values, out, ld


# -- tables, selection, persistence ---------------------------------------------------

def effects_table(scores: xr.Dataset) -> pd.DataFrame:
    """Per attribute: clean and counterfactual logit difference, total effect, flag."""
    return pd.DataFrame({
        "clean_logit_diff": scores.attrs["clean_logit_diff"],
        "counterfactual_logit_diff": scores.counterfactual_logit_diff.values,
        "total_effect": scores.total_effect.values,
        "small_effect": scores.small_effect.values.astype(bool),
    }, index=pd.Index(scores.attribute.values, name="attribute"))


def ranked(scores: xr.Dataset, attribute: str, *, kinds: Sequence[str] | None = None,
           positions: Sequence[str] | None = None, changed_tokens: bool = True) -> pd.DataFrame:
    """Every (site, position) of ``attribute``, by decreasing |score|; without the
    residual stream at tokens the counterfactual replaces or moves unless
    ``changed_tokens``.

    Columns: ``site`` (e.g. ``L9.z.h3``), ``layer``, ``kind``, ``head`` (empty for kinds
    that are not per head), ``position``, ``score``, ``delta``, ``exact`` (patched
    exactly, not estimated), ``share`` (of the summed |score|) and ``cum_share``.
    """
    if attribute not in scores.attribute.values:
        raise ValueError(f"attribute {attribute!r} was not scored; scored: "
                         f"{list(scores.attribute.values)}")
    sub = scores[["score", "delta", "exact"]].sel(attribute=attribute)
    if kinds is not None:
        sub = sub.isel(site=np.isin(sub.kind.values, list(kinds)))
    if positions is not None:
        sub = sub.sel(position=list(positions))
    sub = sub.reset_coords(["layer", "kind", "head"])
    df = sub.to_dataframe().reset_index()
    if not changed_tokens:
        df = df[~(df["kind"].isin(RESIDUAL_KINDS) & df["changed_token"].astype(bool))]
    df = df.drop(columns=["changed_token", "attribute"], errors="ignore")
    df["head"] = df["head"].astype("Int64")
    df = df[["site", "layer", "kind", "head", "position", "score", "delta", "exact"]]
    df = df.iloc[np.argsort(-np.abs(df["delta"].to_numpy()), kind="stable")]
    total = np.abs(df["score"]).sum()
    df["share"] = np.abs(df["score"]) / total if total > 0 else 0.0
    df["cum_share"] = df["share"].cumsum()
    return df.reset_index(drop=True)


def head_grid(scores: xr.DataArray, kind: str = "z") -> xr.DataArray:
    """One per-head ``kind`` of a scores variable as a ``(layer, head)`` grid (the other
    dims kept), for heatmaps and ``.sel(layer=9, head=3)``: e.g.
    ``head_grid(run.discovery.scores.score.sel(attribute="io"))``."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind {kind!r} is not per head; per-head kinds: {sorted(HEAD_KINDS)}")
    sub = scores.isel(site=np.flatnonzero(scores.kind.values == kind))
    if not sub.sizes["site"]:
        raise ValueError(f"no {kind!r} sites were scored; scored kinds: "
                         f"{sorted(set(scores.kind.values))}")
    sub = sub.drop_vars(["kind", "site"])
    sub = sub.assign_coords(head=sub["head"].astype(int))
    return sub.set_index(site=["layer", "head"]).unstack("site")


def select_cross_section(scores: xr.Dataset, attribute: str, *, top_k: int | None = None,
                         coverage: float | None = None, kinds: Sequence[str] | None = None,
                         positions: Sequence[str] | None = None,
                         changed_tokens: bool = False) -> pd.DataFrame:
    """The top-``k`` sites, or the fewest top sites covering ``coverage`` of summed |score|.

    Give exactly one of ``top_k`` / ``coverage`` (a share in (0, 1]). Returns the first rows
    of :func:`ranked`, without the residual stream at tokens the counterfactual replaces or
    moves unless ``changed_tokens``: that stream is the changed input itself (on SmolLM2 IOI the
    IO token's stream carries 0.93-1.0 of the io effect at every layer up to 22), so it
    would fill a cross-section with copies of the input instead of the places the model
    moves the attribute to. Their scores stay in ``scores`` and its plots.
    """
    if (top_k is None) == (coverage is None):
        raise ValueError("give exactly one of top_k (a number of sites) or coverage (a share "
                         "of the summed |score| in (0, 1])")
    df = ranked(scores, attribute, kinds=kinds, positions=positions,
                changed_tokens=changed_tokens)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return df.iloc[:top_k].copy()
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    k = int(np.searchsorted(df["cum_share"].to_numpy(), coverage - 1e-12) + 1)
    return df.iloc[:min(k, len(df))].copy()


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


# -- validation by exact activation patching ------------------------------------------

def exact_patching(model: Any, dataset: Any, attribute: str, pairs: Sequence[tuple], *,
                   joint: bool = True, batch_size: int = 32, max_rows: int = 256,
                   progress: bool = False, remote: Any = None) -> tuple[pd.DataFrame, dict]:
    """Exact change in logit difference from patching each (site, position) from ``x'``.

    All variants (one per pair, plus all pairs together when ``joint``) run stacked along
    the batch, ``max_rows`` rows per forward. Returns a table (``site``, ``position``,
    ``exact_delta``) and a dict with the clean and counterfactual logit differences, the
    total effect and, when ``joint``, ``joint_delta`` (all pairs patched at once).
    """
    return _exact_patching(model, dataset, {attribute: pairs}, joint=joint,
                           batch_size=batch_size, max_rows=max_rows, progress=progress,
                           remote=remote)[attribute]


def _exact_patching(model, dataset, pairs_by_attr: dict, *, joint, batch_size, max_rows,
                    progress, remote) -> dict[str, tuple[pd.DataFrame, dict]]:
    """:func:`exact_patching` of several attributes, sharing its three model runs (so three
    requests remotely): the counterfactual activations at every pair, every variant, and the
    counterfactual prompts' logit differences."""
    missing = sorted(set(pairs_by_attr) - set(dataset.counterfactuals))
    if missing:
        raise ValueError(f"attribute(s) {missing} have no counterfactuals; available: "
                         f"{sorted(dataset.counterfactuals)}")
    attributes = list(pairs_by_attr)
    pairs_by_attr = {a: [(Site.parse(s), str(p)) for s, p in pairs]
                     for a, pairs in pairs_by_attr.items()}
    cfs = [dataset.counterfactuals[a] for a in attributes]
    every_pair = list(dict.fromkeys(p for pairs in pairs_by_attr.values() for p in pairs))
    values = site_values(model, cfs, every_pair, batch_size=batch_size, remote=remote)
    variants, spans = [[]], {}
    for a, cf_values in zip(attributes, values):
        patches = [Patch(site, dataset.positions[pos], cf_values[(site, pos)], f"{site}@{pos}")
                   for site, pos in pairs_by_attr[a]]
        spans[a] = len(variants)
        variants += [[p] for p in patches] + ([patches] if joint and patches else [])
    out = run_patched(model, dataset, variants, names=list(range(len(variants))),
                      batch_size=batch_size, max_rows=max_rows, progress=progress,
                      remote=remote)
    ld = out.logit_diff.mean("prompt").values.astype(float)
    n = len(dataset.prompts)
    cf_ld = run_patched(model, [p for cf in cfs for p in cf.prompts], [[]],
                        answer_ids=np.tile(dataset.answer_ids, len(cfs)),
                        distractor_ids=np.tile(dataset.distractor_ids, len(cfs)),
                        batch_size=batch_size, remote=remote).logit_diff.values[0]
    found = {}
    for i, a in enumerate(attributes):
        pairs, first = pairs_by_attr[a], spans[a]
        table = pd.DataFrame({"site": [str(s) for s, _ in pairs],
                              "position": [p for _, p in pairs],
                              "exact_delta": ld[first:first + len(pairs)] - ld[0]})
        counterfactual = float(cf_ld[i * n:(i + 1) * n].mean())
        summary = {"clean_logit_diff": ld[0], "counterfactual_logit_diff": counterfactual,
                   "total_effect": counterfactual - ld[0]}
        if joint and pairs:
            summary["joint_delta"] = ld[first + len(pairs)] - ld[0]
        found[a] = (table, summary)
    return found


def validate(model: Any, dataset: Any, scores: xr.Dataset, attribute: str,
             selection: pd.DataFrame, *, batch_size: int = 32, max_rows: int = 256,
             remote: Any = None) -> tuple[pd.DataFrame, dict]:
    """Exact patching of the selected sites next to their estimates.

    Returns the selection with ``exact_delta`` (and ``exact_score`` = exact_delta / exact
    total effect) added, and a summary: Spearman rank correlation of estimated vs exact
    deltas, and ``recovered`` = exact effect of patching the whole selection at once over
    the total effect.
    """
    return validate_all(model, dataset, scores, {attribute: selection}, batch_size=batch_size,
                        max_rows=max_rows, remote=remote)[attribute]


def validate_all(model: Any, dataset: Any, scores: xr.Dataset,
                 selections: dict[str, pd.DataFrame], *, batch_size: int = 32,
                 max_rows: int = 256, remote: Any = None) -> dict[str, tuple]:
    """:func:`validate` for every attribute's selection, in the same three model runs."""
    from scipy.stats import spearmanr

    exact = _exact_patching(model, dataset,
                            {a: list(zip(sel["site"], sel["position"]))
                             for a, sel in selections.items()},
                            joint=True, batch_size=batch_size, max_rows=max_rows,
                            progress=False, remote=remote)
    found = {}
    for attribute, selection in selections.items():
        table, summary = exact[attribute]
        out = selection.reset_index(drop=True).copy()
        out["exact_delta"] = table["exact_delta"].to_numpy()
        total = summary["total_effect"]
        out["exact_score"] = out["exact_delta"] / total if total else 0.0
        rho = (spearmanr(out["delta"], out["exact_delta"]).statistic if len(out) > 2
               else float("nan"))
        summary.update(attribute=attribute, n_sites=len(out), spearman=float(rho),
                       recovered=float(summary["joint_delta"] / total) if total
                       else float("nan"))
        found[attribute] = (out, summary)
    return found


# -- cross-sections grown by their joint exact patch ----------------------------------

def grow_cross_sections(model: Any, dataset: Any, scores: xr.Dataset,
                        attributes: Sequence[str] | None = None, *, target: float = 0.6,
                        max_sites: int = 16, kinds: Sequence[str] | None = ("z",),
                        positions: Sequence[str] | None = None, candidates: int | None = None,
                        batch_size: int = 16, max_rows: int = 256, progress: bool = False,
                        remote: Any = None) -> dict[str, tuple[pd.DataFrame, dict]]:
    """Per attribute, a small set of components whose *joint* exact patch recovers
    ``target`` of the total effect; attribution proposes, exact joint patching decides.

    Candidates are the attribute's sites in ``scores`` of ``kinds`` (default per-head ``z``;
    ``None``: every component kind of the grid, never the residual stream, which is a
    candidate only where a residual kind is listed, and then not at the tokens the
    counterfactual replaces or moves) at ``positions`` (default all), ordered by their
    estimated delta *signed in the direction of the total effect*: the sites that should
    carry most of the effect first, the ones estimated to push against it (negative
    name-mover-like heads) last. Components cancel, so patching the top |score| can recover
    little, even a negative share. The first ``candidates`` (default ``max_sites``) form the
    pool. Then, with every attribute's variants stacked in the same forwards:

    1. one counterfactual forward reads every pool site's value (and the counterfactual
       logit differences, so the total effect is measured on ``dataset`` itself);
    2. the joint patch of every prefix of the pool (1, 2, ... sites); ``S`` is the shortest
       prefix reaching ``target``, else the best one;
    3. every member of ``S`` alone (its ``exact_delta``) and ``S`` without it (leave-one-out);
    4. backward pruning: ``S`` without its 1, 2, ... most dispensable members (highest
       leave-one-out recovery first), each set patched jointly.

    The result is the smallest measured set (a prefix from run 2 or a pruned set from run 4)
    of at most ``max_sites`` sites that reaches ``target`` (ties: recovery closest to 1);
    when none does, the measured set of at most ``max_sites`` with the highest recovery.
    Its ``recovered`` is therefore always a measured joint patch, never an estimate. The
    whole search is one kernel (:mod:`sage_nn.growth`): one request remotely, whatever the
    number of attributes, and the counterfactual values never travel (with
    ``Remote.max_prompts``, each run is its own request instead). Each variant recomputes
    only the layers and tokens its patches can change (:func:`run_patched`), so late-layer
    sets at the last token are cheap.

    Returns ``{attribute: (table, summary)}``. The table has :func:`ranked`'s columns for
    the chosen sites plus each site's single-site ``exact_delta`` and ``exact_score``
    (over the measured total effect). The summary: ``recovered`` (the set's joint exact
    delta over the total effect), ``reached``, ``target``, ``max_sites``, ``cap_hit`` (the
    target was not reached within ``max_sites`` sites although more candidates existed),
    ``n_sites``, ``total_effect``, clean and counterfactual logit differences,
    ``joint_delta``, ``small_effect`` (from ``scores``: the share divides by a near-zero
    effect), ``same_as`` (other attributes that ended with the same set of (site,
    position)), ``prefix_recovered`` (run 2's curve), ``spearman`` (estimated vs exact
    single-site deltas of the set) and a plain-words ``note`` when the target was missed.
    """
    from scipy.stats import spearmanr

    if not 0 < target:
        raise ValueError(f"target must be a positive share of the total effect, got {target}")
    if max_sites < 1:
        raise ValueError(f"max_sites must be >= 1, got {max_sites}")
    pool_size = max_sites if candidates is None else int(candidates)
    if pool_size < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    attributes = [str(a) for a in (scores.attribute.values if attributes is None else attributes)]
    missing = [a for a in attributes if a not in scores.attribute.values
               or a not in dataset.counterfactuals]
    if missing or not attributes:
        raise ValueError(f"attributes {missing} are not both scored in scores "
                         f"({list(scores.attribute.values)}) and counterfactuals of the dataset "
                         f"({sorted(dataset.counterfactuals)})")
    if int(scores.attrs.get("n_prompts", len(dataset.prompts))) != len(dataset.prompts):
        warnings.warn(f"scores were scored on {scores.attrs['n_prompts']} prompts, the dataset "
                      f"has {len(dataset.prompts)}: candidates come from the former, every "
                      "exact number from the latter", stacklevel=2)
    grid_kinds = list(scores.kind.values)
    kinds = [k for k in grid_kinds if k not in RESIDUAL_KINDS] if kinds is None else list(kinds)
    absent = [k for k in kinds if k not in grid_kinds]
    if absent or not kinds:
        raise ValueError(f"kinds {absent or kinds} are not in the attribution grid "
                         f"({grid_kinds}); score them first or choose others")
    pools, n_candidates = {}, {}
    for a in attributes:
        df = ranked(scores, a, kinds=kinds, positions=positions, changed_tokens=False)
        n_candidates[a] = len(df)
        sign = 1.0 if float(scores.total_effect.sel(attribute=a)) >= 0 else -1.0
        order = np.argsort(-sign * df["delta"].to_numpy(), kind="stable")
        pools[a] = df.iloc[order[:pool_size]].reset_index(drop=True)
        if pools[a].empty:
            raise ValueError(f"attribute {a!r} has no candidate sites of kinds {kinds}")
    pairs = {a: [(Site.parse(s), str(p)) for s, p in zip(df["site"], df["position"])]
             for a, df in pools.items()}

    m = measure_growth(model, dataset, pairs, target, batch_size=batch_size,
                       max_rows=max_rows, progress=progress, remote=remote)
    clean_ld, cf_ld = m["clean"], m["cf"]
    total = {a: cf_ld[a] - clean_ld for a in attributes}

    def share(a, ld):
        return (np.asarray(ld) - clean_ld) / total[a] if total[a] else np.full(len(ld), np.nan)

    measured, single = {}, {}  # (members, joint logit difference); each member alone
    for a in attributes:
        s = m["chosen"][a]
        measured[a] = ([(list(range(k + 1)), ld) for k, ld in enumerate(m["prefix"][a])]
                       + list(zip(m["pruned"].get(a, []), m["pruned_ld"].get(a, []))))
        single[a] = dict(zip(s, m["loo"][a][:len(s)]))
    found = {}
    for a in attributes:
        eligible = [(members, ld) for members, ld in measured[a] if len(members) <= max_sites]
        rec = share(a, [ld for _, ld in eligible])
        hit = [i for i in range(len(eligible)) if rec[i] >= target]
        if hit:
            best = min(hit, key=lambda i: (len(eligible[i][0]), abs(1 - rec[i])))
        else:
            best = min(range(len(eligible)), key=lambda i: (
                -rec[i] if np.isfinite(rec[i]) else np.inf, len(eligible[i][0])))
        members, joint = eligible[best]
        members = sorted(members)
        table = pools[a].iloc[members].reset_index(drop=True)
        table["exact_delta"] = [single[a][i] - clean_ld for i in members]
        table["exact_score"] = table["exact_delta"] / total[a] if total[a] else np.nan
        recovered = float(rec[best])
        reached = bool(recovered >= target)
        cap_hit = not reached and n_candidates[a] > max_sites
        summary = {
            "attribute": a, "method": "joint coverage", "recovered": recovered,
            "reached": reached, "target": float(target), "max_sites": int(max_sites),
            "cap_hit": bool(cap_hit), "n_sites": len(members),
            "total_effect": float(total[a]), "clean_logit_diff": float(clean_ld),
            "counterfactual_logit_diff": float(cf_ld[a]),
            "joint_delta": float(joint - clean_ld),
            "small_effect": bool(scores.small_effect.sel(attribute=a)),
            "n_candidates": n_candidates[a], "pool": len(pairs[a]),
            "prefix_recovered": [float(x) for x in share(a, m["prefix"][a])],
            "spearman": float(spearmanr(table["delta"], table["exact_delta"]).statistic)
            if len(table) > 2 else float("nan")}
        if cap_hit:
            summary["note"] = (f"cap hit: max_sites={max_sites} reached before the target "
                               f"{target:g}; the best set of at most {max_sites} sites "
                               f"recovers {recovered:.2f} of the total effect")
        elif not reached:
            summary["note"] = (f"target {target:g} not reached: the best of the "
                               f"{len(pairs[a])} candidates' sets recovers {recovered:.2f}")
        found[a] = (table, summary)
    keys = {a: frozenset(zip(t["site"], t["position"])) for a, (t, _) in found.items()}
    for a, (_, summary) in found.items():
        summary["same_as"] = [b for b in attributes if b != a and keys[b] == keys[a]]
    return found


# -- plots ----------------------------------------------------------------------------

def plot_heatmaps(scores: xr.Dataset, attribute: str, out_dir: str | Path | None = None, *,
                  dpi: int = 90) -> dict:
    """Heatmaps of ``attribute``'s scores: layer x head per head kind, and layer x kind for
    the other kinds (panel ``residual``); one column per named position. Returns ``{panel:
    matplotlib Figure}`` (shown inline in a notebook), each saved as
    ``heatmap_{attribute}_{panel}.png`` in ``out_dir`` when one is given."""
    from .report import _figure, _finish

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    sub = scores.score.sel(attribute=attribute)
    vmax = float(np.abs(sub).max()) or 1.0
    positions = list(scores.position.values)
    layers = sorted(set(int(l) for l in scores.layer.values))
    kinds = list(dict.fromkeys(str(k) for k in scores.kind.values))
    panels = [(k, head_grid(sub, k)) for k in kinds if k in HEAD_KINDS]
    other = np.flatnonzero(~np.isin(scores.kind.values, sorted(HEAD_KINDS)))
    if len(other):
        rest = sub.isel(site=other).drop_vars(["head", "site"])
        rest = rest.set_index(site=["layer", "kind"]).unstack("site")
        panels.append(("residual", rest.sel(kind=[k for k in kinds if k not in HEAD_KINDS])))
    figures = {}
    for name, data in panels:
        data = data.reindex(layer=layers)  # layers without this kind stay blank
        fig = _figure(figsize=(2.2 * len(positions) + 1.5, 0.18 * len(layers) + 1.5))
        axes = fig.subplots(1, len(positions), squeeze=False, sharey=True)
        fig.subplots_adjust(top=0.8)  # room for the title above the panel titles
        for ax, pos in zip(axes[0], positions):
            values = data.sel(position=pos).transpose("layer", ...).values
            im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                           origin="lower", interpolation="nearest")
            xt = data["head"].values if name != "residual" else data.kind.values
            ax.set_xticks(range(len(xt)), [str(x) for x in xt],
                          rotation=0 if name != "residual" else 90, fontsize=7)
            ax.set_title(pos, fontsize=9)
            ax.set_xlabel("head" if name != "residual" else "")
        axes[0][0].set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score (fraction of effect)")
        fig.suptitle(f"{scores.attrs.get('task', '')} / {attribute}: {name}")
        figures[name] = _finish(fig, out_dir and out_dir / f"heatmap_{attribute}_{name}.png",
                                dpi)
    return figures


def plot_cross_section(table: pd.DataFrame, path: str | Path | None = None, title: str = "",
                       *, dpi: int = 90):
    """Bar chart of a selected cross-section: estimated score, and exact when validated.
    Returns the matplotlib Figure, saved to ``path`` when one is given."""
    from .report import _figure, _finish

    labels = [f"{s}@{p}" for s, p in zip(table["site"], table["position"])]
    y = np.arange(len(labels))
    fig = _figure(figsize=(6, 0.28 * len(labels) + 1.2))
    ax = fig.subplots()
    has_exact = "exact_score" in table
    h = 0.4 if has_exact else 0.8
    ax.barh(y - (h / 2 if has_exact else 0), table["score"], height=h, label="attribution")
    if has_exact:
        ax.barh(y + h / 2, table["exact_score"], height=h, label="exact patching")
        ax.legend(fontsize=8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("fraction of the counterfactual effect")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _finish(fig, path, dpi)


# -- the whole stage ------------------------------------------------------------------

@dataclass
class DiscoveryConfig:
    """Settings of :func:`discover` (the attribution grid, selection and validation).

    ``kinds`` / ``layers`` / ``positions`` / ``attributes`` restrict the attribution grid
    (scores and heatmaps). ``select_kinds`` restricts what a cross-section may hold; the
    default (``None``) is per-head ``z``, or, when ``kinds`` lists the grid without ``z``,
    the kinds listed there. The residual stream is selectable only where a residual kind is
    named in ``select_kinds`` or ``kinds``.

    Selection: by default a cross-section is grown by its joint exact patch
    (:func:`grow_cross_sections`) until it recovers ``target`` of the total effect, with
    at most ``max_sites`` sites from a pool of the ``candidates`` best estimates (default
    ``max_sites``). Setting ``top_k`` or ``coverage`` selects the old way instead (the top
    sites by |attribution|, or those covering a share of the summed |score|), validated by
    exact patching when ``validate``; the joint growth is exact patching itself.
    """

    kinds: Sequence[str] | None = None
    layers: Sequence[int] | None = None
    positions: Sequence[str] | None = None
    attributes: Sequence[str] | None = None
    batch_size: int = 16
    min_effect: float = 1.0
    exact_residuals: bool = True  # residual stream at changed tokens patched exactly
    ig_steps: int = 0  # > 0: integrated gradients (see AttributionPatching)
    target: float = 0.6  # share of the total effect the joint patch must recover
    max_sites: int = 16
    candidates: int | None = None
    select_kinds: Sequence[str] | None = None
    top_k: int | None = None  # set one of top_k / coverage to select by attribution alone
    coverage: float | None = None
    changed_tokens: bool = False  # may a cross-section hold the changed tokens' own stream?
    validate: bool = True
    max_rows: int = 256

    def selectable_kinds(self, grid_kinds: Sequence[str]) -> list[str]:
        """The kinds a cross-section may hold, given the kinds the grid scored."""
        if self.select_kinds is not None:
            wanted = list(self.select_kinds)
        elif self.kinds is not None and "z" not in self.kinds:
            wanted = list(self.kinds)  # the caller named the grid: its kinds are asked for
        else:
            wanted = ["z"]
        kinds = [k for k in wanted if k in grid_kinds]
        if not kinds:
            raise ValueError(f"select_kinds {wanted} are not in the attribution grid "
                             f"({list(grid_kinds)}); set DiscoveryConfig.select_kinds")
        return kinds


@dataclass
class Discovery:
    """What :func:`discover` found: scores, cross-sections, validation summaries."""

    scores: xr.Dataset  # attribution scores (saved as scores.nc)
    cross_sections: dict[str, pd.DataFrame]
    validation: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        """Per attribute: effects, the cross-section and its validation (JSON-ready): for a
        grown cross-section ``recovered``, ``reached``, ``target``, ``max_sites``,
        ``cap_hit``, ``n_sites``, ``same_as``, ``small_effect`` and a ``note`` when the
        target was missed."""
        effects = effects_table(self.scores)
        return {a: {**{k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v))
                       for k, v in effects.loc[a].items()},
                    "cross_section": [f"{s}@{p}" for s, p in zip(t["site"], t["position"])],
                    **{k: _plain(v) for k, v in self.validation.get(a, {}).items()
                       if k != "attribute"}}
                for a, t in self.cross_sections.items()}


def _plain(value: Any) -> Any:
    """numpy scalars and lists of them as Python ones, for JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def discover(model: Any, dataset: Any, config: DiscoveryConfig | None = None, *,
             out_dir: str | Path | None = None, progress: bool = False,
             remote: Any = None) -> Discovery:
    """Score the grid, select a cross-section per attribute, validate it, save and plot.

    By default each cross-section is grown by its joint exact patch (see
    :class:`DiscoveryConfig` and :func:`grow_cross_sections`); its summary says the share it
    recovers (``recovered``), whether ``max_sites`` stopped it short of the target
    (``cap_hit``) and which attributes ended with the same set (``same_as``).

    With ``out_dir``: ``scores.nc``, ``cross_sections.csv``, ``summary.json`` and the PNGs.
    ``remote`` runs the model's passes elsewhere (see :mod:`sage_nn.remote`).
    """
    config = config or DiscoveryConfig()
    if config.top_k is not None and config.coverage is not None:
        raise ValueError("set only one of DiscoveryConfig.top_k or DiscoveryConfig.coverage")
    fit = AttributionPatching(config.kinds, config.layers, config.positions, config.attributes,
                              config.batch_size, config.min_effect,
                              exact_residuals=config.exact_residuals, ig_steps=config.ig_steps,
                              progress=progress).fit(model, dataset, remote=remote)
    found = Discovery(fit.scores_, {})
    kinds = config.selectable_kinds(list(fit.scores_.kind.values))
    if config.top_k is None and config.coverage is None:  # grown by the joint exact patch
        grown = grow_cross_sections(model, dataset, fit.scores_, target=config.target,
                                    max_sites=config.max_sites, kinds=kinds,
                                    candidates=config.candidates,
                                    batch_size=config.batch_size, max_rows=config.max_rows,
                                    progress=progress, remote=remote)
        for a, (table, summary) in grown.items():
            found.cross_sections[a], found.validation[a] = table, summary
    else:
        found.cross_sections = {
            str(a): select_cross_section(fit.scores_, a, top_k=config.top_k,
                                         coverage=config.coverage, kinds=kinds,
                                         changed_tokens=config.changed_tokens)
            for a in fit.scores_.attribute.values}
        if config.validate:  # every attribute's exact patching shares the same model runs
            for a, (sel, summary) in validate_all(model, dataset, fit.scores_,
                                                  found.cross_sections,
                                                  batch_size=config.batch_size,
                                                  max_rows=config.max_rows,
                                                  remote=remote).items():
                found.cross_sections[a], found.validation[a] = sel, summary
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_scores(fit.scores_, out_dir / "scores.nc")
        pd.concat([t.assign(attribute=a) for a, t in found.cross_sections.items()]).to_csv(
            out_dir / "cross_sections.csv", index=False)
        (out_dir / "summary.json").write_text(json.dumps(found.summary(), indent=2))
        for attribute, table in found.cross_sections.items():
            plot_heatmaps(fit.scores_, attribute, out_dir)
            plot_cross_section(table, out_dir / f"cross_section_{attribute}.png",
                               title=f"{fit.scores_.attrs['task']} / {attribute}")
    return found
