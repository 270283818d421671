"""The linear view of a model around a residual stream, with the norm scale and the
attention pattern frozen to the clean run's.

Plain torch on plain data: everything here but the settings read off modules runs inside a
request on a server, trusted or sandboxed (where the request holds only a meta copy of the
model and module calls run where the weights are):

- :func:`frozen_maps`, inside a trace, gets what the view needs of one layer by *calling*
  the model's own modules on inputs the trace supplies (the attention norm on constant
  vectors, the projections on the identity): no weight is read, so the maps are right
  wherever the weights are, and come back with the request (a few ``d_model x d_head``
  slices).
- :func:`pattern_rows` recomputes the clean attention pattern at the query tokens from
  the inputs of the attention's kernel call (queries, keys, mask, scaling: what
  ``arch["attention_call"]`` names), as eager attention computes it, whatever
  implementation the server's model runs.
- :func:`linear_codes` turns a residual SAE's codes of the residual feeding a layer into
  its codes and offsets at the layer's q/k/v/z/attn_out sites, from the reconstruction's
  inputs (:func:`take_inputs`: the residual rows the sites read, the pattern rows at the
  query tokens, a post-norm's scale). The same function runs on the server (the SAE's
  encoder uploaded) or here (those rows downloaded), so the two give the same numbers up
  to what transport rounds.

Sites are ``(layer, kind, head)`` keys here (:func:`~sage_nn.model.sites.site_key`).
"""

from __future__ import annotations

import torch

from . import encoders
from .sites import at_path, blocks_of, channels


# -- settings read off modules (attributes, not weights: a meta model has them) -----------

def norm_settings(module: torch.nn.Module, kind: str = "rms") -> tuple[str, float]:
    """``(kind, eps)`` of a norm module: ``"layer"`` for a LayerNorm, else ``kind``."""
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(module, a, None), float)), 1e-5)
    return ("layer" if isinstance(module, torch.nn.LayerNorm) else kind), float(eps)


def _settings(ad, model, layer: int, name: str | None):
    if not name:
        return None
    block = ad.blocks(getattr(model, "_module", model))[layer]
    return norm_settings(getattr(block, name), ad.arch.norm_kinds.get(name, "rms"))


def mlp_norm(ad, model, layer: int) -> tuple[str, float] | None:
    """``(kind, eps)`` of the norm before ``layer``'s MLP (``None``: the MLP reads the
    residual itself)."""
    return _settings(ad, model, layer, ad.arch.mlp_norm)


def attention_norms(ad, model, layer: int) -> tuple:
    """``(norm, post_norm)`` settings ``(kind, eps)`` of ``layer``'s attention (``None``
    where it has none)."""
    return (_settings(ad, model, layer, ad.arch.attn_norm),
            _settings(ad, model, layer, ad.arch.attn_post_norm))


def heads_read(arch: dict, sites) -> list[tuple[str, int]]:
    """The projection heads ``(kind, head)`` the linear view of ``sites`` (``(layer, kind,
    head)``) reads: q/k/v their own, z its value head, attn_out every value head."""
    group = arch["n_heads"] // arch["n_kv_heads"]
    heads = set()
    for _, kind, head in sites:
        if kind in ("q", "k", "v"):
            heads.add((kind, head))
        elif kind == "z":
            heads.add(("v", head // group))
        else:  # attn_out
            heads |= {("v", h // group) for h in range(arch["n_heads"])}
    return sorted(heads)


# -- norms -------------------------------------------------------------------------------

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


# -- what the view needs of the weights, from calls of the modules ---------------------------

def _like(module) -> torch.Tensor:
    return next(module.parameters(), torch.zeros(0))


def affine_of(module, d_in: int, cols=None, like: torch.Tensor | None = None):
    """``(W [d_in, d_out], b)`` of a linear module (Linear, or GPT-2's transposed Conv1D),
    from calls of it on the zero vector and the identity: no weight is read, so ``module``
    may be a module of a model whose weights are elsewhere (an envoy in a trace). Only the
    output columns ``cols`` when given. ``like``: a tensor on the module's device in its
    dtype (default: its first parameter, here)."""
    like = _like(module) if like is None else like
    with torch.no_grad():
        b = module(torch.zeros(1, d_in, dtype=like.dtype, device=like.device))[0]
        W = module(torch.eye(d_in, dtype=like.dtype, device=like.device)) - b
        if cols is not None:
            W, b = W[:, cols], b[cols]
    return W.float().contiguous(), b.float().contiguous()


def norm_weight(module, d: int, kind: str, eps: float,
                like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma, beta)`` with ``norm(x) = inv_scale(x) * centre(x) * gamma + beta``, from
    calls of the norm (so Gemma's ``1 + w`` convention needs no special case, and no weight
    is read). ``kind``/``eps``: :func:`norm_settings`."""
    like = _like(module) if like is None else like
    with torch.no_grad():
        v = torch.ones(d, dtype=like.dtype, device=like.device)
        if kind == "layer":
            v[1::2] = -1.0  # zero mean, unit variance
            beta = module(torch.ones(1, d, dtype=like.dtype, device=like.device))[0].float()
        else:
            beta = torch.zeros(d, device=like.device)
        gamma = (module(v[None])[0].float() - beta) / (v.float() * torch.rsqrt(
            torch.tensor(1 + eps)))
    return gamma, beta


def head_key(kind: str, head: int) -> str:
    return f"{kind}.{head}"


def frozen_maps(model, arch: dict, layer: int, heads, attn_out: bool, norm, post_norm,
                like: torch.Tensor) -> dict:
    """What the linear view of ``layer`` needs of the weights, from calls of the layer's
    modules (a kernel runs this inside a trace, on the server): the attention norm's
    ``gamma``/``beta``, the projection columns ``proj["v.3"] = (W [d_model, d_head], b)``
    of ``heads`` (``(kind, head)`` pairs), and with ``attn_out`` the output projection
    and post-norm weights. ``norm``/``post_norm``: their settings (:func:`attention_norms`);
    ``like``: a tensor of the model's (its device and dtype)."""
    block = blocks_of(model, arch)[layer]
    attn = getattr(block, arch["attn"])
    d = arch["d_model"]
    if norm is not None:
        gamma, beta = norm_weight(getattr(block, arch["attn_norm"]), d, *norm, like=like)
    else:  # attention reads the residual itself
        gamma, beta = torch.ones(d, device=like.device), torch.zeros(d, device=like.device)
    proj = {head_key(k, h): affine_of(at_path(attn, arch[f"{k}_proj"]), d,
                                      channels(arch, k, h), like) for k, h in heads}
    maps = {"layer_norm": norm is not None and norm[0] == "layer", "gamma": gamma,
            "beta": beta, "proj": proj, "W_O": None, "b_O": None, "post": None}
    if attn_out:
        maps["W_O"], maps["b_O"] = affine_of(at_path(attn, arch["o_proj"]),
                                             arch["n_heads"] * arch["d_head"], None, like)
        if post_norm is not None:
            maps["post"] = norm_weight(getattr(block, arch["attn_post_norm"]), d, *post_norm,
                                       like=like)
    return maps


# -- the clean pattern, from the attention's own inputs -------------------------------------

def attention_call(model, arch: dict, layer: int):
    """Inside a trace: ``layer``'s attention kernel call (``arch["attention_call"]``), whose
    ``.inputs`` are ``(args, kwargs)``: queries, keys, values, mask, scaling. Ask for it
    before the attention runs (nnsight instruments the forward then); read its inputs
    before the layer's ``z``."""
    attn = getattr(blocks_of(model, arch)[layer], arch["attn"])
    return getattr(attn.source, arch["attention_call"])


def pattern_rows(call, cols: torch.Tensor, heads, n_heads: int, start: int = 0) -> dict:
    """The clean attention pattern of ``heads`` at the query tokens ``cols [b, m]`` (``{h:
    [b, m, T]}``), from the attention call's inputs ``call.inputs = (args, kwargs)``: queries
    ``[B, H, T, d]``, keys ``[B, KV, T, d]``, the mask (additive, boolean, or ``None`` for
    causal), ``scaling``, a ``softcap`` and sinks (``s_aux``), as eager attention computes
    them; for the batch's ``b`` rows from ``start``."""
    args, kwargs = call.inputs
    query, key, mask = args[1], args[2], args[4] if len(args) > 4 else kwargs.get("attention_mask")
    b, T = len(cols), key.shape[2]
    query, key = query[start:start + b], key[start:start + b]
    if mask is not None and mask.shape[0] > 1:
        mask = mask[start:start + b]
    rows = torch.arange(b, device=cols.device)[:, None]
    heads = list(heads)
    group = n_heads // key.shape[1]
    q = query[:, heads][rows, :, cols].float()  # [b, m, h, d]
    k = key[:, [h // group for h in heads]].float()  # [b, h, T, d]
    scaling = kwargs.get("scaling")
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    scores = torch.einsum("bmhd,bhtd->bmht", q, k) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:  # causal
        allowed = torch.arange(T, device=cols.device)[None, None, :] <= cols[:, :, None]
        scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    else:
        m = mask.expand(b, *mask.shape[1:])[rows, 0, cols][..., -T:]  # [b, m, T]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m[:, :, None, :], float("-inf"))
        else:
            scores = scores + m[:, :, None, :].float()
    sinks = kwargs.get("s_aux")  # a learned logit per head that attends to nothing
    if sinks is not None:
        sink = sinks.float()[heads].reshape(1, 1, -1, 1).expand(*scores.shape[:-1], 1)
        P = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    else:
        P = scores.softmax(-1)  # [b, m, h, T]
    # each its own copy: a view would carry every head's rows back from a server
    return {h: P[:, :, i].clone() for i, h in enumerate(heads)}


# -- the reconstruction's inputs, and the codes at the sites --------------------------------

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


def take_inputs(r, pattern, o_out, mask, cols, post_norm=None) -> dict:
    """What :func:`linear_codes` reads of the clean run at one layer, from its residual
    ``r [b, T, d]``, the pattern rows at the query tokens ``cols [b, m]`` (``pattern``:
    :func:`pattern_rows`, or ``None``) and the output projection's output ``o_out [b, T,
    d]`` (inside a trace too): the residual at the ``mask`` tokens (``r [n_tokens,
    d_model]``), the pattern rows, and with ``post_norm`` (a post-norm's ``(kind, eps)``)
    its scale of the attention output there (``post [b, m, 1]``)."""
    rows = torch.arange(len(cols), device=cols.device)[:, None]
    out = {"r": r[mask]}
    if pattern:
        out["pattern"] = pattern
    if post_norm is not None:
        out["post"] = inv_scale(o_out[rows, cols], *post_norm)
    return out


def linear_codes(arch: dict, enc: dict, norm, taken: dict, mask, cols, maps: dict,
                 sites) -> dict:
    """Site codes and offsets of q/k/v/z/attn_out ``sites`` (``(layer, kind, head)``) of
    one layer at the query tokens ``cols [b, m]``, from the clean run alone (``taken``:
    :func:`take_inputs` at the ``mask`` tokens) and the layer's ``maps``
    (:func:`frozen_maps`). ``enc``: the residual SAE's plain encoder
    (:mod:`~sage_nn.model.encoders`). With the norm scale and pattern frozen to the clean
    run's, ``codes @ directions + offset`` (summed over heads for attn_out;
    :func:`site_directions`) is the site recomputed from the SAE's reconstruction of the
    residual. ``norm``: the attention norm's ``(kind, eps)`` (``None``: attention reads the
    residual itself). Returns ``{site: (codes [b, m, L] (attn_out: [b, m, H, L]), offset
    [b, m, width])}``."""
    r = taken["r"].float()
    b = len(cols)
    scale, shift = encoders.decode_affine(enc, r)
    s = torch.ones_like(r[..., :1]) if norm is None else inv_scale(r, *norm)
    eff = scale.float() * s  # [n, 1] per-token factor on the codes
    codes = encoders.encode(enc, r).float() * eff  # [n_tokens, L]
    bias_r = scale.float() * enc["b_dec"].float() + shift.float()  # the reconstruction's offset
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

    group = arch["n_heads"] // arch["n_kv_heads"]
    rows = torch.arange(b, device=cols.device)[:, None]
    out = {}
    for site in sites:
        _, kind, head = site
        if kind in ("q", "k", "v"):
            at = index[rows, cols]
            out[site] = (codes[at], head_offset(kind, head)[at])
        elif kind == "z":
            P = mixed(head)
            out[site] = (P @ codes, P @ head_offset("v", head // group))
        else:  # attn_out: each head's codes, and the offset through W_O
            per_head, off = [], maps["b_O"].clone()
            for h in range(arch["n_heads"]):
                P = mixed(h)
                per_head.append(P @ codes)
                off = off + (P @ head_offset("v", h // group)) @ maps["W_O"][channels(arch, "z", h)]
            per_head = torch.stack(per_head, -2)
            if maps["post"] is not None:
                sp = taken["post"]  # [b, m, 1]
                per_head = per_head * sp[..., None]
                off = off * sp * maps["post"][0] + maps["post"][1]
            out[site] = (per_head, off)
    return out


def site_directions(arch: dict, maps: dict, decoder: torch.Tensor, site) -> torch.Tensor:
    """Each latent's decoder row (``decoder [L, d_model]``) pushed through ``site``'s frozen
    map (``maps``: :func:`frozen_maps` of its layer; ``site``: ``(layer, kind, head)``).
    q/k/v/z: ``[L, d_head]``; attn_out: ``[head, L, d_model]`` (latents reach attn_out
    through each head's own pattern)."""
    _, kind, head = site
    W_dec = decoder.float()
    if maps["layer_norm"]:
        W_dec = W_dec - W_dec.mean(-1, keepdim=True)
    base = W_dec * maps["gamma"]  # [L, d_model] after the frozen norm

    def head_dir(k, h):
        return base @ maps["proj"][head_key(k, h)][0]

    if kind in ("q", "k", "v"):
        return head_dir(kind, head)
    group = arch["n_heads"] // arch["n_kv_heads"]
    if kind == "z":
        return head_dir("v", head // group)
    dirs = []
    for h in range(arch["n_heads"]):
        d = head_dir("v", h // group) @ maps["W_O"][channels(arch, "z", h)]
        dirs.append(d * maps["post"][0] if maps["post"] is not None else d)
    return torch.stack(dirs)
