"""What SAEs are trained on: text sources (the built-in story corpus, text files, HF
datasets, a task's prompts at every token or at its named positions, mixes), as token
units, and a hash of their content that names a trained SAE's cache entry."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

BUILTIN_CORPUS = Path(__file__).parents[1] / "data" / "smollm2_corpus.jsonl.gz"


# Task prompts for SAE training are drawn with the run's seed plus this offset, so they
# are other draws than the prompts the run fits and evaluates on (exact repeats are dropped).
TASK_SEED_OFFSET = 104_729


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


@dataclass(frozen=True)
class Prompts:
    """Short texts each run through the model on its own, every position kept (task
    prompts), rather than joined and cut into chunks like corpus text."""

    texts: tuple[str, ...]
    name: str = "prompts"
    # per prompt, the token indices to train on (e.g. the task's named positions); None: all
    positions: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if not self.texts:
            raise ValueError(f"{self.name}: no prompts")
        if self.positions is not None and len(self.positions) != len(self.texts):
            raise ValueError(f"{self.name}: {len(self.positions)} position lists for "
                             f"{len(self.texts)} prompts")

    def __str__(self) -> str:
        return f"{self.name}[{len(self.texts)}]"


@dataclass(frozen=True)
class Text:
    """A text source (``"builtin"``, a file or directory, ``hf:NAME``) of which at most
    ``max_docs`` documents are read (the first ones): a run's prompt budget
    (``sae_task_prompts``) applied to the built-in text too, so that small settings train on
    a small corpus. Named and hashed as the source itself when the cap keeps every
    document."""

    source: str
    max_docs: int | None = None

    def texts(self) -> list[str]:
        return load_texts(self.source)[:self.max_docs]

    def capped(self) -> bool:
        return self.max_docs is not None and self.max_docs < len(load_texts(self.source))

    def __str__(self) -> str:
        return f"{self.source}[:{self.max_docs} documents]" if self.capped() else self.source


@dataclass(frozen=True)
class Tokens:
    """One sequence to run, and the indices of the tokens whose activations to keep."""

    ids: torch.Tensor
    keep: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)


def task_prompts(model: Any, task: Any, n: int = 2048, seed: int = 0,
                 exclude: Sequence[str] = (), split: str = "train",
                 named_positions: bool = False) -> Prompts:
    """``n`` prompts of ``task`` (name, YAML path or TaskSpec), for training SAEs on the
    task distribution (Makelov, Lange & Nanda 2024). Drawn at ``seed + TASK_SEED_OFFSET``;
    prompts in ``exclude`` (the prompts a run fits and evaluates on) and repeats are
    dropped, so training never sees them. Counterfactuals are left out: they are draws of
    the same distribution. ``named_positions``: train only on the task's named positions
    (IO, S2, END, ...: where cross-sections are), not every token."""
    from ..tasks.datasets import TaskSpec, load_task

    spec = task if isinstance(task, TaskSpec) else load_task(task)
    ds = spec.build(model, n=n, seed=seed + TASK_SEED_OFFSET, split=split)
    drop = set(exclude)
    rows = {}  # ordered, no repeats
    for i, p in enumerate(ds.prompts):
        if p not in drop and p not in rows:
            rows[p] = tuple(sorted({int(v[i]) for v in ds.positions.values()}))
    if not named_positions:
        return Prompts(tuple(rows), name=f"task:{spec.name}")
    return Prompts(tuple(rows), name=f"task:{spec.name}@positions",
                   positions=tuple(rows.values()))


def text_sources(source: Any) -> list:
    """A source or a mix (``"builtin+task:ioi"``, or a list) as a list of single sources."""
    if isinstance(source, (list, tuple)):
        return [s for part in source for s in text_sources(part)]
    if isinstance(source, str) and "+" in source:
        return [s for part in source.split("+") for s in text_sources(part.strip())]
    return [source]


class UnitSettings(Protocol):
    """What :func:`corpus_units` reads of a training config (a
    :class:`~.training.TrainConfig` has them; named here so the corpus does not depend on
    the trainer, which depends on it)."""

    context_size: int  # tokens per chunk of text
    task_prompts: int  # prompts drawn for a ``task:NAME`` source
    seed: int


def corpus_units(model: Any, source: Any, cfg: UnitSettings) -> list[torch.Tensor]:
    """The token sequences the model is run on: ``context_size`` chunks of corpus text,
    one sequence per prompt of a :class:`Prompts` (or ``task:NAME``) source."""
    units: list[torch.Tensor] = []
    for part in text_sources(source):
        if isinstance(part, str) and part.startswith("task:"):
            name, at, where = part[5:].partition("@")
            part = task_prompts(model, name, n=cfg.task_prompts, seed=cfg.seed,
                                named_positions=bool(at))
        if isinstance(part, Prompts):
            ids = [torch.tensor(i) for i in model.tokenizer(list(part.texts))["input_ids"]]
            units += ids if part.positions is None else [
                Tokens(i, keep) for i, keep in zip(ids, part.positions)]
        elif isinstance(part, Text):
            units += list(chunk_tokens(model, part.texts(), cfg.context_size))
        else:
            units += list(chunk_tokens(model, load_texts(part), cfg.context_size))
    return units


def corpus_hash(source: Any) -> str:
    """Identifies the training text by its content, so a changed corpus never reuses
    cached SAEs (a single file or directory source hashes as it always did)."""
    parts = text_sources(source)
    if len(parts) > 1:
        return hashlib.sha256("+".join(corpus_hash(p) for p in parts).encode()).hexdigest()[:8]
    part = parts[0]
    if isinstance(part, Text):  # as its source unless the cap drops documents
        own = corpus_hash(part.source)
        return hashlib.sha256(f"{own}:{part.max_docs}".encode()).hexdigest()[:8] \
            if part.capped() else own
    if isinstance(part, Prompts):
        return hashlib.sha256(("\n".join(part.texts) + (
            "" if part.positions is None else repr(part.positions))).encode()).hexdigest()[:8]
    source = str(part)
    path = BUILTIN_CORPUS if source == "builtin" else Path(source)
    h = hashlib.sha256(source.encode())
    for f in sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else []:
        h.update(f.read_bytes())
    return h.hexdigest()[:8]


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
