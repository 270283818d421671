"""evaluate_cross_section on a tiny model, with SAEs whose answers are known."""

import numpy as np
import pytest
import torch

from conftest import tiny_task_dataset
from sage_nn.evaluation.coders import CrossSection
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.model.sites import Site

SITE = Site(1, "resid_pre")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, full = tiny_task_dataset(tmp_path_factory.mktemp("task"), n=48)
    # A random tiny model moves its logit differences by thousandths of a logit, below the
    # metrics' 0.1-logit floor for dividing by an effect: scale the logits up (the final
    # norm's gain) so necessity and edit success are defined and can be checked.
    with torch.no_grad():
        model._module.model.norm.weight.mul_(300)
    return model, full.subset(np.arange(32)), full.subset(np.arange(32, 48))


def perfect_sae(d: int) -> SparseAutoencoder:
    """ReLU SAE with latents ±e_i: reconstructs every input exactly."""
    eye = torch.eye(d)
    return SparseAutoencoder(torch.cat([eye, -eye], 1), torch.zeros(2 * d),
                             torch.cat([eye, -eye], 0), torch.zeros(d),
                             layer=SITE.layer, kind=SITE.kind)


def mean_sae(d: int, mean: torch.Tensor) -> SparseAutoencoder:
    """Never active: reconstructs every input as the mean."""
    return SparseAutoencoder(torch.zeros(d, 4), -torch.ones(4), torch.randn(4, d), mean,
                             layer=SITE.layer, kind=SITE.kind)


def test_known_answers(setup):
    model, fit, held_out = setup
    cs = CrossSection("io", [(SITE, "END"), (SITE, "IO")])
    d = model.config.hidden_size
    out = evaluate_cross_section(model, fit, held_out, cs, {"perfect": perfect_sae(d)},
                                 ks=[1, 64], n_boot=50).squeeze("attribute")
    perfect = out.sel(dictionary="perfect")
    assert float(perfect.sufficiency) == pytest.approx(1.0, abs=1e-4)
    assert float(perfect.necessity) == pytest.approx(1.0, abs=1e-4)  # x = mean exactly
    np.testing.assert_allclose(perfect.fvu, 0, atol=1e-10)
    assert float(perfect.loss_increase) == pytest.approx(0.0, abs=1e-5)
    # with every latent allowed, the edit is the counterfactual activation itself
    assert float(perfect.edit.sel(k=64)) == pytest.approx(1.0, abs=1e-4)
    # ... against the no-edit baseline (the clean run the edit starts from), which is 0
    assert float(out.edit_baseline) == pytest.approx(0.0, abs=1e-6)
    assert str(out.edit_metric.values) in ("accuracy", "success")
    low, high = perfect.sufficiency_ci.values
    assert low <= 1.0 + 1e-4 and high >= 1.0 - 1e-4
    assert set(out.dictionary.values) == {"supervised", "perfect", "random:perfect",
                                          "random-sae:perfect"}
    assert list(out.pair.values) == ["L1.resid_pre@END", "L1.resid_pre@IO"]


def test_a_reconstruction_that_explains_nothing(setup):
    model, fit, held_out = setup
    cs = CrossSection("s", [(SITE, "END")])
    d = model.config.hidden_size
    from sage_nn.model.reads import site_values

    mean = site_values(model, fit, [(SITE, "END")])[(SITE, "END")].mean(0)
    out = evaluate_cross_section(model, fit, held_out, cs, {"mean": mean_sae(d, mean)},
                                 ks=[1], n_boot=20).squeeze("attribute")
    m = out.sel(dictionary="mean")
    # â = mean: no better than mean ablation (sufficiency 0) and everything is removed
    # (necessity 0); the plain ratio is the mean-ablated LD over the clean LD
    assert float(m.sufficiency) == pytest.approx(0.0, abs=1e-4)
    assert float(m.sufficiency_ratio) == pytest.approx(
        float(out.mean_ablated_logit_diff / out.clean_logit_diff), rel=1e-4)
    assert float(m.necessity) == pytest.approx(0.0, abs=1e-4)
    # the splice costs exactly what mean ablation costs
    assert float(m.loss_increase) == pytest.approx(
        float(out.clean_answer_logprob - out.mean_ablated_answer_logprob), abs=1e-5)
    assert float(m.l0.squeeze()) == 0.0 and float(m.dead.squeeze()) == 1.0


def test_a_resid_post_sae_serves_the_next_layers_resid_pre(setup):
    """Public residual SAEs sit at resid_post; discovery names that tensor L+1.resid_pre."""
    model, fit, held_out = setup
    d = model.config.hidden_size
    sae = perfect_sae(d)
    sae.layer, sae.kind = SITE.layer - 1, "resid_post"
    out = evaluate_cross_section(model, fit, held_out, CrossSection("io", [(SITE, "END")]),
                                 {"post": sae}, ks=[1], n_boot=10).squeeze("attribute")
    assert float(out.sel(dictionary="post").sufficiency) == pytest.approx(1.0, abs=1e-4)


def test_an_sae_at_another_site_is_refused(setup):
    model, fit, held_out = setup
    cs = CrossSection("io", [(Site(0, "resid_pre"), "END")])
    with pytest.raises(ValueError, match="cannot serve cross-section site L0.resid_pre"):
        evaluate_cross_section(model, fit, held_out, cs,
                               {"x": perfect_sae(model.config.hidden_size)}, ks=[1])


def test_sublayer_sites_directly_and_through_the_reconstruction(setup):
    """A z-head SAE serves its own head; a residual SAE reaches the same head through the
    reconstruction, and its L0 there counts its latents' codes at the site (the
    pattern-weighted sum over the source tokens the edit moves), as the reconstruction's own
    forward computes them; each floor has its SAE's L0 (matched on the fit prompts)."""
    from sage_nn.evaluation.coders import ReconstructedSAE
    from sage_nn.evaluation.scoring import _seen_rows
    from sage_nn.dictionaries.reconstruction import ResidualReconstruction

    model, fit, held_out = setup
    d, dh = model.config.hidden_size, model.config.hidden_size // model.config.num_attention_heads
    z = Site(1, "z", 0)
    eye = torch.eye(dh)
    head_sae = SparseAutoencoder(torch.cat([eye, -eye], 1), torch.zeros(2 * dh),
                                 torch.cat([eye, -eye], 0), torch.zeros(dh), layer=1, kind="z",
                                 heads=[0])
    other_head = SparseAutoencoder(head_sae.W_enc, head_sae.b_enc, head_sae.W_dec,
                                   head_sae.b_dec, layer=1, kind="z", heads=[1])
    cs = CrossSection("io", [(z, "END")])
    out = evaluate_cross_section(
        model, fit, held_out, cs,
        {"head": [other_head, head_sae], "resid": ReconstructedSAE([perfect_sae(d)])},
        ks=[1], n_boot=10).squeeze("attribute")
    for name in ("head", "resid"):  # exact at the head
        assert float(out.fvu.sel(dictionary=name).squeeze()) == pytest.approx(0.0, abs=1e-6)
        assert float(out.sufficiency_ratio.sel(dictionary=name)) == pytest.approx(1.0, abs=1e-3)
    # one head of a random model: mean ablation barely moves LD, so no ratio over it
    assert np.isnan(float(out.sufficiency.sel(dictionary="head")))
    assert str(out.mean_ablation_note.values).startswith("NaN: mean ablation moves")
    recon = ResidualReconstruction([perfect_sae(d)], mode="input", freeze_norm=True,
                                   freeze_pattern=True).fit(model)
    scored = held_out.subset(_seen_rows(fit, held_out, "io"))
    at_site = recon.run_at(scored.prompts, scored.positions["END"], [z], with_codes=True)
    expected_l0 = float((at_site.codes[z] != 0).sum(-1).float().mean())
    assert expected_l0 > d  # non-zero wherever a latent fires in the context
    assert float(out.l0_site.sel(dictionary="resid").squeeze()) == pytest.approx(expected_l0)
    # the L0 column is per token at the SAE's own site: d of the perfect SAE's 2d latents
    assert float(out.l0.sel(dictionary="resid").squeeze()) == pytest.approx(d)
    assert float(out.l0.sel(dictionary="head").squeeze()) == pytest.approx(dh)
    for name, width in (("head", dh), ("resid", d)):  # each control at its SAE's budget
        sae_l0 = float(out.l0.sel(dictionary=name).squeeze())
        for control in ("random", "random-sae"):
            l0 = float(out.l0.sel(dictionary=f"{control}:{name}").squeeze())
            assert l0 == pytest.approx(min(sae_l0, width), abs=max(1.0, 0.15 * sae_l0)), name
    # never worse than the mean at their own site (the head's; the residual's is checked in
    # tests/test_floor.py: pushed to a head, an error the size of the residual's spread over
    # every token is not bounded by the head's spread at one token)
    for control in ("random", "random-sae"):
        assert float(out.fvu.sel(dictionary=f"{control}:head").squeeze()) <= 1.0, control
    with pytest.raises(ValueError, match="cannot serve cross-section site L1.z.h2"):
        evaluate_cross_section(model, fit, held_out, CrossSection("io", [(Site(1, "z", 2), "END")]),
                               {"head": [head_sae]}, ks=[1])


def test_difference_mode_reaches_attn_out_and_input_mode_is_the_default(setup):
    """attn_out as SAE(resid_mid) - SAE(resid_pre): exact with perfect SAEs; no latent
    directions there, so no edit (NaN), while input mode edits the same site."""
    from sage_nn.evaluation.coders import ReconstructedSAE

    model, fit, held_out = setup
    d = model.config.hidden_size
    pre, mid = perfect_sae(d), perfect_sae(d)
    mid.kind = "resid_mid"
    cs = CrossSection("io", [(Site(1, "attn_out"), "END")])
    out = evaluate_cross_section(
        model, fit, held_out, cs,
        {"diff": ReconstructedSAE([pre, mid], mode="difference"),
         "input": ReconstructedSAE([pre, mid])}, ks=[1], n_boot=10).squeeze("attribute")
    for name in ("diff", "input"):
        assert float(out.fvu.sel(dictionary=name).squeeze()) == pytest.approx(0.0, abs=1e-6)
        assert float(out.sufficiency_ratio.sel(dictionary=name)) == pytest.approx(1.0, abs=1e-3)
    assert np.isnan(float(out.edit.sel(dictionary="diff", k=1)))
    assert not np.isnan(float(out.edit.sel(dictionary="input", k=1)))
    with pytest.raises(ValueError, match="cannot serve cross-section site L1.attn_out"):
        evaluate_cross_section(model, fit, held_out, cs,
                               {"x": ReconstructedSAE([pre], mode="difference")}, ks=[1])


def test_a_ceiling_that_fails_its_checks_is_not_ground_truth():
    import xarray as xr

    from sage_nn.evaluation.scoring import trust_ceiling

    def results(sufficiency, necessity, edit):
        return xr.Dataset(
            {"sufficiency": (("attribute", "dictionary"), [[sufficiency]]),
             "necessity": (("attribute", "dictionary"), [[necessity]]),
             "edit": (("attribute", "dictionary", "k"), [[[0.0, edit]]])},
            coords={"attribute": ["io"], "dictionary": ["supervised"], "k": [1, 2]})

    good = trust_ceiling(results(1.02, 0.8, 0.9))
    assert bool(good.ground_truth.item()) and good.ground_truth_note.item() == ""
    bad = trust_ceiling(results(1.6, 0.2, np.nan))
    assert not bool(bad.ground_truth.item())
    assert bad.ground_truth_note.item() == ("sufficiency 1.60 outside [0.8, 1.25]; "
                                            "necessity 0.20 < 0.25; edit (k=2) nan < 0.5")
