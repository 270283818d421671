"""Reading a cross-section: activations at (site, named position) pairs, and residual SAEs'
codes at the sublayer sites they reach, from one clean forward per batch.

A residual SAE reaches q/k/v/z/attn_out through the residual-to-sublayer reconstruction.
With the norm scale and the attention pattern frozen to the clean run's, that map is
linear (:mod:`sage_nn.model.linear`), so each SAE's site codes follow from the clean run
alone: any number of SAEs are read in the same forwards as the activations, and remotely
in one request::

    read = read_sites(model, [test, cf], pairs, [LinearJob(sae, [Site.parse("L9.z.h3")],
                                                           ["END"])])
    read.values[0][(Site.parse("L9.z.h3"), "END")]     # [n, d_head], test prompts
    read.codes[1][(0, Site.parse("L9.z.h3"), "END")]   # (codes, offset) of job 0, cf prompts
    read.maps[9]                                       # layer 9's frozen maps (directions)

Where an SAE is encoded is chosen per layer by the bytes each way needs (``Remote.placement``,
default ``"auto"``): on the server (its encoder uploaded, its codes downloaded: grows with
its width) or here (the residual rows the reconstruction reads and the pattern rows at the
query tokens downloaded, once for every SAE of the layer: grows with prompts x tokens x
d_model, not with the SAE). Both run :func:`~sage_nn.model.linear.linear_codes` on the same
inputs, so they agree up to transport rounding. The frozen maps are read from the model where
its weights are and come back with the request, so a model without weights here needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .activations import NonFiniteActivationError, batches, encode, model_device
from .linear import (
    attention_call,
    attention_norms,
    frozen_maps,
    heads_read,
    linear_codes,
    needed_tokens,
    pattern_rows,
    take_inputs,
)
from .patching import Patch
from .remote import as_remote, cast_shared, payload_bytes, request_groups, run_kernel
from .sites import (
    HEAD_KINDS,
    KINDS,
    Site,
    adapter,
    at_path,
    blocks_of,
    channels,
    site_key,
    site_name,
    site_tensor,
    stop_after_reads,
    width_of,
)


@dataclass
class LinearJob:
    """A residual SAE's codes at q/k/v/z/attn_out ``sites`` of one layer (the one its input
    feeds), at the named ``positions``, on the read's sets ``sets`` (``None``: all).
    ``sae`` is the whole SAE (here); only its encoder travels, if it is encoded there.
    ``label`` names it in the placement record."""

    sae: Any
    sites: list
    positions: list[str]
    sets: list[int] | None = None
    label: str = ""

    @property
    def layer(self) -> int:
        return self.sites[0].layer


@dataclass
class Reads:
    """What :func:`read_sites` returns, per set: ``values[(site, position)] [n, width]`` and
    ``codes[(job, site, position)] = (codes [n, L] (attn_out [n, H, L]), offset [n,
    width])``; per layer of a job, its frozen ``maps`` (for
    :func:`~sage_nn.model.linear.site_directions`); per job, where it was encoded and what
    each placement would cost (``placements``)."""

    values: list[dict]
    codes: list[dict]
    maps: dict = field(default_factory=dict)
    placements: list[dict] = field(default_factory=list)
    #: with ``keep_inputs``: per set, per batch, ``{layer: {"taken", "cols", "mask",
    #: "positions", "sites", "attention_mask"}}``, what :func:`~sage_nn.model.linear.
    #: linear_codes` reads at the named ``positions`` (the evaluation's controls are coded
    #: here from it: nothing of them travels)
    inputs: list[list[dict]] = field(default_factory=list)


@dataclass
class _Layer:
    """One layer's linear view: what the jobs there read (see :func:`read_sites`)."""

    jobs: list[int]
    sites: list
    positions: list[str]
    norm: Any
    post_norm: Any

    @property
    def mixing(self) -> bool:  # z/attn_out mix tokens through the pattern
        return any(s.kind in ("z", "attn_out") for s in self.sites)

    @property
    def attn_out(self) -> bool:
        return any(s.kind == "attn_out" for s in self.sites)

    def pattern_heads(self, ad) -> list[int]:
        if self.attn_out:
            return list(range(ad.n_heads))
        return sorted({s.head for s in self.sites if s.kind == "z"})


def read_sites(model: Any, sets: Sequence[Any], pairs: Sequence[tuple],
               jobs: Sequence[LinearJob] = (), *, batch_size: int = 32,
               remote: Any = None, keep_inputs: bool = False) -> Reads:
    """Activations at ``pairs`` and every job's codes, for each task dataset of ``sets``
    (see :class:`Reads`). All sets go through one :func:`~sage_nn.model.remote.run_kernel`
    (one request remotely). ``keep_inputs``: what every job's linear view read comes back
    (:attr:`Reads.inputs`), and the jobs are coded here from it (on the server only where
    ``remote.placement`` is ``"server"``: there "auto" has nothing left to save)."""
    remote = as_remote(remote)
    ad = adapter(model)
    pairs = [(ad.check(s), str(p)) for s, p in pairs]
    jobs = list(jobs)
    names = sorted({p for _, p in pairs})
    wanted = set(names) | {p for job in jobs for p in job.positions}
    missing = sorted(wanted - set.intersection(*(set(d.positions) for d in sets)))
    if missing:
        raise ValueError(f"unknown named positions {missing}; the dataset has "
                         f"{sorted(sets[0].positions)}")
    reads = sorted({s for s, _ in pairs}, key=lambda s: s.order)
    layers = _layers(ad, model, jobs)
    device, dtype = model_device(model), remote.transport_dtype
    prepared = []  # per batch: set, inputs, the reads' columns, per layer (cols, mask, jobs)
    for k, data in enumerate(sets):
        for idx in batches(len(data.prompts), batch_size):
            batch = encode(model, [data.prompts[i] for i in idx], device)
            cols = torch.stack([batch.index(data.positions[p][idx]) for p in names], 1) \
                if names else torch.zeros(len(idx), 0, dtype=torch.long)
            at = {}
            for layer, plan in layers.items():
                js = [j for j in plan.jobs if jobs[j].sets is None or k in jobs[j].sets]
                if js:
                    lc = torch.stack([batch.index(data.positions[p][idx])
                                      for p in plan.positions], 1)
                    at[layer] = (lc, needed_tokens(batch.inputs["attention_mask"], lc,
                                                   plan.mixing), js)
            prepared.append((k, batch.inputs, cols, at))
    if any(plan.pattern_heads(ad) for plan in layers.values()) and not ad.arch.attention_call:
        raise ValueError(f"{ad.arch.name}: its attention's forward has no attention_interface "
                         "call to read the clean pattern from, so z and attn_out cannot be "
                         "reached through the reconstruction; use SAEs at the sites")
    here, placements = _place(ad, remote, layers, jobs, prepared)
    if keep_inputs:  # the rows come here anyway: the SAEs are coded from them here too,
        # unless the server is asked for (then it encodes them, and the rows come as well)
        forced = remote is not None and remote.is_remote and remote.placement == "server"
        here = set() if forced else set(layers)
        for record in placements:
            record["placement"] = "here" if record["layer"] in here else "server"
    maps_of = {layer: (heads_read(ad.spec, [site_key(s) for s in plan.sites]), plan.attn_out)
               for layer, plan in layers.items()}
    cast: dict = {}  # encoders cast once
    read_keys = [site_key(s) for s in reads]

    def chunks():
        for k, inputs, cols, at in prepared:
            args = {}
            for layer, (lc, mask, js) in at.items():
                plan = layers[layer]
                encoders = [] if layer in here else [
                    (j, _encoder(jobs[j].sae, dtype, cast), [site_key(s) for s in jobs[j].sites])
                    for j in js]
                args[layer] = {"cols": lc.to(device), "mask": mask.to(device),
                               "norm": plan.norm, "post_norm": plan.post_norm if
                               plan.attn_out else None, "heads": plan.pattern_heads(ad),
                               "maps": maps_of[layer], "jobs": encoders,
                               "send": keep_inputs or layer in here}
            yield inputs, cols.to(device), read_keys, args, dtype

    parts: list[list] = [[] for _ in sets]
    inputs: list[list] = [[] for _ in sets]
    maps: dict[int, dict] = {}
    for out, (k, batch_inputs, _, at) in zip(run_kernel(model, _read_batch, chunks(), remote,
                                             stage="read", shapes=read_bytes, shared=True),
                                  prepared):
        for layer in list(maps_of):
            if f"L{layer}|maps" in out:  # once per request
                maps[layer] = _on(out.pop(f"L{layer}|maps"), "cpu")
        kept = {}
        for layer in set(at) if keep_inputs else here & set(at):
            lc, mask, js = at[layer]
            taken = out.pop(f"L{layer}|taken")
            if layer in here:
                out.update(_codes_here(ad, layers[layer], taken, lc, mask, maps[layer],
                                       {j: jobs[j] for j in js}))
            if keep_inputs:
                kept[layer] = {"taken": _on(taken, "cpu"), "cols": lc, "mask": mask,
                               "positions": list(layers[layer].positions),
                               "sites": list(layers[layer].sites),
                               "attention_mask": batch_inputs["attention_mask"].cpu()}
        parts[k].append(out)
        inputs[k].append(kept)
    values, codes = [], []
    for k, part in enumerate(parts):
        cat = lambda key: torch.cat([p[key] for p in part]).float().cpu()  # noqa: E731
        values.append({(s, p): cat(str(s))[:, names.index(p)] for s, p in pairs})
        bad = sorted({str(s) for (s, _), v in values[-1].items() if not torch.isfinite(v).all()})
        if bad:
            raise NonFiniteActivationError(
                f"NaN or inf in the activations at {bad}: check the model's dtype (float16 "
                "overflows on some models: use float32 or bfloat16) and its weights and inputs")
        codes.append({(j, s, p): (cat(f"{j}|{s}|codes")[:, layers[job.layer].positions.index(p)],
                                  cat(f"{j}|{s}|offset")[:, layers[job.layer].positions.index(p)])
                      for j, job in enumerate(jobs) for s in job.sites for p in job.positions
                      if f"{j}|{s}|codes" in part[0]})
    return Reads(values, codes, maps, placements, inputs if keep_inputs else [])


def _layers(ad, model, jobs: list[LinearJob]) -> dict[int, _Layer]:
    layers: dict[int, _Layer] = {}
    for j, job in enumerate(jobs):
        sites = [ad.check(s) for s in job.sites]
        if {s.layer for s in sites} != {job.layer} or any(
                s.kind not in ("q", "k", "v", "z", "attn_out") for s in sites):
            raise ValueError(f"a linear job reads q/k/v/z/attn_out sites of one layer; got "
                             f"{', '.join(map(str, sites))}")
        if job.layer not in layers:
            layers[job.layer] = _Layer([], [], [], *attention_norms(ad, model, job.layer))
        plan = layers[job.layer]
        plan.jobs.append(j)
        plan.sites = sorted(set(plan.sites) | set(sites), key=lambda s: s.order)
        plan.positions = sorted(set(plan.positions) | set(job.positions))
    return dict(sorted(layers.items()))


def _encoder(sae, dtype, cast: dict) -> dict:
    """The SAE's plain encoder (``sae.encoder()``: half its weights, plain data) in the
    transport dtype, one copy per SAE (a request that names it twice carries it once)."""
    if id(sae) not in cast:
        enc = sae.encoder()
        cast[id(sae)] = enc if dtype in (None, torch.float32) else cast_shared(enc, dtype)
    return cast[id(sae)]


def _place(ad, remote, layers: dict[int, _Layer], jobs, prepared) -> tuple[set, list[dict]]:
    """The layers whose SAEs are encoded here (the rest on the server), and a record per
    job of where and what each placement would send and receive (in the transport dtype):
    on the server, its encoder each request plus its codes and offsets; here, the layer's
    residual rows, pattern rows and post-norm scales, shared by every SAE of the layer."""
    size = (remote.transport_dtype or torch.float32).itemsize
    groups = list(request_groups([(x[1],) for x in prepared], remote.max_prompts))
    in_request = []  # per batch: its request
    for g, group in enumerate(groups):
        in_request += [g] * len(group)
    here_bytes = {layer: 0 for layer in layers}
    server_bytes = {j: 0 for j in range(len(jobs))}
    requests_of = {j: set() for j in range(len(jobs))}
    for (k, inputs, _, at), g in zip(prepared, in_request):
        T = inputs["input_ids"].shape[1]
        for layer, (lc, mask, js) in at.items():
            plan, (b, m) = layers[layer], lc.shape
            here_bytes[layer] += size * (int(mask.sum()) * ad.d_model + b * m * (
                len(plan.pattern_heads(ad)) * T + (plan.post_norm is not None
                                                   and plan.attn_out)))
            for j in js:
                requests_of[j].add(g)
                server_bytes[j] += size * b * m * sum(
                    _code_width(ad.spec, s.kind, jobs[j].sae.d_sae) for s in jobs[j].sites)
    sent: set = set()  # (SAE, request): an SAE named by several jobs travels once a request
    for j, job in enumerate(jobs):
        encoder = payload_bytes(job.sae.encoder(), itemsize=size)
        new = {(id(job.sae), g) for g in requests_of[j]} - sent
        server_bytes[j] += encoder * len(new)
        sent |= new
    here, limit = set(), remote.max_request_bytes
    for layer, plan in layers.items():
        server = sum(server_bytes[j] for j in plan.jobs)
        # an encoder larger than a request can be is encoded here, whatever it costs
        too_big = [jobs[j].label or repr(jobs[j].sae) for j in plan.jobs if limit is not None
                   and payload_bytes(jobs[j].sae.encoder(), itemsize=size) > limit]
        if too_big and remote.placement == "server" and remote.is_remote and not remote.dry_run:
            raise ValueError(
                f"the encoder of {too_big[0]} is larger than a request to the server may be "
                f"({limit / 1e6:.2f} MB): it cannot be encoded there; fix: "
                "--remote-placement here (or auto)")
        if remote.placement == "here" or (remote.placement == "auto" and remote.is_remote
                                          and (too_big or here_bytes[layer] < server)):
            here.add(layer)
    records = [{"sae": job.label, "layer": job.layer, "width": int(job.sae.d_sae),
                "placement": "here" if job.layer in here else "server",
                "server_bytes": server_bytes[j], "here_bytes": here_bytes[job.layer],
                "saes_sharing_here": len({id(jobs[i].sae) for i in layers[job.layer].jobs})}
               for j, job in enumerate(jobs)]
    if remote.is_remote:
        remote.placements.extend(records)
    return here, records


def _code_width(arch: dict, kind: str, width: int) -> int:
    """Floats a server sends back per (prompt, position) for one job's site: the codes and
    the offset."""
    return arch["n_heads"] * width + arch["d_model"] if kind == "attn_out" \
        else width + arch["d_head"]


def _codes_here(ad, plan: _Layer, taken: dict, cols, mask, maps: dict, jobs: dict) -> dict:
    """The jobs' codes at ``plan``'s sites from the rows the server sent (here placement),
    on each SAE's device, keyed as the kernel keys them."""
    out = {}
    for j, job in jobs.items():
        device = job.sae.W_enc.device
        with torch.no_grad():
            found = linear_codes(ad.spec, job.sae.encoder(), plan.norm, _on(taken, device),
                                 mask.to(device), cols.to(device), _on(maps, device),
                                 [site_key(s) for s in job.sites])
        for s, (c, off) in found.items():
            out[f"{j}|{site_name(s)}|codes"], out[f"{j}|{site_name(s)}|offset"] = c, off
    return out


def _on(obj, device):
    """Nested tensors as float32 (floating ones) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return (obj.float() if obj.is_floating_point() else obj).to(device)
    if isinstance(obj, dict):
        return {k: _on(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on(v, device) for v in obj)
    return obj


def read_bytes(model, arch, inputs, cols, reads, layers, dtype, seen: set) -> int:
    """The bytes :func:`_read_batch` returns for one chunk, from shapes alone (a plan: the
    model may have no weights here); each layer's maps once per request (``seen``)."""
    size = (dtype or torch.float32).itemsize
    b, P = cols.shape
    T = inputs["input_ids"].shape[1]
    floats = sum(b * P * width_of(arch, kind) for _, kind, _ in reads)
    d, dh = arch["d_model"], arch["d_head"]
    for layer, plan in layers.items():
        m = plan["cols"].shape[1]
        if layer not in seen:
            seen.add(layer)
            heads, attn_out = plan["maps"]
            floats += 2 * d + len(heads) * (d + 1) * dh
            if attn_out:
                floats += (arch["n_heads"] * dh + 1) * d + (
                    2 * d if arch["attn_post_norm"] else 0)
        for _, enc, sites in plan["jobs"]:
            floats += b * m * sum(_code_width(arch, kind, enc["W_enc"].shape[1])
                                  for _, kind, _ in sites)
        if plan["send"]:
            floats += int(plan["mask"].sum()) * d + b * m * (
                len(plan["heads"]) * T + (plan["post_norm"] is not None))
    return floats * size


def _read_batch(model, arch, inputs, cols, reads, layers, dtype=None, shared=None):
    """One clean trace (a remote kernel): every read site (``(layer, kind, head)``) at
    tokens ``cols [b, P]``, and per layer of ``layers`` what its linear view reads, then
    each server-placed job's codes there (``"j|site|codes"``, ``"j|site|offset"``) or,
    placed here, the reconstruction's inputs (``"L9|taken"``); each layer's frozen maps
    once per request (``"L9|maps"``; ``shared``: the request's own dict). Keyed by
    strings: a server returns plain data."""
    memo = {} if shared is None else shared
    out, taken, maps = _trace_reads(model, arch, inputs, cols, reads, layers,
                                    [layer for layer in layers if layer not in memo])
    for layer, plan in layers.items():
        if layer not in memo:  # read where the weights are, sent once
            memo[layer] = out[f"L{layer}|maps"] = maps[layer]
        for j, enc, sites in plan["jobs"]:
            if dtype not in (None, torch.float32):  # the encoder travelled in half precision
                if ("float32", id(enc)) not in memo:
                    memo["float32", id(enc)] = cast_shared(enc, torch.float32)
                enc = memo["float32", id(enc)]
            with torch.no_grad():
                found = linear_codes(arch, enc, plan["norm"], taken[layer], plan["mask"],
                                     plan["cols"], memo[layer], sites)
            for s, (c, off) in found.items():
                out[f"{j}|{site_name(s)}|codes"], out[f"{j}|{site_name(s)}|offset"] = c, off
        if plan["send"]:
            out[f"L{layer}|taken"] = taken[layer]
    return out if dtype is None else cast_shared(out, dtype)


def _trace_reads(model, arch, inputs, cols, reads, layers, new_maps):
    """The clean trace of :func:`_read_batch`: the reads, each planned layer's inputs of
    the linear view (the clean pattern recomputed from the attention call's inputs), and
    the frozen maps of the layers in ``new_maps`` (module calls, inside the trace)."""
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    out, taken, maps = {}, {}, {}  # made outside the trace: filled in it, they come back whole
    with torch.no_grad(), model.trace(inputs, use_cache=False, logits_to_keep=1) as tracer:
        calls = {layer: attention_call(model, arch, layer) for layer, plan in layers.items()
                 if plan["heads"]}  # asked for before the model runs
        for layer in sorted({s[0] for s in reads} | set(layers)):
            plan = layers.get(layer)
            r = site_tensor(model, arch, layer, "resid_pre").clone() if plan else None
            if plan and layer in new_maps:
                maps[layer] = frozen_maps(model, arch, layer, *plan["maps"], plan["norm"],
                                          plan["post_norm"], like=r)
            pattern = None
            for kind in KINDS:
                if kind == "z" and plan and plan["heads"]:  # before z: the attention call
                    pattern = pattern_rows(calls[layer], plan["cols"], plan["heads"],
                                           arch["n_heads"])
                if kind == "attn_out" and plan:  # the clean pattern is known from here on
                    attn = getattr(blocks_of(model, arch)[layer], arch["attn"])
                    o_out = at_path(attn, arch["o_proj"]).output if plan["post_norm"] else None
                    taken[layer] = take_inputs(r, pattern, o_out, plan["mask"], plan["cols"],
                                               plan["post_norm"])
                for key in (key for key in reads if key[0] == layer and key[1] == kind):
                    t = site_tensor(model, arch, layer, kind)
                    if kind in HEAD_KINDS:
                        t = t[..., channels(arch, kind, key[2])]
                    out[site_name(key)] = t[rows, cols]  # [b, P, width]
        stop_after_reads(model, tracer)
    return out, taken, maps


def site_values(model: Any, data: Any, pairs: Sequence[tuple], *, batch_size: int = 32,
                remote: Any = None) -> Any:
    """Activations of ``data`` at (site, named position) pairs: ``{(site, pos): [n, width]}``.

    ``data`` is a task dataset (its named positions are used), or a list of them (then a
    list of dicts comes back). One trace per batch reads every pair, for all datasets
    together (through :func:`read_sites`; one request remotely).
    """
    sets = list(data) if isinstance(data, (list, tuple)) else [data]
    values = read_sites(model, sets, pairs, batch_size=batch_size, remote=remote).values
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
