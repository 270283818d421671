"""Patching primitives on tiny random models: batching, positions, exactness, errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from sage_nn import tiny_random_model
from sage_nn.model.activations import encode
from sage_nn.model.patching import LatentEdit, Patch, logit_diff, run_patched
from sage_nn.model.reads import counterfactual_patches, site_values
from sage_nn.model.sites import Site, adapter

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna"]
TEMPLATES = {  # IOI over the tiny vocabulary; {A} comes first
    "went": "when {A} and {B} went to the store , {S} gave a drink to",
    "then": "then {A} and {B} went to the park , and {S} said it to",
}


@dataclass
class TinyTask:
    """The TaskDataset interface (sage_nn.tasks), built by hand for the tiny tokenizer."""

    name: str
    prompts: list
    attributes: pd.DataFrame
    attribute_names: list
    answers: list
    distractors: list
    answer_ids: np.ndarray
    distractor_ids: np.ndarray
    positions: dict
    counterfactuals: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.prompts)

    def subset(self, indices):
        idx = np.asarray(indices)
        return TinyTask(self.name, [self.prompts[i] for i in idx],
                        self.attributes.iloc[idx].reset_index(drop=True), self.attribute_names,
                        [self.answers[i] for i in idx], [self.distractors[i] for i in idx],
                        self.answer_ids[idx], self.distractor_ids[idx],
                        {k: v[idx] for k, v in self.positions.items()},
                        {k: v.subset(idx) for k, v in self.counterfactuals.items()})


def _rows_to_task(tokenizer, rows) -> TinyTask:
    prompts, pos = [], {"IO": [], "S1": [], "S2": [], "END": []}
    for io, s, order, template in rows:
        a, b = (io, s) if order == "ABB" else (s, io)
        prompt = TEMPLATES[template].format(A=a, B=b, S=s)
        words = prompt.split()
        prompts.append(prompt)
        pos["IO"].append(words.index(io))
        pos["S1"].append(words.index(s))
        pos["S2"].append(len(words) - 1 - words[::-1].index(s))
        pos["END"].append(len(words) - 1)
        assert len(tokenizer(prompt)["input_ids"]) == len(words)
    attrs = pd.DataFrame(rows, columns=["io", "s", "order", "template"]).assign(split="train")
    ids = lambda names: np.array([tokenizer(" " + x)["input_ids"][0] for x in names])
    answers, distractors = list(attrs.io), list(attrs.s)
    return TinyTask("tiny_ioi", prompts, attrs, ["io", "s", "order"],
                    [" " + x for x in answers], [" " + x for x in distractors],
                    ids(answers), ids(distractors), {k: np.array(v) for k, v in pos.items()})


def tiny_ioi(model, n: int = 12, seed: int = 0) -> TinyTask:
    """Clean prompts with io/s/order counterfactuals (resample, resample, flip)."""
    rng = np.random.default_rng(seed)
    rows, cf = [], {"io": [], "s": [], "order": []}
    for i in range(n):
        io, s = rng.choice(NAMES, 2, replace=False)
        order, template = ["ABB", "BAB"][i % 2], list(TEMPLATES)[(i // 2) % 2]
        rows.append((io, s, order, template))
        new_io = rng.choice([x for x in NAMES if x not in (io, s)])
        new_s = rng.choice([x for x in NAMES if x not in (io, s)])
        cf["io"].append((new_io, s, order, template))
        cf["s"].append((io, new_s, order, template))
        cf["order"].append((io, s, "BAB" if order == "ABB" else "ABB", template))
    task = _rows_to_task(model.tokenizer, rows)
    task.counterfactuals = {a: _rows_to_task(model.tokenizer, r) for a, r in cf.items()}
    return task


@pytest.fixture(scope="module")
def llama():
    return tiny_random_model("llama", seed=1)


def _plain_logits(model, prompts):
    batch = encode(model, prompts)
    with torch.no_grad():
        return model._module(**batch.inputs).logits[:, -1]


def test_logit_diff_picks_answer_minus_distractor():
    logits = torch.tensor([[0.0, 1.0, 5.0], [2.0, -1.0, 0.5]])
    assert logit_diff(logits, [2, 0], [1, 2]).tolist() == [4.0, 1.5]
    # [batch, seq, vocab] uses the last position
    assert logit_diff(torch.stack([logits * 0, logits], 1), [2, 0], [1, 2]).tolist() == [4.0, 1.5]
    with pytest.raises(ValueError, match="one id per prompt"):
        logit_diff(logits, [1], [2])


def test_clean_variant_matches_plain_forward(llama):
    ds = tiny_ioi(llama, n=6)
    out = run_patched(llama, ds, [[]], batch_size=4)
    ref = logit_diff(_plain_logits(llama, ds.prompts), ds.answer_ids, ds.distractor_ids)
    np.testing.assert_allclose(out.logit_diff.sel(variant="clean").values, ref.numpy(),
                               rtol=1e-4, atol=1e-4)
    assert (out.top1.values[0] == _plain_logits(llama, ds.prompts).argmax(-1).numpy()).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patching_the_last_residual_reproduces_the_counterfactual(arch):
    """The logits at END depend only on the last block's output at END, so patching it from
    x' must give m(x') exactly, whatever the architecture and however the batch is split."""
    model = tiny_random_model(arch, seed=3)
    ds = tiny_ioi(model, n=8)
    cf = ds.counterfactuals["io"]
    last = adapter(model).n_layers - 1
    patches = counterfactual_patches(model, ds, cf, [(f"L{last}.resid_post", "END"),
                                                     (f"L{last}.resid_post", "IO")])
    # 3 variants x 8 prompts with max_rows=10: variants split over several forwards
    out = run_patched(model, ds, [[], [patches[0]], [patches[1]]], batch_size=5, max_rows=10)
    expected = logit_diff(_plain_logits(model, cf.prompts), ds.answer_ids, ds.distractor_ids)
    np.testing.assert_allclose(out.logit_diff.values[1], expected.numpy(), rtol=1e-4, atol=1e-4)
    # patching a non-final position of the last block changes nothing at END
    np.testing.assert_allclose(out.logit_diff.values[2], out.logit_diff.values[0], atol=1e-5)
    assert out.variant.values.tolist() == ["clean", f"L{last}.resid_post@END",
                                           f"L{last}.resid_post@IO"]


def test_head_patch_writes_only_that_head(llama):
    """Patching z of one head with its own clean value is a no-op; with another head's value
    it changes the output, and the change is the same batched or alone."""
    ds = tiny_ioi(llama, n=4)
    vals = site_values(llama, ds, [("L1.z.h0", "END"), ("L1.z.h3", "END")])
    own = Patch("L1.z.h3", ds.positions["END"], vals[(Site(1, "z", 3), "END")])
    swapped = Patch("L1.z.h3", ds.positions["END"], vals[(Site(1, "z", 0), "END")], "swap")
    big_k = Patch("L1.k.h1", ds.positions["S1"], torch.full((4, 8), 30.0), "big_k")
    out = run_patched(llama, ds, [[], [own], [swapped], [big_k], [swapped, big_k]])
    ld = out.logit_diff.values
    np.testing.assert_allclose(ld[1], ld[0], atol=1e-5)
    assert np.abs(ld[2] - ld[0]).max() > 1e-3 and np.abs(ld[3] - ld[0]).max() > 1e-3
    alone = run_patched(llama, ds, [[swapped]], batch_size=1).logit_diff.values[0]
    np.testing.assert_allclose(alone, ld[2], rtol=1e-4, atol=1e-5)


def test_sparse_edits_patch_as_their_dense_values(llama):
    """A LatentEdit (clean values moved along a few latent directions) patches exactly as
    its dense values, in the forwards it shares with dense patches, here and through
    nnsight's NDIF simulation; the edit at k is the first k steps of the path."""
    ds = tiny_ioi(llama, n=6)
    site = Site(1, "resid_pre")
    base = site_values(llama, ds, [(site, "END")])[(site, "END")]
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(5, base.shape[1], generator=g)
    chosen = torch.randint(0, 5, (6, 4), generator=g)
    chosen[0, 1:] = -1  # the greedy path of prompt 0 stopped after one latent
    coefs = torch.randn(6, 4, generator=g)
    edits = LatentEdit.prefixes(base, chosen, coefs, directions, [1, 2, 4])
    step = coefs[:, :, None] * directions[chosen.clamp(min=0)] * (chosen >= 0)[:, :, None]
    for k, edit in edits.items():
        torch.testing.assert_close(edit.dense(), base + step[:, :k].sum(1))
    head = Patch("L1.z.h3", ds.positions["END"], torch.full((6, 8), 3.0), "head")
    sparse = [[Patch(site, ds.positions["END"], e, f"sparse{k}"), head] for k, e in edits.items()]
    dense = [[Patch(site, ds.positions["END"], e.dense(), f"dense{k}"), head]
             for k, e in edits.items()]
    ld = run_patched(llama, ds, [[]] + sparse + dense, batch_size=4).logit_diff.values
    np.testing.assert_allclose(ld[1:4], ld[4:7], rtol=1e-5, atol=1e-5)
    assert np.abs(ld[1:4] - ld[0]).min(1).max() > 1e-3  # the edits change the output
    there = run_patched(llama, ds, [[]] + sparse, batch_size=4, remote="local")
    np.testing.assert_allclose(there.logit_diff.values, ld[:4], rtol=1e-5, atol=1e-5)


def test_bad_patches_get_clear_errors(llama):
    ds = tiny_ioi(llama, n=4)
    with pytest.raises(ValueError, match="values have width 5, site L1.z.h0 has width 8"):
        run_patched(llama, ds, [[Patch("L1.z.h0", ds.positions["END"], torch.zeros(4, 5))]])
    with pytest.raises(ValueError, match="3 positions/values for 4 prompts"):
        run_patched(llama, ds, [[Patch("L1.z.h0", [0, 1, 2], torch.zeros(3, 8))]])
    with pytest.raises(ValueError, match="layer 7 out of range"):
        run_patched(llama, ds, [[Patch("L7.z.h0", ds.positions["END"], torch.zeros(4, 8))]])
    with pytest.raises(ValueError, match="answer_ids and distractor_ids are needed"):
        run_patched(llama, ds.prompts, [[]])
    with pytest.raises(ValueError, match="unknown named positions \\['XX'\\]"):
        site_values(llama, ds, [("L1.z.h0", "XX")])
    with pytest.raises(ValueError, match="values must be \\[n_prompts, width\\]"):
        Patch("L1.z.h0", [0, 1], torch.zeros(3, 8))


def _full_forward_patched(model, ds, variant):
    """Reference: one full forward per variant, every block and token recomputed."""
    from sage_nn.model.patching import patched_forward, plain_patch, writes_of

    arch, batch = adapter(model).spec, encode(model, ds.prompts)
    idx = np.arange(len(ds.prompts))
    writes = writes_of(arch, batch.plain(), idx, [[plain_patch(p) for p in variant]], "cpu",
                       torch.float32)
    return patched_forward(model, arch, batch.inputs, writes, torch.as_tensor(ds.answer_ids),
                           torch.as_tensor(ds.distractor_ids))[0].numpy()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patched_blocks_equal_full_forwards(arch):
    """Variants recompute only the layers and tokens their patches can change (from the
    clean keys/values and residual stream); that must equal a full forward per variant, for
    patches at the first layer, at several layers and positions at once, and at END only."""
    model = tiny_random_model(arch, seed=5)
    ds = tiny_ioi(model, n=7)
    cf = ds.counterfactuals["io"]
    last = adapter(model).n_layers - 1
    kinds = adapter(model).kinds()
    mid = "resid_mid" if "resid_mid" in kinds else "attn_out"
    pairs = [("L0.resid_pre", "IO"), ("L1.z.h1", "S2"), (f"L{last}.z.h0", "END"),
             ("L1.mlp_out", "END"), (f"L{last}.{mid}", "END"), ("L0.v.h0", "S1")]
    g = torch.Generator().manual_seed(0)
    p = [Patch(q.site, q.positions, q.values + 3 * torch.randn(q.values.shape, generator=g),
               q.label) for q in counterfactual_patches(model, ds, cf, pairs)]
    variants = [[], [p[0]], [p[1], p[2]], [p[2]], [p[3], p[4]], [p[5], p[2]], [p[4]]]
    out = run_patched(model, ds, variants, batch_size=4, max_rows=8)
    for v, variant in enumerate(variants):
        np.testing.assert_allclose(out.logit_diff.values[v],
                                   _full_forward_patched(model, ds, variant),
                                   rtol=1e-4, atol=1e-4, err_msg=f"variant {v}")
    # the patches matter (else equal values would prove nothing)
    assert np.abs(out.logit_diff.values[1:] - out.logit_diff.values[0]).max() > 0.05
