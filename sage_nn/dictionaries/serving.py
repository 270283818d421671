"""Which residual SAEs serve which sites: directly, as the residual that feeds a sublayer
site (input mode), or as the two residuals around attn_out/mlp_out (difference mode); and
where a transcoder of an MLP reads and writes (it serves the ``mlp_out`` it writes)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    pass
log = logging.getLogger("sage_nn")

#: The MLP input side a transcoder of layer L may read, by TransformerLens hook inside block
#: L: the site it is read at, and what is taken of it ("site": the site itself;
#: "normalized": the MLP norm's centring and scaling without its weight, TransformerLens'
#: ``ln2.hook_normalized``). Any other name that maps to ``L.resid_mid`` reads it as is.
TRANSCODER_INPUTS = {"hook_mlp_in": ("resid_mid", "site"),
                     "hook_resid_mid": ("resid_mid", "site"),
                     "ln2.hook_normalized": ("resid_mid", "normalized")}
#: How a served-sites entry names a transcoder (by the site it writes): ``transcoder:L3.mlp_out``.
TRANSCODER_PREFIX = "transcoder:"

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def transcoder_sites(hook_in: str, hook_out: str | None, model: Any = None) -> dict:
    """Where a transcoder of the MLP reads and writes: ``{input_layer, input_kind,
    input_form, layer, kind}`` from its input hook (:data:`TRANSCODER_INPUTS`, or a name
    that maps to ``L.resid_mid``) and output hook (``L.mlp_out``; the input's layer when
    the config names none). Raises ValueError naming the hook and what is read."""
    from ..model.sites import parse_site

    match = _BLOCK_HOOK.match(str(hook_in).strip())
    if match and match.group(2) in TRANSCODER_INPUTS:
        layer, (kind, form) = int(match.group(1)), TRANSCODER_INPUTS[match.group(2)]
    else:
        try:
            layer, kind, _ = parse_site(hook_in, model)
        except ValueError:
            kind = None
        form = "site"
        if kind != "resid_mid":
            raise ValueError(
                f"transcoder input {hook_in!r}: sage_nn evaluates transcoders of the MLP, "
                f"reading {', '.join(f'blocks.L.{h}' for h in TRANSCODER_INPUTS)} (or a name "
                "of L.resid_mid); pass site= with one of those")
    out = (layer, "mlp_out")
    if hook_out:
        out = parse_site(hook_out, model)[:2]
        if out != (layer, "mlp_out"):
            raise ValueError(f"transcoder writing {hook_out!r} from {hook_in!r}: sage_nn "
                             f"evaluates transcoders of one MLP (blocks.{layer}.hook_mlp_out "
                             "from that layer's MLP input)")
    return {"input_layer": layer, "input_kind": kind, "input_form": form, "layer": out[0],
            "kind": out[1]}


def residual_sites_for(pairs: list[tuple], parallel: bool, mode: str = "input") -> list[str]:
    """Residual SAE sites that serve every cross-section site: directly, as the residual
    that feeds a sublayer site (input mode), or as the two residuals around attn_out/mlp_out
    (difference mode)."""
    from ..model.sites import ATTN_KINDS, RESID_KINDS

    needed = set()
    for site, _ in pairs:
        layer = site.layer
        if site.kind in RESID_KINDS:
            needed.add(f"L{layer}.{site.kind}")
        elif mode == "difference":
            needed |= ({f"L{layer}.resid_pre", f"L{layer}.resid_mid"} if site.kind == "attn_out"
                       else {f"L{layer}.resid_mid", f"L{layer}.resid_post"})
        elif site.kind in ATTN_KINDS or parallel:
            needed.add(f"L{layer}.resid_pre")
        else:
            needed.add(f"L{layer}.resid_mid")
    return sorted(needed, key=lambda s: (int(s[1:].split(".")[0]), s))


def residual_key(layer: int, kind: str, n_layers: int) -> tuple[int, str]:
    """One name per residual tensor: ``L.resid_post`` is ``L+1.resid_pre`` below the top."""
    if kind == "resid_post" and layer + 1 < n_layers:
        return layer + 1, "resid_pre"
    return layer, kind


def served_sites(sites: list[str], n_layers: int, parallel: bool | None,
                 mode: str = "input") -> set[tuple[int, str]]:
    """The ``(layer, kind)`` cross-section sites residual SAEs at ``sites`` (hook names or
    sage names) serve: their own residual tensor (under both its names), and in input mode
    the components it feeds (q/k/v/z/attn_out from ``L.resid_pre``; mlp_out from
    ``L.resid_mid``, or ``L.resid_pre`` in parallel blocks; ``parallel=None``: either);
    in difference mode attn_out/mlp_out where both residuals around them have an SAE. The
    inverse of :func:`residual_sites_for`. ``transcoder:L.mlp_out`` entries (transcoders)
    serve the site they write, and so do SAEs when all of them are at attn_out/mlp_out
    (evaluated at their own sites). SAEs at other kinds serve nothing here."""
    from ..model.sites import ATTN_KINDS, HEAD_KINDS, RESID_KINDS, parse_site

    keys, served = set(), set()
    plain = [n for n in sites if not str(n).startswith(TRANSCODER_PREFIX)]
    parsed = [parse_site(n)[:2] for n in plain]
    if parsed and all(k not in RESID_KINDS and k not in HEAD_KINDS for _, k in parsed):
        served |= set(parsed)  # SAEs all at attn_out/mlp_out are evaluated at those sites
    for name in sites:
        if str(name).startswith(TRANSCODER_PREFIX):  # a transcoder serves the site it writes
            served.add(parse_site(str(name)[len(TRANSCODER_PREFIX):])[:2])
            continue
        layer, kind, _ = parse_site(name)
        if kind in RESID_KINDS:
            keys.add(residual_key(layer, kind, n_layers))
    for layer, kind in keys:
        served.add((layer, kind))
        if kind == "resid_pre" and layer > 0:
            served.add((layer - 1, "resid_post"))
        if mode != "input" or layer >= n_layers:
            continue
        if kind == "resid_pre":
            served |= {(layer, k) for k in ATTN_KINDS}
            if parallel or parallel is None:
                served.add((layer, "mlp_out"))
        elif kind == "resid_mid" and not parallel:
            served.add((layer, "mlp_out"))
    if mode == "difference":
        top = (n_layers - 1, "resid_post")
        for layer in range(n_layers):
            if {(layer, "resid_pre"), (layer, "resid_mid")} <= keys:
                served.add((layer, "attn_out"))
            after = (layer + 1, "resid_pre") if layer + 1 < n_layers else top
            if {(layer, "resid_mid"), after} <= keys:
                served.add((layer, "mlp_out"))
    return served


def serving_sae(kind: str, mode: str = "input", parallel: bool | None = False) -> str | None:
    """The residual SAE(s) that serve cross-section sites of ``kind`` at layer L, as hook
    names (:func:`served_sites` read backwards); None where no residual SAE does."""
    from ..model.sites import ATTN_KINDS, RESID_KINDS

    if kind in RESID_KINDS:
        return f"blocks.L.hook_{kind}"
    if mode == "difference":
        return {"attn_out": "blocks.L.hook_resid_pre and blocks.L.hook_resid_mid",
                "mlp_out": "blocks.L.hook_resid_mid and blocks.L.hook_resid_post"}.get(kind)
    if kind in ATTN_KINDS or parallel:
        return "blocks.L.hook_resid_pre"
    return "blocks.L.hook_resid_mid" + (" (hook_resid_pre in parallel blocks)"
                                        if parallel is None else "")
