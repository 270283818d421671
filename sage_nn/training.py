"""Train SAEs on a model's activations with sae_lens's trainer, streamed through nnsight.

One trace per batch of text chunks reads every requested site at once, so SAEs for several
layers (and sublayer sites, as references for the reconstruction) train from one pass over
the data: sae_lens's ``MultiSAETrainer`` steps them in lockstep. Text comes from the
built-in offline corpus (text SmolLM2 generated itself, ``scripts/make_corpus.py``), local
text files, or a HuggingFace dataset (``hf:NAME``, needs the network). Output is the
sae_lens on-disk format (``SAE.load_from_disk`` reads it), one directory per site.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# sae_lens before any trace runs (DESIGN.md, "Known facts").
from sae_lens import (StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                      TopKTrainingSAEConfig)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .activations import model_device
from .saes import SparseAutoencoder, from_sae_lens, parse_site
from .sites import HEAD_KINDS, adapter

BUILTIN_CORPUS = Path(__file__).parent / "data" / "smollm2_corpus.jsonl.gz"
TRAINABLE = ("standard", "topk")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_saes`.

    ``tokens``: training tokens per SAE. ``batch_size``: tokens per optimiser step.
    ``context_size``: tokens per text chunk fed to the model. ``skip_first``: drop each
    chunk's first tokens (attention-sink outliers). ``buffer_chunks``: chunks mixed in the
    shuffle buffer. ``eval_fraction``: share of chunks held out for FVU/L0/dead latents.
    ``cache_bytes``: a corpus whose activations fit is read once and kept in memory.
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
    seed: int = 0

    def __post_init__(self):
        if self.architecture not in TRAINABLE:
            raise ValueError(f"cannot train architecture {self.architecture!r}; "
                             f"choose one of {', '.join(TRAINABLE)}")
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be in 1..d_sae={self.d_sae}")


# -- text sources ---------------------------------------------------------------------

def load_texts(source: str | Path = "builtin") -> list[str]:
    """Documents from ``"builtin"``, a text file (one document per blank-line-separated
    paragraph), a directory of ``.txt`` files, or ``"hf:NAME[:SPLIT[:COLUMN]]"``."""
    source = str(source)
    if source == "builtin":
        if not BUILTIN_CORPUS.exists():
            raise FileNotFoundError(f"the built-in corpus {BUILTIN_CORPUS} is missing; "
                                    "regenerate it with python scripts/make_corpus.py")
        with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    if source.startswith("hf:"):
        return _hf_texts(*source[3:].split(":"))
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("**/*.txt"))
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"text source {source!r} not found: use 'builtin', a .txt file, "
                                "a directory of .txt files, or hf:DATASET")
    texts = [t.strip() for f in files for t in f.read_text(encoding="utf-8").split("\n\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"no text in {source!r}")
    return texts


def _hf_texts(name: str, split: str = "train", column: str = "text", limit: int = 20_000):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise RuntimeError(f"hf:{name} needs the HuggingFace hub, but HF_HUB_OFFLINE is set; "
                           "use the built-in corpus ('builtin') or local text files")
    import datasets

    stream = datasets.load_dataset(name, split=split, streaming=True)
    return [row[column] for _, row in zip(range(limit), stream)]


def chunk_tokens(model: Any, texts: Sequence[str], context_size: int) -> torch.Tensor:
    """All documents tokenized, joined with EOS, cut into ``[n_chunks, context_size]``."""
    tok = model.tokenizer
    sep = tok.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tok(text)["input_ids"] + ([sep] if sep is not None else [])
    n = len(ids) // context_size
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens of text, fewer than context_size={context_size}")
    return torch.tensor(ids[: n * context_size]).view(n, context_size)


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


def activation_batches(model: Any, chunks: torch.Tensor, sites, *, batch_size: int = 16,
                       skip_first: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch of chunks, one trace reading every site: ``{label: [tokens, width]}``."""
    ad, device = adapter(model), model_device(model)
    keys = sorted(_site_keys(model, sites), key=lambda k: (k[1], ad.kinds().index(k[2])))
    for start in range(0, len(chunks), batch_size):
        ids = chunks[start: start + batch_size].to(device)
        saved = {}
        with torch.no_grad(), model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
            for label, layer, kind, heads in keys:
                t = ad.tensor(model, layer, kind)
                if kind in HEAD_KINDS:
                    t = t[..., ad.channels(kind, heads)]
                saved[label] = t[:, skip_first:].save()
        yield {k: v.reshape(-1, v.shape[-1]).float().cpu() for k, v in saved.items()}


def _shuffled(model, chunks, sites, cfg: TrainConfig, rng: torch.Generator):
    """Endless stream of shuffled training batches ``{label: [batch_size, width]}``.

    A corpus whose activations fit in ``cfg.cache_bytes`` (the built-in one does) is run
    through the model once and reshuffled every epoch; a larger one is streamed through
    a shuffle buffer of ``cfg.buffer_chunks`` chunks, re-running the model each epoch.
    """
    ad = adapter(model)
    width = sum(ad.d_head * len(h) if kind in HEAD_KINDS else ad.d_model
                for _, _, kind, h in _site_keys(model, sites))
    cached = len(chunks) * (cfg.context_size - cfg.skip_first) * width * 4 <= cfg.cache_bytes
    buffers = None
    while True:
        order = chunks[torch.randperm(len(chunks), generator=rng)]
        if buffers is None or not cached:
            step = len(order) if cached else cfg.buffer_chunks
            buffers = []
            for start in range(0, len(order), step):
                parts = list(activation_batches(model, order[start: start + step], sites,
                                                batch_size=cfg.model_batch_size,
                                                skip_first=cfg.skip_first))
                buffers.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
                if not cached:
                    yield from _batches_of(buffers.pop(), cfg.batch_size, rng)
        for buf in buffers:
            yield from _batches_of(buf, cfg.batch_size, rng)


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
               source: str | Path = "builtin", out_dir: str | Path | None = None,
               ) -> tuple[dict[str, SparseAutoencoder], pd.DataFrame]:
    """Train one SAE per site (``L5.resid_pre``, ``L5.mlp_out``, ``L5.z`` = all heads, TL
    hook names...) from one stream of activations. Returns the trained SAEs (plain torch)
    and a table of held-out FVU, L0 and dead latents; with ``out_dir``, each SAE is saved
    in sae_lens format under ``out_dir/<site>``."""
    cfg = config or TrainConfig()
    ad = adapter(model)
    keys = _site_keys(model, sites)
    labels = [k[0] for k in keys]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate sites in {list(sites)}")
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    chunks = chunk_tokens(model, load_texts(source), cfg.context_size)
    chunks = chunks[torch.randperm(len(chunks), generator=rng)]
    n_eval = max(1, int(len(chunks) * cfg.eval_fraction))
    eval_chunks, train_chunks = chunks[:n_eval], chunks[n_eval:]
    if len(train_chunks) == 0:
        raise ValueError("not enough text for a held-out split; add text or lower eval_fraction")
    tokens_per_pass = len(train_chunks) * (cfg.context_size - cfg.skip_first)
    if tokens_per_pass < cfg.batch_size:
        raise ValueError(f"{tokens_per_pass} training tokens, fewer than batch_size "
                         f"{cfg.batch_size}: add text or lower batch_size")
    name = str(model.config._name_or_path)
    saes, hooks = {}, {}
    for label, layer, kind, heads in keys:
        d_in = ad.d_head * len(heads) if kind in HEAD_KINDS else ad.d_model
        hook = _hook_name(layer, kind, heads, ad.n_heads_of(kind))
        meta = SAEMetadata(hook_name=hook, model_name=name, context_size=cfg.context_size,
                           dataset_path=str(source), sage_nn_site=label)
        saes[label], hooks[label] = _new_sae(cfg, d_in, meta), label
    trainer_cfg = SAETrainerConfig(total_training_samples=cfg.tokens,
                                   train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
                                   lr_end=cfg.lr / 10, lr_scheduler_name="constant",
                                   dead_feature_window=max(1, cfg.tokens // cfg.batch_size // 4),
                                   feature_sampling_window=max(1, cfg.tokens // cfg.batch_size),
                                   device=str(model_device(model)))
    # sae_lens's own bar moves every 100 steps only: count steps here too
    stream = iter(tqdm(_shuffled(model, train_chunks, labels, cfg, rng),
                       total=-(-cfg.tokens // cfg.batch_size), desc="train steps", leave=False))
    # b_dec starts at the data mean (sae_lens's runner does this too): residual streams
    # have large means, which a few hundred steps from zero would not learn
    first = next(stream)
    with torch.no_grad():
        for label, sae in saes.items():
            sae.b_dec.copy_(first[label].mean(0))
    stream = itertools.chain([first], stream)
    trainer = MultiSAETrainer(trainer_cfg, saes, hooks, stream)
    trained = trainer.fit()  # sae_lens shows a progress bar
    plain = {}
    for label, (_, layer, kind, heads) in zip(labels, keys):
        sae = trained[label]
        if out_dir is not None:
            sae.save_inference_model(Path(out_dir) / label)
        plain[label] = from_sae_lens(_as_inference(sae), site=label, model=model)
    report = evaluate(model, plain, eval_chunks, cfg)
    report["dead_in_training"] = [trainer.trainers[l].dead_neurons.sum().item() for l in labels]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        report.to_csv(Path(out_dir) / "report.csv")
        (Path(out_dir) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return plain, report


def _as_inference(training_sae):
    """The inference sae_lens SAE of a training SAE (as written by save_inference_model)."""
    import tempfile

    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def evaluate(model: Any, saes: dict[str, SparseAutoencoder], chunks: torch.Tensor,
             cfg: TrainConfig) -> pd.DataFrame:
    """Held-out FVU, mean L0 and dead latents (never active on the held-out tokens)."""
    rows = []
    acts = list(activation_batches(model, chunks, list(saes), batch_size=cfg.model_batch_size,
                                   skip_first=cfg.skip_first))
    for label, sae in saes.items():
        x = torch.cat([a[label] for a in acts])
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


__all__ = ["TrainConfig", "train_saes", "load_texts", "chunk_tokens", "activation_batches",
           "evaluate", "load_trained", "BUILTIN_CORPUS"]
