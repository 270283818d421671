"""Train SAEs on a model's activations with sae_lens's trainer, streamed through nnsight.

One trace per batch of text reads every requested site at once (and stops after the last
of them: no logits), so SAEs for several layers (and sublayer sites, as references for the
reconstruction) train from one pass over the data. TopK SAEs of one shape train as one
stack of tensors with one batched optimiser step (sae_lens's TopK training math, here in
plain torch; ``trainer="sae_lens"`` steps sae_lens's ``MultiSAETrainer`` instead, as
standard SAEs always do), optionally stopping at held-out convergence (``converge_tol``). Text comes from the
built-in offline corpus (text SmolLM2 generated itself, ``scripts/make_corpus.py``), local
text files, a HuggingFace dataset (``hf:NAME``, needs the network), or the prompts of a
task (:class:`Prompts`, :func:`task_prompts`; ``task:NAME``), and any mix of these
(``"builtin+task:ioi"`` or a list). Corpus text is cut into ``context_size`` chunks; a
task prompt is run on its own, as the evaluation runs it, and every position is kept.
Output is the sae_lens on-disk format (``SAE.load_from_disk`` reads it), one directory per
site.

One module because the trainers (sae_lens's and the batched TopK stack) share one activation
stream, held-out split and report; the corpus they read is :mod:`.corpus`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

# sae_lens before any trace runs (why: sage_nn/saes.py, top).
from sae_lens import (
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from tqdm.auto import tqdm

from ..model.activations import model_device
from ..model.sites import HEAD_KINDS, adapter, parse_site
from .corpus import Tokens, corpus_hash, corpus_units, text_sources
from .saes import SparseAutoencoder, from_sae_lens

TRAINABLE = ("standard", "topk")
# "batched": TopK SAEs of one shape step as one stacked tensor op with one Adam step (here,
# plain torch, sae_lens's TopK training math); "sae_lens": sae_lens's MultiSAETrainer, one
# SAETrainer per SAE. Standard (L1) SAEs always train with sae_lens's trainer.
TRAINERS = ("batched", "sae_lens")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_saes`.

    ``tokens``: training tokens per SAE. ``batch_size``: tokens per optimiser step.
    ``context_size``: tokens per text chunk fed to the model. ``skip_first``: drop each
    chunk's (and task prompt's) first tokens (attention-sink outliers: SmolLM2's first
    residual is ~60x the norm of the others). ``buffer_chunks``: chunks mixed in the
    shuffle buffer. ``eval_fraction``: share of chunks held out for FVU/L0/dead latents.
    ``cache_bytes``: a corpus whose activations fit is read once and kept in memory.
    ``model_batch_size``: chunks per model trace (shorter task prompts: as many as fit in
    the same number of tokens). ``task_prompts``: prompts drawn for a ``task:NAME`` source.
    ``trainer``: ``"batched"`` (TopK SAEs of one shape as stacked tensors, one optimiser
    step for all) or ``"sae_lens"`` (sae_lens's MultiSAETrainer); see :data:`TRAINERS`.
    ``converge_tol``: with the batched trainer, every ``check_every`` steps the held-out FVU
    of each SAE is measured, and an SAE stops once its best FVU improved by less than this
    fraction over the last ``converge_window`` steps (not before ``min_steps``); ``tokens``
    stays the cap. None: every SAE trains on all of ``tokens``. The steps each SAE used are
    in the report (``steps``), its ``cfg.json`` (``metadata.sage_nn_train_steps``) and
    ``train_config.json``.
    """

    architecture: str = "topk"
    d_sae: int = 2048
    k: int = 32
    l1_coefficient: float = 5.0
    lr: float = 4e-4
    tokens: int = 200_000
    batch_size: int = 1024
    context_size: int = 64
    model_batch_size: int = 16
    skip_first: int = 1
    buffer_chunks: int = 64
    eval_fraction: float = 0.1
    cache_bytes: int = 2 << 30
    task_prompts: int = 2048
    seed: int = 0
    trainer: str = "batched"
    converge_tol: float | None = None
    converge_window: int = 60
    check_every: int = 10
    min_steps: int = 60

    def __post_init__(self):
        if self.architecture not in TRAINABLE:
            raise ValueError(f"cannot train architecture {self.architecture!r}; "
                             f"choose one of {', '.join(TRAINABLE)}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be in 1..d_sae={self.d_sae}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer {self.trainer!r}: choose one of {', '.join(TRAINERS)}")
        if self.converge_tol is not None and not self.converge_tol >= 0:
            raise ValueError(f"converge_tol={self.converge_tol} must be >= 0 (or None: "
                             "train for all of `tokens`)")
        if min(self.converge_window, self.check_every) < 1:
            raise ValueError("converge_window and check_every must be >= 1 step")


# -- text sources ---------------------------------------------------------------------


# -- activations ------------------------------------------------------------------------

def _site_keys(model: Any, sites: Sequence[str]) -> list[tuple[str, int, str, list | None]]:
    keys = []
    for name in sites:
        layer, kind, heads = parse_site(name, model)
        if kind in HEAD_KINDS and heads is None:
            heads = list(range(adapter(model).n_heads_of(kind)))
        label = f"L{layer}.{kind}" + ("" if kind not in HEAD_KINDS or heads is None or
                                      len(heads) == adapter(model).n_heads_of(kind)
                                      else ".h" + "_".join(map(str, heads)))
        keys.append((label, layer, kind, heads))
    return keys


def _batch_ranges(lengths: Sequence[int], batch_size: int, batch_tokens: int | None):
    """Consecutive ranges of at most ``batch_size`` sequences, or, with ``batch_tokens``,
    as many as fit in that many (padded) tokens: short task prompts go many to a trace,
    since each trace has a fixed cost."""
    start = 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and (
                end - start < batch_size if batch_tokens is None
                else (end - start + 1) * max(longest, lengths[end]) <= batch_tokens):
            longest = max(longest, lengths[end])
            end += 1
        yield start, end
        start = end


def activation_batches(model: Any, units, sites, *, batch_size: int = 16,
                       skip_first: int = 1, batch_tokens: int | None = None,
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch of token sequences (rows of a chunk tensor, or a list of 1-D tensors of any
    length), one trace reading every site: ``{label: [tokens, width]}``, the real tokens of
    each sequence from ``skip_first`` on. A batch is ``batch_size`` sequences, or as many as
    fit in ``batch_tokens``. Shorter sequences are right-padded: causal attention keeps
    padding after a token from changing it."""
    ad, device = adapter(model), model_device(model)
    keys = sorted(_site_keys(model, sites), key=lambda k: (k[1], ad.kinds().index(k[2])))
    pad = model.tokenizer.pad_token_id or 0
    for start, end in _batch_ranges([len(u) for u in units], batch_size, batch_tokens):
        part = list(units[start: end])
        lengths = torch.tensor([len(u) for u in part])
        ids = torch.nn.utils.rnn.pad_sequence([getattr(u, "ids", u) for u in part],
                                              batch_first=True, padding_value=pad)
        steps = torch.arange(ids.shape[1])
        mask = steps[None] < lengths[:, None]
        keep = mask & (steps[None] >= skip_first)
        for row, u in enumerate(part):
            if isinstance(u, Tokens):  # only the chosen tokens of this sequence
                keep[row] = False
                keep[row, list(u.keep)] = True
        saved = {}
        with torch.no_grad(), model.trace({"input_ids": ids.to(device),
                                           "attention_mask": mask.long().to(device)}) as tracer:
            for label, layer, kind, heads in keys:
                t = ad.tensor(model, layer, kind)
                if kind in HEAD_KINDS:
                    t = t[..., ad.channels(kind, heads)]
                saved[label] = t.save()
            # nothing after the last site is needed: the layers above it and the logits
            # (SmolLM2's unembedding is a fifth of a forward) are not computed
            tracer.stop()
        yield {k: v[keep.to(v.device)].float().cpu() for k, v in saved.items()}


def _shuffled(model, units, sites, cfg: TrainConfig, rng: torch.Generator):
    """Endless stream of shuffled training batches ``{label: [batch_size, width]}``.

    A corpus whose activations fit in ``cfg.cache_bytes`` (the built-in one does) is run
    through the model once and reshuffled every epoch; a larger one is streamed through
    a shuffle buffer of ``cfg.buffer_chunks`` chunks, re-running the model each epoch.
    """
    ad = adapter(model)
    width = sum(ad.d_head * len(h) if kind in HEAD_KINDS else ad.d_model
                for _, _, kind, h in _site_keys(model, sites))
    cached = count_tokens(units, cfg.skip_first) * width * 4 <= cfg.cache_bytes
    buffers = None
    while True:
        order = [units[i] for i in torch.randperm(len(units), generator=rng)]
        if buffers is None or not cached:
            step = len(order) if cached else cfg.buffer_chunks
            buffers = []
            for start in range(0, len(order), step):
                parts = list(activation_batches(model, order[start: start + step], sites,
                                                skip_first=cfg.skip_first,
                                                batch_tokens=_batch_tokens(cfg)))
                buffers.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
                if not cached:
                    yield from _batches_of(buffers.pop(), cfg.batch_size, rng)
        for buf in buffers:
            yield from _batches_of(buf, cfg.batch_size, rng)


def _batch_tokens(cfg: TrainConfig) -> int:
    """Tokens per trace: ``model_batch_size`` chunks' worth, whatever the sequences' length."""
    return cfg.model_batch_size * cfg.context_size


def count_tokens(units, skip_first: int) -> int:
    return sum(len(u.keep) if isinstance(u, Tokens) else max(0, len(u) - skip_first)
               for u in units)


def _batches_of(buf: dict, batch_size: int, rng: torch.Generator):
    n = next(iter(buf.values())).shape[0]
    perm = torch.randperm(n, generator=rng)
    for b in range(0, n - batch_size + 1, batch_size):
        idx = perm[b: b + batch_size]
        yield {k: v[idx] for k, v in buf.items()}


# -- training -----------------------------------------------------------------------------

def _hook_name(layer: int, kind: str, heads, n_heads: int) -> str:
    if kind in HEAD_KINDS:
        if heads is not None and len(heads) == 1:
            return f"L{layer}.{kind}.h{heads[0]}"
        if heads is not None and len(heads) != n_heads:
            raise ValueError("train head-kind SAEs on one head (L5.z.h3) or all heads (L5.z)")
        return f"blocks.{layer}.attn.hook_{kind}"
    return f"blocks.{layer}.hook_{kind}"


def _new_sae(cfg: TrainConfig, d_in: int, meta: SAEMetadata):
    if cfg.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k,
                                                     metadata=meta))
    return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae,
                                                         l1_coefficient=cfg.l1_coefficient,
                                                         metadata=meta))


def train_saes(model: Any, sites: Sequence[str], config: TrainConfig | None = None, *,
               source: Any = "builtin", out_dir: str | Path | None = None,
               progress: bool = True) -> tuple[dict[str, SparseAutoencoder], pd.DataFrame]:
    """Train one SAE per site (``L5.resid_pre``, ``L5.mlp_out``, ``L5.z`` = all heads, TL
    hook names...) from one stream of activations. ``source``: see :func:`corpus_units`
    (``"builtin"``, a text file/directory, ``hf:NAME``, ``task:NAME``, :class:`Prompts`,
    or a mix). Returns the trained SAEs (plain torch) and a table of held-out FVU, L0 and
    dead latents; with ``out_dir``, each SAE is saved in sae_lens format under
    ``out_dir/<site>`` with ``train_config.json`` (its config, corpus and corpus hash).
    ``progress=False`` hides the step counter."""
    cfg = config or TrainConfig()
    ad = adapter(model)
    keys = _site_keys(model, sites)
    labels = [k[0] for k in keys]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate sites in {list(sites)}")
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    units = corpus_units(model, source, cfg)
    units = [units[i] for i in torch.randperm(len(units), generator=rng)]
    n_eval = max(1, int(len(units) * cfg.eval_fraction))
    eval_units, train_units = units[:n_eval], units[n_eval:]
    if len(train_units) == 0:
        raise ValueError("not enough text for a held-out split; add text or lower eval_fraction")
    tokens_per_pass = count_tokens(train_units, cfg.skip_first)
    if tokens_per_pass < cfg.batch_size:
        raise ValueError(f"{tokens_per_pass} training tokens, fewer than batch_size "
                         f"{cfg.batch_size}: add text or lower batch_size")
    name = str(model.config._name_or_path)
    corpus_name = "+".join(str(p) for p in text_sources(source))
    saes, hooks = {}, {}
    for label, layer, kind, heads in keys:
        d_in = ad.d_head * len(heads) if kind in HEAD_KINDS else ad.d_model
        hook = _hook_name(layer, kind, heads, ad.n_heads_of(kind))
        meta = SAEMetadata(hook_name=hook, model_name=name, context_size=cfg.context_size,
                           dataset_path=corpus_name, sage_nn_site=label)
        saes[label], hooks[label] = _new_sae(cfg, d_in, meta), label
    n_steps = -(-cfg.tokens // cfg.batch_size)
    # held-out activations, read once: for convergence checks and the final report
    held_out = _activations(model, eval_units, labels, cfg)
    # sae_lens's own bar moves every 100 steps only: count steps here too
    stream = iter(tqdm(_shuffled(model, train_units, labels, cfg, rng),
                       total=n_steps, desc="train steps", leave=False, disable=not progress))
    # b_dec starts at the data mean (sae_lens's runner does this too): residual streams
    # have large means, which a few hundred steps from zero would not learn
    first = next(stream)
    with torch.no_grad():
        for label, sae in saes.items():
            sae.b_dec.copy_(first[label].mean(0))
    stream = itertools.chain([first], stream)
    if cfg.trainer == "batched" and cfg.architecture == "topk":
        steps, dead_in_training, curves = _fit_batched(saes, stream, cfg, held_out, n_steps)
    else:
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.tokens, train_batch_size_samples=cfg.batch_size,
            lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant",
            dead_feature_window=_dead_window(cfg), feature_sampling_window=max(1, n_steps),
            device=str(model_device(model)))
        trainer = MultiSAETrainer(trainer_cfg, saes, hooks, stream)
        saes = trainer.fit()  # sae_lens shows a progress bar
        steps = {label: trainer.n_training_steps for label in labels}
        dead_in_training = {l: trainer.trainers[l].dead_neurons.sum().item() for l in labels}
        curves = {}
    plain = {label: from_sae_lens(_as_inference(saes[label]), site=label, model=model)
             for label in labels}
    report = evaluate(model, plain, eval_units, cfg, acts=held_out)
    report["dead_in_training"] = [dead_in_training[l] for l in labels]
    report["steps"] = [steps[l] for l in labels]
    for label in labels:  # what the SAE was trained with, and how well, travels with it
        meta = saes[label].cfg.metadata
        meta.sage_nn_train_steps = steps[label]
        meta.sage_nn_trainer = cfg.trainer if cfg.architecture == "topk" else "sae_lens"
        meta.sage_nn_held_out_fvu = float(report.loc[label, "fvu"])
        meta.sage_nn_held_out_l0 = float(report.loc[label, "l0"])
        if out_dir is not None:
            saes[label].save_inference_model(Path(out_dir) / label)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        report.to_csv(Path(out_dir) / "report.csv")
        (Path(out_dir) / "train_config.json").write_text(json.dumps(
            {**asdict(cfg), "corpus": corpus_name, "corpus_hash": corpus_hash(source),
             "train_tokens_per_pass": tokens_per_pass, "steps_used": steps,
             "held_out_fvu_curves": curves}, indent=2))
    return plain, report


def _dead_window(cfg: TrainConfig) -> int:
    """Steps without firing after which a latent counts as dead (sae_lens's
    ``dead_feature_window``; the TopK auxiliary loss trains those)."""
    return max(1, cfg.tokens // cfg.batch_size // 4)


def _activations(model: Any, units, labels: Sequence[str], cfg: TrainConfig) -> dict:
    acts = list(activation_batches(model, units, list(labels), skip_first=cfg.skip_first,
                                   batch_tokens=_batch_tokens(cfg)))
    return {label: torch.cat([a[label] for a in acts]) for label in labels}


class _TopKStack:
    """TopK SAEs of one shape trained as stacked tensors ``[n_saes, ...]``: one batched
    matmul per layer and one Adam step for all of them. The math is sae_lens's
    ``TopKTrainingSAE`` with ``SAETrainer``: pre-activations scaled by the decoder row
    norms, ReLU of the top k, MSE summed over the input and averaged over the batch, the
    TopK auxiliary loss on dead latents (k_aux = d_in / 2), gradient norm clipped to 1 per
    SAE, Adam (0.9, 0.999) at a constant learning rate."""

    NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(self, labels: list[str], saes: dict, cfg: TrainConfig, dead_window: int):
        first = saes[labels[0]].cfg
        self.labels, self.k, self.lr = list(labels), first.k, cfg.lr
        self.aux_coefficient = first.aux_loss_coefficient
        self.d_in, self.dead_window = first.d_in, dead_window
        if not (first.rescale_acts_by_decoder_norm and first.apply_b_dec_to_input
                and first.normalize_activations == "none"):
            raise ValueError("the batched trainer implements sae_lens's default TopK SAE only")
        self.p = {n: torch.stack([getattr(saes[l], n).detach() for l in labels]).clone()
                  for n in self.NAMES}
        self.m = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.v = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.t = 0
        shape = (len(labels), first.d_sae)
        self.since_fired = torch.zeros(shape)
        self.fired_count = torch.zeros(shape)
        self.n_seen = 0

    def _encode(self, x: torch.Tensor, p: dict):
        """Pre-activations ``[S, B, d_sae]`` and the top-k latents of each token. sae_lens
        ranks ``pre * |W_dec row|`` and decodes ``relu(pre * norm) / norm @ W_dec``, which
        is ``relu(pre) @ W_dec``: the norm only picks the latents, so it is applied to the
        ranking alone (no gradient flows through it in sae_lens either; it cancels)."""
        pre = torch.baddbmm(p["b_enc"][:, None], x - p["b_dec"][:, None], p["W_enc"])
        with torch.no_grad():
            norm = p["W_dec"].norm(dim=-1)[:, None]  # [S, 1, d_sae]
            ranked = pre.detach() * norm
            index = ranked.topk(self.k, dim=-1, sorted=False).indices
        return pre, ranked, index

    @staticmethod
    def _decode(coef: torch.Tensor, index: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """``sum_j coef[s, b, j] * W_dec[s, index[s, b, j]]``: only the chosen rows."""
        S, B, k = index.shape
        n = W_dec.shape[1]
        flat = (index + torch.arange(S, device=index.device)[:, None, None] * n).reshape(-1, k)
        out = torch.nn.functional.embedding_bag(flat, W_dec.reshape(S * n, -1), mode="sum",
                                                per_sample_weights=coef.reshape(-1, k))
        return out.view(S, B, -1)

    def _forward(self, x: torch.Tensor, p: dict):
        pre, ranked, index = self._encode(x, p)
        coef = pre.gather(-1, index).relu()
        out = self._decode(coef, index, p["W_dec"]) + p["b_dec"][:, None]
        return out, coef, index, pre, ranked

    @torch.no_grad()
    def fvu(self, x: torch.Tensor) -> torch.Tensor:
        out = self._forward(x, self.p)[0]
        return ((x - out) ** 2).sum((1, 2)) / ((x - x.mean(1, keepdim=True)) ** 2).sum((1, 2))

    def step(self, x: torch.Tensor) -> None:
        p = {n: t.requires_grad_() for n, t in self.p.items()}
        dead = self.since_fired > self.dead_window  # before this step's firing, as sae_lens
        out, coef, index, pre, ranked = self._forward(x, p)
        loss = (out - x).pow(2).sum(-1).mean(-1).sum()  # each SAE's loss; params are disjoint
        n_dead = dead.sum(-1)
        if int(n_dead.max()) > 0:  # TopK auxiliary loss: dead latents predict the residual
            half = self.d_in // 2
            k_aux = min(half, int(n_dead.max()))
            scale = (n_dead.float() / half).clamp(max=1.0)  # 0 for an SAE with none dead
            residual = (x - out).detach()
            with torch.no_grad():
                aux_index = ranked.masked_fill_(~dead[:, None], -torch.inf).topk(
                    k_aux, dim=-1, sorted=False)
                live = torch.isfinite(aux_index.values)  # an SAE with fewer dead than k_aux
                aux_index = aux_index.indices
            aux_coef = torch.where(live, pre.gather(-1, aux_index), 0.0)  # no ReLU (sae_lens)
            recons = self._decode(aux_coef, aux_index, p["W_dec"])
            aux = (recons - residual).pow(2).sum(-1).mean(-1)
            loss = loss + (self.aux_coefficient * scale * aux).sum()
        loss.backward()
        with torch.no_grad():
            grads = {n: t.grad for n, t in p.items()}
            total = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0)
            clip = (1.0 / (total.sqrt() + 1e-6)).clamp(max=1.0)
            self.t += 1
            b1, b2, eps = 0.9, 0.999, 1e-8
            for n, g in grads.items():
                g.mul_(clip.view(-1, *[1] * (g.ndim - 1)))
                self.m[n].lerp_(g, 1 - b1)
                self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (self.v[n].sqrt() / (1 - b2 ** self.t) ** 0.5).add_(eps)
                self.p[n] = p[n].detach().addcdiv_(self.m[n], denom,
                                                   value=-self.lr / (1 - b1 ** self.t))
            S, B, n = pre.shape
            firing = torch.zeros(S, B, n, dtype=torch.bool).scatter_(-1, index, coef > 0)
            self.since_fired += 1
            self.since_fired[firing.any(1)] = 0
            self.fired_count += firing.sum(1)
            self.n_seen += x.shape[1]

    def keep(self, rows: list[int]) -> None:
        """Drop the SAEs not in ``rows`` (finished) from every stacked state."""
        idx = torch.tensor(rows)
        self.labels = [self.labels[i] for i in rows]
        for state in (self.p, self.m, self.v):
            for n in state:
                state[n] = state[n][idx].clone()
        self.since_fired = self.since_fired[idx].clone()
        self.fired_count = self.fired_count[idx].clone()

    def write_back(self, saes: dict, steps: int, dead: dict, finished: dict,
                   rows: list[int] | None = None) -> None:
        """Copy the trained weights (of ``rows``; default all) into the sae_lens SAEs,
        which are saved in sae_lens's format, and record the steps they took."""
        for i in range(len(self.labels)) if rows is None else rows:
            label = self.labels[i]
            sae = saes[label]
            with torch.no_grad():
                for n in self.NAMES:
                    getattr(sae, n).copy_(self.p[n][i])
            sae.cfg.metadata.l0 = (self.fired_count[i].sum() / max(1, self.n_seen)).item()
            sae.cfg.metadata.num_dead_features = int(
                (self.since_fired[i] > self.dead_window).sum())
            dead[label] = sae.cfg.metadata.num_dead_features
            finished[label] = steps


def _converged(curve: list, step: int, cfg: TrainConfig) -> bool:
    """Whether the best held-out FVU of ``curve`` (``[[step, fvu], ...]``) improved by less
    than ``cfg.converge_tol`` (relative) over the last ``cfg.converge_window`` steps."""
    if step < max(cfg.min_steps, cfg.converge_window):
        return False
    before = [f for s, f in curve if s <= step - cfg.converge_window]
    if not before:
        return False
    best_then, best_now = min(before), min(f for _, f in curve)
    return best_then - best_now < cfg.converge_tol * best_then


def _fit_batched(saes: dict, stream, cfg: TrainConfig, held_out: dict, n_steps: int):
    """Train TopK SAEs, those of one shape as one :class:`_TopKStack`, from one stream of
    batches. Returns steps used, dead latents at the end, and held-out FVU curves."""
    groups: dict[tuple, list[str]] = {}
    for label, sae in saes.items():
        groups.setdefault((sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k), []).append(label)
    stacks = [_TopKStack(labels, saes, cfg, _dead_window(cfg)) for labels in groups.values()]
    steps, dead = {}, {}
    curves: dict[str, list] = {label: [] for label in saes}
    step = 0
    while stacks and step < n_steps:
        batch = next(stream)
        for stack in stacks:
            stack.step(torch.stack([batch[label] for label in stack.labels]))
        step += 1
        if cfg.converge_tol is None or (step % cfg.check_every and step < n_steps):
            continue
        for stack in list(stacks):
            fvu = stack.fvu(torch.stack([held_out[label] for label in stack.labels]))
            going = []
            for i, label in enumerate(stack.labels):
                curves[label].append([step, round(fvu[i].item(), 6)])
                if not _converged(curves[label], step, cfg):
                    going.append(i)
            if len(going) < len(stack.labels):  # finished SAEs leave the stack
                stack.write_back(saes, step, dead, steps,
                                 rows=[i for i in range(len(stack.labels)) if i not in going])
                if going:
                    stack.keep(going)
                else:
                    stacks.remove(stack)
    for stack in stacks:
        stack.write_back(saes, step, dead, steps)
    return steps, dead, curves


def _as_inference(training_sae):
    """The inference sae_lens SAE of a training SAE (as written by save_inference_model)."""
    import tempfile

    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def evaluate(model: Any, saes: dict[str, SparseAutoencoder], units,
             cfg: TrainConfig, acts: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Held-out FVU, mean L0 and dead latents (never active on the held-out tokens).
    ``acts``: the held-out activations by site, if already read."""
    rows = []
    if acts is None:
        acts = _activations(model, units, list(saes), cfg)
    for label, sae in saes.items():
        x = acts[label]
        with torch.no_grad():
            codes = sae.encode(x)
            recon = sae.decode(codes, x)
        err = ((x - recon) ** 2).sum().item()
        var = ((x - x.mean(0)) ** 2).sum().item()
        rows.append({"site": label, "architecture": sae.architecture, "d_in": sae.d_in,
                     "d_sae": sae.d_sae, "fvu": err / var,
                     "l0": (codes > 0).float().sum(-1).mean().item(),
                     "dead": int(((codes > 0).sum(0) == 0).sum().item()), "eval_tokens": len(x)})
    return pd.DataFrame(rows).set_index("site")


def load_trained(out_dir: str | Path, model: Any = None) -> dict[str, SparseAutoencoder]:
    """Every SAE saved under ``out_dir`` by :func:`train_saes`, keyed by site label."""
    from .saes import load_sae

    dirs = sorted(p.parent for p in Path(out_dir).glob("*/cfg.json"))
    if not dirs:
        raise FileNotFoundError(f"no SAEs (*/cfg.json) under {out_dir}; train with sage train-sae")
    return {d.name: load_sae(d, model=model, site=d.name) for d in dirs}


__all__ = ["TrainConfig", "train_saes", "activation_batches", "evaluate", "load_trained"]
