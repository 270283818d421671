"""Every headline metric ranks dictionaries of known quality in order (sage_nn.validity).

On a tiny model trained to do the tiny IOI task (so io's counterfactual changes its
predictions): a ladder of planted dictionaries (a share f of io's values has a latent that
is its supervised feature, firing exactly on it) for the edits, F1 and alignment, and a
ladder of reconstructions keeping a share f of what a perfect SAE explains for sufficiency
and necessity, at direct sites and through the residual-to-sublayer reconstruction. A
metric that stops ranking its ladder fails here.
"""

import numpy as np
import pytest
import torch

from conftest import trained_tiny_model
from sage_nn.evaluation.coders import CrossSection, ReconstructedSAE
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.model.sites import Site
from sage_nn.tasks.datasets import load_task
from sage_nn.evaluation.validity import SHARES, PlantedDictionary, Shrunk, ladder, ladder_summary, planted_sae, planted_values

PLANTED = ["edit", "edit_f1", "best_f1", "alignment"]
SHRUNK = ["sufficiency", "necessity"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, spec = trained_tiny_model(tmp_path_factory.mktemp("task"))
    full = load_task(spec).build(model, n=400, seed=0, split="train")
    heads = [(Site(1, "z", h), "END") for h in range(model.config.num_attention_heads)]
    return model, full.subset(np.arange(240)), full.subset(np.arange(240, 400)), heads


def perfect_sae(d: int) -> SparseAutoencoder:
    eye = torch.eye(d)
    return SparseAutoencoder(torch.cat([eye, -eye], 1), torch.zeros(2 * d),
                             torch.cat([eye, -eye], 0), torch.zeros(d), layer=1,
                             kind="resid_pre")


def test_planted_rungs_are_nested():
    values = list("ABCDEFGH")
    rungs = [set(planted_values(values, f, seed=3)) for f in SHARES]
    assert [len(r) for r in rungs] == [0, 2, 4, 6, 8]
    assert all(a <= b for a, b in zip(rungs, rungs[1:]))


def ranked(summary, metrics, apart):
    """Spearman 1 over the levels; f = 0 and f = 1 intervals apart for ``apart``."""
    for name in metrics:
        assert summary.loc[name, "spearman"] == pytest.approx(1.0), (name, summary.T)
    for name in apart:
        assert summary.loc[name, "apart"], (name, summary.T)


def test_planted_ladder_at_the_heads(setup):
    model, fit, held_out, heads = setup
    rungs = {f"planted-{f:g}": (f, PlantedDictionary(fit, "io", f)) for f in SHARES}
    results = ladder(model, fit, held_out, CrossSection("io", heads), rungs, ks=[2],
                     n_boot=200, control_seeds=1)
    assert str(results.edit_metric.values[0]) == "accuracy"  # the model does the task
    summary = ladder_summary(results, PLANTED)
    ranked(summary, PLANTED, apart=["edit", "edit_f1", "best_f1"])
    # f = 1 knows io as the ceiling does; f = 0 cannot edit it at all
    for name in ("edit", "best_f1"):
        assert summary.loc[name, "in_ceiling_interval"], summary.T
    assert summary.loc["edit", "f=0"] == 0.0 and summary.loc["best_f1", "f=1"] == 1.0
    # the floor edits below the dictionary that knows the attribute
    assert summary.loc["edit", "floor"] < summary.loc["edit", "f=1"]


def test_planted_ladder_through_the_reconstruction(setup):
    """Residual SAEs at L1.resid_pre whose planted latents fire at the IO token, where io's
    value lives, reaching layer 1's heads at END through the attention pattern."""
    model, fit, held_out, heads = setup
    rungs = {f"planted-{f:g}": (f, ReconstructedSAE([planted_sae(model, fit, "io", 1, "IO", f)]))
             for f in SHARES}
    summary = ladder_summary(ladder(model, fit, held_out, CrossSection("io", heads), rungs,
                                    ks=[2], n_boot=200, control_seeds=1), PLANTED)
    ranked(summary, PLANTED, apart=["edit", "edit_f1", "best_f1"])


@pytest.mark.parametrize("where", ["direct", "reconstruction"])
def test_shrunk_ladder(setup, where):
    """Keeping a share f of a perfect SAE's reconstruction: f = 0 is the mean (sufficiency
    and necessity 0), f = 1 exact (1)."""
    model, fit, held_out, heads = setup
    d = model.config.hidden_size
    if where == "direct":
        cs, coder = CrossSection("io", [(Site(1, "resid_pre"), "IO")]), perfect_sae(d)
    else:
        cs, coder = CrossSection("io", heads), ReconstructedSAE([perfect_sae(d)])
    rungs = {f"shrunk-{f:g}": (f, Shrunk(coder, f)) for f in SHARES}
    summary = ladder_summary(ladder(model, fit, held_out, cs, rungs, ks=[1], n_boot=200,
                                    control_seeds=1), SHRUNK)
    ranked(summary, SHRUNK, apart=SHRUNK)
    for name in SHRUNK:
        assert summary.loc[name, "f=0"] == pytest.approx(0.0, abs=1e-6)
        assert summary.loc[name, "f=1"] == pytest.approx(1.0, abs=1e-3)


# -- in the tool's regime ------------------------------------------------------------------

def distractors(d: int, seed: int = 0) -> SparseAutoencoder:
    """A TopK residual SAE at L1.resid_pre, 4 of 96 latents a token: its latents fire all
    over the context and reach the heads with dense codes (distractors for the planted)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, 96, generator=g) / d ** 0.5
    return SparseAutoencoder(W, torch.zeros(96), W.T.clone(), torch.zeros(d),
                             architecture="topk", k=4, layer=1, kind="resid_pre")


def test_planted_latents_among_distractors_through_the_reconstruction(setup):
    """The planted latents beside an SAE's latents at its own L0, all reaching the heads
    through the reconstruction, the SAE's latents that detect a value of io on the fit
    prompts removed (as benchmarks/validity.py does with a trained SAE): every headline
    metric of the ladder ranks the rungs, best F1 included. (On this tiny model a name is
    its token, and the distractors' codes summed over the context detect it: with them all
    kept, best F1 is 1 at every rung and the floor's, and the top-F1 edit picks
    distractors tied at F1 1.)"""
    from sage_nn.evaluation.validity import WithoutDetectors, WithPlanted

    model, fit, held_out, heads = setup
    base = distractors(model.config.hidden_size)
    bases = {f: WithoutDetectors(ReconstructedSAE([base]), fit, "io", 0.4) for f in SHARES}
    rungs = {f"planted-{f:g}": (f, WithPlanted(
        bases[f], ReconstructedSAE([planted_sae(model, fit, "io", 1, "IO", f)])))
        for f in SHARES}
    results = ladder(model, fit, held_out, CrossSection("io", heads), rungs, ks=[1, 2, 4],
                     n_boot=200, control_seeds=1)
    headline = ["edit_auc", "edit_f1_auc", "best_f1"]
    summary = ladder_summary(results, headline)
    ranked(summary, headline, apart=headline)
    # the base keeps distractors (not every latent detects io) but does not know io: the
    # floor's place is not above f = 0 (random directions know as much or more), rises with
    # the rungs, and is above f = 1 but on best F1, where the floor's random directions
    # summed over the context detect every name (F1 1, tied with f = 1)
    removed = [len(r) for r in bases[0.0].removed.values()]
    assert 0 < min(removed) and max(removed) < 96, removed
    places = {"edit_auc": "above", "edit_f1_auc": "above", "best_f1": "overlap"}
    for name in headline:
        row = summary.loc[name]
        assert row["place f=0"] in ("below", "overlap"), summary.T.to_string()
        assert row["place f=1"] == places[name], summary.T.to_string()
        assert row["floor_monotone"], summary.T.to_string()
    assert summary.loc["best_f1", "floor"] == 1.0
    assert summary.loc["best_f1", "f=1"] == 1.0
    # the distractors keep their L0: per token at the residual, 4 of them
    assert float(results.l0.sel(dictionary="planted-0").mean()) == pytest.approx(4.0)


def test_equal_fvu_rungs_only_the_orthogonal_error_keeps_sufficiency(setup):
    """Every rung has the same FVU; for a share f of the prompts the error lies outside the
    task's subspace (the span of the supervised features at the site). Sufficiency must rank
    them, the all-orthogonal rung keeping much more of the effect than the all-inside one;
    FVU cannot (so FVU standing in for sufficiency, or necessity, fails here). Measured:
    sufficiency 0.00, 0.22, 0.40, 0.64, 0.69 over f = 0-1 (the orthogonal noise, as large as
    the task's signal, still moves the logits through the block's norm and what the model
    reads outside that span); necessity 0.00 to -0.36 (spearman -0.9): removing
    ``mean - noise`` pushes each prompt away from the mean ablation, so necessity does not
    rank this ladder and is not asserted to."""
    from sage_nn.evaluation.validity import Perturbed

    model, fit, held_out, heads = setup
    cs = CrossSection("io", [(Site(1, "resid_pre"), "IO")])  # where io's value lives
    rungs = {f"error-out-{f:g}": (f, Perturbed(fit, f)) for f in SHARES}
    results = ladder(model, fit, held_out, cs, rungs, ks=[1], n_boot=200, control_seeds=1)
    summary = ladder_summary(results, SHRUNK + ["fvu_pooled"])
    ranked(summary, ["sufficiency"], apart=["sufficiency"])
    fvus = [summary.loc["fvu_pooled", f"f={f:g}"] for f in SHARES]
    assert np.ptp(fvus) < 1e-3 * max(fvus), fvus
    low, high = (summary.loc["sufficiency", f"f={f:g}"] for f in (0, 1))
    assert high - low > 0.5 and low < 0.2, summary.T.to_string()


def test_sufficiency_and_necessity_part_where_a_reconstruction_overshoots(setup):
    """A linear ladder cannot tell sufficiency from necessity (each is about f); twice what
    a perfect SAE explains can. Put back, it keeps the effect (sufficiency about 1, measured
    1.03: the doubled residual goes through the next block's RMSNorm, which undoes most of a
    change of scale, so the effect does not double); removed (``mean - (a - mean)``), it
    reverses the effect (necessity below 0, measured -0.52). Swapped, sufficiency would read
    below 0 and necessity about 1."""
    model, fit, held_out, heads = setup
    cs = CrossSection("io", [(Site(1, "resid_pre"), "IO")])
    out = ladder(model, fit, held_out, cs, {"twice": (2.0, Shrunk(perfect_sae(
        model.config.hidden_size), 2.0))}, ks=[1], n_boot=50,
        control_seeds=1).squeeze("attribute")
    sufficiency, necessity = (float(out[m].sel(dictionary="twice")) for m in SHRUNK)
    assert sufficiency > 0.8 and necessity < 0.2, (sufficiency, necessity)
    assert sufficiency - necessity > 1.0, (sufficiency, necessity)
