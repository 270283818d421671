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
    EagerAttention,
    frozen_maps,
    heads_read,
    inv_scale,
    linear_codes,
    norm_settings,
    site_directions,
    take_inputs,
)
from ..model.reads import LinearJob
from ..model.remote import run_kernel
from ..model.sites import ATTN_KINDS, Site, adapter, at_path
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
        saved, logits = _reconstruct(model, *self._double(inputs), self, sites, with_codes, None)
        return ReconstructionResult(**_by_site(saved), logits=logits)

    def run_at(self, prompts: Sequence[str], positions: Sequence[int], sites: Sequence[Site | str],
               *, with_codes: bool = False, batch_size: int = 16,
               remote: Any = None) -> ReconstructionResult:
        """:meth:`run` over many prompts in batches, keeping one token per prompt
        (``positions``: an index per prompt, negative from the end): each site's values are
        ``[n_prompts, ...]`` and ``logits`` those of the last token. ``remote`` runs the
        forwards elsewhere (see :mod:`sage_nn.model.remote`); only these rows come back."""
        return self.run_at_each([(prompts, positions, sites, with_codes)],
                                batch_size=batch_size, remote=remote)[0]

    def run_at_each(self, jobs: Sequence[tuple], *, batch_size: int = 16,
                    remote: Any = None) -> list[ReconstructionResult]:
        """Several :meth:`run_at` jobs ``(prompts, positions, sites, with_codes)``: each has
        its own forwards (their splices do not mix), all in one request remotely."""
        model = self.model_
        jobs = [(prompts, np.asarray(positions), self._prepare(sites, with_codes), with_codes)
                for prompts, positions, sites, with_codes in jobs]
        owners = []

        def chunks():
            for j, (prompts, positions, sites, with_codes) in enumerate(jobs):
                for idx in batches(len(prompts), batch_size):
                    batch = encode(model, [prompts[i] for i in idx], model_device(model))
                    rows_cols = (torch.arange(len(idx)), batch.index(positions[idx]))
                    owners.append(j)
                    yield *self._double(batch.inputs), self, sites, with_codes, rows_cols

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

    def splice(self, model: Any, sites: Sequence[Site], n: int, *, with_codes: bool = False,
               out: dict | None = None, maps: dict | None = None) -> dict:
        """Inside a trace: reconstruct ``sites`` in rows ``[:n]``. In input mode the trace's
        batch must be the prompts twice (rows ``[n:]`` are scratch). Fills and returns ``out``
        (create it before the trace: nnsight hands back only objects made outside it or saved):
        ``{"clean"|"recon"|"codes"|"offsets": {site: tensor}}``. ``with_codes`` needs each
        layer's frozen ``maps`` (:func:`kernel_maps`, read before the trace)."""
        sites = self._plan(sites)
        ad = self.adapter_
        if out is None:
            out = {}
        for key in ("clean", "recon", "codes", "offsets"):
            out.setdefault(key, {})
        by_layer: dict[int, list[Site]] = {}
        for s in sites:
            by_layer.setdefault(s.layer, []).append(s)
        for layer in sorted(by_layer):
            if self.mode == "input":
                self._input_layer(model, ad, layer, by_layer[layer], n, out,
                                  maps if with_codes else None)
            else:
                self._difference_layer(model, ad, layer, by_layer[layer], out)
        return out

    def _record(self, out, site, clean, recon):
        out["clean"][site] = clean.clone().save()
        out["recon"][site] = recon.clone().save()

    def _difference_layer(self, model, ad, layer, sites, out):
        kinds = {s.kind for s in sites}
        r_pre = ad.tensor(model, layer, "resid_pre")
        hat_pre = self.by_site_[(layer, "resid_pre")](r_pre) if "attn_out" in kinds else None
        if "attn_out" in kinds:
            a = ad.tensor(model, layer, "attn_out")
            clean = a.clone()
            recon = self.by_site_[(layer, "resid_mid")](r_pre + clean) - hat_pre
            a[:] = recon
            self._record(out, Site(layer, "attn_out"), clean, recon)
        if "mlp_out" in kinds:
            r_mid = ad.tensor(model, layer, "resid_mid")
            m = ad.tensor(model, layer, "mlp_out")
            clean = m.clone()
            recon = self.by_site_[(layer + 1, "resid_pre")](r_mid + clean) - \
                self.by_site_[(layer, "resid_mid")](r_mid)
            m[:] = recon
            self._record(out, Site(layer, "mlp_out"), clean, recon)

    def _rescale(self, model, layer, which, inp_clean, inp_scratch, out_t, n):
        """Give the scratch rows' norm output the clean rows' norm scale."""
        mod_name, kind, eps = self.norms_[layer][which]
        module = getattr(self.adapter_.blocks(model._module)[layer], mod_name)
        beta = module.bias if getattr(module, "bias", None) is not None else 0.0
        ratio = inv_scale(inp_clean, kind, eps) / inv_scale(inp_scratch, kind, eps)
        out_t[n:] = ((out_t[n:] - beta) * ratio.to(out_t.dtype) + beta)

    def _input_layer(self, model, ad, layer, sites, n, out, maps):
        with_codes = maps is not None
        arch = ad.arch
        block = ad.blocks(model)[layer]
        attn_sites = [s for s in sites if s.kind in ATTN_KINDS]
        mlp = any(s.kind == "mlp_out" for s in sites)
        cache = {}
        # resid_pre: clean rows feed the SAE, scratch rows take its reconstruction
        r = ad.tensor(model, layer, "resid_pre")
        if attn_sites or (mlp and ad.parallel):
            sae = self.by_site_[(layer, "resid_pre")]
            clean_r = r[:n].clone()
            r[n:] = sae(clean_r).to(r.dtype)
            cache["r"] = clean_r
            if self.freeze_norm and "attn" in self.norms_[layer]:  # else nothing to freeze
                norm_name = self.norms_[layer]["attn"][0]
                scratch_r = r[n:].clone()
                norm_out = getattr(block, norm_name).output
                self._rescale(model, layer, "attn", clean_r, scratch_r, norm_out, n)
        if attn_sites:
            proj = {"q": arch.q_proj, "k": arch.k_proj, "v": arch.v_proj}
            attn = getattr(block, arch.attn)
            attn_output = lambda: attn.output if arch.attn_tuple else (attn.output,)  # noqa: E731
            fused = arch.qkv != "separate"
            needed = {"q", "k", "v"} & {s.kind for s in attn_sites}
            if self.freeze_pattern:
                needed |= {"q", "k"}
            for kind in ("q", "k", "v") if not fused else ("q",):
                kinds_here = ("q", "k", "v") if fused else (kind,)
                if not needed & set(kinds_here):
                    continue
                t = at_path(attn, proj[kind]).output
                frozen = {kk: t[:n, :, ad.channels(kk)].clone() for kk in kinds_here
                          if self.freeze_pattern and kk in ("q", "k")}
                for kk in kinds_here:
                    for s in (s for s in attn_sites if s.kind == kk):
                        ch = ad.channels(kk, s.head)
                        clean, recon = t[:n, :, ch].clone(), t[n:, :, ch].clone()
                        t[:n, :, ch] = recon
                        self._record(out, s, clean, recon)
                for kk, clean_qk in frozen.items():  # the clean pattern in the scratch rows
                    t[n:, :, ad.channels(kk)] = clean_qk
            z_sites = [s for s in attn_sites if s.kind == "z"]
            attn_out_site = next((s for s in attn_sites if s.kind == "attn_out"), None)
            if z_sites:
                t = ad.tensor(model, layer, "z")
                for s in z_sites:
                    ch = ad.channels("z", s.head)
                    clean, recon = t[:n, :, ch].clone(), t[n:, :, ch].clone()
                    t[:n, :, ch] = recon
                    self._record(out, s, clean, recon)
            post = arch.attn_post_norm
            if post and ((attn_out_site and self.freeze_norm) or with_codes):
                o = at_path(attn, arch.o_proj).output
                o_clean, o_scratch = o[:n].clone(), o[n:].clone()
                cache["o_out"] = o_clean
            attn_output = attn_output() if (with_codes or (attn_out_site and not post)) else None
            if with_codes and (z_sites or attn_out_site):
                cache["pattern"] = attn_output[1][n:].float()  # the pattern the scratch rows used
            if attn_out_site is not None:
                t = getattr(block, post).output if post else attn_output[0]
                if post and self.freeze_norm:
                    self._rescale(model, layer, "attn_post", o_clean, o_scratch, t, n)
                clean, recon = t[:n].clone(), t[n:].clone()
                t[:n] = recon
                self._record(out, attn_out_site, clean, recon)
            if with_codes:
                self._codes(layer, attn_sites, cache, out, maps)
        if mlp:
            if not ad.parallel:
                sae = self.by_site_[(layer, "resid_mid")]
                mid = ad.tensor(model, layer, "resid_mid")
                clean_m = mid[:n].clone()
                mid[n:] = sae(clean_m).to(mid.dtype)
                if self.freeze_norm and "mlp" in self.norms_[layer]:
                    norm_name = self.norms_[layer]["mlp"][0]
                    self._rescale(model, layer, "mlp", clean_m, mid[n:].clone(),
                                  getattr(block, norm_name).output, n)
            elif self.freeze_norm and "mlp" in self.norms_[layer] and \
                    self.norms_[layer]["mlp"] != self.norms_[layer].get("attn"):
                # parallel block: the MLP norm reads resid_pre, rebuilt above (a norm shared
                # with attention was rescaled there already)
                norm_name = self.norms_[layer]["mlp"][0]
                self._rescale(model, layer, "mlp", clean_r, r[n:].clone(),
                              getattr(block, norm_name).output, n)
            if arch.mlp_post_norm and self.freeze_norm:
                m_in = getattr(block, arch.mlp).output
                m_in = m_in[0] if arch.mlp_tuple else m_in
                m_clean, m_scratch = m_in[:n].clone(), m_in[n:].clone()
                t = ad.tensor(model, layer, "mlp_out")
                self._rescale(model, layer, "mlp_post", m_clean, m_scratch, t, n)
            else:
                t = ad.tensor(model, layer, "mlp_out")
            clean, recon = t[:n].clone(), t[n:].clone()
            t[:n] = recon
            self._record(out, Site(layer, "mlp_out"), clean, recon)

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
        return site_directions(self.adapter_, maps, self.source(site).decoder(), site)

    def frozen(self, layer: int, sites: Sequence[Site]) -> dict:
        """The frozen maps ``sites`` of ``layer`` read (:func:`~sage_nn.model.linear.
        frozen_maps`), off the model's weights here."""
        ad = self.adapter_
        attn = getattr(ad.blocks(self.model_._module)[layer], ad.arch.attn)
        if next(attn.parameters()).device.type == "meta":
            raise ValueError(
                f"layer {layer}'s weights are not here (a remote model is held without them): "
                "pass the layer's frozen maps read on the server, directions(site, "
                "maps=read_sites(...).maps[layer]); evaluate_cross_section reads them itself")
        return frozen_maps(self.model_, layer, heads_read(ad, sites),
                           any(s.kind == "attn_out" for s in sites))

    def linear_job(self, sites: Sequence[Site], positions: Sequence[str],
                   sets: Sequence[int] | None = None, label: str = "") -> LinearJob:
        """The :class:`~sage_nn.model.reads.LinearJob` that reads the codes of ``sites``
        (q/k/v/z/attn_out of one layer) at ``positions``: the SAE feeding that layer."""
        sites = self._plan(sites)
        self._check_linear(sites)
        return LinearJob(self.source(sites[0]), sites, list(positions),
                         None if sets is None else list(sets), label)

    def _codes(self, layer, sites, cache, out, maps):
        """Site-level codes and offsets at every token (in the trace), for :meth:`directions`."""
        n, T = cache["r"].shape[:2]
        cols = torch.arange(T, device=cache["r"].device)[None, :].expand(n, T)
        mask = torch.ones(n, T, dtype=torch.bool, device=cols.device)
        heads = [h for h in range(self.adapter_.n_heads)
                 if any(s.kind == "attn_out" or (s.kind == "z" and s.head == h) for s in sites)]
        norm, post_norm = self.norms_[layer].get("attn"), self.norms_[layer].get("attn_post")
        post = post_norm[1:] if post_norm and any(s.kind == "attn_out" for s in sites) else None
        taken = take_inputs(cache["r"], cache.get("pattern"), cache.get("o_out"), mask, cols,
                            heads, post)
        for s, (codes, offset) in linear_codes(self.adapter_, self.source(sites[0]),
                                               norm[1:] if norm else None, taken, mask, cols,
                                               maps[layer], sites).items():
            out["codes"][s], out["offsets"][s] = codes.save(), offset.save()


def _reconstruct(model, inputs, n, recon, sites, with_codes, rows_cols):
    """One forward with ``sites`` reconstructed in rows ``[:n]`` (a remote kernel). With
    ``rows_cols``, only those tokens' values and the last token's logits are kept."""
    saved = {"clean": {}, "recon": {}, "codes": {}, "offsets": {}}  # filled in the trace
    maps = kernel_maps(model, sites) if with_codes else None  # where the weights are
    with EagerAttention(model, with_codes or recon.freeze_pattern), torch.no_grad(), \
            model.trace(inputs):
        recon.splice(model, sites, n, with_codes=with_codes, out=saved, maps=maps)
        logits = model.output.logits[:n]
        pick = (lambda v: v[rows_cols]) if rows_cols is not None else (lambda v: v)
        # keyed by site name: a server returns plain data, not sage_nn objects
        saved = {key: {str(s): pick(v) for s, v in d.items()} for key, d in saved.items()}
        logits = logits[:, -1].clone() if rows_cols is not None else logits  # not a view
        result = [saved, logits]
        result.save()
    return result


def kernel_maps(model, sites) -> dict:
    """Each layer's frozen maps for the linear view of ``sites``, read off ``model`` where
    it runs (in a kernel: on the server), before its trace."""
    ad, by_layer = adapter(model), {}
    for s in sites:
        if s.kind in ATTN_KINDS:
            by_layer.setdefault(s.layer, []).append(s)
    return {layer: frozen_maps(model, layer, heads_read(ad, ss),
                               any(s.kind == "attn_out" for s in ss))
            for layer, ss in by_layer.items()}


def _by_site(saved: dict) -> dict:
    return {key: {Site.parse(s): v for s, v in d.items()} for key, d in saved.items()}
