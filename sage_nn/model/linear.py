"""The linear view of a model around a residual stream, with the norm scale and the
attention pattern frozen to the clean run's.

Two halves, both plain torch (they run inside a request, on a server, as well as here):

- :func:`frozen_maps` reads, *where the weights are*, what that view needs of one layer:
  the attention norm's weights, the projection columns of the heads asked for, the output
  projection. It runs in the kernel, so a model held here without weights (on NDIF) needs
  nothing of its weights here: the maps come back with the request (a few ``d_model x
  d_head`` slices).
- :func:`linear_codes` turns a residual SAE's codes of the residual feeding a layer into
  its codes and offsets at the layer's q/k/v/z/attn_out sites, from the reconstruction's
  inputs (:func:`take_inputs`: the residual rows the sites read, the pattern
  rows at the query tokens, a post-norm's scale). The same function runs on the server
  (the SAE's encoder uploaded) or here (those rows downloaded), so the two give the same
  numbers up to what transport rounds.

:class:`EagerAttention` makes a model return its attention pattern.
"""

from __future__ import annotations

import torch

from .sites import adapter, at_path


def norm_settings(module: torch.nn.Module, kind: str = "rms") -> tuple[str, float]:
    """``(kind, eps)`` of a norm module: ``"layer"`` for a LayerNorm, else ``kind``."""
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(module, a, None), float)), 1e-5)
    return ("layer" if isinstance(module, torch.nn.LayerNorm) else kind), float(eps)


def inv_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The per-token factor a norm multiplies its (centred) input by, before its weight."""
    x = x.float()
    var = x.var(-1, unbiased=False, keepdim=True) if kind == "layer" else x.pow(2).mean(-1, True)
    return torch.rsqrt(var + eps)


def normalized(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """A norm's output before its weight (TransformerLens' ``hook_normalized``): ``x``
    centred (a LayerNorm) and scaled by :func:`inv_scale`."""
    x = x.float()
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x * inv_scale(x, kind, eps)


def mlp_norm(ad, model, layer: int) -> tuple[str, float] | None:
    """``(kind, eps)`` of the norm before ``layer``'s MLP (``None``: the MLP reads the
    residual itself), read off the module's attributes: no weights needed."""
    arch = ad.arch
    if not arch.mlp_norm:
        return None
    block = ad.blocks(getattr(model, "_module", model))[layer]
    return norm_settings(getattr(block, arch.mlp_norm), arch.norm_kinds.get(arch.mlp_norm, "rms"))


def affine_of(module: torch.nn.Module, d_in: int,
              cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d_in, d_out], b)`` of a linear module (Linear or GPT-2's Conv1D), only the
    output columns ``cols`` when given (a head's slice: read, not the whole matrix)."""
    with torch.no_grad():
        if isinstance(module, torch.nn.Linear):  # read the columns, not a forward of eye
            pick = (lambda t: t) if cols is None else (lambda t: t[cols])  # noqa: E731
            W = pick(module.weight)
            b = W.new_zeros(W.shape[0]) if module.bias is None else pick(module.bias)
            return W.T.float().contiguous(), b.float().contiguous()
        p = next(module.parameters())
        b = module(torch.zeros(1, d_in, dtype=p.dtype, device=p.device))[0]
        W = module(torch.eye(d_in, dtype=p.dtype, device=p.device)) - b
        if cols is not None:
            W, b = W[:, cols], b[cols]
    return W.float().contiguous(), b.float().contiguous()


def norm_weight(module: torch.nn.Module, d: int,
                kind: str = "rms") -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma, beta)`` with ``norm(x) = inv_scale(x) * centre(x) * gamma + beta``, read off
    the module itself (so Gemma's ``1 + w`` convention needs no special case)."""
    kind, eps = norm_settings(module, kind)
    p = next(module.parameters(), torch.zeros(0))
    with torch.no_grad():
        v = torch.ones(d, dtype=p.dtype, device=p.device)
        if kind == "layer":
            v[1::2] = -1.0  # zero mean, unit variance
            beta = module(torch.ones(1, d, dtype=p.dtype, device=p.device))[0].float()
        else:
            beta = torch.zeros(d, device=p.device)
        gamma = (module(v[None])[0].float() - beta) / (v.float() * torch.rsqrt(
            torch.tensor(1 + eps)))
    return gamma, beta


def attention_norms(ad, model, layer: int) -> tuple:
    """``(norm, post_norm)`` settings ``(kind, eps)`` of ``layer``'s attention (``None``
    where it has none), read off the modules' attributes: no weights needed."""
    arch, block = ad.arch, ad.blocks(getattr(model, "_module", model))[layer]

    def settings(name):
        return norm_settings(getattr(block, name), arch.norm_kinds.get(name, "rms")) \
            if name else None

    return settings(arch.attn_norm), settings(arch.attn_post_norm)


def head_key(kind: str, head: int) -> str:
    return f"{kind}.{head}"


def heads_read(ad, sites) -> list[tuple[str, int]]:
    """The projection heads ``(kind, head)`` the linear view of ``sites`` reads: q/k/v
    their own, z its value head, attn_out every value head."""
    group = ad.n_heads // ad.n_kv_heads
    heads = set()
    for s in sites:
        if s.kind in ("q", "k", "v"):
            heads.add((s.kind, s.head))
        elif s.kind == "z":
            heads.add(("v", s.head // group))
        else:  # attn_out
            heads |= {("v", h // group) for h in range(ad.n_heads)}
    return sorted(heads)


def frozen_maps(model, layer: int, heads, attn_out: bool) -> dict:
    """What the linear view of ``layer`` needs of the weights, read where they are (a
    kernel runs this on the server): the attention norm's ``gamma``/``beta``, the
    projection columns ``proj["v.3"] = (W [d_model, d_head], b)`` of ``heads`` (``(kind,
    head)`` pairs), and with ``attn_out`` the output projection and post-norm weights."""
    ad = adapter(model)
    arch, hf = ad.arch, getattr(model, "_module", model)
    block = ad.blocks(hf)[layer]
    attn = getattr(block, arch.attn)
    norm, post_norm = attention_norms(ad, model, layer)
    if norm is not None:
        gamma, beta = norm_weight(getattr(block, arch.attn_norm), ad.d_model, norm[0])
    else:  # attention reads the residual itself
        device = next(attn.parameters()).device
        gamma, beta = torch.ones(ad.d_model, device=device), torch.zeros(ad.d_model, device=device)
    proj = {head_key(k, h): affine_of(at_path(attn, getattr(arch, f"{k}_proj")), ad.d_model,
                                      ad.channels(k, h)) for k, h in heads}
    maps = {"layer_norm": norm is not None and norm[0] == "layer", "gamma": gamma,
            "beta": beta, "proj": proj, "W_O": None, "b_O": None, "post": None}
    if attn_out:
        maps["W_O"], maps["b_O"] = affine_of(at_path(attn, arch.o_proj), ad.n_heads * ad.d_head)
        if post_norm is not None:
            maps["post"] = norm_weight(getattr(block, arch.attn_post_norm), ad.d_model,
                                       post_norm[0])
    return maps


def needed_tokens(attention_mask: torch.Tensor, cols: torch.Tensor, mixing: bool) -> torch.Tensor:
    """``[b, T]`` bool: the tokens whose residual the linear view reads for query tokens
    ``cols [b, m]``: every real token up to the last query (``mixing``: z/attn_out, whose
    pattern rows mix them), else the query tokens alone (q/k/v)."""
    b, T = attention_mask.shape
    t = torch.arange(T, device=cols.device)[None, :]
    if mixing:
        return attention_mask.bool() & (t <= cols.max(1, keepdim=True).values)
    mask = torch.zeros(b, T, dtype=torch.bool, device=cols.device)
    mask[torch.arange(b, device=cols.device)[:, None], cols] = True
    return mask


def take_inputs(r, pattern, o_out, mask, cols, heads, post_norm=None) -> dict:
    """What :func:`linear_codes` reads of the clean run at one layer, from its residual
    ``r [b, T, d]``, attention ``pattern [b, H, T, T]`` and output projection's output
    ``o_out [b, T, d]`` (inside a trace too): the residual at the ``mask`` tokens (``r
    [n_tokens, d_model]``), the pattern rows of ``heads`` at the query tokens ``cols [b,
    m]`` (``pattern[h] [b, m, T]``), and with ``post_norm`` (a post-norm's ``(kind,
    eps)``) its scale of the attention output there (``post [b, m, 1]``)."""
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    out = {"r": r[mask]}
    if heads:
        P = pattern[rows, :, cols]  # [b, m, H, T]
        # each its own copy: a view would carry every head's rows back from a server
        out["pattern"] = {h: P[..., h, :].clone() for h in heads}
    if post_norm is not None:
        out["post"] = inv_scale(o_out[rows, cols], *post_norm)
    return out


def linear_codes(ad, sae, norm, taken: dict, mask, cols, maps: dict, sites) -> dict:
    """Site codes and offsets of q/k/v/z/attn_out ``sites`` of one layer at the query tokens
    ``cols [b, m]``, from the clean run alone (``taken``: :func:`take_inputs`
    at the ``mask`` tokens) and the layer's ``maps`` (:func:`frozen_maps`). With the norm
    scale and pattern frozen to the clean run's, ``codes @ directions + offset`` (summed
    over heads for attn_out; :func:`site_directions`) is the site recomputed from the
    SAE's reconstruction of the residual. ``norm``: the attention norm's ``(kind, eps)``
    (``None``: attention reads the residual itself). Plain torch, here or on a server.
    Returns ``{site: (codes [b, m, L] (attn_out: [b, m, H, L]), offset [b, m, width])}``."""
    r = taken["r"].float()
    b = len(cols)
    scale, shift = sae.decode_affine(r)
    s = torch.ones_like(r[..., :1]) if norm is None else inv_scale(r, *norm)
    eff = scale.float() * s  # [n, 1] per-token factor on the codes
    codes = sae.encode(r).float() * eff  # [n_tokens, L]
    bias_r = scale.float() * sae.b_dec.float() + shift.float()  # the reconstruction's offset
    if maps["layer_norm"]:
        bias_r = bias_r - bias_r.mean(-1, keepdim=True)
    pre = s * bias_r * maps["gamma"] + maps["beta"]  # [n, d] after the frozen norm
    # token index of each (row, position), and each row's pattern weights over its tokens
    index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    index[mask] = torch.arange(int(mask.sum()), device=mask.device)
    owner, where = mask.nonzero(as_tuple=True)

    def mixed(head):  # [b, m, n_tokens]: the query rows' pattern over the taken tokens
        w = taken["pattern"][head].float()
        full = w.new_zeros(b, w.shape[1], len(owner))
        full[owner, :, torch.arange(len(owner))] = w[owner, :, where]
        return full

    def head_offset(kind, head):
        W, bias = maps["proj"][head_key(kind, head)]
        return pre @ W + bias  # [n, d_head]

    group = ad.n_heads // ad.n_kv_heads
    rows = torch.arange(b, device=cols.device)[:, None]
    out = {}
    for site in sites:
        if site.kind in ("q", "k", "v"):
            at = index[rows, cols]
            out[site] = (codes[at], head_offset(site.kind, site.head)[at])
        elif site.kind == "z":
            P = mixed(site.head)
            out[site] = (P @ codes, P @ head_offset("v", site.head // group))
        else:  # attn_out: each head's codes, and the offset through W_O
            per_head, off = [], maps["b_O"].clone()
            for h in range(ad.n_heads):
                P = mixed(h)
                per_head.append(P @ codes)
                off = off + (P @ head_offset("v", h // group)) @ maps["W_O"][ad.channels("z", h)]
            per_head = torch.stack(per_head, -2)
            if maps["post"] is not None:
                sp = taken["post"]  # [b, m, 1]
                per_head = per_head * sp[..., None]
                off = off * sp * maps["post"][0] + maps["post"][1]
            out[site] = (per_head, off)
    return out


def site_directions(ad, maps: dict, decoder: torch.Tensor, site) -> torch.Tensor:
    """Each latent's decoder row (``decoder [L, d_model]``) pushed through ``site``'s frozen
    map (``maps``: :func:`frozen_maps` of its layer). q/k/v/z: ``[L, d_head]``; attn_out:
    ``[head, L, d_model]`` (latents reach attn_out through each head's own pattern)."""
    W_dec = decoder.float()
    if maps["layer_norm"]:
        W_dec = W_dec - W_dec.mean(-1, keepdim=True)
    base = W_dec * maps["gamma"]  # [L, d_model] after the frozen norm

    def head_dir(kind, head):
        return base @ maps["proj"][head_key(kind, head)][0]

    if site.kind in ("q", "k", "v"):
        return head_dir(site.kind, site.head)
    group = ad.n_heads // ad.n_kv_heads
    if site.kind == "z":
        return head_dir("v", site.head // group)
    dirs = []
    for h in range(ad.n_heads):
        d = head_dir("v", h // group) @ maps["W_O"][ad.channels("z", h)]
        dirs.append(d * maps["post"][0] if maps["post"] is not None else d)
    return torch.stack(dirs)


class EagerAttention:
    """``with EagerAttention(model, needed):`` the model runs eager attention, which returns
    the pattern (a server's sdpa model does not), and gets its own back on exit. Plain
    Python, so kernels that use it ship to a server."""

    def __init__(self, model, needed: bool = True):
        self.hf, self.needed = model._module, needed

    def __enter__(self):
        self.impl = self.hf.config._attn_implementation
        if self.needed and self.impl != "eager":
            self.hf.set_attn_implementation("eager")
        return self

    def __exit__(self, *exc):
        if self.hf.config._attn_implementation != self.impl:
            self.hf.set_attn_implementation(self.impl)
