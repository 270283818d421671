"""SAEs: load any sae_lens SAE, find its canonical site, and run it as plain torch.

sae_lens objects never enter a trace (they cannot be shipped to NDIF, and importing
sae_lens while nnsight's ``.save`` patch is active can fail): :func:`from_sae_lens`
copies the weights into a :class:`SparseAutoencoder`, a small ``torch.nn.Module`` whose
``encode``/``decode`` reproduce sae_lens's exactly (standard/ReLU, TopK, JumpReLU, gated;
``apply_b_dec_to_input``, run-time ``layer_norm``/``constant_norm_rescale`` input
normalisation, TopK's ``rescale_acts_by_decoder_norm``).

SAEs trained on TransformerLens-processed models (``center_writing_weights``, e.g. the
GPT-2 ``res-jb`` release) saw a residual stream with its mean over ``d_model`` removed:
``center=True`` removes it before encoding and adds it back after decoding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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

from ..common.formats import SAE_ARCHITECTURES as ARCHITECTURES_SUPPORTED
from ..model.reads import encoder_only  # noqa: F401  (what a server needs of an SAE)
from ..model.sites import HEAD_KINDS, KINDS, Site, SiteAdapter, adapter, parse_site

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
# Folded into the weights by sae_lens at load time, so identity at inference (as in sae_lens).
_FOLDED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")


class SAEMismatchError(ValueError):
    """An SAE that does not fit the model (width, site, layer)."""


class SparseAutoencoder(torch.nn.Module):
    """A plain-torch SAE: ``codes = encode(x)``, ``x_hat = decode(codes, x)``.

    Weights follow sae_lens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``. ``site`` is the
    canonical kind and layer it reads (``heads`` lists the heads of a q/k/v/z SAE, all
    concatenated head-major, or ``None`` for d_model-wide kinds).
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, *, architecture: str = "standard",
                 k: int | None = None, threshold=None, b_gate=None, r_mag=None, b_mag=None,
                 apply_b_dec_to_input: bool = True, normalize: str = "none",
                 rescale_acts_by_decoder_norm: bool = False, center: bool = False,
                 layer: int | None = None, kind: str | None = None,
                 heads: list[int] | None = None, hook_name: str | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES_SUPPORTED:
            raise ValueError(f"SAE architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES_SUPPORTED)}")
        if normalize in _FOLDED_NORMALIZATIONS:
            normalize = "none"
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"input normalisation {normalize!r} is not supported; supported: "
                             f"{', '.join(NORMALIZATIONS + _FOLDED_NORMALIZATIONS)}")
        if architecture == "topk" and not k:
            raise ValueError("a TopK SAE needs k (number of active latents)")
        t = lambda a: None if a is None else torch.as_tensor(a).detach().clone()  # noqa: E731
        self.W_enc, self.W_dec, self.b_dec = (torch.nn.Parameter(t(w), requires_grad=False)
                                              for w in (W_enc, W_dec, b_dec))
        extra = dict(b_enc=b_enc, threshold=threshold, b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)
        for name, value in extra.items():
            setattr(self, name, None if value is None
                    else torch.nn.Parameter(t(value), requires_grad=False))
        if architecture == "gated" and any(v is None for v in (b_gate, r_mag, b_mag)):
            raise ValueError("a gated SAE needs b_gate, r_mag and b_mag")
        if architecture != "gated" and b_enc is None:
            raise ValueError(f"a {architecture} SAE needs b_enc")
        if architecture == "jumprelu" and threshold is None:
            raise ValueError("a JumpReLU SAE needs threshold")
        self.architecture, self.k = architecture, k
        self.apply_b_dec_to_input, self.normalize = apply_b_dec_to_input, normalize
        self.rescale_acts_by_decoder_norm, self.center = rescale_acts_by_decoder_norm, center
        self.layer, self.kind, self.heads, self.hook_name = layer, kind, heads, hook_name

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def __repr__(self) -> str:
        where = f"L{self.layer}.{self.kind}" if self.kind is not None else "unplaced"
        return (f"SparseAutoencoder({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"site={where}{', k=%d' % self.k if self.k else ''})")

    # -- the maths (plain torch, so it runs inside a trace, locally or on NDIF) --------
    def _prepare(self, x: torch.Tensor):
        """Input as sae_lens sees it, and the (scale, shift) that undo it after decoding."""
        x = x.to(self.W_enc.dtype)
        shift = torch.zeros_like(x[..., :1])
        if self.center:
            shift = x.mean(-1, keepdim=True)
            x = x - shift
        scale = torch.ones_like(x[..., :1])
        if self.normalize == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / self.d_in ** 0.5
            x = x / scale
        elif self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            x = (x - mu) / (std + 1e-5)
            scale, shift = std, shift + mu
        return x, scale, shift

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of inputs [..., d_in]."""
        x, _, _ = self._prepare(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.architecture == "gated":
            active = (x @ self.W_enc + self.b_gate > 0).to(x.dtype)
            return active * torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def decoder(self) -> torch.Tensor:
        """The effective decoder [d_sae, d_in]: ``decode(c) = scale * (c @ decoder() + b_dec) + shift``."""
        if self.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        return self.W_dec

    def decode_affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(scale [..., 1], shift [..., 1])`` of the input normalisation/centring."""
        _, scale, shift = self._prepare(x)
        return scale, shift

    def decode(self, codes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from latents; ``x`` (the input) is needed to undo normalisation."""
        out = codes.to(self.W_dec.dtype) @ self.decoder() + self.b_dec
        if self.normalize != "none" or self.center:
            if x is None:
                raise ValueError(f"this SAE normalises its input ({self.normalize}, "
                                 f"center={self.center}): pass the input, decode(codes, x)")
            scale, shift = self.decode_affine(x)
            out = out * scale + shift
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x).to(x.dtype)


# -- sae_lens conversion ----------------------------------------------------------------

def from_sae_lens(sae: Any, *, site: "Site | str | None" = None, center: bool | None = None,
                  model: Any = None) -> SparseAutoencoder:
    """Copy a sae_lens SAE into a :class:`SparseAutoencoder` (and check it fits ``model``).

    ``site`` overrides the site read from the SAE's hook name. ``center`` defaults to what
    the SAE's metadata says about TransformerLens' ``center_writing_weights``.
    """
    cfg = sae.cfg
    arch = cfg.architecture()
    if arch not in ARCHITECTURES_SUPPORTED:
        raise ValueError(f"sae_lens architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES_SUPPORTED)}")
    p = {name: getattr(sae, name, None) for name in
         ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_gate", "r_mag", "b_mag")}
    if arch != "jumprelu":
        p["threshold"] = None
    meta = cfg.metadata
    hook_name = meta.hook_name if meta is not None else None
    layer = kind = heads = None
    if site is not None or hook_name:
        layer, kind, heads = parse_site(site if site is not None else hook_name, model)
    if center is None:
        kwargs = (meta.model_from_pretrained_kwargs if meta is not None else None) or {}
        center = bool(kwargs.get("center_writing_weights", False)) and kind not in HEAD_KINDS
    out = SparseAutoencoder(
        **p, architecture=arch, k=getattr(cfg, "k", None),
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, normalize=cfg.normalize_activations,
        rescale_acts_by_decoder_norm=getattr(cfg, "rescale_acts_by_decoder_norm", False),
        center=center, layer=layer, kind=kind, heads=heads, hook_name=hook_name)
    if model is not None:
        check_sae(out, model)
    return out


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


# -- the on-disk cache of trained SAEs ------------------------------------------------------

SEAL = "sha256.json"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(directory: str | Path) -> None:
    """Flush an SAE directory's files to disk and record their SHA-256 in ``sha256.json``,
    so a reader tells a complete SAE from a truncated or corrupted one."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != SEAL)
    for path in files:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    digests = {p.name: _digest(p) for p in files}
    with open(directory / SEAL, "w") as f:
        json.dump(digests, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def sealed_problem(directory: str | Path) -> str | None:
    """What is wrong with a sealed SAE directory (``None``: intact). A directory without a
    seal (written before seals existed, or by hand) is left to the loader to judge."""
    directory = Path(directory)
    try:
        digests = json.loads((directory / SEAL).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return f"its {SEAL} is corrupt"
    for name, digest in digests.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _digest(path) != digest:
            return f"{name} is truncated or corrupt (SHA-256 differs from its seal)"
    return None


@contextlib.contextmanager
def cache_lock(path: str | Path):
    """Hold an exclusive lock on ``path`` (a ``.lock`` file beside it) for the ``with``
    block: two processes that need the same cached SAEs take turns, and the second reads
    what the first wrote. The operating system drops the lock when a process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_sae(sae: SparseAutoencoder, model: Any) -> SparseAutoencoder:
    """Raise :class:`SAEMismatchError` unless the SAE's site exists in ``model`` and its
    width matches; fills in all heads for all-head q/k/v/z SAEs. Call before any forward."""
    ad = model if isinstance(model, SiteAdapter) else adapter(model)
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


def channels(sae: SparseAutoencoder, model: Any):
    """Last-dim indices of the SAE's site tensor (all of it for d_model-wide kinds)."""
    ad = adapter(model)
    return ad.channels(sae.kind, sae.heads) if sae.kind in HEAD_KINDS else slice(None)


__all__ = ["SparseAutoencoder", "SAEMismatchError", "from_sae_lens", "load_sae", "parse_site",
           "check_sae", "channels", "KINDS", "seal", "sealed_problem", "cache_lock"]
