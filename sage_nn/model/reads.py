"""Reading a cross-section: activations at (site, named position) pairs, and residual SAEs'
codes at the sublayer sites they reach, from one clean forward per batch.

A residual SAE reaches q/k/v/z/attn_out through the residual-to-sublayer reconstruction
(:mod:`sage_nn.reconstruction`, input mode). With the norm scale and the attention pattern
frozen to the clean run's, that map is linear, so each SAE's site codes and offsets follow
from the clean run alone (:func:`sage_nn.reconstruction.linear_codes`): any number of SAEs
and floors are read in the same forward as the activations, and remotely in one request::

    values, codes = read_sites(model, [test, cf], pairs, jobs)
    values[0][(Site.parse("L9.z.h3"), "END")]          # [n, d_head], test prompts
    codes[1][(0, Site.parse("L9.z.h3"), "END")]        # (codes, offset) of job 0, cf prompts

A *job* is ``(spec, sites)``: a :meth:`ResidualReconstruction.linear_spec` (the SAE feeding
one layer, its frozen maps) and the sites it reaches at that layer. Inside the trace
everything is plain torch.

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .activations import NonFiniteActivationError, batches, encode, model_device
from .linear import EagerAttention, linear_codes
from .patching import Patch
from .remote import as_remote, cast_shared, run_kernel
from .sites import HEAD_KINDS, KINDS, Site, adapter, at_path


def read_sites(model: Any, sets: Sequence[Any], pairs: Sequence[tuple], jobs: Sequence[tuple] = (),
               *, batch_size: int = 32, remote: Any = None) -> tuple[list[dict], list[dict]]:
    """Activations at ``pairs`` and every job's codes, for each task dataset of ``sets``.

    Returns ``(values, codes)``, one dict per set: ``values[(site, position)]`` is
    ``[n, width]``; ``codes[(job index, site, position)]`` is ``(codes, offset)``, codes
    ``[n, L]`` (attn_out ``[n, H, L]``) and offset ``[n, width]`` (see
    :func:`sage_nn.reconstruction.linear_codes`). Each job's sites are read at every named
    position of ``pairs``, in every set or in the sets a third element lists (``(spec,
    sites, [set indices])``). All sets go through one :func:`sage_nn.remote.run_kernel`
    (one request remotely).
    """
    ad = adapter(model)
    pairs = [(ad.check(s), str(p)) for s, p in pairs]
    names = sorted({p for _, p in pairs})
    missing = sorted(set(names) - set.intersection(*(set(d.positions) for d in sets)))
    if missing:
        raise ValueError(f"unknown named positions {missing}; the dataset has "
                         f"{sorted(sets[0].positions)}")
    reads = sorted({s for s, _ in pairs}, key=lambda s: s.order)
    by_layer: list[dict[int, list]] = [{} for _ in sets]  # per set: the jobs it runs
    for j, (spec, sites, *only) in enumerate(jobs):
        for k in (only[0] if only else range(len(sets))):
            by_layer[k].setdefault(min(s.layer for s in sites), []).append((j, spec, list(sites)))
    device, owners = model_device(model), []
    dtype = as_remote(remote).transport_dtype  # what the results (and SAE weights) travel in
    if dtype is not None and dtype != torch.float32:  # weights too: half the upload
        memo = {}
        by_layer = [cast_shared(jobs_k, dtype, memo) for jobs_k in by_layer]

    def chunks():
        for k, data in enumerate(sets):
            for idx in batches(len(data.prompts), batch_size):
                batch = encode(model, [data.prompts[i] for i in idx], device)
                cols = torch.stack([batch.index(data.positions[p][idx]) for p in names], 1)
                owners.append(k)
                yield batch.inputs, cols.to(device), reads, by_layer[k], dtype

    parts: list[list] = [[] for _ in sets]
    for out in run_kernel(model, _read_batch, chunks(), remote, stage="read"):
        parts[owners.pop(0)].append(out)
    values, codes = [], []
    for part in parts:
        cat = lambda key: torch.cat([p[key] for p in part]).float().cpu()  # noqa: E731
        values.append({(s, p): cat(str(s))[:, names.index(p)] for s, p in pairs})
        bad = sorted({str(s) for (s, _), v in values[-1].items() if not torch.isfinite(v).all()})
        if bad:
            raise NonFiniteActivationError(
                f"NaN or inf in the activations at {bad}: check the model's dtype (float16 "
                "overflows on some models: use float32 or bfloat16) and its weights and inputs")
        codes.append({(j, s, p): (cat(f"{j}|{s}|codes")[:, names.index(p)],
                                  cat(f"{j}|{s}|offset")[:, names.index(p)])
                      for j, (_, sites, *_) in enumerate(jobs) for s in sites for p in names
                      if f"{j}|{s}|codes" in part[0]})
    return values, codes


def _read_batch(model, inputs, cols, reads, jobs, dtype=None):
    """One clean trace (a remote kernel): every read site at tokens ``cols [b, P]``, and
    each job's codes there, layer by layer in execution order. Keyed by strings: a server
    returns plain data."""
    if dtype not in (None, torch.float32):  # the maps travelled in half precision
        jobs = {layer: [(j, {k: v if k == "sae" else cast_shared(v, torch.float32)
                             for k, v in spec.items()}, sites) for j, spec, sites in js]
                for layer, js in jobs.items()}
    needs_pattern = any(s.kind in ("z", "attn_out") for js in jobs.values() for _, _, ss in js
                        for s in ss)
    with EagerAttention(model, needs_pattern):
        out = _trace_reads(model, inputs, cols, reads, jobs)
    if dtype is not None:
        out = {key: value.to(dtype) for key, value in out.items()}
    return out


def _trace_reads(model, inputs, cols, reads, jobs):
    ad = adapter(model)
    arch = ad.arch
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    layers = sorted({s.layer for s in reads} | set(jobs))
    with torch.no_grad(), model.trace(inputs) as tracer:
        out = {}
        for layer in layers:
            here = jobs.get(layer, [])
            kinds_here = {s.kind for _, _, sites in here for s in sites}
            attn = getattr(ad.blocks(model)[layer], arch.attn)
            r = ad.tensor(model, layer, "resid_pre").clone() if here else None
            for kind in KINDS:
                if kind == "attn_out" and here:  # the clean pattern is known from here on
                    o_out = (at_path(attn, arch.o_proj).output.clone()
                             if "attn_out" in kinds_here and arch.attn_post_norm else None)
                    pattern = attn.output[1] if kinds_here & {"z", "attn_out"} else None
                    for j, spec, sites in here:
                        for s, (c, off) in linear_codes(ad, spec, r, pattern, o_out, rows,
                                                        cols, sites).items():
                            out[f"{j}|{s}|codes"], out[f"{j}|{s}|offset"] = c, off
                for s in (s for s in reads if s.layer == layer and s.kind == kind):
                    t = ad.tensor(model, layer, kind)
                    if kind in HEAD_KINDS:
                        t = t[..., ad.channels(kind, s.head)]
                    out[str(s)] = t[rows, cols]  # [b, P, width]
        out.save()
        tracer.stop()  # the layers above the last read and the logits are not needed
    return out


def site_values(model: Any, data: Any, pairs: Sequence[tuple], *, batch_size: int = 32,
                remote: Any = None) -> Any:
    """Activations of ``data`` at (site, named position) pairs: ``{(site, pos): [n, width]}``.

    ``data`` is a task dataset (its named positions are used), or a list of them (then a
    list of dicts comes back). One trace per batch reads every pair, for all datasets
    together (through :func:`sage_nn.reads.read_sites`; one request remotely).
    """
    sets = list(data) if isinstance(data, (list, tuple)) else [data]
    values, _ = read_sites(model, sets, pairs, batch_size=batch_size, remote=remote)
    return values if isinstance(data, (list, tuple)) else values[0]



def counterfactual_patches(model: Any, clean: Any, source: Any, pairs: Sequence[tuple], *,
                           batch_size: int = 32, remote: Any = None) -> list[Patch]:
    """One patch per (site, named position): ``source``'s activation written into ``clean``.

    The value is read at the position's token in the source prompt and written at the same
    named position's token in the clean prompt (they may differ, e.g. IOI's order swap).
    """
    if len(source.prompts) != len(clean.prompts):
        raise ValueError(f"source has {len(source.prompts)} prompts, clean has "
                         f"{len(clean.prompts)}; they must be paired row by row")
    pairs = [(Site.parse(s), str(p)) for s, p in pairs]
    values = site_values(model, source, pairs, batch_size=batch_size, remote=remote)
    return [Patch(site, clean.positions[pos], values[(site, pos)], f"{site}@{pos}")
            for site, pos in pairs]
