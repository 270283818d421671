"""Canonical sites and the architecture adapters that find them in a model.

A site is ``(layer, kind[, head])``; its string form is ``L9.resid_pre`` or ``L9.z.h3``.
An :class:`Architecture` maps each kind to the tensor nnsight exposes while the model
runs, so reading a site is slicing that tensor and writing it is an in-place assignment.
Within a block, kinds are listed in execution order (nnsight requires accesses in that
order inside one invoke).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# architectures imports torch where it is used: Site, KINDS and parse_site serve the CLI's
# input checks without it. (No relative import inside a function here: a SiteAdapter is
# also built on a server from shipped source, where sage_nn cannot be imported.)
from .architectures import architecture_of, channel_index

if TYPE_CHECKING:
    import torch

#: Kinds in the order the forward pass produces them inside one block.
KINDS = ("resid_pre", "q", "k", "v", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
HEAD_KINDS = frozenset({"q", "k", "v", "z"})
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
#: Kinds computed from a layer's resid_pre inside the attention sublayer.
ATTN_KINDS = ("q", "k", "v", "z", "attn_out")

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
        return site_name((self.layer, self.kind, self.head))

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


def at_path(envoy: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


# -- live access inside a trace ---------------------------------------------------------
# Plain functions of the architecture's facts as plain data (:func:`spec`): they run inside
# requests on a server, which gets source and plain data, never a class of sage_nn's.

def n_heads_of(arch: dict, kind: str) -> int:
    return arch["n_kv_heads"] if kind in ("k", "v") else arch["n_heads"]


def width_of(arch: dict, kind: str) -> int:
    return arch["d_head"] if kind in HEAD_KINDS else arch["d_model"]


def channels(arch: dict, kind: str, heads: "int | Sequence[int] | None" = None):
    """Last-dim indices of ``heads`` (one, several or all) of ``kind``, head-major."""
    if kind not in HEAD_KINDS:
        return slice(None)
    index = channel_index(arch, kind)
    # a head's own copy: a view would carry every head's indices in a request
    return index.flatten() if heads is None else index[heads].flatten().clone()


def blocks_of(model: Any, arch: dict) -> Any:
    """The decoder layers (a module list) of ``model``."""
    return at_path(model, arch["layers"])


def site_tensor(model: Any, arch: dict, layer: int, kind: str) -> "torch.Tensor":
    """The live tensor holding ``kind`` at ``layer`` ([batch, seq, channels]).

    Slicing it reads the site; assigning into it in place writes the site. For q/k/v/z,
    :func:`channels` picks a head's slice of the last dim."""
    block = blocks_of(model, arch)[layer]
    attn = getattr(block, arch["attn"])
    if kind == "resid_pre":
        # past the first block, the output of the block before: the same tensor, but a
        # block's input comes with its keyword arguments (the key/value cache among them),
        # which a sandboxed request is sent with every read and gets back stale
        return site_tensor(model, arch, layer - 1, "resid_post") if layer > 0 else block.input
    if kind in ("q", "k", "v"):
        return at_path(attn, arch[f"{kind}_proj"]).output
    if kind == "z":
        return at_path(attn, arch["o_proj"]).input
    if kind == "attn_out":
        if arch["attn_post_norm"]:
            return getattr(block, arch["attn_post_norm"]).output
        return attn.output[0] if arch["attn_tuple"] else attn.output
    if kind == "resid_mid":
        return getattr(block, arch["mid_norm"]).input
    if kind == "mlp_out":
        if arch["mlp_post_norm"]:
            return getattr(block, arch["mlp_post_norm"]).output
        mlp = getattr(block, arch["mlp"])
        return mlp.output[0] if arch["mlp_tuple"] else mlp.output
    if kind == "resid_post":
        return block.output[0] if arch["block_tuple"] else block.output
    raise ValueError(f"unknown site kind {kind!r}")


def weightless(model: Any) -> bool:
    """Whether the code runs beside a copy of the model without weights: NDIF's sandbox,
    where a request's code runs in a process holding a meta copy and the forward runs
    elsewhere. There no backward pass runs, and ``tracer.stop()`` misbehaves (ndif 0.1.2)."""
    return next(model._module.parameters()).device.type == "meta"


def stop_after_reads(model: Any, tracer: Any) -> None:
    """Inside a trace, after its last read: stop the forward (the layers above and the
    logits are not needed), where that is safe. In NDIF's sandbox a stopped trace leaves
    every later trace of the same request stopped before it starts (ndif 0.1.2), so there
    the forward runs to its end."""
    if not weightless(model):
        tracer.stop()


def skip_blocks(model: Any, arch: dict, layers: int, hidden: "torch.Tensor") -> None:
    """Inside a trace: do not run blocks ``< layers``; block ``layers`` reads ``hidden``."""
    blocks = blocks_of(model, arch)
    for i in range(layers):
        blocks[i].skip((hidden,) if arch["block_tuple"] else hidden)


class SiteAdapter:
    """Canonical sites of one model: shapes and validation, here.

    Where each site lives is derived from the model's own structure
    (:func:`sage_nn.model.architectures.architecture_of`), once per model, here: a remote
    model is probed through a tiny twin of its config. ``spec`` is the same as plain data,
    what a request carries to the functions above.
    """

    def __init__(self, model: Any):
        hf = getattr(model, "_module", model)
        self.arch = arch = architecture_of(hf)
        self.spec = arch.plain()
        self.config = hf.config
        self.n_layers, self.d_model = arch.n_layers, arch.d_model
        self.n_heads, self.n_kv_heads, self.d_head = arch.n_heads, arch.n_kv_heads, arch.d_head
        self.parallel = arch.parallel

    # -- shapes --------------------------------------------------------------
    def n_heads_of(self, kind: str) -> int:
        return n_heads_of(self.spec, kind)

    def head_dim(self, kind: str) -> str:
        """Name of the head dimension: ``kv_head`` for k/v under grouped-query attention."""
        return "kv_head" if kind in ("k", "v") and self.n_kv_heads != self.n_heads else "head"

    def width(self, kind: str) -> int:
        return width_of(self.spec, kind)

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

    # -- live access (here, in a trace this process runs) ----------------------
    def channels(self, kind: str, heads: int | Sequence[int] | None = None) -> torch.Tensor | slice:
        return channels(self.spec, kind, heads)

    def blocks(self, model: Any) -> Any:
        return blocks_of(model, self.spec)

    def tensor(self, model: Any, layer: int, kind: str) -> torch.Tensor:
        return site_tensor(model, self.spec, layer, kind)

    def read(self, model: Any, layer: int, kind: str) -> torch.Tensor:
        """All heads of ``kind`` as [batch, seq, heads, d_head], or [batch, seq, d_model]."""
        t = self.tensor(model, layer, kind)
        if kind in HEAD_KINDS:
            t = t[..., self.channels(kind)].unflatten(-1, (self.n_heads_of(kind), self.d_head))
        return t

    def skip(self, model: Any, layers: int, hidden: torch.Tensor) -> None:
        skip_blocks(model, self.spec, layers, hidden)


def adapter(model: Any) -> SiteAdapter:
    """The :class:`SiteAdapter` for an nnsight (or HuggingFace) model."""
    return SiteAdapter(model)


def spec(model: Any) -> dict:
    """The model's architecture as plain data, for requests (:class:`SiteAdapter`.spec)."""
    return adapter(model).spec


def site_name(key: tuple) -> str:
    """``L9.z.h3`` of a ``(layer, kind, head)`` key (plain: it runs in requests too)."""
    layer, kind, head = key
    return f"L{layer}.{kind}" + (f".h{head}" if head is not None else "")


def site_key(site: "Site | str") -> tuple:
    """``(layer, kind, head)``: a site as plain data, for requests."""
    site = Site.parse(site)
    return (site.layer, site.kind, site.head)


# -- hook names and module paths -> canonical sites --------------------------------------

_TL_HOOKS = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_z": "z",
    "attn.hook_q": "q", "attn.hook_k": "k", "attn.hook_v": "v",
}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _hf_kinds(arch) -> dict[str, str]:
    """Module path inside a block (and .input/.output) -> kind."""
    table = {"": "resid_post", ".output": "resid_post", ".input": "resid_pre",
             f".{arch.attn}.{arch.o_proj}.input": "z",
             f".{arch.attn}": "attn_out", f".{arch.attn}.output": "attn_out",
             f".{arch.mlp}": "mlp_out", f".{arch.mlp}.output": "mlp_out"}
    if arch.qkv == "separate":
        for kind in "qkv":
            proj = getattr(arch, f"{kind}_proj")
            table[f".{arch.attn}.{proj}"] = table[f".{arch.attn}.{proj}.output"] = kind
    if arch.mid_norm:
        table[f".{arch.mid_norm}.input"] = "resid_mid"
    for norm, kind in ((arch.attn_post_norm, "attn_out"), (arch.mlp_post_norm, "mlp_out")):
        if norm:  # post-norm architectures: the sublayer's contribution is the norm's output
            table[f".{norm}"] = table[f".{norm}.output"] = kind
            table.pop(f".{arch.attn if kind == 'attn_out' else arch.mlp}", None)
            table.pop(f".{arch.attn if kind == 'attn_out' else arch.mlp}.output", None)
    return table


@functools.lru_cache(maxsize=1)
def _common_architectures() -> list:
    """Module layouts to read a HuggingFace path by when no model is given: those of the
    families whose module paths cover most checkpoints (Llama-like, GPT-2, GPT-NeoX)."""
    from .architectures import derive, tiny_twin

    return [derive(tiny_twin(family)) for family in ("llama", "gpt2", "gpt_neox")]


def parse_site(name: "str | Site", model: Any = None) -> tuple[int, str, list[int] | None]:
    """``(layer, kind, heads)`` of a sage site (``L5.z.h3``; ``L5.z`` = all heads), a TransformerLens hook name
    (``blocks.5.hook_resid_pre``, ``blocks.5.attn.hook_z``) or a HuggingFace module path
    (``model.layers.5``, ``model.layers.5.mlp``, ``transformer.h.5.attn.c_proj.input``).

    ``heads`` is ``None`` for d_model-wide kinds and for all-head q/k/v/z hooks (filled with
    every head once a model is known).
    """
    whole = re.match(r"^L(\d+)\.([qkvz])$", str(name).strip())  # all heads, e.g. L5.z
    if whole:
        kind = whole.group(2)
        heads = list(range(adapter(model).n_heads_of(kind))) if model is not None else None
        return int(whole.group(1)), kind, heads
    if isinstance(name, Site) or re.match(r"^L\d+\.", str(name)):
        site = Site.parse(name)
        return site.layer, site.kind, None if site.head is None else [site.head]
    text = str(name).strip()
    match = _TL_RE.match(text)
    if match and match.group(2) in _TL_HOOKS:
        kind = _TL_HOOKS[match.group(2)]
        heads = None
        if kind in HEAD_KINDS and model is not None:
            heads = list(range(adapter(model).n_heads_of(kind)))
        return int(match.group(1)), kind, heads
    archs = [adapter(model).arch] if model is not None else _common_architectures()
    for arch in archs:
        m = re.match(rf"^(?:model\.)?{re.escape(arch.layers)}\.(\d+)(.*)$", text) or \
            re.match(rf"^{re.escape(arch.layers.split('.', 1)[-1])}\.(\d+)(.*)$", text)
        if m and m.group(2) in _hf_kinds(arch):
            kind = _hf_kinds(arch)[m.group(2)]
            heads = None
            if kind in HEAD_KINDS and model is not None:
                heads = list(range(adapter(model).n_heads_of(kind)))
            return int(m.group(1)), kind, heads
    raise ValueError(
        f"cannot map {name!r} to a canonical site; use a sage site (L5.resid_pre), a "
        "TransformerLens hook name (blocks.5.hook_resid_pre, blocks.5.attn.hook_z, "
        "hook_resid_mid/post, hook_attn_out, hook_mlp_out) or a HuggingFace module path "
        "(model.layers.5, model.layers.5.mlp), or pass site= explicitly")
