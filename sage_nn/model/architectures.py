"""Where a decoder-only transformer keeps each canonical site, read off the model itself.

:func:`derive` finds, from a model's module tree and one probe forward of a few tokens:

- the decoder layers (the module list with one entry per layer);
- in each layer, the attention module, its q/k/v projections (separate, or fused with the
  layout the probe identifies: ``blocks`` = [q | k | v], ``grouped`` = per KV group
  [q_1 .. q_G | k | v], which is GPT-NeoX's per-head layout when G = 1), its output
  projection (whose input is the heads' z), heads, KV heads and head width;
- the MLP (dense or mixture-of-experts: it stays one site);
- the norms by what they read and feed: before attention, before the MLP (reading
  ``resid_mid``, or ``resid_pre`` in a parallel block), after either sublayer (sandwich).

One module because deriving, the probe forward, the tiny twins a remote model is probed
through and the checks before weights load all read the same structure.

Nothing here branches on the family's name. What a structure cannot show is data:
:data:`REFUSED` says why families that are not decoder-only transformers are refused, so
the refusal comes before any weights load (:func:`check_config`).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported in each function that uses it, not at the top: importing this module
# (sites.py does) stays light, so the CLI's help, task list and input
# checks do not wait for torch. A relative import would not do: these functions also run
# on a server as shipped source, where sage_nn cannot be imported.

#: Families refused by name, with the reason (checked before weights load). Anything else
#: is derived from its structure and refused with the reason derivation finds.
REFUSED = {
    **dict.fromkeys(
        ["mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma"],
        "recurrent or state-space layers, not attention: there are no heads or attention "
        "sublayer to evaluate at"),
    **dict.fromkeys(
        ["jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h",
         "lfm2", "lfm2_moe", "lfm3", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text",
         "qwen4_exp_text", "olmo_hybrid", "bailing_hybrid", "minimax", "kimi_linear"],
        "hybrid: some layers are state-space, convolution or linear-attention layers, "
        "which have no softmax heads; sites would differ from layer to layer"),
}

#: Names under which decoder blocks keep their parts (first match wins). Lists of names are
#: data: a new spelling is one more entry here.
ATTENTION = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention",
             "mixer")
# the MLP, or its output projection where the layer holds the MLP's parts itself (OPT)
MLP = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "mlp_block", "fc2")
Q = ("q_proj", "query", "q", "wq", "Wq", "q_lin")
K = ("k_proj", "key", "k", "wk", "Wk", "k_lin")
V = ("v_proj", "value", "v", "wv", "Wv", "v_lin")
QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv")
O = ("o_proj", "c_proj", "dense", "out_proj", "o", "wo", "Wo", "out_lin")


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    """Module paths (relative to a block, or to its attention for projections) and sizes.

    ``mid_norm`` names the module whose input is ``resid_mid`` (the pre-MLP norm, or the
    MLP itself when it has none); it is ``None`` in parallel blocks. ``*_tuple`` say
    whether a module returns a tuple whose first element is the hidden state.
    """

    name: str
    layers: str
    attn: str
    qkv: str  # "separate", "blocks" or "grouped"
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp: str
    attn_norm: str | None
    mlp_norm: str | None
    mid_norm: str | None
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    parallel: bool = False
    n_layers: int = 0
    d_model: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    block_tuple: bool = False
    attn_tuple: bool = True
    mlp_tuple: bool = False
    norm_kinds: dict = field(default_factory=dict, compare=False)  # name -> "layer" | "rms"
    features: tuple = ()  # descriptive: moe, qk_norm, sliding_window, softcap, ...
    # nnsight's name for the call inside the attention's forward that gets queries, keys,
    # values and the mask (transformers' attention_interface): the clean pattern is
    # recomputed from its inputs (sage_nn.model.linear.pattern_rows); None: not found
    attention_call: str | None = None

    def plain(self) -> dict:
        """The same facts as plain data: what a request carries to a server (a dataclass
        would travel as bytecode, which another Python version cannot run)."""
        import dataclasses

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# -- before the weights load ------------------------------------------------------------

def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def check_config(config: Any, name: str = "") -> None:
    """Refuse, before any weights load, a model that is not a decoder-only transformer."""
    what = f"model {name!r} has architecture {getattr(config, 'model_type', None)!r}, which"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{what} is an encoder-decoder: sage_nn evaluates decoder-only causal LMs, whose "
            "residual stream runs straight from the embeddings to the logits")
    if text_config(config) is not config:
        config = text_config(config)
    reason = REFUSED.get(getattr(config, "model_type", None))
    if reason:
        raise UnsupportedArchitectureError(f"{what} sage_nn does not support: {reason}")


# -- from the module tree -------------------------------------------------------------------

def _child(module: torch.nn.Module, names) -> str | None:
    import torch

    for name in names:
        if isinstance(getattr(module, name, None), torch.nn.Module):
            return name
    return None


def _layers(hf: torch.nn.Module, n_layers: int) -> str:
    import torch

    lists = [name for name, m in hf.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and name]
    if not lists:
        raise UnsupportedArchitectureError(
            f"no list of {n_layers} decoder layers in {type(hf).__name__}")
    return min(lists, key=lambda n: (n.count("."), n))


def _attention_parts(attn: torch.nn.Module) -> dict:
    """Projection paths relative to the attention module: its children, or those of the
    one module it wraps (GPT-Neo's ``attn.attention``)."""
    for prefix, inner in [("", attn)] + [(f"{n}.", m) for n, m in attn.named_children()]:
        fused = _child(inner, QKV)
        q, k, v = (_child(inner, names) for names in (Q, K, V))
        o = _child(inner, O)
        if o is not None and (fused or (q and k and v)):
            return dict(q_proj=prefix + (fused or q), k_proj=prefix + (fused or k),
                        v_proj=prefix + (fused or v), o_proj=prefix + o, fused=bool(fused))
    children = ", ".join(n for n, _ in attn.named_children()) or "none"
    raise UnsupportedArchitectureError(
        f"its attention ({type(attn).__name__}, children: {children}) has no per-head "
            "q/k/v projections and output projection (e.g. multi-head latent attention)")


# -- one probe forward ----------------------------------------------------------------------

def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _same(a, b, tol=1e-4) -> bool:
    import torch

    a, b = _first(a), _first(b)
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return False
    return bool((a.float() - b.float()).abs().max() <= tol * (1 + b.float().abs().max()))


def norm_kind(module: torch.nn.Module, x: torch.Tensor) -> str:
    """``layer`` if the norm ignores a shift of its input (it centres), else ``rms``."""
    import torch

    with torch.no_grad():
        return "layer" if _same(module(x + 3.0), module(x), 1e-3) else "rms"


def _is_norm(module: torch.nn.Module) -> bool:
    import torch

    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or \
        "norm" in type(module).__name__.lower()


def _probe(hf: torch.nn.Module, layers: str, attn: str, parts: dict, mlp: str) -> tuple:
    """``(seen, modules)``: ``seen[part] = (first input, output, kwargs)`` of every part of
    layer 0 (the layer, its attention and projections, MLP and norms) in one forward over
    a few tokens."""
    import torch

    block = _get(hf, layers)[0]
    seen, handles = {}, []

    def hook(name):
        def record(module, args, kwargs, output):
            first = args[0] if args else next(iter(kwargs.values()), None)
            seen[name] = (first, output, kwargs)
        return record

    named = {"block": block, "attn": getattr(block, attn), "mlp": getattr(block, mlp),
             "o": _get(getattr(block, attn), parts["o_proj"]),
             "q": _get(getattr(block, attn), parts["q_proj"]),
             "k": _get(getattr(block, attn), parts["k_proj"]),
             "v": _get(getattr(block, attn), parts["v_proj"])}
    for name, module in block.named_children():
        if name not in (attn, mlp) and _is_norm(module):
            named[f"child:{name}"] = module
    for name, module in named.items():
        handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    config = text_config(hf.config)
    vocab = getattr(config, "vocab_size", 64)
    ids = torch.arange(10, 24).reshape(2, 7) % vocab  # two rows: batch-shaped outputs show
    impl = getattr(hf.config, "_attn_implementation", None)
    try:
        if impl not in (None, "eager"):
            hf.set_attn_implementation("eager")  # so the attention returns its pattern
        with torch.no_grad():
            hf(input_ids=ids.to(next(hf.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        if impl not in (None, "eager"):
            hf.set_attn_implementation(impl)
    return seen, named


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _qkv_layout(seen, parts, n_heads, d_head) -> tuple[str | None, int]:
    """``("separate" or None if fused, number of KV heads)`` from the projections' widths."""
    widths = {k: _first(seen[k][1]).shape[-1] for k in "qkv"}
    if not parts["fused"]:
        if widths["q"] != n_heads * d_head:
            raise UnsupportedArchitectureError(
                f"its q projection is {widths['q']} wide, not heads x z's head width = "
                f"{n_heads} x {d_head} (q/k heads of another width than v heads, or a "
                "gated query)")
        return "separate", widths["k"] // d_head
    return None, (widths["q"] - n_heads * d_head) // (2 * d_head)


def derive(hf: torch.nn.Module) -> Architecture:
    """The :class:`Architecture` of a HuggingFace causal LM with real (not meta) weights."""
    import torch

    config = text_config(hf.config)
    name = getattr(config, "model_type", type(hf).__name__)
    check_config(hf.config, name)
    n_layers = config.num_hidden_layers
    layers = _layers(hf, n_layers)
    blocks = _get(hf, layers)
    attn, mlp = _child(blocks[0], ATTENTION), _child(blocks[0], MLP)
    if attn is None or mlp is None:
        missing = "attention" if attn is None else "MLP"
        children = ", ".join(n for n, _ in blocks[0].named_children())
        raise UnsupportedArchitectureError(
            f"its layers ({type(blocks[0]).__name__}, children: {children}) have no {missing} "
            "module sage_nn recognizes")
    parts = _attention_parts(getattr(blocks[0], attn))
    for i, block in enumerate(blocks):
        if type(block) is not type(blocks[0]) or not hasattr(block, attn):
            raise UnsupportedArchitectureError(
                f"hybrid: layer {i} ({type(block).__name__}) differs from layer 0 "
                f"({type(blocks[0]).__name__})")
    seen, named = _probe(hf, layers, attn, parts, mlp)
    x, y = seen["block"][0], _first(seen["block"][1])
    a, m = _first(seen["attn"][1]), _first(seen["mlp"][1])
    norms = {n.split(":", 1)[1]: (seen[n][0], _first(seen[n][1])) for n in seen
             if n.startswith("child:") and torch.is_tensor(seen[n][0])}

    def find(t, end):  # the norm whose input (end 0) or output (end 1) is t: the very
        # tensor first, since freshly initialised norms compute equal values
        return next((n for n, io in norms.items() if io[end] is t), None) or \
            next((n for n, io in norms.items() if _same(io[end], t)), None)

    reading = lambda t: find(t, 0)  # noqa: E731
    feeding = lambda t: find(t, 1)  # noqa: E731

    for what, t in (("attention", a), ("MLP", m)):
        if not torch.is_tensor(t) or t.shape != x.shape:
            raise UnsupportedArchitectureError(
                f"its {what} returns {getattr(t, 'shape', type(t).__name__)}, not the "
                f"residual's [batch, tokens, d_model] {tuple(x.shape)}")
    attn_post = reading(a)
    c_a = norms[attn_post][1] if attn_post else a
    mlp_post = reading(m)
    c_m = norms[mlp_post][1] if mlp_post else m
    mid = x + c_a
    mlp_in = seen["mlp"][0]
    mid_norm = reading(mid) or (mlp if _same(mlp_in, mid) else None)
    parallel = mid_norm is None
    if not _same(y, x + c_a + c_m, 1e-3):
        raise UnsupportedArchitectureError(
            "post-norm: the residual stream is normalized inside each layer" if feeding(y) else
            "its layer output is not its input plus its attention and MLP outputs (a "
            "sublayer that adds the residual itself, scaled residuals, or extra inputs)")
    if parallel and not (_same(mlp_in, x) or feeding(mlp_in) and _same(norms[feeding(mlp_in)][0], x)):
        raise UnsupportedArchitectureError("its MLP reads neither the residual after attention "
                                           "nor the layer's input")
    attn_in = seen["attn"][0]
    attn_norm = None if _same(attn_in, x) else feeding(attn_in)
    mlp_norm = feeding(mlp_in)
    # sizes from the structure: z is the output projection's input, [.., heads * d_head]
    n_heads = config.num_attention_heads
    z = seen["o"][0]
    d_head = z.shape[-1] // n_heads
    layout, n_kv = _qkv_layout(seen, parts, n_heads, d_head)
    arch = dict(name=name, layers=layers, attn=attn, mlp=mlp, qkv=layout or "blocks",
                q_proj=parts["q_proj"], k_proj=parts["k_proj"], v_proj=parts["v_proj"],
                o_proj=parts["o_proj"], attn_norm=attn_norm, mlp_norm=mlp_norm,
                mid_norm=None if parallel else mid_norm, attn_post_norm=attn_post,
                mlp_post_norm=mlp_post, parallel=parallel, n_layers=n_layers,
                d_model=x.shape[-1], n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head,
                block_tuple=isinstance(seen["block"][1], (tuple, list)),
                attn_tuple=isinstance(seen["attn"][1], (tuple, list)),
                mlp_tuple=isinstance(seen["mlp"][1], (tuple, list)),
                norm_kinds={n: norm_kind(named[f"child:{n}"], i) for n, (i, _) in norms.items()
                            if n in (attn_norm, mlp_norm, attn_post, mlp_post)},
                features=_features(config, getattr(blocks[0], attn), getattr(blocks[0], mlp)),
                attention_call=_attention_call(getattr(blocks[0], attn)))
    pattern = seen["attn"][1][1] if arch["attn_tuple"] and len(seen["attn"][1]) > 1 else None
    arch["qkv"] = _check_heads(seen, arch, pattern, candidates=[layout] if layout else
                               ["blocks", "grouped"])
    return Architecture(**arch)


def channel_index(arch: Architecture | dict, kind: str) -> torch.Tensor:
    """Indices of ``kind``'s heads in the last dim of its tensor, shape [heads, d_head]."""
    import torch

    get = arch.get if isinstance(arch, dict) else lambda k: getattr(arch, k)
    heads = get("n_kv_heads") if kind in "kv" else get("n_heads")
    dh, H, KV = get("d_head"), get("n_heads"), get("n_kv_heads")
    per_head = torch.arange(heads)[:, None] * dh + torch.arange(dh)
    if kind == "z" or get("qkv") == "separate":
        return per_head
    if get("qkv") == "blocks":  # [q (H heads) | k (KV heads) | v (KV heads)]
        return per_head + {"q": 0, "k": H * dh, "v": (H + KV) * dh}[kind]
    # grouped: per KV group g, [q_gG .. q_gG+G-1 | k_g | v_g]
    G = H // KV
    group = torch.arange(heads) // (G if kind == "q" else 1)
    slot = torch.arange(heads) % G if kind == "q" else torch.full((heads,), G + "kv".index(kind))
    return ((group * (G + 2) + slot) * dh)[:, None] + torch.arange(dh)


def _check_heads(seen, arch: dict, pattern, candidates) -> str:
    """The q/k/v layout for which each head's z is its attention pattern applied to its v
    (checked when the attention returns its pattern; else the first candidate)."""
    import torch

    if not torch.is_tensor(pattern):
        return candidates[0]
    v_all, z = _first(seen["v"][1]).float(), seen["o"][0].float()
    group = arch["n_heads"] // max(arch["n_kv_heads"], 1)
    for layout in candidates:
        trial = {**arch, "qkv": layout}
        try:
            v = v_all[..., channel_index(trial, "v")]  # [b, t, kv, dh]
        except IndexError:
            continue
        zs = torch.stack([pattern[:, h].float() @ v[:, :, h // group] for h in range(arch["n_heads"])], 2)
        if _same(zs.flatten(-2), z, 1e-3):
            return layout
    raise UnsupportedArchitectureError(
        "its heads' z are not their attention pattern applied to v (e.g. differential "
        "attention, or a projection layout sage_nn does not know)")


def _attention_call(attn: torch.nn.Module) -> str | None:
    """The last call in the attention's forward named ``attention_interface*``, as nnsight's
    ``.source`` names it (read from the forward's source, nothing is run or changed)."""
    from nnsight.intervention.source import SourceNotAvailable, instrument, module_body

    try:
        names = instrument(module_body(attn), lambda *args, **kwargs: None)[1].names
    except (SourceNotAvailable, OSError, TypeError):
        return None
    calls = [n for n in names if n.startswith("attention_interface")]
    return calls[-1] if calls else None


def _features(config, attn, mlp) -> tuple:
    found = []
    if any(n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") for n, _ in attn.named_children()):
        found.append("qk_norm")
    if (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)) \
            or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        found.append("sliding_window")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        found.append("softcap")
    if any("expert" in n.lower() for n, _ in mlp.named_modules()) or "moe" in type(mlp).__name__.lower():
        found.append("moe")
    return tuple(found)


# -- one derivation per model ------------------------------------------------------------

_DERIVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def architecture_of(hf: torch.nn.Module) -> Architecture:
    """:func:`derive` once per model, here (kept beside the model, never on it: a server's
    model is shared, and a request gets the facts as data). A model without weights here
    (remote, on the meta device) is probed through a tiny random twin built from its
    config."""
    arch = _DERIVED.get(hf)
    if arch is None:
        if any(p.device.type == "meta" for p in hf.parameters()):
            arch = _resized(derive(tiny_twin(hf.config)), text_config(hf.config), hf)
        else:
            arch = derive(hf)
        _DERIVED[hf] = arch
    return arch


def _in_out(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear, or of GPT-2's transposed Conv1D."""
    w = module.weight
    return (w.shape[0], module.nf) if hasattr(module, "nf") else (w.shape[1], w.shape[0])


def _resized(arch: Architecture, config, hf) -> Architecture:
    """The twin's structure with the real model's sizes, read off its (meta) weights."""
    import dataclasses

    attn = getattr(_get(hf, arch.layers)[0], arch.attn)
    n_heads = config.num_attention_heads
    d_head = _in_out(_get(attn, arch.o_proj))[0] // n_heads
    kv_width = _in_out(_get(attn, arch.k_proj))[1]
    n_kv = kv_width // d_head if arch.qkv == "separate" else \
        (kv_width - n_heads * d_head) // (2 * d_head)
    return dataclasses.replace(arch, n_layers=config.num_hidden_layers,
                               d_model=config.hidden_size, n_heads=n_heads, n_kv_heads=n_kv,
                               d_head=d_head)


# -- tiny random models of any family -----------------------------------------------------

#: Sizes of a tiny twin: every size-like config field that a family has is set to these.
TINY_SIZES = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, head_dim=8, vocab_size=128, max_position_embeddings=64,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, shared_expert_intermediate_size=32, ffn_hidden_size=64,
    rotary_dim=8, partial_rotary_factor=None, sliding_window=16,
    first_k_dense_replace=0, moe_layer_freq=None, layer_types=None, expert_layer_period=None,
)


TINY_MAX_PARAMETERS = 5_000_000


def tiny_config(model_type: str | Any, vocab_size: int = 128, n_layers: int = 2, **extra) -> Any:
    """A tiny config of ``model_type`` (or shrunk from a config): d_model 32, 4 heads,
    2 KV heads where the family has grouped-query attention, ``n_layers`` layers."""
    from transformers import AutoConfig

    if isinstance(model_type, str):
        config = text_config(AutoConfig.for_model(model_type))
    else:
        config = copy.deepcopy(text_config(model_type))
    sizes = {**TINY_SIZES, "vocab_size": vocab_size, "num_hidden_layers": n_layers, **extra}
    for key, value in sizes.items():
        have = hasattr(config, key) or key in getattr(config, "attribute_map", {})
        if not have:
            continue
        if key == "layer_types":
            old = getattr(config, key, None)
            value = list(old[:n_layers]) if old else old
        elif key == "partial_rotary_factor" or value is None:
            continue
        elif key == "head_dim" and getattr(config, key, None) is None:
            continue
        try:
            setattr(config, key, value)
        except Exception:  # a derived property (read-only on this family)
            pass
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, key):
            setattr(config, key, 1)
    return config


def tiny_twin(config: Any, seed: int = 0, **sizes) -> torch.nn.Module:
    """A randomly initialised tiny model of the same family as ``config`` (a config or a
    family name; ``sizes`` go to :func:`tiny_config`)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(config, **sizes)
    with torch.device("meta"):  # sizes first: some families keep large parts at any config
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    size = sum(p.numel() for p in skeleton.parameters())
    if size > TINY_MAX_PARAMETERS:
        raise ValueError(f"its tiny config still has {size:,} parameters")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
