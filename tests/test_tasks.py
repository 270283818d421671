"""Task specs: loading and located validation errors, dataset building, the task check."""

import warnings

import numpy as np
import pytest
import torch
import yaml

from sage_nn.tasks.datasets import TaskBuildError, TaskDataset, available_tasks, check_task, load_task, logit_diffs
from sage_nn.tasks.spec import TaskSpecError

SHIPPED = ["agreement", "antonyms", "capitals", "greater_than", "ioi", "pronouns"]

# A task over the tiny tokenizer's words (sage_nn.models.TINY_WORDS); 'Zed' and 'Quux'
# are not in that vocabulary, so they are not single tokens and must be dropped.
TINY_SPEC = {
    "name": "tiny",
    "vocab": {
        "people": [{"text": t, "gender": g, "pronoun": p, "other": o} for t, g, p, o in [
            ("Mary", "f", "she", "he"), ("John", "m", "he", "she"), ("Alice", "f", "she", "he"),
            ("Bob", "m", "he", "she"), ("Anna", "f", "she", "he"), ("Tom", "m", "he", "she"),
            ("Zed", "m", "he", "she")]],
        "places": ["store", "park", "school", "Quux"],
    },
    "slots": {"A": "people", "B": "people", "place": "places"},
    "distinct": [["A", "B"]],
    "templates": [
        {"id": "went", "variants": {"AB": "when {A} and {B} went to the {place} , {B} said",
                                    "BA": "when {B} and {A} went to the {place} , {B} said"}},
        {"id": "then", "variants": {"AB": "then {A} and {B} went to the {place} . {B} gave",
                                    "BA": "then {B} and {A} went to the {place} . {B} gave"}},
    ],
    "attributes": {"a": {"slot": "A"}, "gender": {"slot": "B", "field": "gender"},
                   "place": {"slot": "place"},
                   "order": {"template": True}},
    "answer": " {A}",
    "distractor": " {B.pronoun}",
    "positions": {"A": {"slot": "A"}, "B1": {"slot": "B"}, "B2": {"slot": "B", "occurrence": 2},
                  "after_place": {"slot": "place", "offset": 1}, "END": "last"},
    "split": {"test_templates": ["then"]},
}


def write_spec(tmp_path, spec, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_spec(tmp_path, **changes):
    spec = yaml.safe_load(yaml.safe_dump(TINY_SPEC, sort_keys=False))  # deep copy
    spec.update(changes)
    return load_task(write_spec(tmp_path, spec))


@pytest.fixture(scope="module")
def tiny():
    from sage_nn import tiny_random_model

    return tiny_random_model("llama")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from sage_nn.model.loading import configure_tokenizer, smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    configure_tokenizer(tok)
    return tok


def tokens_at(tokenizer, prompts, positions):
    ids = tokenizer(list(prompts))["input_ids"]
    return [tokenizer.decode([row[p]]) for row, p in zip(ids, positions)]


# -- loading -----------------------------------------------------------------------------

def test_shipped_tasks_load():
    assert set(SHIPPED) <= set(available_tasks())
    for name in SHIPPED:
        spec = load_task(name)
        assert len(spec.attribute_names) >= 2, name
        assert "END" in spec.model.positions
    assert load_task("ioi").attribute_names == ["io", "s", "order"]


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match=r"no task 'nope'.*available tasks: .*ioi"):
        load_task("nope")


def _broken(spec, path, value):
    """Set spec[path...] = value (None deletes)."""
    *parents, last = path
    node = spec
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return spec


BROKEN = [  # (what to change, expected field in the message, expected text)
    (("answer",), None, "field answer: Field required; fix: add the field"),
    (("colour",), "red", "field colour: Extra inputs are not permitted; fix: remove it"),
    (("templates", 0, "id"), True, "field templates[0].id: Input should be a valid string; "
                                   "fix: give a string (quote it in YAML)"),
    (("slots", "A"), 3, "field slots.A: Input should be a valid string"),
    (("positions", "B1"), {"slot": "B", "ofset": 1},
     "field positions.B1.ofset: Extra inputs are not permitted; fix: remove it or correct its "
     "spelling"),
    (("vocab", "places"), [["store"]], "field vocab.places[0]: "),
    (("slots", "A"), "folk", "field slots.A: unknown vocabulary 'folk'; fix: use one of "
                             "['people', 'places']"),
    (("templates", 0, "variants", "AB"), "when {C} and {B} went to the {place} , {B} said",
     "field templates[0].variants.AB: unknown slot 'C'"),
    (("answer",), " {A.age}", "field answer: vocabulary 'people' has no field 'age'; fix: use "
                              "one of ['gender', 'other', 'pronoun', 'text']"),
    (("attributes", "a"), {"slot": "A", "counterfactual": "flip"},
     "field attributes.a.counterfactual: 'flip' is for template attributes"),
    (("attributes", "place"), {"slot": "place", "counterfactual": {"swap": "A"}},
     "field attributes.place.counterfactual.swap: slots 'place' and 'A' draw from different "
     "vocabularies"),
    (("attributes", "a"), {"slot": "A", "template": True},
     "field attributes.a: needs exactly one of 'slot' or 'template: true'"),
    (("positions", "B2"), {"slot": "B", "occurrence": 3},
     "position 'B2' needs occurrence 3 of {B} but the template has 2"),
    (("split",), {"test_templates": ["later"]},
     "field split.test_templates: unknown template id 'later'; fix: use one of ['went', 'then']"),
    (("split",), {}, "field split: declares no held-out templates or vocabulary halves"),
    (("templates", 1, "variants"), {"AB": "then {A} and {B} . {B} {place}"},
     "field templates[1].variants: only one variant"),
    (("templates", 1), {"id": "then", "text": "then {A} and {B} . {B} {place}"},
     "field templates[1].text: attribute 'order' is a template choice"),
    (("templates", 0, "id"), "then", "duplicate template id 'then'"),
    (("vocab", "places"), {"file": "places.txt"}, "field vocab.places.file: file "),
    (("vocab", "places"), ["store", "park", "store"],
     "field vocab.places: duplicate values ['store']"),
    (("attributes", "template"), {"slot": "A"}, "'template' is a reserved column name"),
    (("attributes", "a"), {"slot": "A", "counterfactual": {"swap": "A"}},
     "field attributes.a.counterfactual.swap: slot 'A' swapped with itself"),
]


@pytest.mark.parametrize("path,value,message", BROKEN, ids=[".".join(map(str, b[0])) + str(i)
                                                            for i, b in enumerate(BROKEN)])
def test_broken_spec_has_a_located_message(tmp_path, path, value, message):
    spec = _broken(yaml.safe_load(yaml.safe_dump(TINY_SPEC, sort_keys=False)), path, value)
    file = write_spec(tmp_path, spec, "broken.yaml")
    with pytest.raises(TaskSpecError) as err:
        load_task(file)
    text = str(err.value)
    assert "broken.yaml: field " in text and "; fix: " in text
    assert message in text


def test_yaml_syntax_and_non_mapping_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntemplates: [unclosed\n")
    with pytest.raises(TaskSpecError, match=r"bad.yaml: field <yaml>: not valid YAML at line 3, "
                       r"column 1: expected ',' or '\]'"):
        load_task(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(TaskSpecError, match="not a YAML mapping"):
        load_task(bad)


def test_vocab_files_next_to_the_spec(tmp_path):
    (tmp_path / "places.txt").write_text("store\npark\n\nschool\n")
    (tmp_path / "people.csv").write_text("text,gender,pronoun,other\n" + "\n".join(
        f"{r['text']},{r['gender']},{r['pronoun']},{r['other']}"
        for r in TINY_SPEC["vocab"]["people"]) + "\n")
    spec = tiny_spec(tmp_path, vocab={"people": {"file": "people.csv"},
                                      "places": {"file": "places.txt"}})
    assert [r["text"] for r in spec.vocab["places"]] == ["store", "park", "school"]
    assert spec.vocab["people"][1] == {"text": "John", "gender": "m", "pronoun": "he",
                                       "other": "she"}


# -- building ----------------------------------------------------------------------------

def test_build_interface_and_positions(tmp_path, tiny):
    spec = tiny_spec(tmp_path)
    with pytest.warns(UserWarning, match=r"dropped 2 values.*Zed.*Quux"):
        ds = spec.build(tiny, n=24, seed=0, split="train")
    assert isinstance(ds, TaskDataset) and len(ds) == 24 and ds.name == "tiny"
    assert sorted(ds.dropped.value) == ["Quux", "Zed"]
    assert ds.attribute_names == ["a", "gender", "place", "order"]
    assert list(ds.attributes.columns) == ["a", "gender", "place", "order", "template", "split"]
    assert set(ds.attributes.template) == {"went"} and set(ds.attributes.split) == {"train"}
    assert ds.answer_ids.dtype == np.int64 and ds.answer_ids.shape == (24,)
    tok = tiny.tokenizer
    assert [tok.decode([i]) for i in ds.answer_ids] == ds.answers
    assert ds.answers == [" " + a for a in ds.attributes.a]
    assert tokens_at(tok, ds.prompts, ds.positions["A"]) == ds.answers
    b = [" " + p for p in (ds.counterfactuals["gender"].attributes.a)]  # same A in that cf
    assert tokens_at(tok, ds.counterfactuals["gender"].prompts,
                     ds.counterfactuals["gender"].positions["A"]) == b
    assert tokens_at(tok, ds.prompts, ds.positions["after_place"]) == [" ,"] * 24
    lengths = [len(ids) for ids in tok(ds.prompts)["input_ids"]]
    assert list(ds.positions["END"]) == [n - 1 for n in lengths]
    assert (ds.positions["B1"] < ds.positions["B2"]).all()
    ab = ds.attributes.order == "AB"
    assert ((ds.positions["A"] < ds.positions["B1"]) == ab).all() and ab.any() and (~ab).any()


def test_counterfactuals_change_only_their_attribute(tmp_path, tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = tiny_spec(tmp_path).build(tiny, n=40, seed=1, split="train")
    clean = ds.attributes
    for attr, cf in ds.counterfactuals.items():
        assert len(cf) == len(ds) and cf.counterfactuals == {}
        assert (cf.attributes[attr] != clean[attr]).all(), attr
        same = [a for a in ds.attribute_names if a != attr]
        assert (cf.attributes[same] == clean[same]).all().all(), attr
    # order flips the wording and keeps the names
    flip = ds.counterfactuals["order"]
    assert (flip.attributes.order != clean.order).all()
    assert [sorted(p.split()) for p in flip.prompts] == [sorted(p.split()) for p in ds.prompts]
    # the B slot never equals A (distinct), also after resampling
    for d in [ds, *ds.counterfactuals.values()]:
        b = np.array(tokens_at(tiny.tokenizer, d.prompts, d.positions["B1"]))
        a = np.array(tokens_at(tiny.tokenizer, d.prompts, d.positions["A"]))
        assert (a != b).all()


def test_swap_counterfactual(tmp_path, tiny):
    spec = yaml.safe_load(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    spec["slots"]["C"] = "people"
    spec["distinct"] = [["A", "B", "C"]]
    for t in spec["templates"]:
        t["variants"] = {k: v + " {C}" for k, v in t["variants"].items()}
    spec["attributes"]["place"] = {"slot": "place"}
    spec["attributes"]["a"] = {"slot": "A", "counterfactual": {"swap": "C"}}
    spec["positions"]["C"] = {"slot": "C"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_task(write_spec(tmp_path, spec)).build(tiny, n=12, seed=0)
    cf = ds.counterfactuals["a"]
    tok = tiny.tokenizer
    assert tokens_at(tok, cf.prompts, cf.positions["A"]) == tokens_at(tok, ds.prompts,
                                                                      ds.positions["C"])
    assert tokens_at(tok, cf.prompts, cf.positions["C"]) == ds.answers


def test_build_is_deterministic_and_seeded(tmp_path, tiny):
    spec = tiny_spec(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one, two = (spec.build(tiny, n=16, seed=3) for _ in range(2))
        other = spec.build(tiny, n=16, seed=4)
    assert one.prompts == two.prompts
    for attr in one.counterfactuals:
        assert one.counterfactuals[attr].prompts == two.counterfactuals[attr].prompts
    assert one.prompts != other.prompts


def test_splits_hold_out_templates_and_vocabulary_halves(smol_tokenizer):
    spec = load_task("ioi")
    train = spec.build(smol_tokenizer, n=200, seed=0, split="train")
    test = spec.build(smol_tokenizer, n=200, seed=0, split="test")
    assert set(test.attributes.template) == {"then"}
    assert "then" not in set(train.attributes.template)
    names = {s: set(d.attributes.io) | set(d.attributes.s) | set(d.counterfactuals["io"].
                                                               attributes.io)
             for s, d in (("train", train), ("test", test))}
    assert names["train"] and names["test"] and not names["train"] & names["test"]
    both = spec.build(smol_tokenizer, n=9, seed=0, split=None)
    assert list(both.attributes.split) == ["train"] * 5 + ["test"] * 4
    with pytest.raises(ValueError, match="split='dev': use 'train', 'test' or None"):
        spec.build(smol_tokenizer, n=4, split="dev")


@pytest.mark.parametrize("name", SHIPPED)
def test_positions_on_the_real_tokenizer(smol_tokenizer, name):
    """Templates of different token lengths still get each prompt's own positions."""
    spec = load_task(name)
    ds = spec.build(smol_tokenizer, n=60, seed=0, split=None)
    assert len(ds.dropped) < 0.3 * sum(len(v) for v in spec.vocab.values()), ds.dropped
    lengths = {len(ids) for ids in smol_tokenizer(ds.prompts)["input_ids"]}
    assert len(lengths) > 1  # the check below covers prompts of different lengths
    for d in [ds, *ds.counterfactuals.values()]:
        for pos_name, pos in spec.model.positions.items():
            if pos == "last":
                continue
            got = tokens_at(smol_tokenizer, d.prompts, d.positions[pos_name])
            fld = pos.field or "text"
            want = [r for r in got if r.strip()]  # every position is a real word token
            assert len(want) == len(got)
            if pos.offset == 0:
                values = {r[fld] for r in spec.vocab[spec.model.slots[pos.slot]]}
                assert all(g.strip() in values for g in got), (pos_name, got[:5])
        assert [smol_tokenizer.decode([i]) for i in d.answer_ids] == d.answers


def test_ioi_positions_name_the_right_people(smol_tokenizer):
    ds = load_task("ioi").build(smol_tokenizer, n=40, seed=0, split=None)
    at = {p: tokens_at(smol_tokenizer, ds.prompts, ds.positions[p]) for p in ("IO", "S1", "S2")}
    assert at["IO"] == ds.answers and at["S1"] == ds.distractors == at["S2"]
    assert at["IO"] == [" " + v for v in ds.attributes.io]
    io_cf = ds.counterfactuals["io"].attributes
    assert (io_cf.io != ds.attributes.io).all() and (io_cf.io != ds.attributes.s).all()


def test_subset_subsets_counterfactuals(tmp_path, tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = tiny_spec(tmp_path).build(tiny, n=10, seed=0)
    sub = ds.subset([7, 2])
    assert sub.prompts == [ds.prompts[7], ds.prompts[2]] and len(sub) == 2
    assert list(sub.answer_ids) == [ds.answer_ids[7], ds.answer_ids[2]]
    assert sub.counterfactuals["order"].prompts == [ds.counterfactuals["order"].prompts[i]
                                                    for i in (7, 2)]
    assert list(sub.attributes.index) == [0, 1]


def test_too_few_single_token_values_is_an_error(tmp_path, tiny):
    spec = yaml.safe_load(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    spec["vocab"]["places"] = ["store", "Quux", "Zork"]
    with pytest.raises(TaskBuildError, match=r"vocabulary 'places' has 1 single-token values "
                       r".*2 dropped: \['Quux', 'Zork'\].*need at least 2: add single-token"):
        load_task(write_spec(tmp_path, spec)).build(tiny, n=4)
    spec = yaml.safe_load(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    spec["vocab"]["people"] = [p for p in spec["vocab"]["people"] if p["gender"] == "f"
                               or p["text"] == "Zed"]
    with pytest.raises(TaskBuildError, match=r"attribute 'gender' takes only the value\(s\) "
                       r"\['f'\].*add single-token values with other 'gender'"):
        load_task(write_spec(tmp_path, spec)).build(tiny, n=4)


def test_slot_merging_with_its_neighbour_is_an_error(tmp_path, smol_tokenizer):
    spec = yaml.safe_load(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    spec["templates"][0]["variants"] = {"AB": "when {A} and {B} went to the {place}s , {B} said",
                                        "BA": "when {B} and {A} went to the {place}s , {B} said"}
    spec["vocab"]["places"] = ["store", "park", "school"]
    with pytest.raises(TaskBuildError, match="is not one token in context"):
        load_task(write_spec(tmp_path, spec)).build(smol_tokenizer, n=8)


# -- the check ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"])
def test_logit_diffs_match_a_plain_forward(tmp_path, tiny_models, arch):
    model = tiny_models[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = tiny_spec(tmp_path).build(model, n=6, seed=0)
    ld = logit_diffs(model, ds, batch_size=8)  # 5 conditions: batches of one clean prompt
    assert ld.dims == ("prompt", "condition")
    assert list(ld.condition.values) == ["clean", "a", "gender", "place", "order"]
    hf, tok = model._module, model.tokenizer
    for j, d in enumerate([ds, *ds.counterfactuals.values()]):
        for i in (0, 5):
            ids = torch.tensor([tok(d.prompts[i])["input_ids"]])
            with torch.no_grad():
                logits = hf(ids).logits[0, -1]
            want = logits[ds.answer_ids[i]] - logits[ds.distractor_ids[i]]  # clean ids
            assert float(ld[i, j]) == pytest.approx(float(want), abs=1e-4)


def test_check_task_table(tmp_path, tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = check_task(tiny, tiny_spec(tmp_path), n=8)
    assert list(table.index) == ["clean", "a", "gender", "place", "order"]
    assert list(table.columns) == ["n", "accuracy", "mean_ld", "std_ld", "effect"]
    assert table.loc["clean", "effect"] == 0 and table.attrs["split"] == "test"
    assert ((table.accuracy >= 0) & (table.accuracy <= 1)).all()


# -- real SmolLM2 --------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_performs_ioi(smollm2):
    table = check_task(smollm2, "ioi", n=48, split="test")
    assert table.loc["clean", "accuracy"] > 0.9
    assert table.loc["clean", "mean_ld"] > 3
    assert table.loc["io", "effect"] < -5  # the answer changes: the LD collapses
    assert table.loc["io", "accuracy"] < 0.3
    assert abs(table.loc["order", "effect"]) < 1.5  # same names: the model still answers


@pytest.mark.slow
@pytest.mark.parametrize("name,main", [("capitals", "country"), ("pronouns", "gender"),
                                       ("agreement", "number"), ("antonyms", "word"),
                                       ("greater_than", "start")])
def test_smollm2_performs_the_other_tasks(smollm2, name, main):
    table = check_task(smollm2, name, n=48, split="test")
    assert table.loc["clean", "accuracy"] > 0.75, table
    assert table.loc[main, "effect"] < -(1 if name == "greater_than" else 2), table


@pytest.mark.slow
def test_task_check_command(capsys):
    from sage_nn.cli import main

    main(["task-check", "--task", "pronouns", "--n", "16"])
    out = capsys.readouterr().out
    assert "accuracy" in out and "gender" in out and "pronouns" in out
    with pytest.raises(SystemExit) as exit_:
        main(["task-check", "--task", "nope"])
    assert exit_.value.code == 2
    assert "no task 'nope'" in capsys.readouterr().err
