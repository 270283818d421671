"""SAEs: load any sae_lens SAE or transcoder, find its sites, and run it as plain torch.

sae_lens objects never enter a trace (they cannot be shipped to NDIF, and importing
sae_lens while nnsight's ``.save`` patch is active can fail): :func:`from_sae_lens`
copies the weights into a :class:`SparseAutoencoder`, a small ``torch.nn.Module`` whose
``encode``/``decode`` reproduce sae_lens's exactly, for every inference class of sae_lens
6.54 that has a per-token code (:data:`~sage_nn.common.formats.SAE_ARCHITECTURES`:
standard/ReLU, TopK, AbsTopK, JumpReLU, gated, matching pursuit, and the four transcoders;
``apply_b_dec_to_input``, run-time ``layer_norm``/``constant_norm_rescale`` input
normalisation, TopK's ``rescale_acts_by_decoder_norm``). The temporal SAE is refused with
its reason (:data:`~sage_nn.common.formats.REFUSED_ARCHITECTURES`) before any forward.

A transcoder reads one site and writes another: here, the MLP's input side of layer L
(:data:`TRANSCODER_INPUTS`) and its ``mlp_out``. Its ``layer``/``kind`` are the site it
writes (where its decoder rows are directions), ``input_layer``/``input_kind`` the site
its codes come from, ``input_form`` what is taken of that site.

SAEs trained on TransformerLens-processed models (``center_writing_weights``, e.g. the
GPT-2 ``res-jb`` release) saw a residual stream with its mean over ``d_model`` removed:
``center=True`` removes it before encoding and adds it back after decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# sae_lens must be imported before any trace runs: nnsight patches a ``.save`` method onto
# objects, and pydantic models imported after that fail ("Attribute 'save' is missing its
# type annotation").
import sae_lens  # noqa: F401
import torch
from sae_lens import SAE

from ..common.formats import SAE_ARCHITECTURES, SAE_TENSOR_SHAPES, architecture_problem
from ..model import encoders
from ..model.sites import HEAD_KINDS, KINDS, Site, SiteAdapter, adapter, parse_site
from .sealing import cache_lock, seal, sealed_problem  # their old home: still here
from .serving import TRANSCODER_INPUTS, transcoder_sites

ARCHITECTURES_SUPPORTED = tuple(SAE_ARCHITECTURES)
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
# Folded into the weights by sae_lens at load time, so identity at inference (as in sae_lens).
_FOLDED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")
INPUT_FORMS = ("site", "normalized")


class SAEMismatchError(ValueError):
    """An SAE that does not fit the model (width, site, layer)."""


class SparseAutoencoder(torch.nn.Module):
    """A plain-torch SAE or transcoder: ``codes = encode(x)``, ``x_hat = decode(codes, x)``.

    Weights follow sae_lens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]`` (``d_out =
    d_in`` but for transcoders), ``W_skip [d_out, d_in]`` (skip transcoders). ``site`` is
    the canonical kind and layer it reads, or for a transcoder writes (``heads`` lists the
    heads of a q/k/v/z SAE, all concatenated head-major, or ``None`` for d_model-wide
    kinds). ``architecture`` is sae_lens's name; what it means is data
    (:data:`~sage_nn.common.formats.SAE_ARCHITECTURES`): the encoder runs the method named
    by its activation.
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, *, architecture: str = "standard",
                 k: int | None = None, threshold=None, b_gate=None, r_mag=None, b_mag=None,
                 W_skip=None, apply_b_dec_to_input: bool = True, normalize: str = "none",
                 rescale_acts_by_decoder_norm: bool = False, center: bool = False,
                 residual_threshold: float = 1e-2, max_iterations: int | None = None,
                 stop_on_duplicate_support: bool = True,
                 layer: int | None = None, kind: str | None = None,
                 heads: list[int] | None = None, hook_name: str | None = None,
                 input_layer: int | None = None, input_kind: str | None = None,
                 input_form: str = "site", hook_name_out: str | None = None):
        super().__init__()
        problem = architecture_problem(architecture)
        if problem:
            raise ValueError(problem)
        spec = SAE_ARCHITECTURES[architecture]
        if normalize in _FOLDED_NORMALIZATIONS:
            normalize = "none"
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"input normalisation {normalize!r} is not supported; supported: "
                             f"{', '.join(NORMALIZATIONS + _FOLDED_NORMALIZATIONS)}")
        if spec.activation in ("topk", "abstopk") and not k:
            raise ValueError(f"a {architecture} SAE needs k (number of active latents)")
        if input_form not in INPUT_FORMS:
            raise ValueError(f"input_form {input_form!r}: one of {', '.join(INPUT_FORMS)}")
        given = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                 "threshold": threshold, "b_gate": b_gate, "r_mag": r_mag, "b_mag": b_mag,
                 "W_skip": W_skip}
        missing = [n for n in spec.tensors if given[n] is None]
        if missing:
            raise ValueError(f"a {architecture} SAE needs {', '.join(missing)}")
        t = lambda a: None if a is None else torch.as_tensor(a).detach().clone()  # noqa: E731
        if spec.tied:  # sae_lens's matching pursuit encodes with its decoder: W_enc = W_dec.T
            given["W_enc"] = t(W_dec).T.contiguous()
        if spec.tied and not apply_b_dec_to_input:  # it decodes with b_dec only if it encodes so
            given["b_dec"] = torch.zeros_like(t(b_dec))
        for name in SAE_TENSOR_SHAPES:  # what the architecture does not use stays None
            value = given[name] if name in spec.tensors or name == "W_enc" else None
            setattr(self, name, None if value is None
                    else torch.nn.Parameter(t(value), requires_grad=False))
        self.architecture, self.activation, self.k = architecture, spec.activation, k
        self.transcoder = spec.transcoder
        self.apply_b_dec_to_input = apply_b_dec_to_input and not spec.transcoder
        self.normalize, self.rescale_acts_by_decoder_norm = normalize, rescale_acts_by_decoder_norm
        self.center = center and not spec.transcoder
        self.residual_threshold, self.max_iterations = residual_threshold, max_iterations
        self.stop_on_duplicate_support = stop_on_duplicate_support
        self.layer, self.kind, self.heads, self.hook_name = layer, kind, heads, hook_name
        self.input_layer, self.input_kind, self.input_form = input_layer, input_kind, input_form
        self.hook_name_out = hook_name_out

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def __repr__(self) -> str:
        where = f"L{self.layer}.{self.kind}" if self.kind is not None else "unplaced"
        if self.transcoder and self.input_kind is not None:
            where = f"L{self.input_layer}.{self.input_kind}->{where}"
        return (f"SparseAutoencoder({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"site={where}{', k=%d' % self.k if self.k else ''})")

    # -- the maths (plain torch on the plain encoder: the same functions run in a request) --
    def encoder(self) -> dict:
        """What encoding needs, as plain data (:mod:`sage_nn.model.encoders`): the encoder
        tensors, the decoder's row norms where the codes are scaled by them, the settings.
        What a request carries of an SAE (half its weights, no class of sage_nn's)."""
        return {"activation": self.activation, "k": self.k, "W_enc": self.W_enc,
                "b_enc": self.b_enc, "b_dec": self.b_dec, "threshold": self.threshold,
                "b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag,
                "dec_norm": self.W_dec.norm(dim=-1) if self.rescale_acts_by_decoder_norm
                else None,
                "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize": self.normalize,
                "center": self.center, "transcoder": self.transcoder,
                "residual_threshold": self.residual_threshold,
                "max_iterations": self.max_iterations,
                "stop_on_duplicate_support": self.stop_on_duplicate_support}

    def plain(self) -> dict:
        """The whole SAE as plain data (:mod:`sage_nn.model.encoders`): the encoder, the
        effective decoder, the skip path; what a request that rebuilds activations
        carries."""
        undo = not self.transcoder and (self.normalize != "none" or self.center)
        return {**self.encoder(), "decoder": self.decoder(), "W_skip": self.W_skip,
                "undo": undo}

    def _prepare(self, x: torch.Tensor):
        """Input as sae_lens sees it, and the (scale, shift) that undo it after decoding."""
        return encoders.prepare(self.encoder(), x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of inputs [..., d_in]."""
        return encoders.encode(self.encoder(), x)

    def decoder(self) -> torch.Tensor:
        """The effective decoder [d_sae, d_out]: ``decode(c) = scale * (c @ decoder() + b_dec) +
        shift`` (+ the skip path of a skip transcoder)."""
        if self.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        return self.W_dec

    def decode_affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(scale [..., 1], shift [..., 1])`` of the input normalisation/centring
        (identity for a transcoder: sae_lens does not undo it at another site)."""
        return encoders.decode_affine(self.encoder(), x)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's linear path ``x @ W_skip.T`` (zero without one): part of its
        reconstruction, never latents."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=self.W_dec.dtype,
                               device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(self, codes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from latents; ``x`` (the input) is needed to undo normalisation
        and for a skip transcoder's skip path."""
        out = codes.to(self.W_dec.dtype) @ self.decoder() + self.b_dec
        undo = not self.transcoder and (self.normalize != "none" or self.center)
        if undo or self.W_skip is not None:
            if x is None:
                why = "it adds a skip path of its input" if self.W_skip is not None else \
                    f"it normalises its input ({self.normalize}, center={self.center})"
                raise ValueError(f"this {self.architecture} SAE needs its input to decode "
                                 f"({why}): pass the input, decode(codes, x)")
            if undo:
                scale, shift = self.decode_affine(x)
                out = out * scale + shift
            out = out + self.skip(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x).to(x.dtype)


# -- sae_lens conversion ----------------------------------------------------------------

def from_sae_lens(sae: Any, *, site: "Site | str | None" = None, center: bool | None = None,
                  model: Any = None) -> SparseAutoencoder:
    """Copy a sae_lens SAE into a :class:`SparseAutoencoder` (and check it fits ``model``).

    ``site`` overrides the site read from the SAE's hook name (a transcoder's: the site
    it reads). ``center`` defaults to what the SAE's metadata says about TransformerLens'
    ``center_writing_weights``. An architecture sage_nn cannot represent is refused here,
    naming the class and why, before anything runs.
    """
    cfg = sae.cfg
    arch = cfg.architecture()
    problem = architecture_problem(arch)
    if problem:
        raise ValueError(f"{type(sae).__name__}: {problem}")
    spec = SAE_ARCHITECTURES[arch]
    p = {name: getattr(sae, name, None) if name in spec.tensors else None
         for name in SAE_TENSOR_SHAPES}
    if cfg.reshape_activations not in ("none", "hook_z"):  # hook_z: flat heads, as here
        raise ValueError(f"{type(sae).__name__}: reshape_activations "
                         f"{cfg.reshape_activations!r} is not supported")
    meta = cfg.metadata
    hook_name = meta.hook_name if meta is not None else None
    hook_out = meta.hook_name_out if meta is not None else None
    where: dict = {"layer": None, "kind": None, "heads": None}
    if spec.transcoder and (site is not None or hook_name):
        where.update(transcoder_sites(str(site) if site is not None else hook_name, hook_out,
                                      model))
    elif site is not None or hook_name:
        where["layer"], where["kind"], where["heads"] = parse_site(
            site if site is not None else hook_name, model)
    if center is None:
        kwargs = (meta.model_from_pretrained_kwargs if meta is not None else None) or {}
        center = bool(kwargs.get("center_writing_weights", False)) and \
            where["kind"] not in HEAD_KINDS
    extra = {name: getattr(cfg, name) for name in
             ("residual_threshold", "max_iterations", "stop_on_duplicate_support")
             if hasattr(cfg, name)}
    out = SparseAutoencoder(
        **p, architecture=arch, k=getattr(cfg, "k", None),
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, normalize=cfg.normalize_activations,
        rescale_acts_by_decoder_norm=getattr(cfg, "rescale_acts_by_decoder_norm", False),
        center=center, hook_name=hook_name, hook_name_out=hook_out, **where, **extra)
    if model is not None:
        check_sae(out, model)
    return out


def _refuse_unreadable(path: Path) -> None:
    """Refuse an SAE directory of an architecture sage_nn cannot represent from its cfg.json
    alone, naming sae_lens's class and why (before its weights load)."""
    try:
        arch = json.loads((path / "cfg.json").read_text()).get("architecture", "standard")
    except (OSError, ValueError, AttributeError):
        return  # sae_lens's loader says what is wrong with it
    problem = architecture_problem(arch)
    if problem:
        from sae_lens.registry import get_sae_class

        try:
            name = get_sae_class(arch)[0].__name__
        except (KeyError, ValueError):
            name = "an SAE"
        raise ValueError(f"{path}: {name}: {problem}")


def load_sae(release_or_path: str | Path, sae_id: str | None = None, *, model: Any = None,
             site: "Site | str | None" = None, center: bool | None = None,
             device: str = "cpu") -> SparseAutoencoder:
    """Load an SAE from a sae_lens directory (``cfg.json`` + weights) or a pretrained release.

    With ``model``, the SAE's width and site are checked against it before anything runs.
    """
    path = Path(release_or_path)
    if sae_id is None:
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(
                f"{path} is not a sae_lens SAE directory (no cfg.json); pass a directory "
                "written by SAE.save_model / sage train-sae, or a release and sae_id")
        _refuse_unreadable(path)
        sae = SAE.load_from_disk(path, device=device)
    else:
        try:
            sae = SAE.from_pretrained(str(release_or_path), sae_id, device=device)
        except Exception as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            hint = ("the HuggingFace hub is disabled (HF_HUB_OFFLINE=1): download the SAE "
                    "elsewhere and load its directory with load_sae(path)" if offline else
                    "check the release and sae_id (sae_lens.pretrained_saes.yaml lists them) "
                    "and that huggingface.co is reachable, or load a local directory")
            raise RuntimeError(f"cannot load SAE {sae_id!r} of release {release_or_path!r}: "
                               f"{type(err).__name__}: {err}. {hint}") from err
    return from_sae_lens(sae, site=site, center=center, model=model)


def check_sae(sae: SparseAutoencoder, model: Any) -> SparseAutoencoder:
    """Raise :class:`SAEMismatchError` unless the SAE's site exists in ``model`` and its
    width matches; fills in all heads for all-head q/k/v/z SAEs. Call before any forward."""
    ad = model if isinstance(model, SiteAdapter) else adapter(model)
    if sae.transcoder:
        return _check_transcoder(sae, ad)
    if sae.kind is None:
        raise SAEMismatchError(
            f"{sae!r} has no site (its config has no hook_name): pass site='L5.resid_pre' "
            "(or a hook name) when loading it")
    try:
        ad.check(Site(sae.layer, sae.kind, 0 if sae.kind in HEAD_KINDS else None))
    except ValueError as err:
        raise SAEMismatchError(f"SAE for L{sae.layer}.{sae.kind} does not fit the model: {err}") \
            from err
    if sae.kind in HEAD_KINDS:
        if sae.heads is None:
            sae.heads = list(range(ad.n_heads_of(sae.kind)))
        for h in sae.heads:
            ad.check(Site(sae.layer, sae.kind, h))
        width = len(sae.heads) * ad.d_head
    else:
        width = ad.d_model
    if sae.d_in != width:
        what = (f"{len(sae.heads)} head(s) x d_head {ad.d_head}" if sae.kind in HEAD_KINDS
                else f"d_model {ad.d_model}")
        raise SAEMismatchError(
            f"SAE width d_in={sae.d_in} does not match site L{sae.layer}.{sae.kind} of "
            f"{ad.arch.name} model {getattr(ad.config, '_name_or_path', '')!r} ({what} = {width}): "
            "the SAE was trained on another model or site; load an SAE for this model")
    return sae


def _check_transcoder(sae: SparseAutoencoder, ad: SiteAdapter) -> SparseAutoencoder:
    if sae.kind is None:
        raise SAEMismatchError(
            f"{sae!r} has no site (its config has no hook_name): pass the site it reads, "
            "site='blocks.5.ln2.hook_normalized' (or blocks.5.hook_mlp_in), when loading it")
    for site, what in ((Site(sae.input_layer, sae.input_kind), "reads"),
                       (Site(sae.layer, sae.kind), "writes")):
        try:
            ad.check(site)
        except ValueError as err:
            raise SAEMismatchError(f"transcoder {sae!r} {what} {site}, which does not fit the "
                                   f"model: {err}") from err
    if (sae.d_in, sae.d_out) != (ad.d_model, ad.d_model):
        raise SAEMismatchError(
            f"transcoder widths d_in={sae.d_in}, d_out={sae.d_out} do not match the MLP of "
            f"{ad.arch.name} model {getattr(ad.config, '_name_or_path', '')!r} (d_model "
            f"{ad.d_model}): it was trained on another model; load one for this model")
    return sae


def channels(sae: SparseAutoencoder, model: Any):
    """Last-dim indices of the SAE's site tensor (all of it for d_model-wide kinds)."""
    ad = adapter(model)
    return ad.channels(sae.kind, sae.heads) if sae.kind in HEAD_KINDS else slice(None)


__all__ = ["SparseAutoencoder", "SAEMismatchError", "from_sae_lens", "load_sae", "parse_site",
           "transcoder_sites", "TRANSCODER_INPUTS",
           "check_sae", "channels", "KINDS", "seal", "sealed_problem", "cache_lock"]
