"""Patching primitives: run prompts with site values written in, many variants per forward.

A *patch* writes one value per prompt into one site at one token of each prompt; a
*variant* is a list of patches applied together (an empty variant is the clean run).
:func:`run_patched` stacks variants along the batch — row ``v * b + i`` is prompt ``i``
under variant ``v`` — so one forward serves many variants, and returns the task metric
and the top-1 prediction of every (variant, prompt)::

    patches = counterfactual_patches(model, ds, ds.counterfactuals["io"],
                                     [("L9.z.h3", "END"), ("L12.resid_post", "END")])
    out = run_patched(model, ds, [[p] for p in patches] + [patches])
    out.logit_diff.mean("prompt")        # (variant)

Everything inside the traces is plain torch, so it can run remotely.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from .activations import batches, encode, model_device, token_index
from .remote import as_remote, cast_shared, payload_bytes, run_kernel
from .sites import HEAD_KINDS, KINDS, Site, adapter, channels, site_key, site_tensor, skip_blocks


def logit_diff(logits: torch.Tensor, answer_ids: Any, distractor_ids: Any) -> torch.Tensor:
    """``logit(answer) - logit(distractor)`` per row, at the last token.

    ``logits`` is ``[batch, vocab]`` or ``[batch, seq, vocab]`` (the last position is used;
    with left padding that is every prompt's last token).
    """
    if logits.ndim == 3:
        logits = logits[:, -1]
    answer = torch.as_tensor(answer_ids, device=logits.device).long().reshape(-1, 1)
    distractor = torch.as_tensor(distractor_ids, device=logits.device).long().reshape(-1, 1)
    if len(answer) != len(logits) or len(distractor) != len(logits):
        raise ValueError(f"{len(logits)} rows of logits but {len(answer)} answer ids and "
                         f"{len(distractor)} distractor ids; pass one id per prompt")
    return (logits.gather(1, answer) - logits.gather(1, distractor)).squeeze(1)


# -- sparse edits as plain data (they travel in requests: a server gets plain data) ------

def edit_rows(edit: dict, idx) -> dict:
    """The rows ``idx`` of a sparse edit (:class:`LatentEdit`'s plain form)."""
    idx = torch.as_tensor(idx)
    counts = edit["counts"][idx]
    starts = (torch.cumsum(edit["counts"], 0) - edit["counts"])[idx]
    # each selected row's entries: its start, then the next counts - 1
    first = torch.cumsum(counts, 0) - counts
    entries = (torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
               + torch.repeat_interleave(starts, counts))
    return {**edit, "rows": edit["rows"][idx], "counts": counts, "ids": edit["ids"][entries],
            "coefs": edit["coefs"][entries]}


def edit_cat(parts: Sequence[dict]) -> dict:
    """The rows of edits that share a base and directions, in order."""
    return {**parts[0], **{f: torch.cat([p[f] for p in parts])
                           for f in ("rows", "counts", "ids", "coefs")}}


def edit_to(edit: dict, device=None, dtype=None) -> dict:
    floating = ("base", "coefs", "directions")
    return {f: t.to(device, dtype) if f in floating else t.to(device) for f, t in edit.items()}


def edit_dense(edit: dict) -> torch.Tensor:
    """``[n, w]``: each row its base row moved along its latents."""
    rows = edit["rows"]
    owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device),
                                    edit["counts"].long())
    moves = edit["coefs"][:, None] * edit["directions"][edit["ids"].long()]
    return edit["base"][rows].index_add(0, owner, moves.to(edit["base"].dtype))


@dataclass
class LatentEdit:
    """Patch values as the rows of a base moved along a few latent directions: row ``i`` is
    ``base[rows[i]]`` plus its ``counts[i]`` moves ``coefs[e] * directions[ids[e]]`` (the
    entries of row ``i`` follow those of row ``i - 1``). A sparse edit travels like this:
    per row only the latents it moves, and the directions and the clean values it starts
    from once per request, instead of one dense value per k (as :meth:`plain` data)."""

    base: torch.Tensor        # [N, w], shared by every edit that starts from it
    rows: torch.Tensor        # [n] rows of base
    counts: torch.Tensor      # [n] moves per row
    ids: torch.Tensor         # [moves] into directions
    coefs: torch.Tensor       # [moves]
    directions: torch.Tensor  # [U, w], only the latents some row moves

    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.base.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def plain(self) -> dict:
        return {f: getattr(self, f) for f in ("base", "rows", "counts", "ids", "coefs",
                                              "directions")}

    def dense(self) -> torch.Tensor:
        """``[n, w]``."""
        return edit_dense(self.plain())

    @classmethod
    def prefixes(cls, base, chosen, coefs, directions, ks) -> dict[int, "LatentEdit"]:
        """The edit at each k of one greedy path (:func:`sage_nn.metrics.greedy_path`'s
        ``chosen [n, K]`` ids, -1 for none, and ``coefs``; row ``i`` starts from
        ``base[i]``), sharing the base and the directions the path uses."""
        moved = chosen >= 0
        used, ids = torch.unique(chosen[moved], return_inverse=True)
        at = torch.full_like(chosen, -1)
        at[moved] = ids
        rows = torch.arange(len(chosen))
        directions, out = directions[used], {}
        for k in ks:
            m = moved[:, :k]
            out[k] = cls(base, rows, m.sum(1).int(), at[:, :k][m].int(), coefs[:, :k][m],
                         directions)
        return out


@dataclass
class Patch:
    """Write ``values[i]`` into ``site`` at token ``positions[i]`` of prompt ``i``.

    ``positions`` are per-prompt token indices (unpadded; negative counts from the end);
    ``values`` is ``[n_prompts, width]`` (width ``d_head`` for q/k/v/z, else ``d_model``).
    ``label`` names the patch, e.g. ``"L9.z.h3@END"``.
    """

    site: Site
    positions: np.ndarray
    values: torch.Tensor
    label: str = ""

    def __post_init__(self):
        self.site = Site.parse(self.site)
        self.positions = np.asarray(self.positions, dtype=np.int64).reshape(-1)
        if not isinstance(self.values, LatentEdit):
            self.values = torch.as_tensor(self.values)
        if self.values.ndim != 2 or len(self.values) != len(self.positions):
            raise ValueError(f"patch {self.label or self.site}: values must be [n_prompts, width] "
                             f"with one row per position; got values {tuple(self.values.shape)} "
                             f"for {len(self.positions)} positions")
        self.label = self.label or str(self.site)


def _prompt_set(data: Any, answer_ids: Any, distractor_ids: Any):
    if hasattr(data, "prompts"):
        answer_ids = data.answer_ids if answer_ids is None else answer_ids
        distractor_ids = data.distractor_ids if distractor_ids is None else distractor_ids
        data = data.prompts
    prompts = [data] if isinstance(data, str) else list(data)
    if answer_ids is None or distractor_ids is None:
        raise ValueError("answer_ids and distractor_ids are needed for plain prompts; pass them "
                         "or pass a task dataset")
    answer_ids = np.broadcast_to(np.asarray(answer_ids, dtype=np.int64), (len(prompts),))
    distractor_ids = np.broadcast_to(np.asarray(distractor_ids, dtype=np.int64), (len(prompts),))
    return prompts, answer_ids, distractor_ids


def run_patched(
    model: Any,
    data: Any,
    variants: Sequence[Sequence[Patch]],
    *,
    names: Sequence[str] | None = None,
    answer_ids: Any = None,
    distractor_ids: Any = None,
    batch_size: int = 32,
    max_rows: int = 256,
    progress: bool = False,
    remote: Any = None,
) -> xr.Dataset:
    """Run ``data`` under every variant; one forward serves up to ``max_rows`` rows.

    ``data`` is a task dataset or a list of prompts (then pass ``answer_ids`` and
    ``distractor_ids``, one per prompt or one for all). Returns a Dataset with
    ``logit_diff``, ``answer_logprob`` and ``top1`` (the argmax token id), all at the last
    position and ``(variant, prompt)``; ``variant`` is labelled by ``names`` (default: the joined patch
    labels, ``"clean"`` for an empty variant).

    A patch at layer ``l`` and token ``t`` can change only layers ``>= l`` at tokens
    ``>= t``; the rest is the clean run. So each batch runs clean once (keeping its keys and
    values, and the residual streams), and a variant recomputes only its block: from its
    first patched layer (fed the clean residual stream) and its first patched token (against
    the clean keys and values of the tokens before). Variants with the same block share
    forwards. The numbers equal full patched forwards to float tolerance.
    """
    prompts, answer_ids, distractor_ids = _prompt_set(data, answer_ids, distractor_ids)
    n, ad, device = len(prompts), adapter(model), model_device(model)
    variants = [list(v) for v in variants]
    if not variants:
        raise ValueError("no variants to run; pass e.g. [[]] for the clean run")
    for v in variants:
        for p in v:
            ad.check(p.site)
            if len(p.positions) != n:
                raise ValueError(f"patch {p.label}: {len(p.positions)} positions/values for "
                                 f"{n} prompts; give one per prompt")
            if p.values.shape[1] != ad.width(p.site.kind):
                raise ValueError(f"patch {p.label}: values have width {p.values.shape[1]}, site "
                                 f"{p.site} has width {ad.width(p.site.kind)}")
    if names is None:
        names = ["+".join(p.label for p in v) or "clean" for v in variants]
    if len(names) != len(variants):
        raise ValueError(f"{len(names)} names for {len(variants)} variants")
    # values travel in the transport dtype, and are written in the server model's
    dtype = as_remote(remote).transport_dtype or next(model._module.parameters()).dtype
    memo: dict = {}  # sparse edits' bases and directions: cast once, shared, sent once
    variants = [[plain_patch(p, dtype, memo) for p in v] for v in variants]
    shape = (len(variants), n)
    ld, logp = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    top1 = np.zeros(shape, np.int64)
    clean = [v for v, patches in enumerate(variants) if not patches]
    prepared, blocks_run = [], [0.0]

    budget = as_remote(remote).payload_budget

    def chunks():
        for idx in batches(n, batch_size, progress and "patch"):
            batch = encode(model, [prompts[i] for i in idx], device)
            groups, members, cost = plan_batch(ad.spec, batch.plain(), idx, variants, max_rows,
                                               device, dtype, suffix_ok(model, batch))
            blocks_run[0] += len(idx) * (1 + cost)
            tile = lambda ids: torch.as_tensor(ids[idx], device=device)  # noqa: E731
            fixed = (batch.inputs, tile(answer_ids), tile(distractor_ids))
            # a batch whose patches are more than a request may carry goes as several
            # chunks, each running the clean batch again
            room = None if budget is None else budget - payload_bytes(fixed)
            for part, part_members in _within(groups, members, room):
                prepared.extend([(idx, chunk) for chunk in part_members] + [(idx, clean)])
                yield fixed[0], part, *fixed[1:]

    for outs in run_kernel(model, patched_blocks, chunks(), remote, stage="patch",
                           shapes=patched_bytes):
        for out in [*outs[1:], outs[0]]:  # the groups', then the clean run's
            idx, chunk = prepared.pop(0)
            for array, values in zip((ld, logp, top1), out):
                values = values.cpu().numpy().reshape(len(idx), -1).T  # [variant, prompt]
                array[np.ix_(chunk, idx)] = values if len(values) == len(chunk) else \
                    np.broadcast_to(values, (len(chunk), len(idx)))
    return xr.Dataset(
        {"logit_diff": (("variant", "prompt"), ld), "answer_logprob": (("variant", "prompt"), logp),
         "top1": (("variant", "prompt"), top1)},
        coords={"variant": list(names), "prompt": np.arange(n)},
        # the layers x tokens computed, in full forwards of the prompts: the clean run and
        # each variant's block (the lower bound of any patched run)
        attrs={"forwards": blocks_run[0] / n},
    )


def plain_patch(patch: Patch, dtype=None, memo: dict | None = None) -> tuple:
    """A patch as plain data, for planning and requests: ``(site (layer, kind, head),
    positions, values)``; a :class:`LatentEdit` becomes its plain dict. Floating values are
    cast to ``dtype`` (each shared tensor once, through ``memo``)."""
    values = patch.values
    if isinstance(values, LatentEdit):  # its tensors outlive this dict: memo by them
        values = {f: t if dtype is None else cast_shared(t, dtype, memo)
                  for f, t in values.plain().items()}
    return (site_key(patch.site), patch.positions, values)


def _within(groups: list, members: list, budget: int | None):
    """A batch's groups of variants, split into parts of at most ``budget`` tensor bytes
    (:func:`~sage_nn.model.remote.payload_bytes`; a group over it goes alone)."""
    if budget is None or not groups:  # the clean run alone is one chunk
        yield groups, members
        return
    part, mine, size, seen = [], [], 0, set()
    for group, member in zip(groups, members):
        extra = payload_bytes(group, seen=seen)
        if part and size + extra > budget:
            yield part, mine
            part, mine, seen = [], [], set()
            extra = payload_bytes(group, seen=seen)
            size = 0
        part.append(group)
        mine.append(member)
        size += extra
    if part:
        yield part, mine


def suffix_ok(model, batch) -> bool:
    """Whether every layer's cache keeps all tokens of the batch: a sliding-window layer
    keeps only its window, so past it the tokens before a patch cannot be reused."""
    window = getattr(model.config, "sliding_window", None)
    return not window or batch.inputs["input_ids"].shape[1] < window - 1


# -- planning: plain data in, plain data out (it also runs inside a request: discovery's
#    search plans its rounds on the server) ---------------------------------------------

def plan_batch(arch: dict, batch: dict, idx, variants, max_rows: int, device, dtype,
               suffix: bool = True):
    """One batch's arguments for :func:`patched_blocks`: the groups of variants that share
    a block (at most ``max_rows`` rows a forward), the variant indices each group runs, and
    the blocks' cost in full forwards (:func:`block_cost`). ``batch``: :meth:`Batch.plain`;
    ``variants``: lists of :func:`plain_patch` patches."""
    blocks = plan_blocks(batch, idx, variants, suffix)
    per_forward = max(1, max_rows // len(idx))
    groups, members = [], []
    for (layer, col), vs in blocks.items():
        for start in range(0, len(vs), per_forward):
            chunk = vs[start:start + per_forward]
            writes = writes_of(arch, batch, idx, [variants[v] for v in chunk], device, dtype,
                               offset=col)
            groups.append((layer, col, len(chunk), writes))
            members.append(chunk)
    return groups, members, block_cost(batch, blocks, arch["n_layers"])


def plan_blocks(batch: dict, idx, variants, suffix: bool = True) -> dict[tuple[int, int], list[int]]:
    """Variants by the block they can change in this batch: ``(first patched layer, first
    patched padded token)`` -> variant indices (empty variants are the clean run). Without
    ``suffix``, every block starts at the first token."""
    blocks: dict[tuple[int, int], list[int]] = {}
    for v, patches in enumerate(variants):
        if patches:
            layer = min(site[0] for site, _, _ in patches)
            col = min(int(token_index(batch["offsets"], batch["lengths"], at[idx]).min())
                      for _, at, _ in patches) if suffix else 0
            blocks.setdefault((layer, col), []).append(v)
    return dict(sorted(blocks.items()))


def block_cost(batch: dict, blocks: dict, n_layers: int) -> float:
    """The variants' blocks (:func:`plan_blocks`) in full forwards of this batch:
    ``sum (L - l) * (T - t) / (L * T)`` over variants."""
    width = batch["inputs"]["input_ids"].shape[1]
    return sum(len(vs) * (n_layers - layer) * (width - col) / (n_layers * width)
               for (layer, col), vs in blocks.items())


def writes_of(arch: dict, batch: dict, idx, variants, device, dtype, offset: int = 0) -> dict:
    """A chunk's patches as ``{(layer, kind): [(rows [m], cols [m], channels [c],
    values [m, c]), ...]}``, one entry per channel set (a head, or the whole width), so a
    request carries the values and one index per row, not one per element. Rows are
    prompt-major (``i * len(variants) + j``); columns count from ``offset``."""
    groups: dict[tuple, list] = {}
    b, m = len(idx), len(variants)
    rows_of = torch.as_tensor(idx)
    for j, variant in enumerate(variants):
        rows = torch.arange(b) * m + j
        for (layer, kind, head), at, values in variant:
            cols = token_index(batch["offsets"], batch["lengths"], at[idx]) - offset
            values = edit_rows(values, rows_of) if isinstance(values, dict) else values[rows_of]
            groups.setdefault((layer, kind, head), []).append((rows, cols, values))
    writes: dict[tuple, list] = {}
    for (layer, kind, head), parts in groups.items():
        chans = channels(arch, kind, head) if kind in HEAD_KINDS else torch.arange(arch["d_model"])
        # edits from one base along one set of directions stay sparse; the rest is dense
        by_source: dict[Any, list] = {}
        for part in parts:
            v = part[2]
            key = (id(v["base"]), id(v["directions"])) if isinstance(v, dict) else None
            by_source.setdefault(key, []).append(part)
        for key, same in by_source.items():
            values = [v for _, _, v in same]
            values = torch.cat(values).to(device, dtype) if key is None else \
                edit_to(edit_cat(values), device, dtype)
            writes.setdefault((layer, kind), []).append((
                torch.cat([r for r, _, _ in same]).to(device),
                torch.cat([c for _, c, _ in same]).to(device), chans.to(device), values))
    return writes


# -- kernels: plain torch on plain data, the only code that touches the model -------------

def write_into(t: torch.Tensor, parts: list) -> None:
    """``parts`` (a write's ``(rows, cols, channels, values)``) into ``t`` in place."""
    for rows, cols, chans, values in parts:
        if isinstance(values, dict):
            values = edit_dense(values)
        # a server's model may run in bf16
        t[rows[:, None], cols[:, None], chans[None, :]] = values.to(t.device, t.dtype)


def apply_writes(model, arch: dict, writes: dict) -> None:
    """Write every patch into the running trace, in execution order."""
    for layer, kind in sorted(writes, key=lambda k: (k[0], KINDS.index(k[1]))):
        write_into(site_tensor(model, arch, layer, kind), writes[(layer, kind)])


def readout(logits, answer, distractor) -> list:
    logits = logits.float()
    rows = torch.arange(len(answer), device=logits.device)
    return [logit_diff(logits, answer, distractor), logits.log_softmax(-1)[rows, answer],
            logits.argmax(-1)]


def patched_bytes(model, arch, inputs, groups, answer, distractor, seen=None) -> int:
    """The bytes :func:`patched_blocks` returns for one batch: a float32 logit difference
    and log-probability and an int64 top token per row, for the clean run and each group."""
    rows = len(answer) * (1 + sum(m for _, _, m, _ in groups))
    return rows * (4 + 4 + 8)


def patched_blocks(model, arch, inputs, groups, answer, distractor):
    """One batch (a remote kernel): the clean run, then each group of variants recomputing
    only its block. A group ``(layer, col, m, writes)`` runs tokens ``col..`` of ``m`` copies
    of the batch (prompt-major) against the clean keys and values of tokens ``..col-1``,
    skipping blocks ``< layer`` (fed the clean residual stream). Returns the clean readout
    and one per group (each ``[b * m]``)."""
    layers = sorted({g[0] for g in groups} - {0})
    with torch.no_grad(), model.trace(inputs, use_cache=True, logits_to_keep=1):
        streams = {layer: site_tensor(model, arch, layer, "resid_pre") for layer in layers}
        cache = model.output.past_key_values
        out = [readout(model.output.logits[:, -1], answer, distractor)]
        streams.save()
        cache.save()
        out.save()
    for layer, col, m, writes in groups:
        suffix = {"input_ids": inputs["input_ids"][:, col:].repeat_interleave(m, 0),
                  "position_ids": inputs["position_ids"][:, col:].repeat_interleave(m, 0),
                  "attention_mask": inputs["attention_mask"].repeat_interleave(m, 0)}
        past = {}
        if col > 0:  # the clean keys and values before col, per variant (none before token 0)
            prefix = copy.deepcopy(cache)
            prefix.crop(col - inputs["input_ids"].shape[1])  # drops the tokens from col on
            prefix.batch_repeat_interleave(m)
            past = {_cache_argument(model): prefix}
        with torch.no_grad(), model.trace(suffix, **past, logits_to_keep=1):
            if layer > 0:  # the skipped blocks' output, with the block's input patches in
                hidden = streams[layer][:, col:].repeat_interleave(m, 0)
                write_into(hidden, writes.get((layer, "resid_pre"), []))
                writes = {key: w for key, w in writes.items() if key != (layer, "resid_pre")}
                skip_blocks(model, arch, layer, hidden)
            apply_writes(model, arch, writes)
            result = readout(model.output.logits[:, -1], answer.repeat_interleave(m),
                             distractor.repeat_interleave(m))
            result.save()
        out.append(result)
    return out


def _cache_argument(model) -> str:
    """The name the model's forward takes its key/value cache by: ``cache`` in recent
    transformers (``past_key_values`` is deprecated there), else ``past_key_values``."""
    import inspect

    forward = inspect.signature(model._module.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def patched_forward(model, arch, inputs, writes, answer, distractor, skip=None):
    """One forward with every write applied (a remote kernel): the logit difference, the
    answer's log-probability and the top token at the last position, per row. ``skip`` =
    ``(n, hidden)`` does not run the first ``n`` blocks and feeds ``hidden`` to block ``n``
    (or to the final norm when ``n`` is the number of blocks)."""
    with torch.no_grad(), model.trace(inputs, use_cache=False, logits_to_keep=1):
        if skip is not None:
            skip_blocks(model, arch, *skip)
        apply_writes(model, arch, writes)
        out = readout(model.output.logits[:, -1], answer, distractor)
        out.save()
    return out
