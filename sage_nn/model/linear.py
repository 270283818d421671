"""The linear view of a model around a residual stream: a norm's scale and weights, an
attention sublayer's projections as affine maps, and, with the norm scale and the attention
pattern frozen to the clean run's, the map from a residual vector to the q/k/v/z/attn_out
sites it feeds (:func:`linear_codes`). Plain torch, so it runs inside a trace and on a
server. :class:`EagerAttention` makes a model return its attention pattern."""

from __future__ import annotations

import torch


def norm_settings(module: torch.nn.Module, kind: str = "rms") -> tuple[str, float]:
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps", "epsilon")
                if isinstance(getattr(module, a, None), float)), 1e-5)
    return ("layer" if isinstance(module, torch.nn.LayerNorm) else kind), float(eps)


def inv_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The per-token factor a norm multiplies its (centred) input by, before its weight."""
    x = x.float()
    var = x.var(-1, unbiased=False, keepdim=True) if kind == "layer" else x.pow(2).mean(-1, True)
    return torch.rsqrt(var + eps)


def affine_of(module: torch.nn.Module, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d_in, d_out], b)`` of a linear module (Linear or GPT-2's Conv1D)."""
    with torch.no_grad():
        p = next(module.parameters())
        b = module(torch.zeros(1, d_in, dtype=p.dtype, device=p.device))[0]
        W = module(torch.eye(d_in, dtype=p.dtype, device=p.device)) - b
    return W.float(), b.float()


def norm_weight(module: torch.nn.Module, d: int,
                default: str = "rms") -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma, beta)`` with ``norm(x) = inv_scale(x) * centre(x) * gamma + beta``, read off
    the module itself (so Gemma's ``1 + w`` convention needs no special case)."""
    kind, eps = norm_settings(module, default)
    p = next(module.parameters(), torch.zeros(0))
    with torch.no_grad():
        v = torch.ones(d, dtype=p.dtype, device=p.device)
        if kind == "layer":
            v[1::2] = -1.0  # zero mean, unit variance
            beta = module(torch.ones(1, d, dtype=p.dtype, device=p.device))[0].float()
        else:
            beta = torch.zeros(d, device=p.device)
        gamma = (module(v[None])[0].float() - beta) / (v.float() * torch.rsqrt(torch.tensor(1 + eps)))
    return gamma, beta


def linear_codes(ad, spec: dict, r, pattern, o_out, rows, cols, sites) -> dict:
    """Site codes and offsets of q/k/v/z/attn_out ``sites`` at tokens ``(rows, cols)``
    (``rows = arange(b)[:, None]``, ``cols [b or 1, m]``), from the clean run alone: the clean
    residual ``r [b, T, d]`` feeding the layer, its attention ``pattern [b, H, T, T]``
    (z/attn_out) and o_proj output ``o_out`` (attn_out under a post-norm). With the norm
    scale and pattern frozen to the clean run's, ``codes @ directions + offset`` (summed
    over heads for attn_out) is the site recomputed from the SAE's reconstruction of ``r``:
    no second forward is needed. Plain torch, so it runs inside a trace and on a server.
    Returns ``{site: (codes [..., L] (attn_out: [..., H, L]), offset [..., width])}``."""
    sae, m = spec["sae"], spec["maps"]
    scale, shift = sae.decode_affine(r)
    r = r.float()
    if spec["norm"] is None:  # attention reads the residual itself
        s = torch.ones_like(r[..., :1])
    else:
        s = inv_scale(r, *spec["norm"])
    eff = scale.float() * s  # [b, T, 1] per-token factor on the codes
    codes = sae.encode(r).float() * eff
    bias_r = scale.float() * m["b_dec"] + shift.float()  # the reconstruction's offset
    if m["layer_norm"]:
        bias_r = bias_r - bias_r.mean(-1, keepdim=True)
    pre = s * bias_r * m["gamma"] + m["beta"]  # ... after the frozen norm

    def head_offset(kind, head):
        W, b = m["proj"][(kind, head)]
        return pre @ W + b  # [b, T, d_head]

    group = ad.n_heads // ad.n_kv_heads
    out = {}
    for site in sites:
        if site.kind in ("q", "k", "v"):
            out[site] = (codes[rows, cols], head_offset(site.kind, site.head)[rows, cols])
            continue
        P = pattern[rows, :, cols].float()  # [b, m, H, T]: the query tokens' pattern rows
        if site.kind == "z":
            v_off = head_offset("v", site.head // group)
            P = P[..., site.head, :]  # [..., T]
            out[site] = (P @ codes, P @ v_off)
            continue
        per_head = torch.stack([P[..., h, :] @ codes for h in range(ad.n_heads)], -2)
        off = m["b_O"].clone()
        for h in range(ad.n_heads):
            off = off + (P[..., h, :] @ head_offset("v", h // group)) @ m["W_O"][ad.channels("z", h)]
        if m["post"] is not None:
            sp = inv_scale(o_out.float(), *spec["post_norm"])[rows, cols]  # [..., 1]
            per_head = per_head * sp[..., None]
            off = off * sp * m["post"][0] + m["post"][1]
        out[site] = (per_head, off)
    return out


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
