"""Train transcoders of MLPs: from the MLP's normalised input (TransformerLens'
``blocks.L.ln2.hook_normalized``) to its output (``blocks.L.hook_mlp_out``), read together
from one stream of activations (:mod:`.stream`: ``L.resid_mid`` and ``L.mlp_out``, the same
tokens in every batch).

sae_lens 6.54 has no transcoder trainer, so this is a small loop of its own: a JumpReLU
transcoder (sae_lens's ``JumpReLU``/``Step`` straight-through estimators, passing their
gradient to the pre-activations as well, and its quadratic L0 loss around a target L0 ``k``,
as Gemma Scope 2 trains its transcoders) with an optional
linear skip path (``skip=True``, a ``JumpReLUSkipTranscoder``); each latent's threshold starts
where ``k`` of ``d_sae`` latents fire on the first batch. MSE summed over the output
and averaged over the batch, Adam at a constant learning rate, each gradient clipped to
norm 1. The output is scaled to an average norm of ``sqrt(d_model)`` while training and the
scale is folded into the saved weights. Saved the sae_lens way (``save_model``: sae_lens's
``JumpReLUTranscoder``/``JumpReLUSkipTranscoder``), with the held-out FVU, L0 and dead share
in ``cfg.json`` as :func:`~.training.train_saes` records them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

# sae_lens before any trace runs (why: sage_nn/dictionaries/saes.py, top).
from sae_lens import (
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
)
from sae_lens.saes.jumprelu_sae import JumpReLU, Step
from sae_lens.saes.sae import SAEMetadata

from ..common.formats import TRAINED_TRANSCODERS
from ..model.linear import mlp_norm, normalized
from ..model.sites import Site, adapter, parse_site
from .corpus import text_sources
from .saes import SparseAutoencoder, from_sae_lens
from .stream import read_activations, shuffled, split_corpus

#: ``train:NAME`` for transcoders: whether each adds a linear skip path
TRANSCODERS = TRAINED_TRANSCODERS
BANDWIDTH = 0.05  # sae_lens's jumprelu_bandwidth
INIT_THRESHOLD = 0.01  # sae_lens's jumprelu_init_threshold
#: the estimators' gradient reaches the pre-activations too (sae_lens's
#: ``jumprelu_ste_to_input=True``, Anthropic's setup): without it only the thresholds move
#: the L0, too slowly for short runs (SmolLM2, 300 steps: L0 300-500 for a target of 32)
STE_TO_INPUT = True


def mlp_layers(model: Any, sites: list[str]) -> list[int]:
    """The layers of ``sites`` (``L3.mlp_out`` or hook names): a transcoder of each MLP."""
    ad, layers = adapter(model), []
    for name in sites:
        layer, kind, _ = parse_site(name, model)
        if kind != "mlp_out":
            raise ValueError(f"a transcoder is trained for an MLP's output (L{layer}.mlp_out), "
                             f"not {name!r}")
        ad.check(Site(layer, "resid_mid"))  # parallel blocks have none: said here
        layers.append(layer)
    return list(dict.fromkeys(layers))


class _Transcoder(torch.nn.Module):
    """The trained parameters, sae_lens's layout (``log_threshold`` as its JumpReLU)."""

    def __init__(self, d: int, d_sae: int, skip: bool, y_mean: torch.Tensor,
                 generator: torch.Generator):
        super().__init__()
        W_dec = torch.randn(d_sae, d, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(y_mean.clone())
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), math.log(INIT_THRESHOLD)))
        self.W_skip = torch.nn.Parameter(torch.zeros(d, d)) if skip else None

    def forward(self, x: torch.Tensor):
        pre = x @ self.W_enc + self.b_enc
        threshold = self.log_threshold.exp()
        acts = JumpReLU.apply(pre, threshold, BANDWIDTH, STE_TO_INPUT)
        out = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out, Step.apply(pre, threshold, BANDWIDTH, STE_TO_INPUT).sum(-1)


def train_transcoders(model: Any, sites: list[str], config: Any, *, skip: bool = False,
                      source: Any = "builtin", out_dir: str | Path | None = None,
                      progress: bool = True) -> tuple[dict[str, SparseAutoencoder], pd.DataFrame]:
    """Train one JumpReLU transcoder per MLP of ``sites`` (``L3.mlp_out``), from the MLP's
    normalised input to its output, with target L0 ``config.k`` (a
    :class:`~.training.TrainConfig`: ``d_sae``, ``k``, ``l0_coefficient``, ``lr``,
    ``tokens``, ``batch_size``, the corpus settings and ``seed``). Returns the transcoders
    (plain torch, keyed ``L3.mlp_out``) and a table of held-out FVU, L0 and dead latents;
    with ``out_dir``, each is saved the sae_lens way under ``out_dir/L3.mlp_out``."""
    cfg = config
    ad = adapter(model)
    layers = mlp_layers(model, sites)
    labels = [f"L{layer}.{kind}" for layer in layers for kind in ("resid_mid", "mlp_out")]
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    eval_units, train_units, tokens_per_pass = split_corpus(model, source, cfg, rng)
    read = {"skip_first": cfg.skip_first, "batch_tokens": cfg.model_batch_size * cfg.context_size}
    norms = {layer: mlp_norm(ad, model, layer) for layer in layers}

    def pair(batch: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch[f"L{layer}.resid_mid"]
        x = x.float() if norms[layer] is None else normalized(x, *norms[layer])
        return x, batch[f"L{layer}.mlp_out"].float()

    held_out = read_activations(model, eval_units, labels, **read)
    stream = shuffled(model, train_units, labels, batch_size=cfg.batch_size,
                      cache_bytes=cfg.cache_bytes, buffer_units=cfg.buffer_chunks, rng=rng,
                      **read)
    first = next(stream)
    scale = {layer: math.sqrt(ad.d_model) / pair(first, layer)[1].norm(dim=1).mean().item()
             for layer in layers}
    nets = {layer: _Transcoder(ad.d_model, cfg.d_sae, skip, pair(first, layer)[1].mean(0)
                               * scale[layer], rng) for layer in layers}
    with torch.no_grad():  # each latent's threshold starts where k of d_sae fire a token
        for layer, net in nets.items():
            pre = pair(first, layer)[0] @ net.W_enc + net.b_enc
            start = pre.quantile(1 - cfg.k / cfg.d_sae, dim=0).clamp(min=INIT_THRESHOLD)
            net.log_threshold.copy_(start.log())
    optimizers = {layer: torch.optim.Adam(net.parameters(), lr=cfg.lr)
                  for layer, net in nets.items()}
    batch = first
    for step in range(cfg.max_steps):
        if step:
            batch = next(stream)
        for layer, net in nets.items():
            x, y = pair(batch, layer)
            out, l0 = net(x)
            mse = (out - y * scale[layer]).pow(2).sum(-1).mean()
            sparsity = (2 / cfg.k * (l0 - cfg.k) ** 2).mean()  # quadratic, around k
            loss = mse + cfg.l0_coefficient * sparsity
            optimizers[layer].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizers[layer].step()
        if progress and (step + 1) % 100 == 0:
            print(f"transcoders: step {step + 1}/{cfg.max_steps}", flush=True)
    plain, rows = {}, []
    corpus_name = "+".join(str(p) for p in text_sources(source))
    for layer, net in nets.items():
        label = f"L{layer}.mlp_out"
        sae = _as_sae_lens(net, layer, scale[layer], skip, cfg, corpus_name,
                           str(model.config._name_or_path))
        plain[label] = from_sae_lens(sae, model=model)
        x, y = pair(held_out, layer)
        with torch.no_grad():
            codes = plain[label].encode(x)
            recon = plain[label].decode(codes, x)
        fvu = float((y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        l0 = float((codes != 0).sum(-1).float().mean())
        dead = int(((codes != 0).sum(0) == 0).sum())
        meta = sae.cfg.metadata
        meta.sage_nn_train_steps, meta.sage_nn_trainer = cfg.max_steps, "sage_nn transcoder"
        meta.sage_nn_held_out_fvu, meta.sage_nn_held_out_l0 = fvu, l0
        meta.sage_nn_held_out_dead = dead / cfg.d_sae
        meta.sage_nn_convergence = "not checked (the transcoder trainer)"
        meta.sage_nn_corpus_passes = round(cfg.max_steps * cfg.batch_size / tokens_per_pass, 2)
        meta.sage_nn_train_tokens_per_pass = tokens_per_pass
        meta.sage_nn_batch_size = cfg.batch_size
        if out_dir is not None:
            sae.save_model(Path(out_dir) / label)
        rows.append({"site": label, "architecture": sae.cfg.architecture(), "d_in": ad.d_model,
                     "d_sae": cfg.d_sae, "k": cfg.k, "fvu": fvu, "l0": l0, "dead": dead,
                     "steps": cfg.max_steps, "eval_tokens": len(x)})
    report = pd.DataFrame(rows).set_index("site")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        report.to_csv(Path(out_dir) / "report.csv")
    return plain, report


def _as_sae_lens(net: _Transcoder, layer: int, scale: float, skip: bool, cfg: Any,
                 corpus: str, model_name: str):
    """The trained transcoder as sae_lens's class, its output scale folded in (the model's
    units: ``y = out / scale``)."""
    cls, cfg_cls = (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig) if skip else \
        (JumpReLUTranscoder, JumpReLUTranscoderConfig)
    d = net.W_dec.shape[1]
    meta = SAEMetadata(hook_name=f"blocks.{layer}.ln2.hook_normalized",
                       hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=model_name,
                       context_size=cfg.context_size, dataset_path=corpus,
                       sage_nn_site=f"L{layer}.mlp_out")
    sae = cls(cfg_cls(d_in=d, d_sae=net.W_dec.shape[0], d_out=d, apply_b_dec_to_input=False,
                      metadata=meta))
    with torch.no_grad():
        sae.W_enc.copy_(net.W_enc)
        sae.b_enc.copy_(net.b_enc)
        sae.threshold.copy_(net.log_threshold.exp())
        sae.W_dec.copy_(net.W_dec / scale)
        sae.b_dec.copy_(net.b_dec / scale)
        if skip:
            sae.W_skip.copy_(net.W_skip / scale)
    return sae


__all__ = ["TRANSCODERS", "mlp_layers", "train_transcoders"]
