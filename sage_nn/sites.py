"""Canonical sites and the architecture adapters that find them in a model.

A site is ``(layer, kind[, head])``; its string form is ``L9.resid_pre`` or ``L9.z.h3``.
An :class:`Architecture` maps each kind to the tensor nnsight exposes while the model
runs, so reading a site is slicing that tensor and writing it is an in-place assignment.
Within a block, kinds are listed in execution order (nnsight requires accesses in that
order inside one invoke).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch

#: Kinds in the order the forward pass produces them inside one block.
KINDS = ("resid_pre", "q", "k", "v", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
HEAD_KINDS = frozenset({"q", "k", "v", "z"})
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")

_SITE_RE = re.compile(r"^L(\d+)\.([a-z_]+)(?:\.h(\d+))?$")
# sae_lens/TransformerLens hook names: ``blocks.8.hook_resid_post`` is ``L8.resid_post``;
# q/k/v/z hooks hold every head of a layer, so as sites they need a head (``L8.z.h3``)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.((?:attn\.)?hook_[a-z_]+)$")
_HOOK_KINDS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid",
               "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
               "hook_mlp_out": "mlp_out", "attn.hook_q": "q", "attn.hook_k": "k",
               "attn.hook_v": "v", "attn.hook_z": "z"}


@dataclass(frozen=True)
class Site:
    """One place in the model: ``layer``, ``kind`` and, for q/k/v/z, ``head``."""

    layer: int
    kind: str
    head: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if (self.kind in HEAD_KINDS) != (self.head is not None):
            need = "needs a head (e.g. L3.z.h0)" if self.kind in HEAD_KINDS else "takes no head"
            raise ValueError(f"site kind {self.kind!r} {need}")

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}" + (f".h{self.head}" if self.head is not None else "")

    @classmethod
    def parse(cls, text: "str | Site") -> "Site":
        """A site from ``L9.resid_pre`` / ``L9.z.h3`` or a sae_lens/TransformerLens hook name
        (``blocks.8.hook_resid_post`` is ``L8.resid_post``)."""
        if isinstance(text, Site):
            return text
        text = text.strip()
        hook = _HOOK_RE.match(text)
        if hook:
            return cls._from_hook(text, int(hook.group(1)), hook.group(2))
        match = _SITE_RE.match(text)
        if not match:
            raise ValueError(f"cannot parse site {text!r}; expected e.g. 'L9.resid_pre', "
                             "'L9.z.h3' or a hook name such as 'blocks.9.hook_resid_pre'")
        layer, kind, head = match.groups()
        return cls(int(layer), kind, None if head is None else int(head))

    @classmethod
    def _from_hook(cls, text: str, layer: int, hook: str) -> "Site":
        kind = _HOOK_KINDS.get(hook)
        if kind is None:
            raise ValueError(f"cannot parse site {text!r}: unknown hook {hook!r}; known: "
                             f"{', '.join(_HOOK_KINDS)}")
        if kind in HEAD_KINDS:  # one hook, every head: a site is one head
            raise ValueError(f"{text!r} holds every head of layer {layer}; a site is one "
                             f"head: name it L{layer}.{kind}.hN (e.g. L{layer}.{kind}.h0)")
        return cls(layer, kind)

    @property
    def hook_name(self) -> str:
        """The sae_lens/TransformerLens hook holding this site (``blocks.8.hook_resid_post``);
        for q/k/v/z the layer's all-heads hook (``blocks.8.attn.hook_z``), whose head
        dimension ``head`` indexes."""
        if self.kind in HEAD_KINDS:
            return f"blocks.{self.layer}.attn.hook_{self.kind}"
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def order(self) -> tuple:
        """Execution order: sort sites by this before accessing them in one trace."""
        return (self.layer, KINDS.index(self.kind), -1 if self.head is None else self.head)


def _path(envoy: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        envoy = getattr(envoy, part)
    return envoy


@dataclass(frozen=True)
class Architecture:
    """Where a decoder architecture keeps each canonical site (module paths per block).

    ``qkv`` is ``"separate"`` (q_proj/k_proj/v_proj), ``"gpt2"`` (one fused projection,
    [q | k | v]) or ``"neox"`` (one fused projection, per head [q_h | k_h | v_h]).
    """

    name: str
    layers: str
    attn: str
    qkv: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp: str
    mid_norm: str | None  # norm whose input is resid_mid; None for parallel blocks
    attn_post_norm: str | None = None  # Gemma 2 style: attn_out is this norm's output
    mlp_post_norm: str | None = None


ARCHITECTURES = {
    "gpt2": Architecture("gpt2", "transformer.h", "attn", "gpt2", "c_attn", "c_attn", "c_attn",
                         "c_proj", "mlp", "ln_2"),
    "gpt_neox": Architecture("gpt_neox", "gpt_neox.layers", "attention", "neox", "query_key_value",
                             "query_key_value", "query_key_value", "dense", "mlp", None),
    "llama": Architecture("llama", "model.layers", "self_attn", "separate", "q_proj", "k_proj",
                          "v_proj", "o_proj", "mlp", "post_attention_layernorm"),
    "gemma2": Architecture("gemma2", "model.layers", "self_attn", "separate", "q_proj", "k_proj",
                           "v_proj", "o_proj", "mlp", "pre_feedforward_layernorm",
                           attn_post_norm="post_attention_layernorm",
                           mlp_post_norm="post_feedforward_layernorm"),
}
for _name in ("qwen2", "mistral"):
    ARCHITECTURES[_name] = Architecture(**{**ARCHITECTURES["llama"].__dict__, "name": _name})


class UnsupportedArchitectureError(ValueError):
    pass


class SiteAdapter:
    """Canonical sites of one model: shapes, validation and live tensor access in a trace."""

    def __init__(self, config: Any):
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {model_type!r} is not supported; supported: "
                f"{', '.join(sorted(ARCHITECTURES))}. Add an Architecture entry in sage_nn/sites.py "
                "mapping its module paths to canonical sites."
            )
        self.arch = arch = ARCHITECTURES[model_type]
        self.config = config
        self.n_layers = config.num_hidden_layers
        self.d_model = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.d_head = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        neox_sequential = model_type == "gpt_neox" and not config.use_parallel_residual
        self.parallel = arch.mid_norm is None and not neox_sequential
        self._mid_norm = "post_attention_layernorm" if neox_sequential else arch.mid_norm
        self._channels = {kind: self._channel_index(kind) for kind in HEAD_KINDS}

    # -- shapes --------------------------------------------------------------
    def n_heads_of(self, kind: str) -> int:
        return self.n_kv_heads if kind in ("k", "v") else self.n_heads

    def head_dim(self, kind: str) -> str:
        """Name of the head dimension: ``kv_head`` for k/v under grouped-query attention."""
        return "kv_head" if kind in ("k", "v") and self.n_kv_heads != self.n_heads else "head"

    def width(self, kind: str) -> int:
        return self.d_head if kind in HEAD_KINDS else self.d_model

    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if not (k == "resid_mid" and self.parallel))

    def all_sites(self, kinds=None, layers=None) -> list[Site]:
        sites = []
        for layer in range(self.n_layers) if layers is None else layers:
            for kind in self.kinds() if kinds is None else kinds:
                if kind in HEAD_KINDS:
                    sites += [Site(layer, kind, h) for h in range(self.n_heads_of(kind))]
                else:
                    sites.append(Site(layer, kind))
        return sorted((self.check(s) for s in sites), key=lambda s: s.order)

    def check(self, site: "Site | str") -> Site:
        site = Site.parse(site)
        if not 0 <= site.layer < self.n_layers:
            raise ValueError(f"site {site}: layer {site.layer} out of range; this model has "
                             f"layers 0..{self.n_layers - 1}")
        if site.kind == "resid_mid" and self.parallel:
            raise ValueError(f"site {site}: {self.arch.name} has parallel attention and MLP, so "
                             "there is no resid_mid; use resid_pre, attn_out, mlp_out or resid_post")
        if site.head is not None and not 0 <= site.head < self.n_heads_of(site.kind):
            raise ValueError(f"site {site}: head {site.head} out of range; {site.kind} has "
                             f"heads 0..{self.n_heads_of(site.kind) - 1}")
        return site

    def same_tensor(self, a: "Site | str", b: "Site | str") -> bool:
        """Whether two sites name one tensor (``L.resid_post`` is ``L+1.resid_pre``)."""
        def canonical(site: Site) -> Site:
            if site.kind == "resid_post" and site.layer + 1 < self.n_layers:
                return Site(site.layer + 1, "resid_pre")
            return site

        return canonical(self.check(a)) == canonical(self.check(b))

    # -- live access (inside a trace) ----------------------------------------
    def _channel_index(self, kind: str) -> torch.Tensor:
        """Indices into the last dim of the kind's tensor, shape [heads, d_head]."""
        heads, dh = self.n_heads_of(kind), self.d_head
        per_head = torch.arange(heads)[:, None] * dh + torch.arange(dh)
        if kind == "z" or self.arch.qkv == "separate":
            return per_head
        offset = "qkv".index(kind)
        if self.arch.qkv == "gpt2":
            return per_head + offset * self.d_model
        # neox: per head [q_h | k_h | v_h]
        return torch.arange(heads)[:, None] * 3 * dh + offset * dh + torch.arange(dh)

    def channels(self, kind: str, heads: int | Sequence[int] | None = None) -> torch.Tensor | slice:
        """Last-dim indices of ``heads`` (one, several or all) of ``kind``, head-major."""
        if kind not in HEAD_KINDS:
            return slice(None)
        index = self._channels[kind]
        return index.flatten() if heads is None else index[heads].flatten()

    def tensor(self, model: Any, layer: int, kind: str) -> torch.Tensor:
        """The live tensor holding ``kind`` at ``layer`` ([batch, seq, channels]).

        Slicing it reads the site; assigning into it in place writes the site. For
        q/k/v/z, :meth:`channels` picks a head's slice of the last dim.
        """
        arch = self.arch
        block = _path(model, arch.layers)[layer]
        attn = getattr(block, arch.attn)
        if kind == "resid_pre":
            return block.input
        if kind in ("q", "k", "v"):
            return getattr(attn, getattr(arch, f"{kind}_proj")).output
        if kind == "z":
            return getattr(attn, arch.o_proj).input
        if kind == "attn_out":
            if arch.attn_post_norm:
                return getattr(block, arch.attn_post_norm).output
            return attn.output[0]
        if kind == "resid_mid":
            return getattr(block, self._mid_norm).input
        if kind == "mlp_out":
            if arch.mlp_post_norm:
                return getattr(block, arch.mlp_post_norm).output
            return getattr(block, arch.mlp).output
        if kind == "resid_post":
            return block.output
        raise ValueError(f"unknown site kind {kind!r}")

    def read(self, model: Any, layer: int, kind: str) -> torch.Tensor:
        """All heads of ``kind`` as [batch, seq, heads, d_head], or [batch, seq, d_model]."""
        t = self.tensor(model, layer, kind)
        if kind in HEAD_KINDS:
            t = t[..., self.channels(kind)].unflatten(-1, (self.n_heads_of(kind), self.d_head))
        return t

    def final_norm_and_unembed(self, model: Any):
        """The modules after the last block: (final norm, unembedding)."""
        inner = _path(model, self.arch.layers.rsplit(".", 1)[0])
        norm = getattr(inner, "ln_f", None) or getattr(inner, "final_layer_norm", None) \
            or getattr(inner, "norm")
        unembed = getattr(model, "lm_head", None) or getattr(model, "embed_out")
        return norm, unembed


def adapter(model: Any) -> SiteAdapter:
    """The :class:`SiteAdapter` for an nnsight (or HuggingFace) model."""
    return SiteAdapter(model.config)
