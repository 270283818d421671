"""The measurements behind :func:`sage_nn.discovery.grow_cross_sections`, in one request.

Growing a cross-section is adaptive: which sets are patched next depends on the mean logit
difference of the last ones over all prompts. So the search runs where the model runs. One
kernel (:func:`_grow`) reads every pool site's counterfactual value, patches every prefix
of the pool, chooses, patches each member alone and the set without it, prunes, and
patches the pruned sets: one nnsight session, so one request remotely, in which the
counterfactual values never travel and only the measured means come back.

With ``Remote.max_prompts`` a request may not hold every prompt, and a mean over all of
them needs every prompt: the same search then runs here, each of its four rounds one or
more requests (:func:`_search` is shared; only ``measure`` differs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .activations import Batch, batches, encode, model_device
from .interventions import (Patch, _patched_blocks, _suffix_ok, logit_diff, plan_batch,
                            run_patched)
from .remote import as_remote, run_kernel
from .sites import HEAD_KINDS, KINDS, adapter


def measure_growth(model: Any, dataset: Any, pairs: dict[str, list[tuple]], target: float, *,
                   batch_size: int, max_rows: int, progress: bool = False,
                   remote: Any = None) -> dict:
    """Run the search over each attribute's pool ``pairs[a]`` (``(site, position)``, best
    candidate first). Returns :func:`_search`'s measurements, with the counterfactual logit
    differences under ``"cf"``."""
    if as_remote(remote).max_prompts is not None:
        patches, cf_ld = _counterfactual_patches(model, dataset, pairs, batch_size, progress,
                                                 remote)
        return _search(lambda sets: _joint_logit_diffs(
            model, dataset, sets, patches, batch_size=batch_size, max_rows=max_rows,
            progress=progress, remote=remote), cf_ld, {a: len(ps) for a, ps in pairs.items()},
            target)
    prepared = [_prepare(model, dataset, pairs, idx)
                for idx in batches(len(dataset.prompts), batch_size)]
    inputs = [p.pop("inputs") for p in prepared]
    (out,) = run_kernel(model, _grow, [(inputs, prepared, pairs, _positions(dataset, pairs),
                                        target, max_rows)], remote, stage="grow")
    return out


def _prepare(model, dataset, pairs, idx) -> dict:
    """One batch of clean prompts and their counterfactuals (all attributes stacked)."""
    device, attributes = model_device(model), list(pairs)
    cfs = [dataset.counterfactuals[a] for a in attributes]
    names = _names(pairs)
    clean = encode(model, [dataset.prompts[i] for i in idx], device)
    cf = encode(model, [c.prompts[i] for c in cfs for i in idx], device)
    cols = torch.stack([cf.index(np.concatenate([c.positions[p][idx] for c in cfs]))
                        for p in names], 1).to(device)
    as_ids = lambda ids, k: torch.as_tensor(np.tile(ids[idx], k), device=device)  # noqa: E731
    return {"inputs": clean.inputs, "offsets": clean.offsets, "lengths": clean.lengths,
            "idx": idx, "suffix": _suffix_ok(model, clean), "cf_inputs": cf.inputs,
            "cf_cols": cols, "answer": as_ids(dataset.answer_ids, 1),
            "distractor": as_ids(dataset.distractor_ids, 1),
            "cf_answer": as_ids(dataset.answer_ids, len(cfs)),
            "cf_distractor": as_ids(dataset.distractor_ids, len(cfs))}


def _positions(dataset, pairs: dict) -> dict[str, list]:
    """Each pool pair's per-prompt token positions, where its patch is written."""
    return {a: [dataset.positions[p] for _, p in ps] for a, ps in pairs.items()}


def _names(pairs: dict) -> list[str]:
    return sorted({p for ps in pairs.values() for _, p in ps})


def _grid(pairs: dict) -> list[tuple[int, str]]:
    return sorted({(s.layer, s.kind) for ps in pairs.values() for s, _ in ps},
                  key=lambda k: (k[0], KINDS.index(k[1])))


def _grow(model, inputs, prepared, pairs, positions, target, max_rows):
    """The whole search (a remote kernel): counterfactual values and logit differences of
    every batch, then :func:`_search` with every round's patched runs done here."""
    ad, grid, n = adapter(model), _grid(pairs), sum(len(p["idx"]) for p in prepared)
    patches, cf_ld = _pool(ad, pairs, positions, (
        (*_counterfactual_forward(model, p["cf_inputs"], grid, p["cf_cols"], p["cf_answer"],
                                  p["cf_distractor"]), len(p["idx"])) for p in prepared))
    batch_list = [Batch(x, p["offsets"], p["lengths"]) for x, p in zip(inputs, prepared)]

    def measure(sets: dict[str, list[list[int]]]):
        keys, variants = _variants(sets, patches)
        sums = torch.zeros(len(variants))
        for batch, p in zip(batch_list, prepared):
            device = batch.inputs["input_ids"].device
            groups, members, _ = plan_batch(ad, batch, p["idx"], variants, max_rows, device,
                                            None, p["suffix"])
            outs = _patched_blocks(model, batch.inputs, groups, p["answer"], p["distractor"])
            sums[0] += outs[0][0].float().sum().cpu()
            for (ld, _, _), chunk in zip(outs[1:], members):
                sums[chunk] += ld.float().cpu().reshape(len(p["idx"]), -1).sum(0)
        means = (sums / n).tolist()
        return means[0], _by_attribute(sets, keys, means[1:])

    return _search(measure, cf_ld, {a: len(ps) for a, ps in pairs.items()}, target)


def _variants(sets: dict[str, list[list[int]]], patches: dict) -> tuple[list, list]:
    """A round's sets as :func:`run_patched` variants (the clean run first), and the
    ``(attribute, set index)`` of each after it."""
    keys = [(a, v) for a, variants in sets.items() for v in range(len(variants))]
    return keys, [[]] + [[patches[a][i] for i in sets[a][v]] for a, v in keys]


def _by_attribute(sets, keys, means) -> dict[str, np.ndarray]:
    """The patched variants' means back per attribute, one per set."""
    out = {a: np.zeros(len(variants)) for a, variants in sets.items()}
    for (a, v), x in zip(keys, means):
        out[a][v] = x
    return out


def _pool(ad, pairs, positions, outs) -> tuple[dict[str, list[Patch]], dict[str, float]]:
    """Each attribute's pool as patches, and its mean counterfactual logit difference, from
    the counterfactual forwards' ``(values, logit differences, batch size)`` (every
    attribute stacked along the batch)."""
    attributes, parts, ld_sum, n = list(pairs), [], np.zeros(len(pairs)), 0
    for values, ld, b in outs:
        parts.append({key: v.unflatten(0, (len(attributes), b)) for key, v in values.items()})
        ld_sum += ld.double().cpu().numpy().reshape(len(attributes), b).sum(1)
        n += b
    values = {key: torch.cat([p[key] for p in parts], 1) for key in parts[0]}
    patches = _pool_patches(ad, pairs, positions, values, _names(pairs))
    return patches, {a: float(x) for a, x in zip(attributes, ld_sum / n)}


def _search(measure: Callable, cf_ld: dict[str, float], sizes: dict[str, int],
            target: float) -> dict:
    """The adaptive search over each attribute's pool of ``sizes[a]`` sites (``measure(sets)``
    -> the clean mean logit difference and, per attribute, one mean per set of pool indices
    patched jointly):

    1. every prefix of the pool; the chosen set is the shortest prefix reaching ``target``
       of the total effect, else the best one;
    2. every chosen member alone, and the chosen set without it (leave-one-out);
    3. the chosen set without its 1, 2, ... most dispensable members (highest leave-one-out
       share first), when it has more than one.

    Returns plain data: ``clean``, ``cf``, ``prefix`` (a mean per prefix), ``chosen``,
    ``loo`` (the singles, then the leave-one-outs), ``pruned`` (sets) and ``pruned_ld``.
    """
    clean, prefix = measure({a: [list(range(k + 1)) for k in range(sizes[a])] for a in cf_ld})

    def share(a, ld):
        total = cf_ld[a] - clean
        return (np.asarray(ld) - clean) / total if total else np.full(len(ld), np.nan)

    chosen = {}
    for a in cf_ld:
        rec = share(a, prefix[a])
        hit = np.flatnonzero(rec >= target)
        chosen[a] = list(range((int(hit[0]) if len(hit) else int(np.nanargmax(rec))) + 1))
    _, loo = measure({a: [[i] for i in s] + ([[j for j in s if j != i] for i in s]
                                             if len(s) > 1 else []) for a, s in chosen.items()})
    pruned = {}
    for a, s in chosen.items():
        if len(s) > 1:
            dispensable = [s[i] for i in np.argsort(-share(a, loo[a][len(s):]), kind="stable")]
            pruned[a] = [[j for j in s if j not in dispensable[:m]] for m in range(1, len(s))]
    pruned_ld = measure(pruned)[1] if pruned else {}
    plain = lambda d: {a: [float(x) for x in v] for a, v in d.items()}  # noqa: E731
    return {"clean": float(clean), "cf": {a: float(x) for a, x in cf_ld.items()},
            "prefix": plain(prefix), "chosen": chosen, "loo": plain(loo), "pruned": pruned,
            "pruned_ld": plain(pruned_ld)}


def _counterfactual_forward(model, inputs, grid, cols, answer, distractor):
    """Kernel: every grid tensor at the named positions' tokens ``cols [b, P]``
    (``{(layer, kind): [b, P, channels]}``) and the logit differences."""
    ad = adapter(model)
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):
        values = {}
        for layer, kind in grid:
            t = ad.tensor(model, layer, kind)[..., ad.channels(kind)]
            values[(layer, kind)] = t[rows, cols]
        values.save()
        ld = logit_diff(model.output.logits[:, -1], answer, distractor).save()
    return values, ld


def _pool_patches(ad, pairs, positions, values, names) -> dict[str, list[Patch]]:
    """Each attribute's pool as patches: ``values[(layer, kind)]`` is ``[attribute, prompt,
    position, channels]``, a head's channels are cut out of its kind's."""
    patches = {}
    for a_i, a in enumerate(pairs):
        patches[a] = []
        for (site, pos), at in zip(pairs[a], positions[a]):
            v = values[(site.layer, site.kind)][a_i, :, names.index(pos)]
            if site.kind in HEAD_KINDS:
                w = ad.width(site.kind)
                v = v[:, site.head * w:(site.head + 1) * w]
            patches[a].append(Patch(site, at, v, f"{site}@{pos}"))
    return patches


def _counterfactual_patches(model, dataset, pairs: dict, batch_size, progress, remote):
    """The search's first read, as its own requests: ``{attribute: [Patch]}`` and the mean
    counterfactual logit difference per attribute."""
    grid, sizes = _grid(pairs), []

    def chunks():
        for idx in batches(len(dataset.prompts), batch_size, progress and "counterfactuals"):
            p = _prepare(model, dataset, pairs, idx)
            sizes.append(len(idx))
            yield p["cf_inputs"], grid, p["cf_cols"], p["cf_answer"], p["cf_distractor"]

    outs = run_kernel(model, _counterfactual_forward, chunks(), remote, stage="counterfactuals")
    return _pool(adapter(model), pairs, _positions(dataset, pairs),
                 ((values, ld, sizes.pop(0)) for values, ld in outs))


def _joint_logit_diffs(model, dataset, sets: dict[str, list[list[int]]], patches: dict, *,
                       batch_size, max_rows, progress, remote):
    """One round of the search as its own requests (:func:`run_patched`): the clean mean
    logit difference and ``{attribute: a mean per set}``."""
    keys, variants = _variants(sets, patches)
    ld = run_patched(model, dataset, variants, names=list(range(len(variants))),
                     batch_size=batch_size, max_rows=max_rows, progress=progress,
                     remote=remote).logit_diff.mean("prompt").values.astype(float)
    return float(ld[0]), _by_attribute(sets, keys, ld[1:])
