"""The activations SAEs train on: every requested site read in one trace per batch of token
sequences (stopped after the last site), and the shuffled stream of training batches over
them. A corpus whose activations fit in memory is read once and reshuffled every epoch;
a larger one is streamed through a shuffle buffer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..model.activations import model_device
from ..model.sites import HEAD_KINDS, adapter, parse_site
from .corpus import Tokens, corpus_units


def site_keys(model: Any, sites: Sequence[str]) -> list[tuple[str, int, str, list | None]]:
    """``(label, layer, kind, heads)`` of each site (``L5.z`` = every head of layer 5)."""
    keys = []
    for name in sites:
        layer, kind, heads = parse_site(name, model)
        if kind in HEAD_KINDS and heads is None:
            heads = list(range(adapter(model).n_heads_of(kind)))
        label = f"L{layer}.{kind}" + ("" if kind not in HEAD_KINDS or heads is None or
                                      len(heads) == adapter(model).n_heads_of(kind)
                                      else ".h" + "_".join(map(str, heads)))
        keys.append((label, layer, kind, heads))
    return keys


def site_width(model: Any, kind: str, heads: list | None) -> int:
    ad = adapter(model)
    return ad.d_head * len(heads) if kind in HEAD_KINDS else ad.d_model


def batch_ranges(lengths: Sequence[int], batch_size: int, batch_tokens: int | None):
    """Consecutive ranges of at most ``batch_size`` sequences, or, with ``batch_tokens``,
    as many as fit in that many (padded) tokens: short task prompts go many to a trace,
    since each trace has a fixed cost."""
    start = 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and (
                end - start < batch_size if batch_tokens is None
                else (end - start + 1) * max(longest, lengths[end]) <= batch_tokens):
            longest = max(longest, lengths[end])
            end += 1
        yield start, end
        start = end


def activation_batches(model: Any, units, sites, *, batch_size: int = 16,
                       skip_first: int = 1, batch_tokens: int | None = None,
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch of token sequences (rows of a chunk tensor, or a list of 1-D tensors of any
    length), one trace reading every site: ``{label: [tokens, width]}``, the real tokens of
    each sequence from ``skip_first`` on. A batch is ``batch_size`` sequences, or as many as
    fit in ``batch_tokens``. Shorter sequences are right-padded: causal attention keeps
    padding after a token from changing it."""
    ad, device = adapter(model), model_device(model)
    keys = sorted(site_keys(model, sites), key=lambda k: (k[1], ad.kinds().index(k[2])))
    pad = model.tokenizer.pad_token_id or 0
    for start, end in batch_ranges([len(u) for u in units], batch_size, batch_tokens):
        part = list(units[start: end])
        lengths = torch.tensor([len(u) for u in part])
        ids = torch.nn.utils.rnn.pad_sequence([getattr(u, "ids", u) for u in part],
                                              batch_first=True, padding_value=pad)
        steps = torch.arange(ids.shape[1])
        mask = steps[None] < lengths[:, None]
        keep = mask & (steps[None] >= skip_first)
        for row, u in enumerate(part):
            if isinstance(u, Tokens):  # only the chosen tokens of this sequence
                keep[row] = False
                keep[row, list(u.keep)] = True
        saved = {}
        with torch.no_grad(), model.trace({"input_ids": ids.to(device),
                                           "attention_mask": mask.long().to(device)}) as tracer:
            for label, layer, kind, heads in keys:
                t = ad.tensor(model, layer, kind)
                if kind in HEAD_KINDS:
                    t = t[..., ad.channels(kind, heads)]
                saved[label] = t.save()
            # nothing after the last site is needed: the layers above it and the logits
            # (SmolLM2's unembedding is a fifth of a forward) are not computed
            tracer.stop()
        yield {k: v[keep.to(v.device)].float().cpu() for k, v in saved.items()}


def count_tokens(units, skip_first: int) -> int:
    """Training tokens the units give (each one's kept positions, or all after the first)."""
    return sum(len(u.keep) if isinstance(u, Tokens) else max(0, len(u) - skip_first)
               for u in units)


def split_corpus(model: Any, source: Any, cfg, rng: torch.Generator):
    """``source``'s units (:func:`~.corpus.corpus_units`) shuffled by ``rng``, split into
    ``(held_out, train, training tokens per pass)``: ``cfg.eval_fraction`` of them held out.
    Refuses a corpus with no training part or fewer training tokens than one batch."""
    units = corpus_units(model, source, cfg)
    units = [units[i] for i in torch.randperm(len(units), generator=rng)]
    n_eval = max(1, int(len(units) * cfg.eval_fraction))
    held_out, train = units[:n_eval], units[n_eval:]
    if not train:
        raise ValueError("not enough text for a held-out split; add text or lower eval_fraction")
    tokens = count_tokens(train, cfg.skip_first)
    if tokens < cfg.batch_size:
        raise ValueError(f"{tokens} training tokens, fewer than batch_size "
                         f"{cfg.batch_size}: add text or lower batch_size")
    return held_out, train, tokens


def read_activations(model: Any, units, labels: Sequence[str], *, skip_first: int,
                     batch_tokens: int) -> dict[str, torch.Tensor]:
    """Every site's activations over ``units``, concatenated: ``{label: [tokens, width]}``."""
    parts = list(activation_batches(model, units, list(labels), skip_first=skip_first,
                                    batch_tokens=batch_tokens))
    return {label: torch.cat([p[label] for p in parts]) for label in labels}


def batches_of(buf: dict, batch_size: int, rng: torch.Generator):
    """``buf``'s rows in a random order, as batches of ``batch_size`` (the rest dropped)."""
    n = next(iter(buf.values())).shape[0]
    perm = torch.randperm(n, generator=rng)
    for b in range(0, n - batch_size + 1, batch_size):
        idx = perm[b: b + batch_size]
        yield {k: v[idx] for k, v in buf.items()}


def shuffled(model: Any, units, labels: Sequence[str], *, batch_size: int, skip_first: int,
             batch_tokens: int, cache_bytes: int, buffer_units: int,
             rng: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of shuffled training batches ``{label: [batch_size, width]}``.

    A corpus whose activations fit in ``cache_bytes`` (the task corpora and the built-in
    one do) is run through the model once and reshuffled every epoch; a larger one is
    streamed through a shuffle buffer of ``buffer_units`` units, re-running the model each
    epoch."""
    width = sum(site_width(model, kind, heads) for _, _, kind, heads in
                site_keys(model, labels))
    cached = count_tokens(units, skip_first) * width * 4 <= cache_bytes
    buffers = None
    while True:
        order = [units[i] for i in torch.randperm(len(units), generator=rng)]
        if buffers is None or not cached:
            step = len(order) if cached else buffer_units
            buffers = []
            for start in range(0, len(order), step):
                buffers.append(read_activations(model, order[start: start + step], labels,
                                                skip_first=skip_first,
                                                batch_tokens=batch_tokens))
                if not cached:
                    yield from batches_of(buffers.pop(), batch_size, rng)
        for buf in buffers:
            yield from batches_of(buf, batch_size, rng)
