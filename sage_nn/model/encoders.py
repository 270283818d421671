"""An SAE as plain data and plain functions: what a request carries of an SAE, and what runs
of it on a server.

:class:`~sage_nn.dictionaries.saes.SparseAutoencoder` keeps the weights and the API here;
``sae.encoder()`` is the plain form a read needs (a dict of tensors and settings, without
the decoder but for its row norms where the codes need them), ``sae.plain()`` adds the
decoder for a request that rebuilds activations, and :func:`encode`, :func:`decode_affine`,
:func:`decode` and :func:`reconstruct` are its maths, the same functions here and in a
request. The maths follow sae_lens 6.54 exactly,
for every activation of :data:`~sage_nn.common.formats.SAE_ARCHITECTURES`: the input step
(``center``, ``normalize``, ``apply_b_dec_to_input``), then the activation by name.
"""

from __future__ import annotations

import torch


def prepare(enc: dict, x: torch.Tensor):
    """Input as sae_lens sees it, and the (scale, shift) that undo it after decoding."""
    x = x.to(enc["W_enc"].dtype)
    shift = torch.zeros_like(x[..., :1])
    if enc["center"]:
        shift = x.mean(-1, keepdim=True)
        x = x - shift
    scale = torch.ones_like(x[..., :1])
    if enc["normalize"] == "constant_norm_rescale":
        scale = x.norm(dim=-1, keepdim=True) / enc["W_enc"].shape[0] ** 0.5
        x = x / scale
    elif enc["normalize"] == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
        scale, shift = std, shift + mu
    return x, scale, shift


def encode(enc: dict, x: torch.Tensor) -> torch.Tensor:
    """Latent activations [..., d_sae] of inputs [..., d_in]."""
    x, _, _ = prepare(enc, x)
    if enc["apply_b_dec_to_input"]:
        x = x - enc["b_dec"]
    activation = enc["activation"]
    if activation == "relu":
        return torch.relu(x @ enc["W_enc"] + enc["b_enc"])
    if activation == "jumprelu":
        pre = x @ enc["W_enc"] + enc["b_enc"]
        return torch.relu(pre) * (pre > enc["threshold"]).to(pre.dtype)
    if activation == "gated":
        active = (x @ enc["W_enc"] + enc["b_gate"] > 0).to(x.dtype)
        return active * torch.relu(x @ (enc["W_enc"] * enc["r_mag"].exp()) + enc["b_mag"])
    if activation in ("topk", "abstopk"):
        pre = x @ enc["W_enc"] + enc["b_enc"]
        if enc["dec_norm"] is not None:  # sae_lens's rescale_acts_by_decoder_norm
            pre = pre * enc["dec_norm"]
        if activation == "topk":
            values, indices = torch.topk(pre, k=enc["k"], dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        # top k by magnitude, signs kept (no ReLU)
        indices = torch.topk(pre.abs(), k=enc["k"], dim=-1, sorted=False).indices
        return torch.zeros_like(pre).scatter(-1, indices, pre.gather(-1, indices))
    if activation == "matching_pursuit":
        return matching_pursuit(enc, x)
    raise ValueError(f"unknown SAE activation {activation!r}")


def matching_pursuit(enc: dict, x: torch.Tensor) -> torch.Tensor:
    """sae_lens's greedy matching pursuit over the (tied) dictionary rows ``W_enc.T``."""
    W = enc["W_enc"].T  # [d_sae, d_in]: the decoder
    shape = x.shape
    residual = x.reshape(-1, shape[-1]).clone()
    acts = residual.new_zeros(residual.shape[0], W.shape[0])
    prev = torch.zeros_like(acts, dtype=torch.bool)
    done = torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
    stop_duplicate, threshold = enc["stop_on_duplicate_support"], enc["residual_threshold"]
    for _ in range(enc["max_iterations"] or W.shape[1]):
        index = (residual @ W.T).relu().max(dim=1, keepdim=True).indices
        row = W[index.squeeze(1)]
        values = (residual * row).sum(-1, keepdim=True).relu() * (~done)[:, None].to(x.dtype)
        acts = acts.scatter_add(1, index, values)
        residual = residual - values * row
        support = acts != 0
        if stop_duplicate:
            done = done | (support == prev).all(dim=1)
            prev = support
        if threshold > 0:
            done = done | (residual.norm(dim=-1) < threshold)
        if (stop_duplicate or threshold > 0) and done.all():
            break
    return acts.reshape(*shape[:-1], W.shape[0])


def decode_affine(enc: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(scale [..., 1], shift [..., 1])`` of the input normalisation/centring
    (identity for a transcoder: sae_lens does not undo it at another site)."""
    _, scale, shift = prepare(enc, x)
    if enc["transcoder"]:
        return torch.ones_like(scale), torch.zeros_like(shift)
    return scale, shift


def decode(sae: dict, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction from latents (``sae``: the plain SAE with its ``decoder``, the
    effective one); ``x`` (the input) undoes the input normalisation and feeds a skip
    transcoder's skip path."""
    out = codes.to(sae["decoder"].dtype) @ sae["decoder"] + sae["b_dec"]
    if sae["undo"]:
        scale, shift = decode_affine(sae, x)
        out = out * scale + shift
    if sae["W_skip"] is not None:
        out = out + x.to(sae["W_skip"].dtype) @ sae["W_skip"].T
    return out


def reconstruct(sae: dict, x: torch.Tensor) -> torch.Tensor:
    """``decode(encode(x), x)`` in ``x``'s dtype: the SAE's forward."""
    return decode(sae, encode(sae, x), x).to(x.dtype)
