"""Growing a cross-section by its joint exact patch (:func:`grow_cross_sections`), and the
measurements behind it, in one request.

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

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..model.activations import batches, encode, model_device
from ..model.patching import (
    Patch,
    logit_diff,
    patched_blocks,
    plan_batch,
    run_patched,
    suffix_ok,
)
from ..model.remote import as_remote, run_kernel
from ..model.sites import HEAD_KINDS, KINDS, Site, channels, site_key, site_tensor, spec
from .attribution import RESIDUAL_KINDS
from .selection import ranked


def measure_growth(model: Any, dataset: Any, pairs: dict[str, list[tuple]], target: float, *,
                   batch_size: int, max_rows: int, progress: bool = False,
                   remote: Any = None) -> dict:
    """Run the search over each attribute's pool ``pairs[a]`` (``(site, position)``, best
    candidate first). Returns :func:`_search`'s measurements, with the counterfactual logit
    differences under ``"cf"``."""
    pairs = {a: [(site_key(s), str(p)) for s, p in ps] for a, ps in pairs.items()}  # plain
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
            "idx": idx, "suffix": suffix_ok(model, clean), "cf_inputs": cf.inputs,
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
    return sorted({(s[0], s[1]) for ps in pairs.values() for s, _ in ps},
                  key=lambda k: (k[0], KINDS.index(k[1])))


def _grow(model, arch, inputs, prepared, pairs, positions, target, max_rows):
    """The whole search (a remote kernel): counterfactual values and logit differences of
    every batch, then :func:`_search` with every round's patched runs done here. ``pairs``:
    each attribute's pool as ``((layer, kind, head), position)``."""
    grid, n = _grid(pairs), sum(len(p["idx"]) for p in prepared)
    patches, cf_ld = _pool(arch, pairs, positions, (
        (*_counterfactual_forward(model, arch, p["cf_inputs"], grid, p["cf_cols"],
                                  p["cf_answer"], p["cf_distractor"]), len(p["idx"]))
        for p in prepared))
    batch_list = [{"inputs": x, "offsets": p["offsets"], "lengths": p["lengths"]}
                  for x, p in zip(inputs, prepared)]

    def measure(sets: dict[str, list[list[int]]]):
        keys, variants = _variants(sets, patches)
        sums = torch.zeros(len(variants))
        for batch, p in zip(batch_list, prepared):
            device = batch["inputs"]["input_ids"].device
            groups, members, _ = plan_batch(arch, batch, p["idx"], variants, max_rows, device,
                                            None, p["suffix"])
            outs = patched_blocks(model, arch, batch["inputs"], groups, p["answer"],
                                  p["distractor"])
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


def _pool(arch, pairs, positions, outs) -> tuple[dict[str, list[tuple]], dict[str, float]]:
    """Each attribute's pool as plain patches (:func:`~sage_nn.model.patching.plain_patch`),
    and its mean counterfactual logit difference, from
    the counterfactual forwards' ``(values, logit differences, batch size)`` (every
    attribute stacked along the batch)."""
    attributes, parts, ld_sum, n = list(pairs), [], np.zeros(len(pairs)), 0
    for values, ld, b in outs:
        parts.append({key: v.unflatten(0, (len(attributes), b)) for key, v in values.items()})
        ld_sum += ld.double().cpu().numpy().reshape(len(attributes), b).sum(1)
        n += b
    values = {key: torch.cat([p[key] for p in parts], 1) for key in parts[0]}
    patches = _pool_patches(arch, pairs, positions, values, _names(pairs))
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
        chosen[a] = list(range((int(hit[0]) if len(hit) else _shortest_best(rec)) + 1))
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


#: Recovered shares closer than this are equal: a member that adds nothing must not be kept
#: because float rounding (another machine, another batch order) puts its set a hair ahead.
SHARE_TOLERANCE = 1e-5


def _shortest_best(rec, sizes=None) -> int:
    """The index of the best recovered share, the smallest set among those within
    :data:`SHARE_TOLERANCE` of it (``sizes``: each set's size; default the index, prefixes)."""
    rec = np.asarray(rec, dtype=float)
    if not np.isfinite(rec).any():
        return 0
    near = np.flatnonzero(rec >= np.nanmax(rec) - SHARE_TOLERANCE)
    sizes = np.arange(len(rec)) if sizes is None else np.asarray(sizes)
    return int(min(near, key=lambda i: (sizes[i], -rec[i])))


def _counterfactual_forward(model, arch, inputs, grid, cols, answer, distractor):
    """Kernel: every grid tensor at the named positions' tokens ``cols [b, P]``
    (``{(layer, kind): [b, P, channels]}``) and the logit differences."""
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):
        values = {}
        for layer, kind in grid:
            t = site_tensor(model, arch, layer, kind)[..., channels(arch, kind)]
            values[(layer, kind)] = t[rows, cols]
        values.save()
        ld = logit_diff(model.output.logits[:, -1], answer, distractor).save()
    return values, ld


def _pool_patches(arch, pairs, positions, values, names) -> dict[str, list[tuple]]:
    """Each attribute's pool as plain patches: ``values[(layer, kind)]`` is ``[attribute,
    prompt, position, channels]``, a head's channels are cut out of its kind's."""
    patches = {}
    for a_i, a in enumerate(pairs):
        patches[a] = []
        for ((layer, kind, head), pos), at in zip(pairs[a], positions[a]):
            v = values[(layer, kind)][a_i, :, names.index(pos)]
            if kind in HEAD_KINDS:
                w = arch["d_head"]
                v = v[:, head * w:(head + 1) * w]
            patches[a].append(((layer, kind, head), np.asarray(at, dtype=np.int64), v))
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
    return _pool(spec(model), pairs, _positions(dataset, pairs),
                 ((values, ld, sizes.pop(0)) for values, ld in outs))


def _joint_logit_diffs(model, dataset, sets: dict[str, list[list[int]]], patches: dict, *,
                       batch_size, max_rows, progress, remote):
    """One round of the search as its own requests (:func:`run_patched`): the clean mean
    logit difference and ``{attribute: a mean per set}``."""
    keys, variants = _variants(sets, patches)
    variants = [[Patch(Site(*key), at, v) for key, at, v in variant] for variant in variants]
    ld = run_patched(model, dataset, variants, names=list(range(len(variants))),
                     batch_size=batch_size, max_rows=max_rows, progress=progress,
                     remote=remote).logit_diff.mean("prompt").values.astype(float)
    return float(ld[0]), _by_attribute(sets, keys, ld[1:])


def grow_cross_sections(model: Any, dataset: Any, scores: xr.Dataset,
                        attributes: Sequence[str] | None = None, *, target: float = 0.6,
                        max_sites: int = 16, kinds: Sequence[str] | None = ("z",),
                        positions: Sequence[str] | None = None, candidates: int | None = None,
                        layers: Sequence[int] | None = None, batch_size: int = 16,
                        max_rows: int = 256, progress: bool = False,
                        remote: Any = None) -> dict[str, tuple[pd.DataFrame, dict]]:
    """Per attribute, a small set of components whose *joint* exact patch recovers
    ``target`` of the total effect; attribution proposes, exact joint patching decides.

    Candidates are the attribute's sites in ``scores`` of ``kinds`` (default per-head ``z``;
    ``None``: every component kind of the grid, never the residual stream, which is a
    candidate only where a residual kind is listed, and then not at the tokens the
    counterfactual replaces or moves) at ``positions`` (default all) in ``layers`` (default
    all), ordered by their
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
        df = ranked(scores, a, kinds=kinds, positions=positions, changed_tokens=False,
                    layers=layers)
        n_candidates[a] = len(df)
        sign = 1.0 if float(scores.total_effect.sel(attribute=a)) >= 0 else -1.0
        order = np.argsort(-sign * df["delta"].to_numpy(), kind="stable")
        pools[a] = df.iloc[order[:pool_size]].reset_index(drop=True)
        if pools[a].empty:
            raise ValueError(f"attribute {a!r} has no candidate sites of kinds {kinds}"
                             + (f" in layers {list(layers)}" if layers is not None else ""))
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
            best = _shortest_best(rec, [len(members) for members, _ in eligible])
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
