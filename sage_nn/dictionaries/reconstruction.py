"""Residual-to-sublayer reconstruction: sublayer sites rebuilt from residual-stream SAEs.

Two modes (docs/metrics.md, "residual-to-sublayer reconstruction"), applied inside the traced
forward to the chosen sites only; everything else runs clean:

- ``input``: recompute the sublayer from the SAE's reconstruction of the residual that feeds
  it (q/k/v/z/attn_out from ``resid_pre``; mlp_out from ``resid_mid``, or ``resid_pre`` in
  parallel blocks). The batch is run twice in one pass: clean rows, and scratch rows whose
  residual is overwritten by ``SAE(clean residual)`` so the model's own modules compute the
  sublayer from it; the chosen sites of the clean rows then take the scratch rows' values.
  ``freeze_norm`` rescales the scratch norm outputs to the clean norm scale,
  ``freeze_pattern`` gives the scratch rows the clean queries and keys (so the clean
  attention pattern). With both frozen the map residual -> site is linear and
  :meth:`ResidualReconstruction.directions` gives each latent's site-level direction.
- ``difference``: ``attn_out ~ SAE_mid(resid_mid) - SAE_pre(resid_pre)``,
  ``mlp_out ~ SAE_post(resid_post) - SAE_mid(resid_mid)`` (an SAE at ``L+1.resid_pre``
  serves as ``L.resid_post``).

Inside the trace everything is plain torch.

One module because both modes rebuild sites inside one traced forward from the same
frozen pieces; the linear algebra of those pieces is :mod:`sage_nn.model.linear`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..model.activations import batches, encode, model_device
from ..model.linear import (
    attention_call,
    attention_norms,
    frozen_maps,
    heads_read,
    inv_scale,
    linear_codes,
    norm_settings,
    pattern_rows,
    site_directions,
    take_inputs,
)
from ..model.reads import LinearJob
from ..model.remote import run_kernel
from ..model.encoders import reconstruct
from ..model.sites import (
    ATTN_KINDS,
    Site,
    adapter,
    at_path,
    blocks_of,
    channels,
    site_key,
    site_name,
    site_tensor,
)
from .saes import SparseAutoencoder, check_sae

MODES = ("input", "difference")


@dataclass
class ReconstructionResult:
    """Clean and reconstructed values of each site ([batch, seq, width]) and the logits of
    the forward pass with the reconstructions spliced in. With ``with_codes``: each site's
    latent codes and offset (see :meth:`ResidualReconstruction.directions`)."""

    clean: dict[Site, torch.Tensor]
    recon: dict[Site, torch.Tensor]
    logits: torch.Tensor
    codes: dict[Site, torch.Tensor] = field(default_factory=dict)
    offsets: dict[Site, torch.Tensor] = field(default_factory=dict)


class ResidualReconstruction:
    """Rebuild sublayer sites from residual SAEs inside the traced forward.

    ``saes``: residual-stream :class:`SparseAutoencoder` s (their ``layer``/``kind`` say where).
    Hyperparameters: ``mode`` (``"input"`` or ``"difference"``), ``freeze_norm``,
    ``freeze_pattern`` (input mode). :meth:`fit` checks the SAEs against a model.
    """

    def __init__(self, saes: Sequence[SparseAutoencoder] | Mapping[Any, SparseAutoencoder],
                 mode: str = "input", freeze_norm: bool = False, freeze_pattern: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown reconstruction mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "difference" and (freeze_norm or freeze_pattern):
            raise ValueError("freeze_norm/freeze_pattern apply to input mode only; "
                             "difference mode runs no sublayer")
        self.saes = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
        self.mode, self.freeze_norm, self.freeze_pattern = mode, freeze_norm, freeze_pattern

    # -- setup ------------------------------------------------------------------------
    def fit(self, model: Any) -> "ResidualReconstruction":
        ad = adapter(model)
        self.adapter_, self.by_site_ = ad, {}
        for sae in self.saes:
            check_sae(sae, ad)
            if sae.kind not in ("resid_pre", "resid_mid", "resid_post"):
                raise ValueError(f"{sae!r} is not a residual-stream SAE; the reconstruction "
                                 "needs SAEs at resid_pre/resid_mid/resid_post")
            key = (sae.layer, sae.kind)
            if sae.kind == "resid_post" and sae.layer + 1 < ad.n_layers:
                key = (sae.layer + 1, "resid_pre")  # the same residual stream
            self.by_site_[key] = sae
        if ad.n_layers - 1 >= 0:
            last = next((s for s in self.saes if s.kind == "resid_post"
                         and s.layer == ad.n_layers - 1), None)
            if last is not None:
                self.by_site_[(ad.n_layers, "resid_pre")] = last
        arch = ad.arch
        self.norms_ = {}  # per layer: which norm sits where, (module name, kind, eps)
        for layer, block in enumerate(ad.blocks(model._module)):
            self.norms_[layer] = {
                name: (mod_name, *norm_settings(getattr(block, mod_name),
                                             arch.norm_kinds.get(mod_name, "rms")))
                for name, mod_name in (("attn", arch.attn_norm), ("mlp", arch.mlp_norm),
                                       ("attn_post", arch.attn_post_norm),
                                       ("mlp_post", arch.mlp_post_norm)) if mod_name}
        self.model_ = model
        return self

    def source(self, site: Site | str) -> SparseAutoencoder:
        """The residual SAE whose input feeds ``site`` in input mode."""
        site = self.adapter_.check(site)
        kind = "resid_pre" if site.kind in ATTN_KINDS or self.adapter_.parallel else "resid_mid"
        return self._need(site, (site.layer, kind))

    def _need(self, site, key) -> SparseAutoencoder:
        if key not in self.by_site_:
            have = ", ".join(f"L{l}.{k}" for l, k in sorted(self.by_site_)) or "none"
            raise ValueError(f"reconstructing {site} in {self.mode} mode needs an SAE at "
                             f"L{key[0]}.{key[1]} (have: {have}); add one, or choose another site")
        return self.by_site_[key]

    def _plan(self, sites) -> list[Site]:
        if not hasattr(self, "adapter_"):
            raise RuntimeError("call fit(model) before reconstructing")
        ad = self.adapter_
        sites = sorted({ad.check(s) for s in sites}, key=lambda s: s.order)
        for s in sites:
            if self.mode == "input":
                if s.kind not in ATTN_KINDS + ("mlp_out",):
                    raise ValueError(f"input mode rebuilds q/k/v/z/attn_out/mlp_out, not {s}")
                self.source(s)
            else:
                if s.kind not in ("attn_out", "mlp_out"):
                    raise ValueError(f"difference mode rebuilds attn_out and mlp_out, not {s}")
                if ad.parallel:
                    raise ValueError(f"{ad.arch.name} has parallel attention and MLP, so there is "
                                     f"no resid_mid between them: use input mode for {s}")
                first = (s.layer, "resid_pre" if s.kind == "attn_out" else "resid_mid")
                second = (s.layer, "resid_mid") if s.kind == "attn_out" else (s.layer + 1, "resid_pre")
                self._need(s, first), self._need(s, second)
        return sites

    # -- running ----------------------------------------------------------------------
    def run(self, prompts: Sequence[str] | Mapping[str, torch.Tensor],
            sites: Sequence[Site | str], *, with_codes: bool = False) -> ReconstructionResult:
        """One forward pass over ``prompts`` (strings, or model inputs such as
        ``{"input_ids": ...}``) with ``sites`` reconstructed."""
        model, sites = self.model_, self._prepare(sites, with_codes)
        if isinstance(prompts, Mapping):
            inputs = {k: v.to(model_device(model)) for k, v in prompts.items()}
        else:
            inputs = encode(model, prompts, model_device(model)).inputs
        saved, logits = _reconstruct(model, adapter(model).spec, *self._double(inputs),
                                     self.plain(), [site_key(s) for s in sites], with_codes,
                                     None)
        return ReconstructionResult(**_by_site(saved), logits=logits)

    def run_at(self, prompts: Sequence[str], positions: Sequence[int], sites: Sequence[Site | str],
               *, with_codes: bool = False, batch_size: int = 16,
               remote: Any = None) -> ReconstructionResult:
        """:meth:`run` over many prompts in batches, keeping one token per prompt
        (``positions``: an index per prompt, negative from the end): each site's values are
        ``[n_prompts, ...]`` and ``logits`` those of the last token. ``remote`` runs the
        forwards elsewhere (see :mod:`sage_nn.remote`); only these rows come back."""
        return self.run_at_each([(prompts, positions, sites, with_codes)],
                                batch_size=batch_size, remote=remote)[0]

    def run_at_each(self, jobs: Sequence[tuple], *, batch_size: int = 16,
                    remote: Any = None) -> list[ReconstructionResult]:
        """Several :meth:`run_at` jobs ``(prompts, positions, sites, with_codes)``: each has
        its own forwards (their splices do not mix), all in one request remotely."""
        model = self.model_
        jobs = [(prompts, np.asarray(positions), self._prepare(sites, with_codes), with_codes)
                for prompts, positions, sites, with_codes in jobs]
        owners, plan = [], self.plain()

        def chunks():
            for j, (prompts, positions, sites, with_codes) in enumerate(jobs):
                for idx in batches(len(prompts), batch_size):
                    batch = encode(model, [prompts[i] for i in idx], model_device(model))
                    rows_cols = (torch.arange(len(idx)), batch.index(positions[idx]))
                    owners.append(j)
                    yield (*self._double(batch.inputs), plan, [site_key(s) for s in sites],
                           with_codes, rows_cols)

        parts = [[] for _ in jobs]
        for out in run_kernel(model, _reconstruct, chunks(), remote, stage="reconstruct"):
            parts[owners.pop(0)].append(out)
        results = []
        for job in parts:
            cat = {key: {s: torch.cat([p[0][key][s] for p in job]) for s in job[0][0][key]}
                   for key in job[0][0]}
            results.append(ReconstructionResult(**_by_site(cat),
                                                logits=torch.cat([p[1] for p in job])))
        return results

    def _prepare(self, sites, with_codes: bool) -> list[Site]:
        """The planned sites (with codes: checked to have a linear view)."""
        sites = self._plan(sites)
        if with_codes:
            self._check_linear(sites)
        return sites

    def _double(self, inputs: dict) -> tuple[dict, int]:
        """Input mode runs the prompts twice: clean rows, then scratch rows."""
        n = len(inputs["input_ids"])
        if self.mode == "input":
            inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
        return inputs, n

    def plain(self) -> dict:
        """What a request carries to rebuild sites, as plain data: the mode, the freezes,
        each residual SAE whole (:meth:`SparseAutoencoder.plain`, keyed ``"layer.kind"``)
        and each layer's norms ``(module name, kind, eps)`` by role."""
        return {"mode": self.mode, "freeze_norm": self.freeze_norm,
                "freeze_pattern": self.freeze_pattern, "norms": self.norms_,
                "saes": {f"{layer}.{kind}": sae.plain()
                         for (layer, kind), sae in self.by_site_.items()}}

    # -- linear view: per-latent directions at a site ---------------------------------
    def _check_linear(self, sites):
        if self.mode != "input" or not self.freeze_norm:
            raise ValueError("per-latent site directions need input mode with freeze_norm=True "
                             "(and freeze_pattern=True for z/attn_out): otherwise the map from "
                             "residual to site is not linear")
        for s in sites:
            if s.kind == "mlp_out":
                raise ValueError(f"{s}: the MLP is nonlinear, so mlp_out has no per-latent "
                                 "directions; they exist for q/k/v/z/attn_out")
            if s.kind in ("z", "attn_out") and not self.freeze_pattern:
                raise ValueError(f"{s}: directions at z/attn_out need freeze_pattern=True")

    def directions(self, site: Site | str, maps: dict | None = None) -> torch.Tensor:
        """Each latent's decoder vector pushed through the frozen map to ``site``.

        q/k/v/z: ``[d_sae, d_head]``; attn_out: ``[head, d_sae, d_model]`` (latents reach
        attn_out through each head's own pattern). With :meth:`run` ``(with_codes=True)``,
        ``codes @ directions + offset`` (summed over heads for attn_out) equals the
        reconstructed site exactly. ``maps``: the layer's frozen maps read where the
        weights are (:attr:`sage_nn.model.reads.Reads.maps`), needed when they are not
        here; by default they are read off the model here.
        """
        site = self.adapter_.check(site)
        self._check_linear([site])
        if maps is None:
            maps = self.frozen(site.layer, [site])
        return site_directions(self.adapter_.spec, maps, self.source(site).decoder(),
                               site_key(site))

    def frozen(self, layer: int, sites: Sequence[Site]) -> dict:
        """The frozen maps ``sites`` of ``layer`` read (:func:`~sage_nn.model.linear.
        frozen_maps`), off the model's weights here."""
        return _frozen_here(self.model_, layer, sites)

    def linear_job(self, sites: Sequence[Site], positions: Sequence[str],
                   sets: Sequence[int] | None = None, label: str = "") -> LinearJob:
        """The :class:`~sage_nn.model.reads.LinearJob` that reads the codes of ``sites``
        (q/k/v/z/attn_out of one layer) at ``positions``: the SAE feeding that layer."""
        sites = self._plan(sites)
        self._check_linear(sites)
        return LinearJob(self.source(sites[0]), sites, list(positions),
                         None if sets is None else list(sets), label)


# -- inside the trace: plain functions of the reconstruction's plain data (:meth:`plain`),
#    here and in a request ---------------------------------------------------------------

def _reconstruct(model, arch, inputs, n, plan, sites, with_codes, rows_cols):
    """One forward with ``sites`` (``(layer, kind, head)``) reconstructed in rows ``[:n]``
    (a remote kernel; ``plan``: :meth:`ResidualReconstruction.plain`). With ``rows_cols``,
    only those tokens' values and the last token's logits are kept. Keyed by site name: a
    server returns plain data."""
    saved = {"clean": {}, "recon": {}, "codes": {}, "offsets": {}}  # filled in the trace
    with torch.no_grad(), model.trace(inputs, use_cache=False):
        splice(model, arch, plan, sites, n, with_codes, saved)
        logits = model.output.logits[:n]
        pick = (lambda v: v[rows_cols]) if rows_cols is not None else (lambda v: v)
        saved = {key: {site_name(s): pick(v) for s, v in d.items()} for key, d in saved.items()}
        logits = logits[:, -1].clone() if rows_cols is not None else logits  # not a view
        result = [saved, logits]
        result.save()
    return result


def splice(model, arch: dict, plan: dict, sites, n: int, with_codes: bool, out: dict) -> dict:
    """Inside a trace: reconstruct ``sites`` in rows ``[:n]``. In input mode the trace's
    batch must be the prompts twice (rows ``[n:]`` are scratch). Fills ``out`` (made before
    the trace): ``{"clean"|"recon"|"codes"|"offsets": {site: tensor}}``; with
    ``with_codes`` each q/k/v/z/attn_out site's latent codes and offsets too (the layer's
    frozen maps read in the trace, from calls of its modules)."""
    by_layer: dict[int, list] = {}
    for s in sites:
        by_layer.setdefault(s[0], []).append(s)
    for layer in sorted(by_layer):
        if plan["mode"] == "input":
            _input_layer(model, arch, plan, layer, by_layer[layer], n, out, with_codes)
        else:
            _difference_layer(model, arch, plan, layer, by_layer[layer], out)
    return out


def _sae(plan, layer, kind) -> dict:
    return plan["saes"][f"{layer}.{kind}"]


def _record(out, site, clean, recon):
    out["clean"][site] = clean.clone().save()
    out["recon"][site] = recon.clone().save()


def _difference_layer(model, arch, plan, layer, sites, out):
    kinds = {s[1] for s in sites}
    r_pre = site_tensor(model, arch, layer, "resid_pre")
    hat_pre = reconstruct(_sae(plan, layer, "resid_pre"), r_pre) if "attn_out" in kinds else None
    if "attn_out" in kinds:
        a = site_tensor(model, arch, layer, "attn_out")
        clean = a.clone()
        recon = reconstruct(_sae(plan, layer, "resid_mid"), r_pre + clean) - hat_pre
        a[:] = recon
        _record(out, (layer, "attn_out", None), clean, recon)
    if "mlp_out" in kinds:
        r_mid = site_tensor(model, arch, layer, "resid_mid")
        m = site_tensor(model, arch, layer, "mlp_out")
        clean = m.clone()
        recon = reconstruct(_sae(plan, layer + 1, "resid_pre"), r_mid + clean) - \
            reconstruct(_sae(plan, layer, "resid_mid"), r_mid)
        m[:] = recon
        _record(out, (layer, "mlp_out", None), clean, recon)


def _rescale(model, arch, plan, layer, which, inp_clean, inp_scratch, out_t, n):
    """Give the scratch rows' norm output the clean rows' norm scale (the norm's shift,
    from a call of it on zeros: no weight is read)."""
    mod_name, kind, eps = plan["norms"][layer][which]
    module = getattr(blocks_of(model, arch)[layer], mod_name)
    beta = module(torch.zeros_like(inp_clean[:1, :1]))[0, 0]
    ratio = inv_scale(inp_clean, kind, eps) / inv_scale(inp_scratch, kind, eps)
    out_t[n:] = ((out_t[n:] - beta) * ratio.to(out_t.dtype) + beta)


def _input_layer(model, arch, plan, layer, sites, n, out, with_codes):
    block = blocks_of(model, arch)[layer]
    norms = plan["norms"][layer]
    attn_sites = [s for s in sites if s[1] in ATTN_KINDS]
    mlp = any(s[1] == "mlp_out" for s in sites)
    mixing = [s for s in attn_sites if s[1] in ("z", "attn_out")]
    call = attention_call(model, arch, layer) if with_codes and mixing else None  # before it runs
    cache = {}
    # resid_pre: clean rows feed the SAE, scratch rows take its reconstruction
    r = site_tensor(model, arch, layer, "resid_pre")
    if attn_sites or (mlp and arch["parallel"]):
        sae = _sae(plan, layer, "resid_pre")
        clean_r = r[:n].clone()
        if with_codes and attn_sites:  # what the linear view needs of the weights, by calls
            cache["maps"] = frozen_maps(
                model, arch, layer, heads_read(arch, attn_sites),
                any(s[1] == "attn_out" for s in attn_sites), norms.get("attn", (None,))[1:] or
                None, norms.get("attn_post", (None,))[1:] or None, like=clean_r)
        r[n:] = reconstruct(sae, clean_r).to(r.dtype)
        cache["r"] = clean_r
        if plan["freeze_norm"] and "attn" in norms:  # else nothing to freeze
            scratch_r = r[n:].clone()
            norm_out = getattr(block, norms["attn"][0]).output
            _rescale(model, arch, plan, layer, "attn", clean_r, scratch_r, norm_out, n)
    if attn_sites:
        attn = getattr(block, arch["attn"])
        fused = arch["qkv"] != "separate"
        needed = {"q", "k", "v"} & {s[1] for s in attn_sites}
        if plan["freeze_pattern"]:
            needed |= {"q", "k"}
        for kind in ("q", "k", "v") if not fused else ("q",):
            kinds_here = ("q", "k", "v") if fused else (kind,)
            if not needed & set(kinds_here):
                continue
            t = at_path(attn, arch[f"{kind}_proj"]).output
            frozen = {kk: t[:n, :, channels(arch, kk)].clone() for kk in kinds_here
                      if plan["freeze_pattern"] and kk in ("q", "k")}
            for kk in kinds_here:
                for s in (s for s in attn_sites if s[1] == kk):
                    ch = channels(arch, kk, s[2])
                    clean, recon = t[:n, :, ch].clone(), t[n:, :, ch].clone()
                    t[:n, :, ch] = recon
                    _record(out, s, clean, recon)
            for kk, clean_qk in frozen.items():  # the clean pattern in the scratch rows
                t[n:, :, channels(arch, kk)] = clean_qk
        z_sites = [s for s in attn_sites if s[1] == "z"]
        attn_out_site = next((s for s in attn_sites if s[1] == "attn_out"), None)
        if call is not None:  # before z: the pattern the scratch rows use (the clean one)
            T = cache["r"].shape[1]
            cols = torch.arange(T, device=cache["r"].device)[None, :].expand(n, T)
            cache["pattern"] = pattern_rows(call, cols, _pattern_heads(arch, mixing),
                                            arch["n_heads"], start=n)
        if z_sites:
            t = site_tensor(model, arch, layer, "z")
            for s in z_sites:
                ch = channels(arch, "z", s[2])
                clean, recon = t[:n, :, ch].clone(), t[n:, :, ch].clone()
                t[:n, :, ch] = recon
                _record(out, s, clean, recon)
        post = arch["attn_post_norm"]
        if post and ((attn_out_site and plan["freeze_norm"]) or with_codes):
            o = at_path(attn, arch["o_proj"]).output
            o_clean, o_scratch = o[:n].clone(), o[n:].clone()
            cache["o_out"] = o_clean
        if attn_out_site is not None:
            if post:
                t = getattr(block, post).output
            else:
                t = attn.output[0] if arch["attn_tuple"] else attn.output
            if post and plan["freeze_norm"]:
                _rescale(model, arch, plan, layer, "attn_post", o_clean, o_scratch, t, n)
            clean, recon = t[:n].clone(), t[n:].clone()
            t[:n] = recon
            _record(out, attn_out_site, clean, recon)
        if with_codes:
            _codes(arch, plan, layer, attn_sites, cache, out)
    if mlp:
        if not arch["parallel"]:
            mid = site_tensor(model, arch, layer, "resid_mid")
            clean_m = mid[:n].clone()
            mid[n:] = reconstruct(_sae(plan, layer, "resid_mid"), clean_m).to(mid.dtype)
            if plan["freeze_norm"] and "mlp" in norms:
                _rescale(model, arch, plan, layer, "mlp", clean_m, mid[n:].clone(),
                         getattr(block, norms["mlp"][0]).output, n)
        elif plan["freeze_norm"] and "mlp" in norms and norms["mlp"] != norms.get("attn"):
            # parallel block: the MLP norm reads resid_pre, rebuilt above (a norm shared
            # with attention was rescaled there already)
            _rescale(model, arch, plan, layer, "mlp", clean_r, r[n:].clone(),
                     getattr(block, norms["mlp"][0]).output, n)
        if arch["mlp_post_norm"] and plan["freeze_norm"]:
            m_in = getattr(block, arch["mlp"]).output
            m_in = m_in[0] if arch["mlp_tuple"] else m_in
            m_clean, m_scratch = m_in[:n].clone(), m_in[n:].clone()
            t = site_tensor(model, arch, layer, "mlp_out")
            _rescale(model, arch, plan, layer, "mlp_post", m_clean, m_scratch, t, n)
        else:
            t = site_tensor(model, arch, layer, "mlp_out")
        clean, recon = t[:n].clone(), t[n:].clone()
        t[:n] = recon
        _record(out, (layer, "mlp_out", None), clean, recon)


def _pattern_heads(arch, sites) -> list[int]:
    return [h for h in range(arch["n_heads"])
            if any(s[1] == "attn_out" or (s[1] == "z" and s[2] == h) for s in sites)]


def _codes(arch, plan, layer, sites, cache, out):
    """Site-level codes and offsets at every token (in the trace), for
    :meth:`ResidualReconstruction.directions`."""
    n, T = cache["r"].shape[:2]
    cols = torch.arange(T, device=cache["r"].device)[None, :].expand(n, T)
    mask = torch.ones(n, T, dtype=torch.bool, device=cols.device)
    norm, post_norm = plan["norms"][layer].get("attn"), plan["norms"][layer].get("attn_post")
    post = post_norm[1:] if post_norm and any(s[1] == "attn_out" for s in sites) else None
    taken = take_inputs(cache["r"], cache.get("pattern"), cache.get("o_out"), mask, cols, post)
    found = linear_codes(arch, _sae(plan, layer, "resid_pre"), norm[1:] if norm else None,
                         taken, mask, cols, cache["maps"], sites)
    for s, (codes, offset) in found.items():
        out["codes"][s], out["offsets"][s] = codes.save(), offset.save()


def _frozen_here(model, layer, sites) -> dict:
    """The frozen maps of the linear view of ``sites`` (at ``layer``, or per layer of
    theirs when ``None``), from calls of the modules of a model whose weights are here."""
    ad, by_layer = adapter(model), {}
    for s in sites:
        if s.kind in ATTN_KINDS:
            by_layer.setdefault(s.layer, []).append(s)
    hf = getattr(model, "_module", model)
    like = next(hf.parameters())
    if like.device.type == "meta":
        raise ValueError(
            "the model's weights are not here (a remote model is held without them): pass the "
            "layers' frozen maps read on the server, directions(site, maps=read_sites(...)"
            ".maps[layer]); evaluate_cross_section reads them itself")
    maps = {at: frozen_maps(hf, ad.spec, at, heads_read(ad.spec, [site_key(s) for s in ss]),
                            any(s.kind == "attn_out" for s in ss),
                            *attention_norms(ad, model, at), like=like)
            for at, ss in by_layer.items()}
    return maps if layer is None else maps[layer]


def _by_site(saved: dict) -> dict:
    return {key: {Site.parse(s): v for s, v in d.items()} for key, d in saved.items()}
