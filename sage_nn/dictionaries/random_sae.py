"""The random-SAE control: an SAE's own architecture with random weights, encoded the same way.

:func:`random_sae` builds the sae_lens inference class of an SAE's architecture from its own
config class (``TopKSAE(TopKSAEConfig(...))``, ``JumpReLUSAE(JumpReLUSAEConfig(...))``, ...)
with the SAE's width and settings, initialised by sae_lens under a seeded generator, and
copies it into a :class:`~sage_nn.dictionaries.saes.SparseAutoencoder` at the SAE's site. It
encodes exactly as the SAE does; what it lacks is training.

sae_lens's initialisation alone is not a control, it is a blow-up: its ``b_dec`` is 0, far
from a residual stream's mean, and a JumpReLU's threshold of 0 fires half its latents (an
SAE of 1024 latents at SmolLM2's layer 23 so built has FVU 97). So, on the fit rows at the
SAE's own site, :func:`calibrate` sets what is not a direction (docs/metrics.md, "The
dictionaries compared"):

- ``b_dec``: the fit rows' mean (as sae_lens's ``b_dec_init_method="mean"`` would);
- the per-token budget: a TopK's ``k`` is the SAE's; for a threshold (JumpReLU, ReLU's
  ``b_enc``, gated's ``b_gate``) one scalar for all latents, the quantile of the
  pre-activations that gives the SAE's per-token L0 on the same rows;
- one decoder gain by least squares (``W_dec`` times a scalar), so it is never worse than
  the mean on the fit rows.

Transcoders have no random-SAE control (their reconstruction lives at another site than
their input).
"""

from __future__ import annotations

import torch

from .saes import SparseAutoencoder

__all__ = ["CONTROLLED", "calibrate", "random_sae", "sae_lens_classes"]

#: architectures with a random-SAE control: their sae_lens inference class and config class
CONTROLLED = ("standard", "topk", "abstopk", "jumprelu", "gated", "matching_pursuit")


def sae_lens_classes(architecture: str) -> tuple[type, type]:
    """sae_lens's ``(SAE class, config class)`` of an inference architecture."""
    import sae_lens

    names = {"standard": "StandardSAE", "topk": "TopKSAE", "abstopk": "AbsTopKSAE",
             "jumprelu": "JumpReLUSAE", "gated": "GatedSAE",
             "matching_pursuit": "MatchingPursuitSAE"}
    if architecture not in names:
        raise ValueError(f"no random-SAE control for a {architecture!r} SAE; controlled: "
                         f"{', '.join(CONTROLLED)}")
    name = names[architecture]
    return getattr(sae_lens, name), getattr(sae_lens, name + "Config")


def random_sae(sae: SparseAutoencoder, seed: int) -> SparseAutoencoder:
    """``sae``'s architecture, width and settings with sae_lens's random initialisation
    (under ``torch.manual_seed(seed)``, the global generator left as it was), at ``sae``'s
    site. Uncalibrated: see :func:`calibrate`."""
    cls, config = sae_lens_classes(sae.architecture)
    options = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu"}
    if sae.activation in ("topk", "abstopk"):
        options["k"] = sae.k
        options["rescale_acts_by_decoder_norm"] = sae.rescale_acts_by_decoder_norm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = cls(config(**options))
    weights = {name: getattr(built, name, None) for name in
               ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "r_mag", "b_mag")}
    weights = {name: None if w is None else w.detach().float().clone()
               for name, w in weights.items()}
    if sae.architecture == "matching_pursuit":
        weights["W_enc"] = weights["W_dec"].T.contiguous()
    return SparseAutoencoder(
        **weights, architecture=sae.architecture, k=sae.k,
        apply_b_dec_to_input=sae.apply_b_dec_to_input, normalize=sae.normalize,
        rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, center=sae.center,
        residual_threshold=sae.residual_threshold, max_iterations=sae.max_iterations,
        stop_on_duplicate_support=sae.stop_on_duplicate_support, layer=sae.layer,
        kind=sae.kind, heads=sae.heads, hook_name=sae.hook_name)


def per_token_l0(sae: SparseAutoencoder, rows: torch.Tensor) -> float:
    """Mean non-zero codes per row of ``sae`` on ``rows`` (its own site)."""
    with torch.no_grad():
        return float((sae.encode(rows) != 0).sum(-1).float().mean())


def calibrate(control: SparseAutoencoder, sae: SparseAutoencoder,
              rows: torch.Tensor) -> SparseAutoencoder:
    """``control`` (from :func:`random_sae`) with its offset, budget and gain set on
    ``rows [n, d_in]`` at its site (the module docstring): in place, and returned."""
    rows = rows.float()
    with torch.no_grad():
        prepared, _, _ = control._prepare(rows)
        control.b_dec.copy_(prepared.mean(0))
        if control.activation in ("relu", "jumprelu", "gated"):
            _match_l0(control, prepared, per_token_l0(sae, rows))
        if control.activation != "matching_pursuit":  # its encoder is its decoder
            codes = control.encode(rows)
            base = control.decode(torch.zeros_like(codes), rows)
            part = control.decode(codes, rows) - base
            norm = float((part ** 2).sum())
            gain = float(((rows - base) * part).sum()) / norm if norm > 0 else 0.0
            control.W_dec.mul_(gain)
    return control


def _match_l0(control: SparseAutoencoder, prepared: torch.Tensor, l0: float) -> None:
    """One threshold for every latent such that ``l0`` of them fire per row on average."""
    x = prepared - control.b_dec if control.apply_b_dec_to_input else prepared
    if control.activation == "gated":
        pre = x @ control.W_enc + control.b_gate
    else:
        pre = x @ control.W_enc + control.b_enc
    share = min(max(l0 / control.d_sae, 0.0), 1.0)
    flat = pre.flatten()
    if share >= 1:
        cut = float(flat.min()) - 1.0
    else:
        rank = max(1, min(len(flat), int(round((1 - share) * len(flat)))))
        cut = float(flat.kthvalue(rank).values)
    if control.activation == "jumprelu":
        control.threshold.fill_(max(cut, 0.0))
    elif control.activation == "relu":
        control.b_enc.sub_(cut)
    else:
        control.b_gate.sub_(cut)
