"""The random floor: an SAE with its learned directions replaced by random ones.

:func:`random_like` keeps everything the SAE is except what it learned as directions, so
the SAE and its floor differ only there (docs/metrics.md, "The dictionaries compared"): the
nonlinearity (standard ReLU, TopK with the same ``k``, JumpReLU with the same thresholds,
gated with the same ``r_mag``/``b_mag``/``b_gate``), the input normalisation, centring,
``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm``, the decoder bias ``b_dec``, the
encoder biases and the site (``layer``, ``kind``, ``heads``, ``hook_name``).

Directions: the decoder rows are random **unit** vectors (uniform on the sphere, from a
seeded ``torch.Generator``), and the encoder is tied (its columns are the same vectors).
Unit rather than the SAE's own row norms because a row norm is a scale learned *for* that
row's direction (sae_lens SAEs mostly normalise it to 1 anyway, and with
``rescale_acts_by_decoder_norm`` only the unit direction enters the reconstruction): on a
random direction it is an arbitrary per-latent gain, so the floor uses unit vectors.

L0 matched on the data: given ``activations [..., d_in]``, one scalar shift of the encoder's
pre-activation is solved so that the floor's mean L0 on them equals the SAE's (to within
``1 / n_rows``). The shift is added to ``b_enc`` (standard, TopK, JumpReLU; thresholds and
``k`` are kept) or, for gated SAEs, to the gate bias and, scaled by ``exp(r_mag)``, to the
magnitude bias (the same shift of ``x · w`` on both paths). It is solved exactly rather than
by bisection: every (row, latent) has a *margin* ``m`` such that the latent is active iff
``m + shift > 0`` (ReLU: the pre-activation; JumpReLU: pre-activation minus
``max(threshold, 0)``; gated: ``x · w + min(b_gate, b_mag e^-r_mag)``; TopK: the
pre-activation of the top-``k`` entries, the others never active because a common shift
does not change the ranking), so the shift is read off the sorted margins: deterministic and
one pass over the data. A shift of 0 is kept when it already gives the SAE's L0 (typically
TopK, where ``k`` already fixes L0). Without activations there is no calibration: the floor's
L0 is whatever the kept biases give on random directions, which can be far from the SAE's.
"""

from __future__ import annotations

import math

import torch

from .saes import SparseAutoencoder

__all__ = ["random_like", "floor_margins", "mean_l0", "RandomSAE", "calibration", "accumulate",
           "solve", "apply_shift"]


def random_like(sae: SparseAutoencoder, activations: torch.Tensor | None = None, *,
                seed: int = 0) -> SparseAutoencoder:
    """The floor of ``sae``: random unit directions, tied encoder, everything else kept,
    and its mean L0 on ``activations [..., d_in]`` (if given) equal to the SAE's.

    Deterministic for a given ``seed`` (same seed, same SAE shape → identical weights).
    """
    floor = _with_directions(sae, _directions(sae.d_sae, sae.d_in, seed, sae.W_dec.dtype,
                                              sae.W_dec.device))
    floor.__class__, floor.seed = RandomSAE, seed
    if activations is not None:
        plan = calibration(sae, floor)
        accumulate(plan, torch.as_tensor(activations).reshape(-1, sae.d_in).to(sae.W_dec.device))
        solve(plan)
    return floor


def calibration(sae: SparseAutoencoder, floor: SparseAutoencoder, feeds=()) -> dict:
    """The plan that matches ``floor``'s L0 to ``sae``'s: :func:`accumulate` adds rows (a
    read kernel does it on the fit prompts at ``feeds``, the ``(site, position)`` pairs the
    SAE is read at, repeats kept), then :func:`solve` shifts the floor in place, once.
    Plain data and torch, so the whole plan runs inside one remote request."""
    return {"sae": sae, "floor": floor, "feeds": list(feeds), "margins": [], "active": 0}


def accumulate(plan: dict, x: torch.Tensor) -> None:
    """Add rows ``x [n, d_in]``: the floor's margins and the SAE's active latents on them."""
    with torch.no_grad():
        plan["margins"].append(floor_margins(plan["floor"], x))
        plan["active"] += int((plan["sae"].encode(x) > 0).sum())


def solve(plan: dict) -> float:
    """Shift the floor's pre-activation (in place) so its mean L0 on the accumulated rows
    equals the SAE's, to within one active latent in all; the shift is kept in the plan."""
    if "shift" not in plan:
        if not plan["margins"]:
            raise RuntimeError("an L0 calibration was solved before any row was accumulated")
        shift = _l0_shift(torch.cat(plan.pop("margins")), plan.pop("active"))
        apply_shift(plan, shift)
    return plan["shift"]


def apply_shift(plan: dict, shift: float) -> None:
    """Shift the plan's floor by a solved ``shift`` (solved elsewhere, e.g. on a server)."""
    if shift != 0.0:
        _shift_pre_activation(plan["floor"], shift)
    plan["shift"] = shift


def _directions(d_sae: int, d_in: int, seed: int, dtype, device) -> torch.Tensor:
    """``[d_sae, d_in]`` random unit vectors, the same for the same seed on any machine
    (drawn in float64 on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    return (directions / directions.norm(dim=-1, keepdim=True)).to(dtype).to(device)


class RandomSAE(SparseAutoencoder):
    """A floor: pickled without its directions, which are drawn again from ``seed`` when
    it is unpickled, so a request that ships floors to a server carries their biases only."""

    seed: int

    def __getstate__(self):
        state = self.__dict__.copy()
        params = dict(state["_parameters"])
        shape = (tuple(params["W_dec"].shape), params["W_dec"].dtype)
        params["W_enc"] = params["W_dec"] = None
        return {**state, "_parameters": params, "_directions_shape": shape}

    def __setstate__(self, state):
        (d_sae, d_in), dtype = state.pop("_directions_shape")
        torch.nn.Module.__setstate__(self, state)  # (no super(): classes ship by value)
        directions = _directions(d_sae, d_in, self.seed, dtype, self.b_dec.device)
        self.W_dec = torch.nn.Parameter(directions, requires_grad=False)
        self.W_enc = torch.nn.Parameter(directions.T.clone(), requires_grad=False)


def mean_l0(sae: SparseAutoencoder, activations: torch.Tensor) -> float:
    """Mean number of active latents of ``sae`` per row of ``activations [..., d_in]``."""
    with torch.no_grad():
        codes = sae.encode(torch.as_tensor(activations).reshape(-1, sae.d_in))
    return float((codes > 0).sum(-1).double().mean())


def floor_margins(sae: SparseAutoencoder, activations: torch.Tensor) -> torch.Tensor:
    """``[n, d_sae]`` margins: latent ``j`` of row ``i`` is active iff ``m[i, j] + s > 0``
    after the pre-activation shift ``s`` of :func:`random_like` (``-inf``: never active)."""
    x, _, _ = sae._prepare(torch.as_tensor(activations).reshape(-1, sae.d_in))
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    proj = x @ sae.W_enc
    if sae.architecture == "gated":
        return proj + torch.minimum(sae.b_gate, sae.b_mag * (-sae.r_mag).exp())
    pre = proj + sae.b_enc
    if sae.architecture == "standard":
        return pre
    if sae.architecture == "jumprelu":
        return pre - sae.threshold.clamp(min=0)
    # TopK: a common shift keeps the ranking; only the top k can be active, if positive
    norms = sae.W_dec.norm(dim=-1) if sae.rescale_acts_by_decoder_norm else None
    ranked = pre * norms if norms is not None else pre
    top = torch.topk(ranked, k=sae.k, dim=-1).indices
    out = torch.full_like(pre, -math.inf)
    return out.scatter(-1, top, pre.gather(-1, top))


def _l0_shift(margins: torch.Tensor, count: int) -> float:
    """A shift ``s`` with exactly ``count`` margins ``> -s`` (0 when 0 already works;
    otherwise the midpoint between the count-th and next largest margins)."""
    flat = margins.flatten().double()
    count = max(0, min(count, int(torch.isfinite(flat).sum())))
    largest = torch.topk(flat, k=min(count + 1, len(flat))).values if len(flat) else flat
    upper = float(largest[count - 1]) if count > 0 else math.inf  # must stay active
    lower = float(largest[count]) if count < len(largest) else -math.inf  # must not
    # active iff m > -s: need lower <= -s < upper
    if lower <= 0.0 < upper:
        return 0.0
    if math.isinf(lower):
        cut = upper - max(1.0, abs(upper))
    elif math.isinf(upper):
        cut = lower + max(1.0, abs(lower))
    else:
        cut = (lower + upper) / 2
    return -cut


def _with_directions(sae: SparseAutoencoder, directions: torch.Tensor) -> SparseAutoencoder:
    c = lambda p: None if p is None else p.detach().clone()  # noqa: E731
    return SparseAutoencoder(
        directions.T.clone(), c(sae.b_enc), directions.clone(), c(sae.b_dec),
        architecture=sae.architecture, k=sae.k, threshold=c(sae.threshold),
        b_gate=c(sae.b_gate), r_mag=c(sae.r_mag), b_mag=c(sae.b_mag),
        apply_b_dec_to_input=sae.apply_b_dec_to_input, normalize=sae.normalize,
        rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, center=sae.center,
        layer=sae.layer, kind=sae.kind, heads=None if sae.heads is None else list(sae.heads),
        hook_name=sae.hook_name).to(directions.device)


def _shift_pre_activation(sae: SparseAutoencoder, shift: float) -> None:
    with torch.no_grad():
        if sae.architecture == "gated":
            sae.b_gate += shift
            sae.b_mag += shift * sae.r_mag.exp()
        else:
            sae.b_enc += shift
