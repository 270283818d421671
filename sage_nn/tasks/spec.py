"""The task spec format: pydantic models, and loading with located validation errors.

Every problem is reported as (file, field, what is wrong, how to fix it); pydantic checks
the shape of the YAML, :func:`_check` the references between its parts. The format is
documented in ``docs/tasks.md``; :mod:`sage_nn.tasks` builds datasets from a spec.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal, Union

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class TaskSpecError(ValueError):
    """A task spec that cannot be used; the message says where, what, and how to fix it."""

    def __init__(self, file: Any, problems: list[tuple[str, str, str]]):
        self.file, self.problems = str(file), problems
        lines = [f"{self.file}: field {loc}: {what}; fix: {fix}" for loc, what, fix in problems]
        super().__init__(f"invalid task spec ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(lines))


# -- the spec (pydantic) ---------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class VocabFile(_Strict):
    file: str = Field(description="path relative to the spec: .txt (one value a line) or "
                                  ".csv (header row with a 'text' column)")


class Template(_Strict):
    id: str
    text: str | None = None
    variants: dict[str, str] | None = None


class Swap(_Strict):
    swap: str


class Attribute(_Strict):
    slot: str | None = None
    field: str | None = None
    template: bool = False
    counterfactual: Union[Literal["resample", "flip"], Swap, None] = None


class Position(_Strict):
    slot: str
    field: str | None = None
    occurrence: int = 1
    offset: int = 0


class Split(_Strict):
    test_templates: list[str] = []
    vocab_halves: list[str] = []


class TaskSpecModel(_Strict):
    name: str
    description: str = ""
    vocab: dict[str, Union[list[Union[str, dict[str, str]]], VocabFile]]
    slots: dict[str, str]
    distinct: list[list[str]] = []
    templates: list[Template] = Field(min_length=1)
    attributes: dict[str, Attribute] = Field(min_length=1)
    answer: str
    distractor: str
    positions: dict[str, Union[Literal["last"], Position]] = {}
    split: Split


# -- loading and validation ------------------------------------------------------------

_FIXES = {
    "missing": "add the field",
    "extra_forbidden": "remove it or correct its spelling",
    "string_type": "give a string (quote it in YAML)",
    "list_type": "give a YAML list",
    "dict_type": "give a YAML mapping",
    "model_type": "give a YAML mapping",
    "too_short": "give at least one entry",
    "int_parsing": "give an integer",
    "bool_parsing": "give true or false",
    "literal_error": "use one of the allowed values",
}


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str, str]]:
    # Each member of a union reports an error; keep the deepest one per field (it names
    # the real mistake) and drop the union-member tags so the path reads like the YAML.
    errors = []
    for e in err.errors():
        parts = [p for p in e["loc"] if not _is_union_tag(p)]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        errors.append((parts, loc or "<top>", e["msg"], _FIXES.get(e["type"], "see docs/tasks.md")))
    problems, seen = [], set()
    for parts, loc, msg, fix in errors:
        deeper = any(len(q) > len(parts) and q[:len(parts)] == parts for q, *_ in errors)
        if loc not in seen and not deeper:
            seen.add(loc)
            problems.append((loc, msg, fix))
    return problems


_UNION_TAGS = {"VocabFile", "Position", "Swap", "str", "dict", "list", "int", "bool"}


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


def template_fields(text: str) -> list[tuple[str, str | None]]:
    """Placeholders of a template string as (slot, field or None)."""
    out = []
    for _, name, _, _ in string.Formatter().parse(text):
        if name is not None:
            slot, _, fld = name.partition(".")
            out.append((slot, fld or None))
    return out


def _read_vocab(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        return table.to_dict("records")
    return [{"text": line.strip()} for line in path.read_text().splitlines() if line.strip()]


def _load_vocab(model: TaskSpecModel, base: Path, problems: list) -> dict[str, list[dict]]:
    vocab = {}
    for name, entries in model.vocab.items():
        loc = f"vocab.{name}"
        if isinstance(entries, VocabFile):
            path = base / entries.file
            if not path.is_file():
                problems.append((loc + ".file", f"file {path} does not exist",
                                 "give a path relative to the spec's folder"))
                continue
            if path.suffix not in (".txt", ".csv"):
                problems.append((loc + ".file", f"{path.name} is not .txt or .csv",
                                 "use a .txt file (one value a line) or a .csv with a 'text' "
                                 "column"))
                continue
            entries = _read_vocab(path)
        records = [e if isinstance(e, dict) else {"text": e} for e in entries]
        if not records:
            problems.append((loc, "the vocabulary is empty", "list at least two values"))
        for i, rec in enumerate(records):
            if not str(rec.get("text", "")).strip():
                problems.append((f"{loc}[{i}]", "entry has no 'text'",
                                 "give every entry a non-empty 'text' (the value in the prompt)"))
                break
        texts = [r.get("text") for r in records]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        if dup:
            problems.append((loc, f"duplicate values {dup[:5]}", "list each value once"))
        keys = {k for r in records for k in r}
        for rec in records:
            if set(rec) != keys:
                problems.append((loc, f"entries have different fields ({sorted(set(rec))} vs "
                                 f"{sorted(keys)})", "give every entry the same fields"))
                break
        vocab[name] = records
    return vocab


def _check(m: TaskSpecModel, vocab: dict[str, list[dict]], problems: list) -> None:
    """Cross-field checks pydantic cannot express; each appends (field, what, fix)."""
    slots = m.slots
    for slot, v in slots.items():
        if v not in m.vocab:
            problems.append((f"slots.{slot}", f"unknown vocabulary {v!r}",
                             f"use one of {sorted(m.vocab)} or add it under vocab"))

    def check_ref(loc, slot, fld):
        if slot not in slots:
            problems.append((loc, f"unknown slot {slot!r}", f"use one of {sorted(slots)} or "
                             "declare it under slots"))
        elif fld is not None and slots[slot] in vocab and vocab[slots[slot]] and \
                fld not in vocab[slots[slot]][0]:
            problems.append((loc, f"vocabulary {slots[slot]!r} has no field {fld!r}",
                             f"use one of {sorted(vocab[slots[slot]][0])} or add the column"))

    for i, group in enumerate(m.distinct):
        for slot in group:
            check_ref(f"distinct[{i}]", slot, None)

    template_attrs = [a for a, spec in m.attributes.items() if spec.template]
    if len(template_attrs) > 1:
        problems.append(("attributes", f"more than one template attribute {template_attrs}",
                         "keep one attribute with template: true"))
    ids = [t.id for t in m.templates]
    variant_keys = None
    for i, t in enumerate(m.templates):
        loc = f"templates[{i}]"
        if ids.count(t.id) > 1:
            problems.append((loc + ".id", f"duplicate template id {t.id!r}", "give each a unique id"))
        if (t.text is None) == (t.variants is None):
            problems.append((loc, "needs exactly one of 'text' or 'variants'",
                             "use 'text' for one wording, 'variants' (value: text) for a "
                             "template attribute"))
            continue
        if t.variants is not None and not template_attrs:
            problems.append((loc + ".variants", "variants given but no attribute has "
                             "template: true", "add e.g. 'order: {template: true}' under "
                             "attributes, or use 'text'"))
        if t.text is not None and template_attrs:
            problems.append((loc + ".text", f"attribute {template_attrs[0]!r} is a template "
                             "choice, so every template needs variants", "replace 'text' by "
                             "'variants' with one text per value"))
        if t.variants is not None:
            keys = sorted(t.variants)
            if len(keys) < 2:
                problems.append((loc + ".variants", "only one variant",
                                 "give at least two variants to flip between"))
            if variant_keys is None:
                variant_keys = keys
            elif keys != variant_keys:
                problems.append((loc + ".variants", f"variants {keys} differ from {variant_keys} "
                                 "of the first template", "give every template the same variants"))
        for key, text in (t.variants or {"text": t.text}).items():
            tloc = loc + (f".variants.{key}" if t.variants else ".text")
            try:
                refs = template_fields(text)
            except ValueError as err:
                problems.append((tloc, f"bad template string ({err})",
                                 "write slots as {slot} or {slot.field}; double literal braces"))
                continue
            for slot, fld in refs:
                check_ref(tloc, slot, fld)
            used = {s for s, _ in refs}
            for a, spec in m.attributes.items():
                if spec.slot and spec.slot not in used and spec.slot in slots:
                    problems.append((tloc, f"slot {spec.slot!r} of attribute {a!r} is not in "
                                     "this template", "use every attribute's slot in every "
                                     "template"))
            for p, pos in m.positions.items():
                if isinstance(pos, Position):
                    n = sum(1 for s, f in refs if (s, f) == (pos.slot, pos.field))
                    if n < abs(pos.occurrence):
                        problems.append((tloc, f"position {p!r} needs occurrence "
                                         f"{pos.occurrence} of {{{_ref(pos)}}} but the template "
                                         f"has {n}", "fix the occurrence or the template"))

    for a, spec in m.attributes.items():
        loc = f"attributes.{a}"
        if a in ("template", "split"):
            problems.append((loc, f"{a!r} is a reserved column name", "rename the attribute"))
        if spec.template == (spec.slot is not None):
            problems.append((loc, "needs exactly one of 'slot' or 'template: true'",
                             "name the slot the attribute is, or mark it a template choice"))
            continue
        if spec.slot is not None:
            check_ref(loc + ".slot", spec.slot, spec.field)
        cf = spec.counterfactual
        if spec.template and cf not in (None, "flip"):
            problems.append((loc + ".counterfactual", f"a template attribute cannot {cf}",
                             "use 'flip' (or leave it out)"))
        if spec.slot is not None and cf == "flip":
            problems.append((loc + ".counterfactual", "'flip' is for template attributes",
                             "use 'resample' or {swap: <other slot>}"))
        if isinstance(cf, Swap):
            check_ref(loc + ".counterfactual.swap", cf.swap, None)
            if cf.swap == spec.slot:
                problems.append((loc + ".counterfactual.swap", f"slot {cf.swap!r} swapped with "
                                 "itself", "swap with another slot of the same vocabulary"))
            if cf.swap in slots and spec.slot in slots and slots[cf.swap] != slots[spec.slot]:
                problems.append((loc + ".counterfactual.swap", f"slots {spec.slot!r} and "
                                 f"{cf.swap!r} draw from different vocabularies",
                                 "swap two slots of the same vocabulary"))

    for key in ("answer", "distractor"):
        try:
            refs = template_fields(getattr(m, key))
        except ValueError as err:
            problems.append((key, f"bad template string ({err})", "write {slot} or {slot.field}"))
            continue
        for slot, fld in refs:
            check_ref(key, slot, fld)
    for p, pos in m.positions.items():
        if isinstance(pos, Position):
            check_ref(f"positions.{p}.slot", pos.slot, pos.field)
            if pos.occurrence == 0:
                problems.append((f"positions.{p}.occurrence", "occurrence 0",
                                 "count from 1 (first) or from -1 (last)"))
    for t in m.split.test_templates:
        if t not in ids:
            problems.append(("split.test_templates", f"unknown template id {t!r}",
                             f"use one of {ids}"))
    if set(m.split.test_templates) >= set(ids) and not m.split.vocab_halves:
        problems.append(("split.test_templates", "every template is held out, none is left "
                         "for train", "hold out fewer templates"))
    for v in m.split.vocab_halves:
        if v not in m.vocab:
            problems.append(("split.vocab_halves", f"unknown vocabulary {v!r}",
                             f"use one of {sorted(m.vocab)}"))
    if not m.split.test_templates and not m.split.vocab_halves:
        problems.append(("split", "declares no held-out templates or vocabulary halves",
                         "add test_templates: [<id>] and/or vocab_halves: [<vocabulary>]"))


def _ref(pos: Position) -> str:
    return pos.slot + (f".{pos.field}" if pos.field else "")


def read_spec(path: Path) -> tuple[TaskSpecModel, dict[str, list[dict]]]:
    """Parse and validate one YAML spec: the spec model and its vocabularies as records."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TaskSpecError(path, [("<yaml>", f"not valid YAML{where}: "
                                    f"{getattr(err, 'problem', None) or err}",
                                    "fix the YAML syntax there (quote strings with ': ' "
                                    "or braces)")]) from None
    if not isinstance(data, dict):
        raise TaskSpecError(path, [("<top>", "the file is not a YAML mapping",
                                    "write the spec as 'key: value' lines, see docs/tasks.md")])
    try:
        model = TaskSpecModel.model_validate(data)
    except ValidationError as err:
        raise TaskSpecError(path, _pydantic_problems(err)) from None
    problems: list = []
    vocab = _load_vocab(model, path.parent, problems)
    if not problems:
        _check(model, vocab, problems)
    if problems:
        raise TaskSpecError(path, problems)
    return model, vocab
