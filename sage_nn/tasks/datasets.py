"""Declarative tasks: YAML specs, validated on load, built into tokenizer-aware datasets.

A task is data (``tasks/<name>.yaml``, format in ``docs/tasks.md``)::

    spec = load_task("ioi")
    ds = spec.build(model, n=64, seed=0, split="test")
    ds.prompts, ds.attributes, ds.answer_ids, ds.positions["S2"], ds.counterfactuals["io"]
    check_task(model, "ioi")   # accuracy, clean and counterfactual logit differences

Slot values that are not one token for the model's tokenizer (in the form they take in the
prompt, leading space included) are dropped and reported in ``ds.dropped``.
"""

from __future__ import annotations

import itertools
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..common.notes import SageWarning
from .spec import Swap, TaskSpecError, TaskSpecModel, read_spec, template_fields

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["TaskBuildError", "TaskDataset", "TaskSpec", "TaskSpecError", "available_tasks",
           "check_task", "load_task", "logit_diffs"]

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
SPLITS = ("train", "test")


class DroppedValuesWarning(SageWarning):
    """Vocabulary values that are not one token for the model's tokenizer, left out."""


class TaskBuildError(ValueError):
    """A valid spec that cannot be built for this model (e.g. too few single-token values)."""


def load_task(name_or_path: str | Path) -> "TaskSpec":
    """Load and validate a task: a name in ``tasks/`` (e.g. ``"ioi"``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASKS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no task {str(name_or_path)!r}: {path} does not exist; "
                                f"available tasks: {', '.join(available_tasks())}")
    return TaskSpec(*read_spec(path), path)


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


# -- the dataset -----------------------------------------------------------------------

@dataclass
class TaskDataset:
    """Prompts of a task built for one tokenizer, with attributes, answers and positions."""

    name: str
    prompts: list[str]
    attributes: pd.DataFrame
    attribute_names: list[str]
    answers: list[str]
    distractors: list[str]
    answer_ids: np.ndarray
    distractor_ids: np.ndarray
    positions: dict[str, np.ndarray]
    counterfactuals: dict[str, "TaskDataset"] = field(default_factory=dict)
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["vocab", "value", "form", "reason"]))

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Any) -> "TaskDataset":
        idx = np.arange(len(self))[np.asarray(indices)]
        return TaskDataset(
            self.name, [self.prompts[i] for i in idx],
            self.attributes.iloc[idx].reset_index(drop=True), list(self.attribute_names),
            [self.answers[i] for i in idx], [self.distractors[i] for i in idx],
            self.answer_ids[idx], self.distractor_ids[idx],
            {k: v[idx] for k, v in self.positions.items()},
            {k: v.subset(idx) for k, v in self.counterfactuals.items()}, self.dropped)


@dataclass
class _Row:
    """One prompt before rendering: template family, variant, and a record per slot."""

    template: str
    variant: str | None
    values: dict[str, dict[str, str]]
    split: str


class TaskSpec:
    """A validated task spec; :meth:`build` makes a :class:`TaskDataset` for a model."""

    def __init__(self, model: TaskSpecModel, vocab: dict[str, list[dict]], path: Path):
        self.model, self.vocab, self.path = model, vocab, path
        self.name = model.name
        self.attribute_names = list(model.attributes)
        self._template_attr = next((a for a, s in model.attributes.items() if s.template), None)

    def __repr__(self) -> str:
        return f"TaskSpec({self.name!r}, attributes={self.attribute_names})"

    # -- tokenizer-aware vocabularies

    def _forms(self) -> dict[str, set[tuple[str | None, str]]]:
        """Per vocabulary, the (field, prefix) forms its values take in prompts and answers."""
        forms: dict[str, set] = {v: set() for v in self.vocab}
        texts = [t for tpl in self.model.templates for t in (tpl.variants or {"": tpl.text}).values()]
        for text in texts + [self.model.answer, self.model.distractor]:
            for literal, name, _, _ in string.Formatter().parse(text):
                if name is not None:  # the text right before a slot decides its leading space
                    slot, _, fld = name.partition(".")
                    prefix = " " if literal.endswith(" ") else ""
                    forms[self.model.slots[slot]].add((fld or None, prefix))
        return forms

    def usable_vocab(self, tokenizer: Any) -> tuple[dict[str, list[dict]], pd.DataFrame]:
        """Values that are one token in every form they take; and a table of the dropped."""
        _require_fast(tokenizer)
        forms, kept, dropped = self._forms(), {}, []
        for v, records in self.vocab.items():
            kept[v] = []
            for rec in records:
                bad = [(prefix + rec[fld or "text"]) for fld, prefix in sorted(
                    forms[v], key=str) if not _single_token(tokenizer, prefix + rec[fld or "text"])]
                if bad:
                    dropped.append((v, rec["text"], repr(bad[0]), "not a single token"))
                else:
                    kept[v].append(rec)
        return kept, pd.DataFrame(dropped, columns=["vocab", "value", "form", "reason"])

    def _halves(self, kept: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
        """Vocabulary per split; held-out halves alternate within strata of attribute fields."""
        out = {s: dict(kept) for s in SPLITS}
        for v in self.model.split.vocab_halves:
            strat = [a.field for a in self.model.attributes.values()
                     if a.slot and a.field and self.model.slots[a.slot] == v]
            halves: dict[str, list] = {s: [] for s in SPLITS}
            counts: dict[tuple, int] = {}
            for rec in kept[v]:
                key = tuple(rec[f] for f in strat)
                halves[SPLITS[counts.get(key, 0) % 2]].append(rec)
                counts[key] = counts.get(key, 0) + 1
            for s in SPLITS:
                out[s][v] = halves[s]
        return out

    def _check_sizes(self, vocab: dict[str, dict[str, list[dict]]], dropped: pd.DataFrame,
                     tokenizer: Any) -> None:
        m = self.model
        for v in self.vocab:
            users = [s for s, sv in m.slots.items() if sv == v]
            if not users:
                continue
            together = max([sum(1 for s in g if s in users) for g in m.distinct] + [1])
            resampled = any(a.slot in users and a.counterfactual in (None, "resample")
                            for a in m.attributes.values() if a.slot)
            need = together + int(resampled)
            for split in SPLITS:
                have = vocab[split][v]
                where = f"the {split} half of " if v in m.split.vocab_halves else ""
                n_drop = int((dropped.vocab == v).sum())
                if len(have) < need:
                    raise TaskBuildError(
                        f"task {self.name}: {where}vocabulary {v!r} has {len(have)} single-token "
                        f"values for tokenizer {type(tokenizer).__name__} ({n_drop} dropped: "
                        f"{dropped[dropped.vocab == v].value.tolist()[:8]}), but slots {users} "
                        f"need at least {need}: add single-token values to {v!r}")
                for a, spec in m.attributes.items():
                    if spec.slot in users and spec.field:
                        values = {r[spec.field] for r in have}
                        if len(values) < 2:
                            raise TaskBuildError(
                                f"task {self.name}: attribute {a!r} takes only the value(s) "
                                f"{sorted(values)} in {where}vocabulary {v!r} after dropping "
                                f"{n_drop} multi-token values: add single-token values with "
                                f"other {spec.field!r}")

    # -- sampling

    def _sample(self, rng, vocab: dict[str, list[dict]], split: str, exclude=None,
                fixed: dict | None = None, order: list[str] | None = None) -> dict[str, dict]:
        """Draw a record per slot (in ``order``), keeping ``fixed`` and distinct groups."""
        values = dict(fixed or {})
        for slot in order or list(self.model.slots):
            if slot in values:
                continue
            partners = {values[p]["text"] for g in self.model.distinct if slot in g
                        for p in g if p != slot and p in values}
            cands = [r for r in vocab[self.model.slots[slot]] if r["text"] not in partners
                     and (exclude is None or exclude(slot, r))]
            if not cands:
                raise TaskBuildError(f"task {self.name}: no value of vocabulary "
                                     f"{self.model.slots[slot]!r} left for slot {slot!r} in the "
                                     f"{split} split: add values to the vocabulary")
            values[slot] = cands[rng.integers(len(cands))]
        return values

    def _families(self, split: str) -> list:
        test = set(self.model.split.test_templates)
        return [t for t in self.model.templates if (t.id in test) == (split == "test")] \
            or list(self.model.templates)  # only vocabulary halves split the task

    def _draw(self, rng, vocab: dict[str, list[dict]], split: str) -> _Row:
        families = self._families(split)
        tpl = families[rng.integers(len(families))]
        variant = sorted(tpl.variants)[rng.integers(len(tpl.variants))] if tpl.variants else None
        return _Row(tpl.id, variant, self._sample(rng, vocab, split), split)

    def _counterfactual(self, rng, vocab, row: _Row, attr: str) -> _Row:
        spec = self.model.attributes[attr]
        if spec.template:
            tpl = next(t for t in self.model.templates if t.id == row.template)
            others = [k for k in sorted(tpl.variants) if k != row.variant]
            return _Row(row.template, others[rng.integers(len(others))], dict(row.values),
                        row.split)
        if isinstance(spec.counterfactual, Swap):
            values = dict(row.values)
            values[spec.slot], values[spec.counterfactual.swap] = \
                row.values[spec.counterfactual.swap], row.values[spec.slot]
            return _Row(row.template, row.variant, values, row.split)
        old = row.values[spec.slot]
        if spec.field:
            def exclude(slot, rec):  # a new value of the attribute, not just a new word
                return slot != spec.slot or rec[spec.field] != old[spec.field]
        else:
            def exclude(slot, rec):
                return slot != spec.slot or rec["text"] != old["text"]
        fixed = {s: r for s, r in row.values.items() if s != spec.slot}
        values = self._sample(rng, vocab, row.split, exclude, fixed, [spec.slot])
        return _Row(row.template, row.variant, {s: values[s] for s in row.values}, row.split)

    # -- counting

    def count_prompts(self, model: Any, split: Literal["train", "test"] = "train",
                      cap: int | None = None) -> int:
        """How many distinct prompts :meth:`build` can make for ``split`` with ``model``'s
        tokenizer (or a tokenizer): every template (and variant) of the split, filled with
        every combination of single-token values its slots allow. Counting stops at
        ``cap``, so asking "are there at least n?" stays cheap for large vocabularies."""
        tokenizer = getattr(model, "tokenizer", model)
        kept, _ = self.usable_vocab(tokenizer)
        return self._count(self._halves(kept)[split], split, cap)

    def _count(self, vocab: dict[str, list[dict]], split: str, cap: int | None) -> int:
        seen: set[str] = set()
        for tpl in self._families(split):
            for text in (tpl.variants or {"": tpl.text}).values():
                # only the slots the text shows tell prompts apart
                slots = list(dict.fromkeys(slot for slot, _ in template_fields(text)))
                for records in itertools.product(*(vocab[self.model.slots[s]] for s in slots)):
                    values = dict(zip(slots, records))
                    if self._distinct(values):
                        seen.add(self._fill(text, _Row(tpl.id, None, values, split)))
                        if cap is not None and len(seen) >= cap:
                            return cap
        return len(seen)

    def _distinct(self, values: dict[str, dict]) -> bool:
        """Whether the slots of every ``distinct`` group hold different values."""
        for group in self.model.distinct:
            texts = [values[s]["text"] for s in group if s in values]
            if len(set(texts)) < len(texts):
                return False
        return True

    # -- building

    def build(self, model: Any, n: int = 64, seed: int = 0,
              split: Literal["train", "test"] | None = "train",
              unique: bool = False) -> TaskDataset:
        """``n`` prompts (and a counterfactual per attribute) for ``model``'s tokenizer.

        ``split=None`` gives both: the first ``ceil(n/2)`` rows train, the rest test.
        ``unique``: no prompt twice (a repeat is drawn again), so prompts split into fit
        and held-out sets never overlap; a split that cannot make ``n`` distinct prompts
        raises :class:`TaskBuildError` with the count (:meth:`count_prompts`).
        """
        if split not in (*SPLITS, None):
            raise ValueError(f"split={split!r}: use 'train', 'test' or None (both)")
        if n < 1:
            raise ValueError(f"n={n}: build at least one prompt")
        tokenizer = getattr(model, "tokenizer", model)
        kept, dropped = self.usable_vocab(tokenizer)
        vocab = self._halves(kept)
        self._check_sizes(vocab, dropped, tokenizer)
        if len(dropped):
            values = dropped.value.tolist()[:10]
            warnings.warn(DroppedValuesWarning(
                f"task {self.name}: dropped {len(dropped)} values that are not a single "
                f"token: {values} (see dataset.dropped)",
                cli=f"task {self.name}: {len(dropped)} vocabulary value(s) are more than one "
                    f"token for this model and are left out ({', '.join(map(str, values))}); "
                    "fix: none needed, unless you want them: give the task single-token "
                    "values (docs/tasks.md)", key=self.name), stacklevel=2)
        rng = np.random.default_rng(seed)
        splits = [split] * n if split else ["train"] * ((n + 1) // 2) + ["test"] * (n // 2)
        if unique:
            for s in sorted(set(splits)):
                have = self._count(vocab[s], s, cap=splits.count(s))
                if have < splits.count(s):
                    raise TaskBuildError(
                        f"task {self.name}: the {s} split makes {have} distinct prompts, "
                        f"fewer than the {splits.count(s)} asked for: ask for at most {have}, "
                        "or add vocabulary values or templates")
        rows, seen = [], set()
        for s in splits:
            row = self._draw(rng, vocab[s], s)
            while unique and self._render(row)[0] in seen:  # redraw a repeat
                row = self._draw(rng, vocab[s], s)
            if unique:
                seen.add(self._render(row)[0])
            rows.append(row)
        cf_rows = {a: [self._counterfactual(rng, vocab[r.split], r, a) for r in rows]
                   for a in self.attribute_names}
        ds = self._dataset(rows, tokenizer, dropped)
        ds.counterfactuals = {a: self._dataset(r, tokenizer, dropped) for a, r in cf_rows.items()}
        return ds

    def _render(self, row: _Row) -> tuple[str, list[tuple[str, str | None, int, int]]]:
        tpl = next(t for t in self.model.templates if t.id == row.template)
        text = tpl.variants[row.variant] if tpl.variants else tpl.text
        out, spans = "", []
        for literal, name, _, _ in string.Formatter().parse(text):
            out += literal
            if name is not None:
                slot, _, fld = name.partition(".")
                value = row.values[slot][fld or "text"]
                spans.append((slot, fld or None, len(out), len(out) + len(value)))
                out += value
        return out, spans

    def _fill(self, text: str, row: _Row) -> str:
        return "".join(lit + (row.values[n.partition(".")[0]][n.partition(".")[2] or "text"]
                              if n is not None else "")
                       for lit, n, _, _ in string.Formatter().parse(text))

    def _attribute_values(self, row: _Row) -> dict[str, str]:
        out = {}
        for a, spec in self.model.attributes.items():
            out[a] = row.variant if spec.template else row.values[spec.slot][spec.field or "text"]
        return out

    def _dataset(self, rows: list[_Row], tokenizer: Any, dropped: pd.DataFrame) -> TaskDataset:
        rendered = [self._render(r) for r in rows]
        prompts = [p for p, _ in rendered]
        enc = tokenizer(prompts, return_offsets_mapping=True)
        positions = {name: np.zeros(len(rows), dtype=np.int64) for name in self.model.positions}
        for i, ((prompt, spans), offsets) in enumerate(zip(rendered, enc["offset_mapping"])):
            for name, pos in self.model.positions.items():
                if pos == "last":
                    positions[name][i] = len(offsets) - 1
                    continue
                matching = [s for s in spans if (s[0], s[1]) == (pos.slot, pos.field)]
                _, _, start, end = matching[pos.occurrence - 1 if pos.occurrence > 0
                                            else pos.occurrence]
                tok = _token_at(offsets, start, end, prompt, self.name)
                if not 0 <= tok + pos.offset < len(offsets):
                    raise TaskBuildError(f"task {self.name}: position {name!r} (offset "
                                         f"{pos.offset}) falls outside prompt {prompt!r}")
                positions[name][i] = tok + pos.offset
        answers = [self._fill(self.model.answer, r) for r in rows]
        distractors = [self._fill(self.model.distractor, r) for r in rows]
        attrs = pd.DataFrame([self._attribute_values(r) for r in rows],
                             columns=self.attribute_names)
        attrs["template"] = [r.template for r in rows]
        attrs["split"] = [r.split for r in rows]
        return TaskDataset(self.name, prompts, attrs, list(self.attribute_names),
                           answers, distractors, _token_ids(tokenizer, answers),
                           _token_ids(tokenizer, distractors), positions, {}, dropped)


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TaskBuildError(f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) "
                             "tokenizer; token positions need offset mappings: load the model "
                             "with a fast tokenizer (use_fast=True)")


def _single_token(tokenizer: Any, form: str) -> bool:
    ids = tokenizer(form, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def _token_ids(tokenizer: Any, texts: list[str]) -> np.ndarray:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, i in zip(texts, ids) if len(i) != 1]
    if bad:  # the vocabulary filter should have caught these
        raise TaskBuildError(f"answers/distractors {bad[:5]} are not single tokens")
    return np.array([i[0] for i in ids], dtype=np.int64)


def _token_at(offsets, start: int, end: int, prompt: str, task: str) -> int:
    """Index of the token holding the characters [start, end) (its leading space allowed)."""
    for i, (a, b) in enumerate(offsets):
        if a <= start < b or (a == start and b > a):
            if b == end:
                return i
            break
    raise TaskBuildError(f"task {task}: {prompt[start:end]!r} in prompt {prompt!r} is not one "
                         "token in context (the text around the slot merges with it): put a "
                         "space or punctuation next to the slot in the template")


# -- the check -------------------------------------------------------------------------

def logit_diffs(model: Any, ds: TaskDataset, batch_size: int = 32,
                remote: Any = None) -> "xr.DataArray":
    """Logit difference (clean answer minus clean distractor) at the last token.

    Returns ``(prompt, condition)`` with conditions ``clean`` and one per counterfactual.
    The clean prompts and all their counterfactuals run as one prompt set.
    """
    import xarray as xr

    from ..model.patching import run_patched

    conditions = [ds] + list(ds.counterfactuals.values())
    prompts = [p for c in conditions for p in c.prompts]
    tile = lambda ids: np.tile(ids, len(conditions))  # noqa: E731  (the clean answer throughout)
    out = run_patched(model, prompts, [[]], answer_ids=tile(ds.answer_ids),
                      distractor_ids=tile(ds.distractor_ids), batch_size=batch_size,
                      remote=remote).logit_diff.values[0]
    return xr.DataArray(out.reshape(len(conditions), len(ds)).T, dims=("prompt", "condition"),
                        coords={"condition": ["clean"] + list(ds.counterfactuals)},
                        name="logit_diff")


def check_task(model: Any, task: Any, n: int = 128, split: str | None = "test", seed: int = 0,
               batch_size: int = 32) -> pd.DataFrame:
    """Does ``model`` perform ``task``? One row per condition (clean, each counterfactual).

    Columns: ``accuracy`` (clean answer logit > clean distractor logit), ``mean_ld`` and
    ``std_ld`` of the logit difference, and ``effect`` = mean LD - mean clean LD (the
    effect of changing the attribute, :mod:`sage_nn.tasks.gates`' sign: negative when the
    counterfactual turns the answer away).
    """
    ds = task if isinstance(task, TaskDataset) else \
        (task if isinstance(task, TaskSpec) else load_task(task)).build(model, n, seed, split)
    ld = logit_diffs(model, ds, batch_size).to_pandas()
    table = pd.DataFrame({"n": len(ds), "accuracy": (ld > 0).mean(), "mean_ld": ld.mean(),
                          "std_ld": ld.std(), "effect": ld.mean() - ld["clean"].mean()})
    table.index.name = "condition"
    table.attrs.update(task=ds.name, split=str(split), dropped=len(ds.dropped))
    return table
