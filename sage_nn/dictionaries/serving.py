"""Which residual SAEs serve which sites: directly, as the residual that feeds a sublayer
site (input mode), or as the two residuals around attn_out/mlp_out (difference mode)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    pass
log = logging.getLogger("sage_nn")


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
    inverse of :func:`residual_sites_for`. SAEs at other kinds serve nothing here."""
    from ..model.sites import ATTN_KINDS, RESID_KINDS, parse_site

    keys = set()
    for name in sites:
        layer, kind, _ = parse_site(name)
        if kind in RESID_KINDS:
            keys.add(residual_key(layer, kind, n_layers))
    served = set()
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
