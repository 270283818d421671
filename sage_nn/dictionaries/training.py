"""Train SAEs on a model's activations, streamed through nnsight, and show them trained.

Every SAE of a call trains from one read of the corpus (:mod:`.stream`: one trace per batch
reads every site; a small corpus is read once and reused every epoch), with a part of the
corpus held out. TopK SAEs of one shape train as one stack of tensors with hand-written
sparse gradients (:mod:`.topk`, sae_lens's TopK training math; the loop and its convergence
checks: :mod:`.fit`); ``trainer="sae_lens"`` steps sae_lens's ``MultiSAETrainer`` instead,
as standard SAEs always do. Activations are scaled to an average norm of ``sqrt(d_in)``
(sae_lens's ``expected_average_only_in``), so one learning rate suits residual streams and
heads alike; the scale is folded into the saved weights. Every ``check_every`` steps the held-out FVU and dead share of every SAE are
measured; an SAE whose held-out FVU stopped improving (:func:`converged`) has converged,
and stops there unless ``stop_at_convergence`` is off. The curve, the steps, whether it
converged and by which criterion, and how often the corpus was repeated travel with each
SAE in its ``cfg.json`` (:func:`training_record` reads them back). ``init`` continues
training SAEs saved before. Text sources are :mod:`.corpus`'s. Output is the sae_lens
on-disk format (``SAE.load_from_disk`` reads it), one directory per site.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# sae_lens before any trace runs (why: sage_nn/dictionaries/saes.py, top).
import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..common.formats import TRAINABLE
from ..model.activations import model_device
from ..model.sites import HEAD_KINDS, adapter
from .corpus import corpus_hash, text_sources
from .fit import converged, fit_batched, fit_sae_lens
from .saes import SparseAutoencoder, from_sae_lens
from .stream import read_activations, shuffled, site_keys, site_width, split_corpus
from .topk import WEIGHT_INITS, initialise_threshold, initialise_topk
from .transcoding import TRANSCODERS, train_transcoders

#: What ``architecture`` trains, by name: sae_lens's training class (its config class is the
#: name + "Config") and the TrainConfig fields its config takes, by the config's names.
#: BatchTopK and Matryoshka-BatchTopK save as JumpReLU SAEs (sae_lens's inference form).
TRAINING_CLASSES = {
    "standard": ("StandardTrainingSAE", {"l1_coefficient": "l1_coefficient"}),
    "topk": ("TopKTrainingSAE", {"k": "k"}),
    "batchtopk": ("BatchTopKTrainingSAE", {"k": "k"}),
    "matryoshka_batchtopk": ("MatryoshkaBatchTopKTrainingSAE",
                             {"k": "k", "matryoshka_widths": "matryoshka_widths"}),
    "jumprelu": ("JumpReLUTrainingSAE", {"l0_coefficient": "l0_coefficient",
                                         "jumprelu_sparsity_loss_mode": "quadratic",
                                         "target_l0": "k"}),
    "gated": ("GatedTrainingSAE", {"l1_coefficient": "l1_coefficient"}),
}
#: architectures whose sparsity is k active latents (per token, or per batch on average)
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")
#: architectures that ``weight_init`` starts from the data: TopK's start (unit decoder
#: rows, least-squares encoder scale), and the thresholds at k active latents
#: (:func:`~.topk.initialise_threshold`); the rest start as sae_lens starts them
DATA_STARTS = (*K_ARCHITECTURES, "jumprelu")
# "batched": TopK SAEs of one shape step as one stack with hand-written sparse gradients
# (sae_lens's TopK training math); "sae_lens": sae_lens's MultiSAETrainer, one SAETrainer
# per SAE. Every other architecture always trains with sae_lens's trainer.
TRAINERS = ("batched", "sae_lens")
#: sae_lens's names: "expected_average_only_in" scales every site to an average norm of
#: sqrt(d_in) for training (the factor is folded into the saved weights); "none" does not
NORMALIZATIONS = ("expected_average_only_in", "none")
#: part of the name of the run's SAE cache entries: SAEs another trainer made (before the
#: held-out convergence checks and activation normalisation) are not taken for these
TRAINER_VERSION = "t3"
#: added to it for the architectures whose training changed since: "d1", started from the data
ARCH_VERSIONS = {"batchtopk": "d1", "matryoshka_batchtopk": "d1", "jumprelu": "d1"}
#: beside each SAE the batched trainer saves: its Adam moments and step, so that ``init``
#: continues training where it stopped (a fresh Adam's first steps move every weight by
#: about ``lr``, undoing much of a trained SAE)
OPTIMIZER_FILE = "sage_nn_optimizer.safetensors"


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_saes`.

    ``tokens``: training tokens per SAE at most (the step cap is ``tokens / batch_size``).
    ``batch_size``: tokens per optimiser step. ``k``: active latents of a TopK SAE;
    ``k_heads``: of one at a head's site (q/k/v/z), which is narrower (None: ``k``).
    ``context_size``: tokens per text chunk fed to the model. ``skip_first``: drop each
    chunk's (and task prompt's) first tokens (attention-sink outliers: SmolLM2's first
    residual is ~60x the norm of the others). ``buffer_chunks``: chunks mixed in the
    shuffle buffer. ``eval_fraction``: share of chunks held out for convergence and the
    held-out FVU/L0/dead latents. ``cache_bytes``: a corpus whose activations fit is read
    once and kept in memory. ``model_batch_size``: chunks per model trace (shorter task
    prompts: as many as fit in the same number of tokens). ``task_prompts``: prompts drawn
    for a ``task:NAME`` source. ``trainer``: see :data:`TRAINERS`. ``normalize_activations``:
    see :data:`NORMALIZATIONS`. ``architecture``: one of :data:`TRAINING_CLASSES`
    (``k`` is also a JumpReLU SAE's target L0, sae_lens's quadratic L0 loss around it, as
    Gemma Scope 2; ``l0_coefficient`` its weight;
    ``matryoshka_levels`` nested prefixes of a Matryoshka SAE, halving down from ``d_sae``;
    ``transcoder``/``skip_transcoder``: JumpReLU transcoders of the MLPs of ``mlp_out``
    sites, target L0 ``k``, :mod:`.transcoding`).
    ``dead_window``: steps without firing after which a latent
    counts as dead in training, and the TopK auxiliary loss trains it (None: a quarter of
    the step cap). ``weight_init``: where a TopK, BatchTopK, Matryoshka or JumpReLU SAE starts
    (:data:`~.topk.WEIGHT_INITS`, :data:`DATA_STARTS`).
    ``lr``: Adam's rate at the residual's width; ``lr_by_width``: narrower sites step
    faster (:meth:`lr_at`).

    Convergence (TopK SAEs, batched trainer): every ``check_every`` steps each SAE's FVU
    and dead share on the held-out tokens are measured (its curve). An SAE has converged
    once its best held-out FVU improved by less than ``converge_tol`` (FVU, a share of the
    held-out variance) over the last ``converge_window`` steps, not before ``min_steps``;
    with ``stop_at_convergence`` it stops training there, else it trains all of
    ``tokens`` and the step where it converged is recorded.
    """

    architecture: str = "topk"
    d_sae: int = 2048
    k: int = 32
    k_heads: int | None = None
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    matryoshka_levels: int = 4
    lr: float = 1e-3
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
    normalize_activations: str = "expected_average_only_in"
    dead_window: int | None = None
    converge_tol: float = 0.005
    converge_window: int = 60
    check_every: int = 10
    min_steps: int = 60
    stop_at_convergence: bool = True
    weight_init: str = "data"
    lr_by_width: bool = True

    def __post_init__(self):
        if self.architecture not in TRAINABLE:
            raise ValueError(f"cannot train architecture {self.architecture!r}; "
                             f"choose one of {', '.join(TRAINABLE)}")
        if self.architecture in (*K_ARCHITECTURES, "jumprelu", *TRANSCODERS):
            for name in ("k", "k_heads"):
                k = getattr(self, name)
                if k is not None and not 0 < k <= self.d_sae:
                    raise ValueError(f"{name}={k} must be in 1..d_sae={self.d_sae}")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init={self.weight_init!r}: choose one of "
                             f"{', '.join(WEIGHT_INITS)}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer {self.trainer!r}: choose one of {', '.join(TRAINERS)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations={self.normalize_activations!r}: choose "
                             f"one of {', '.join(NORMALIZATIONS)}")
        if not self.converge_tol >= 0:
            raise ValueError(f"converge_tol={self.converge_tol} must be >= 0 (held-out FVU)")
        if min(self.converge_window, self.check_every) < 1:
            raise ValueError("converge_window and check_every must be >= 1 step")
        if self.dead_window is not None and self.dead_window < 1:
            raise ValueError(f"dead_window={self.dead_window} must be >= 1 step (or None)")

    @property
    def max_steps(self) -> int:
        return -(-self.tokens // self.batch_size)

    def lr_at(self, d_in: int, d_model: int) -> float:
        """Adam's learning rate for an SAE reading ``d_in`` dimensions of a ``d_model``-wide
        model: ``lr`` at the residual's width, and with ``lr_by_width``, ``lr *
        sqrt(d_model / d_in)`` elsewhere: Adam moves every weight by about ``lr``, so a unit
        decoder row of a 64-dimensional head turns 3x slower than one of 576 dimensions."""
        return self.lr * (math.sqrt(d_model / d_in) if self.lr_by_width else 1.0)

    def k_at(self, kind: str) -> int:
        """Active latents of a TopK SAE at a site of ``kind``."""
        return self.k_heads if kind in HEAD_KINDS and self.k_heads is not None else self.k

    def criterion(self) -> str:
        """The convergence criterion in words, as the report states it."""
        return (f"held-out FVU improved by less than {self.converge_tol:g} over the last "
                f"{self.converge_window} steps (checked every {self.check_every}, from step "
                f"{self.min_steps})")


def trainer_version(architecture: str) -> str:
    """The trainer's version in the name of an SAE cache entry of ``architecture``."""
    extra = ARCH_VERSIONS.get(architecture)
    return TRAINER_VERSION + (f"-{extra}" if extra else "")


def _hook_name(layer: int, kind: str, heads, n_heads: int) -> str:
    if kind in HEAD_KINDS:
        if heads is not None and len(heads) == 1:
            return f"L{layer}.{kind}.h{heads[0]}"
        if heads is not None and len(heads) != n_heads:
            raise ValueError("train head-kind SAEs on one head (L5.z.h3) or all heads (L5.z)")
        return f"blocks.{layer}.attn.hook_{kind}"
    return f"blocks.{layer}.hook_{kind}"


def _new_sae(cfg: TrainConfig, d_in: int, k: int, meta: SAEMetadata):
    """A sae_lens training SAE of ``cfg.architecture`` (:data:`TRAINING_CLASSES`)."""
    name, fields = TRAINING_CLASSES[cfg.architecture]
    values = {"k": k, "l1_coefficient": cfg.l1_coefficient, "quadratic": "quadratic",
              "l0_coefficient": cfg.l0_coefficient,
              "matryoshka_widths": sorted({max(1, cfg.d_sae >> i)
                                           for i in range(cfg.matryoshka_levels)})}
    options = {key: values[field] for key, field in fields.items()}
    return getattr(sae_lens, name)(getattr(sae_lens, f"{name}Config")(
        d_in=d_in, d_sae=cfg.d_sae, metadata=meta, **options))


def _initial(init: Any, labels: Sequence[str]) -> dict[str, Path]:
    """The SAE directories ``init`` names per site: a directory of site directories (as
    :func:`train_saes` writes), or ``{site: directory}``."""
    if isinstance(init, Mapping):
        dirs = {str(k): Path(v) for k, v in init.items()}
    else:
        dirs = {d.name: d for d in sorted(p.parent for p in Path(init).glob("*/cfg.json"))}
    missing = [label for label in labels if label not in dirs
               or not (dirs[label] / "cfg.json").exists()]
    if missing:
        raise FileNotFoundError(f"init {init}: no saved SAE for {', '.join(missing)} (a "
                                "directory with cfg.json per site, as train_saes writes)")
    return {label: dirs[label] for label in labels}


def _saved_metadata(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / "cfg.json").read_text()).get("metadata") or {}
    except (OSError, ValueError):
        return {}


def _load_optimizer(directory: Path) -> dict | None:
    """The Adam state saved beside an SAE (None: none saved, Adam starts afresh)."""
    path = Path(directory) / OPTIMIZER_FILE
    return load_file(str(path)) if path.exists() else None


def _load_init(sae, directory: Path, scale: float, state: dict | None = None) -> dict:
    """Copy a saved SAE's weights into a training SAE, in the scaled space it trains in
    (``x * scale``); return the saved SAE's metadata (its steps and curve so far). sae_lens
    saves a TopK SAE with unit decoder rows (the norms folded into the encoder: the same
    function); the saved training state's ``W_dec_norm`` unfolds them, so that the Adam
    moments fit the weights again."""
    from sae_lens import SAE

    saved = SAE.load_from_disk(str(directory))
    want = (sae.cfg.d_in, sae.cfg.d_sae, getattr(sae.cfg, "k", None), sae.cfg.architecture())
    have = (saved.cfg.d_in, saved.cfg.d_sae, getattr(saved.cfg, "k", None),
            saved.cfg.architecture())
    if want != have:
        raise ValueError(f"init {directory}: the saved SAE is (d_in, d_sae, k, architecture) "
                         f"= {have}, the training config asks for {want}; continue with the "
                         "config it was trained with")
    norm = state["W_dec_norm"] if state is not None and "W_dec_norm" in state else None
    norm = torch.ones(saved.cfg.d_sae) if norm is None else norm
    with torch.no_grad():
        sae.W_enc.copy_(saved.W_enc / norm / scale)
        sae.b_enc.copy_(saved.b_enc / norm)
        sae.W_dec.copy_(saved.W_dec * norm[:, None] * scale)
        sae.b_dec.copy_(saved.b_dec * scale)
    return saved.cfg.metadata.to_dict() if saved.cfg.metadata else {}


def train_saes(model: Any, sites: Sequence[str], config: TrainConfig | None = None, *,
               source: Any = "builtin", out_dir: str | Path | None = None,
               progress: bool = True, init: Any = None,
               ) -> tuple[dict[str, SparseAutoencoder], pd.DataFrame]:
    """Train one SAE per site (``L5.resid_pre``, ``L5.mlp_out``, ``L5.z`` = all heads, TL
    hook names...) from one stream of activations. ``source``: see :func:`corpus_units`
    (``"builtin"``, a text file/directory, ``hf:NAME``, ``task:NAME``, :class:`Prompts`,
    or a mix). ``init``: continue training saved SAEs (a directory :func:`train_saes`
    wrote, or ``{site: directory}``) rather than new ones; their steps and curves go on
    from where they were (the optimiser's state starts afresh).

    Returns the trained SAEs (plain torch) and a table of held-out FVU, L0, dead latents,
    steps and convergence; with ``out_dir``, each SAE is saved in sae_lens format under
    ``out_dir/<site>`` with ``train_config.json`` (the config, corpus, corpus hash, curves)
    and ``report.csv``. ``progress=False`` hides the step counter."""
    cfg = config or TrainConfig()
    if cfg.architecture in TRANSCODERS:  # a transcoder per MLP: its own loop
        return train_transcoders(model, list(sites), cfg, skip=TRANSCODERS[cfg.architecture],
                                 source=source, out_dir=out_dir, progress=progress)
    ad = adapter(model)
    keys = site_keys(model, sites)
    labels = [k[0] for k in keys]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate sites in {list(sites)}")
    starts = _initial(init, labels) if init is not None else {}
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    eval_units, train_units, tokens_per_pass = split_corpus(model, source, cfg, rng)
    name = str(model.config._name_or_path)
    corpus_name = "+".join(str(p) for p in text_sources(source))
    saes, k_of = {}, {label: cfg.k_at(kind) for label, _, kind, _ in keys}
    for label, layer, kind, heads in keys:
        meta = SAEMetadata(hook_name=_hook_name(layer, kind, heads, ad.n_heads_of(kind)),
                           model_name=name, context_size=cfg.context_size,
                           dataset_path=corpus_name, sage_nn_site=label)
        saes[label] = _new_sae(cfg, site_width(model, kind, heads), k_of[label], meta)
    read = {"skip_first": cfg.skip_first,
            "batch_tokens": cfg.model_batch_size * cfg.context_size}
    # the corpus is read once: the held-out part here, the rest by the stream's first batch
    held_out = read_activations(model, eval_units, labels, **read)
    # sae_lens's own bar moves every 100 steps only: count steps here too
    stream = iter(tqdm(shuffled(model, train_units, labels, batch_size=cfg.batch_size,
                                cache_bytes=cfg.cache_bytes, buffer_units=cfg.buffer_chunks,
                                rng=rng, **read),
                       total=cfg.max_steps, desc="train steps", leave=False,
                       disable=not progress))
    first = next(stream)
    scale = {label: (math.sqrt(first[label].shape[1]) / first[label].norm(dim=1).mean().item()
                     if cfg.normalize_activations != "none" else 1.0) for label in labels}
    for label, directory in starts.items():  # a continued SAE keeps the space it trained in
        saved = _saved_metadata(directory).get("sage_nn_normalization_scale")
        scale[label] = float(saved) if saved else scale[label]
    optimizer = {label: _load_optimizer(starts[label]) for label in starts}
    before = {label: _load_init(saes[label], starts[label], scale[label], optimizer[label])
              for label in starts}
    with torch.no_grad():  # b_dec starts at the data mean (as sae_lens's runner does):
        for label, sae in saes.items():  # residual streams have large means
            if label not in starts:
                sae.b_dec.copy_(first[label].mean(0) * scale[label])
                if cfg.architecture in DATA_STARTS and cfg.weight_init != "sae_lens":
                    x = first[label] * scale[label]
                    initialise_topk(sae, x, cfg.weight_init, rng, k_of[label])
                    if cfg.architecture != "topk":
                        initialise_threshold(sae, x, k_of[label])
    stream = ({k: v * scale[k] for k, v in batch.items()}
              for batch in itertools.chain([first], stream))
    held_scaled = {label: held_out[label] * scale[label] for label in labels}
    lr = {label: cfg.lr_at(sae.cfg.d_in, ad.d_model) for label, sae in saes.items()}
    if cfg.trainer == "batched" and cfg.architecture == "topk":  # else sae_lens's trainer
        fit = fit_batched(saes, stream, cfg, held_scaled, dead_window=_dead_window(cfg), lr=lr,
                          before={label: before.get(label, {}) for label in labels},
                          optimizer={label: o for label, o in optimizer.items()
                                     if o is not None})
    else:
        fit = fit_sae_lens(saes, stream, cfg, dead_window=_dead_window(cfg), lr=lr,
                           device=str(model_device(model)))
    plain = {}
    for label in labels:
        saes[label].fold_activation_norm_scaling_factor(scale[label])
        plain[label] = from_sae_lens(_as_inference(saes[label]), site=label, model=model)
    report = evaluate(model, plain, eval_units, cfg, acts=held_out)
    report["dead_in_training"] = [fit["dead"][label] for label in labels]
    report["steps"] = [fit["steps"][label] for label in labels]
    report["converged"] = [fit["converged"].get(label) for label in labels]
    report["corpus_passes"] = [round(s * cfg.batch_size / tokens_per_pass, 2)
                               for s in report["steps"]]
    for label in labels:  # what the SAE was trained on, and how well, travels with it
        meta = saes[label].cfg.metadata
        meta.sage_nn_train_steps = fit["steps"][label]
        meta.sage_nn_trainer = cfg.trainer if cfg.architecture == "topk" else "sae_lens"
        meta.sage_nn_held_out_fvu = float(report.loc[label, "fvu"])
        meta.sage_nn_held_out_l0 = float(report.loc[label, "l0"])
        meta.sage_nn_held_out_dead = float(report.loc[label, "dead"] / cfg.d_sae)
        meta.sage_nn_held_out_curve = fit["curves"].get(label, [])
        meta.sage_nn_converged = fit["converged"].get(label)
        meta.sage_nn_converged_at_step = fit["converged_at"].get(label)
        meta.sage_nn_convergence = (cfg.criterion() if label in fit["converged"]
                                    else "not checked (the sae_lens trainer)")
        meta.sage_nn_batch_size = cfg.batch_size
        meta.sage_nn_train_tokens_per_pass = tokens_per_pass
        meta.sage_nn_corpus_passes = float(report.loc[label, "corpus_passes"])
        meta.sage_nn_held_out_tokens = len(held_out[label])
        meta.sage_nn_normalization_scale = scale[label]
        if label in starts:
            meta.sage_nn_continued_from = str(starts[label])
        if out_dir is not None:
            saes[label].save_inference_model(Path(out_dir) / label)
            if label in fit["optimizer"]:  # for `init`: training goes on from here
                state = {**fit["optimizer"][label], "W_dec_norm": saes[label].W_dec.norm(dim=-1)}
                save_file({n: t.detach().contiguous().reshape(t.shape or (1,))
                           for n, t in state.items()},
                          str(Path(out_dir) / label / OPTIMIZER_FILE))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        report.to_csv(Path(out_dir) / "report.csv")
        (Path(out_dir) / "train_config.json").write_text(json.dumps(
            {**asdict(cfg), "corpus": corpus_name, "corpus_hash": corpus_hash(source),
             "train_tokens_per_pass": tokens_per_pass, "steps_used": fit["steps"],
             "converged": fit["converged"], "converged_at_step": fit["converged_at"],
             "criterion": cfg.criterion(),
             "held_out_curves": fit["curves"]}, indent=2))
    return plain, report


def _dead_window(cfg: TrainConfig) -> int:
    """Steps without firing after which a latent counts as dead (sae_lens's
    ``dead_feature_window``; the TopK auxiliary loss trains those)."""
    return cfg.dead_window or max(1, cfg.max_steps // 4)


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
        acts = read_activations(model, units, list(saes), skip_first=cfg.skip_first,
                                batch_tokens=cfg.model_batch_size * cfg.context_size)
    for label, sae in saes.items():
        x = acts[label]
        with torch.no_grad():
            codes = sae.encode(x)
            recon = sae.decode(codes, x)
        err = ((x - recon) ** 2).sum().item()
        var = ((x - x.mean(0)) ** 2).sum().item()
        rows.append({"site": label, "architecture": sae.architecture, "d_in": sae.d_in,
                     "d_sae": sae.d_sae, "k": sae.k, "fvu": err / var,
                     "l0": (codes > 0).float().sum(-1).mean().item(),
                     "dead": int(((codes > 0).sum(0) == 0).sum().item()), "eval_tokens": len(x)})
    return pd.DataFrame(rows).set_index("site")


def training_record(directory: str | Path) -> dict:
    """What a saved SAE's ``cfg.json`` says of its training (``{}`` if nothing): corpus,
    steps, held-out FVU and dead share, curve, whether it converged and by which
    criterion, corpus passes (written by :func:`train_saes`)."""
    try:
        cfg = json.loads((Path(directory) / "cfg.json").read_text())
    except (OSError, ValueError):
        return {}
    meta = cfg.get("metadata") or {}
    fields = {"corpus": "dataset_path", "steps": "sage_nn_train_steps",
              "held_out_fvu": "sage_nn_held_out_fvu", "held_out_dead": "sage_nn_held_out_dead",
              "curve": "sage_nn_held_out_curve", "converged": "sage_nn_converged",
              "converged_at_step": "sage_nn_converged_at_step",
              "criterion": "sage_nn_convergence", "corpus_passes": "sage_nn_corpus_passes",
              "tokens_per_pass": "sage_nn_train_tokens_per_pass",
              "batch_size": "sage_nn_batch_size", "continued_from": "sage_nn_continued_from"}
    if "sage_nn_train_steps" not in meta:
        return {}
    return {key: meta.get(field) for key, field in fields.items() if field in meta}


def load_trained(out_dir: str | Path, model: Any = None) -> dict[str, SparseAutoencoder]:
    """Every SAE saved under ``out_dir`` by :func:`train_saes`, keyed by site label."""
    from .saes import load_sae

    dirs = sorted(p.parent for p in Path(out_dir).glob("*/cfg.json"))
    if not dirs:
        raise FileNotFoundError(f"no SAEs (*/cfg.json) under {out_dir}; train with sage train-sae")
    return {d.name: load_sae(d, model=model, site=None if transcoder_dir(d) else d.name)
            for d in dirs}


def transcoder_dir(directory: Path) -> bool:
    """Whether an SAE directory holds a transcoder: placed by its config's hooks (it reads
    one site and writes another), not by its folder's name."""
    from ..common.formats import SAE_ARCHITECTURES

    try:
        arch = json.loads((directory / "cfg.json").read_text()).get("architecture")
    except (OSError, ValueError, AttributeError):
        return False
    spec = SAE_ARCHITECTURES.get(arch or "standard")
    return bool(spec and spec.transcoder)


__all__ = [
    "TrainConfig",
    "converged",
    "evaluate",
    "fit_batched",
    "load_trained",
    "train_saes",
    "training_record",
    "transcoder_dir",
]
