"""The metric formulas on constructed cases with known answers."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sage_nn.evaluation import metrics


def test_sufficiency_and_necessity():
    clean = np.array([4.0, 6.0])  # mean 5
    mean_ablated = np.array([1.0, 1.0])  # mean ablation takes 4 of the 5 logits
    # the share of what mean ablation takes away that the reconstruction keeps
    assert metrics.sufficiency(np.array([2.0, 3.0]), mean_ablated, clean) == pytest.approx(0.375)
    assert metrics.sufficiency(clean, mean_ablated, clean) == pytest.approx(1.0)
    assert metrics.sufficiency(mean_ablated, mean_ablated, clean) == pytest.approx(0.0)
    # reversing the effect is not good: the sign is kept (the reference takes |.|)
    assert metrics.sufficiency(np.array([-3.0, -3.0]), mean_ablated, clean) == pytest.approx(-1.0)
    # the plain ratio credits whatever mean ablation leaves standing (here 1 of 5)
    assert metrics.sufficiency_ratio(mean_ablated, clean) == pytest.approx(0.2)
    assert np.isnan(metrics.sufficiency(clean, clean + 0.05, clean))  # too small to divide by
    # removing what the dictionary explains drops LD all the way to the mean ablation: 1
    assert metrics.necessity(mean_ablated, mean_ablated, clean) == pytest.approx(1.0)
    # removing it changes nothing: 0
    assert metrics.necessity(clean, mean_ablated, clean) == pytest.approx(0.0)
    assert metrics.necessity(np.array([3.0, 3.0]), mean_ablated, clean) == pytest.approx(0.5)
    # per prompt: errors that push prompts both ways do not cancel (their mean LD is the
    # mean-ablated one, which the mean-level ratio would score 1)
    assert metrics.necessity(np.array([-2.0, 4.0]), mean_ablated, clean) == pytest.approx(0.25)
    assert metrics.mean_ablation_reason(mean_ablated, clean) is None


def test_necessity_is_nan_with_a_reason_when_mean_ablation_barely_moves_ld():
    clean = np.array([4.0, 6.0])
    mean_ablated = np.array([4.98, 4.98])  # moves the mean LD by 0.02 < 0.1
    # the bare ratio would be 1 - 4/0.02 = -199
    assert np.isnan(metrics.necessity(np.array([1.0, 1.0]), mean_ablated, clean))
    reason = metrics.mean_ablation_reason(mean_ablated, clean)
    assert reason.startswith("NaN: mean ablation moves the logit difference by only 0.02")
    # min_gap is the threshold: a smaller one makes it defined again
    assert metrics.necessity(np.array([1.0, 1.0]), mean_ablated, clean,
                             min_gap=0.01) == pytest.approx(1 - 3.98 / 1.0)
    assert metrics.mean_ablation_reason(mean_ablated, clean, min_gap=0.01) is None
    # exactly zero gap: NaN, not inf
    assert np.isnan(metrics.necessity(clean, clean, clean))


def test_bootstrap_of_necessity_drops_nan_resamples():
    rng = np.random.default_rng(0)
    clean = rng.normal(3.0, 0.5, 200)
    mean_ablated = rng.normal(0.0, 0.5, 200)
    lo, hi = metrics.bootstrap(metrics.necessity, 0.5 * clean, mean_ablated, clean,
                               n_boot=200)
    assert lo < 0.5 < hi and hi - lo < 0.2
    # a gap of 0: every resample is NaN, and so is the interval (no warning, no inf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = metrics.bootstrap(metrics.necessity, clean, clean, clean, n_boot=50)
    assert np.isnan(lo) and np.isnan(hi)


def test_loss_increase():
    clean = np.log(np.array([0.5, 0.25]))
    assert metrics.loss_increase(clean, clean) == 0.0
    assert metrics.loss_increase(clean + np.log(2), clean) == pytest.approx(-np.log(2))
    # halving p(answer) costs log 2 nats
    assert metrics.loss_increase(clean - np.log(2), clean) == pytest.approx(np.log(2))


def test_edit_accuracy_counts_only_prompts_the_counterfactual_changes():
    clean = np.array([0, 0, 0, 0, 5, 5])
    cf = np.array([1, 2, 3, 4, 5, 5])  # the last two keep the clean prediction
    edit = np.array([1, 2, 0, 0, 5, 5])
    # 2 of the 4 changed prompts; over all 6 prompts it would be 4/6
    assert metrics.edit_accuracy(edit, cf, clean) == 0.5
    assert metrics.edit_accuracy_reason(cf, clean) is None
    # the no-edit baseline is the same function of the reconstruction's predictions
    reconstruction = np.array([0, 2, 0, 0, 5, 5])
    assert metrics.edit_accuracy(reconstruction, cf, clean) == 0.25


def test_edit_accuracy_is_nan_when_the_counterfactual_never_changes_the_prediction():
    clean = np.array([3, 3, 7])
    assert np.isnan(metrics.edit_accuracy(clean, clean, clean))
    assert metrics.edit_accuracy_reason(clean, clean) == (
        "NaN: the counterfactual never changes the top prediction")


def test_edit_success_is_the_share_of_the_logit_difference_move():
    clean = np.array([3.0, 5.0])  # mean 4
    cf = np.array([0.0, 2.0])  # mean 1: moves by -3
    assert metrics.edit_success(np.array([2.0, 4.0]), clean, cf) == pytest.approx(1 / 3)
    assert metrics.edit_success(cf, clean, cf) == pytest.approx(1.0)
    assert metrics.edit_success(clean + 1, clean, cf) == pytest.approx(-1 / 3)  # wrong way
    assert metrics.edit_success_reason(clean, cf) is None
    # tiny counterfactual move: NaN with a reason
    near = clean + 0.05
    assert np.isnan(metrics.edit_success(cf, clean, near))
    assert metrics.edit_success_reason(clean, near).startswith(
        "NaN: the counterfactual moves the logit difference by only 0.05")


def test_edit_metric_rule():
    clean = np.zeros(20, dtype=int)
    assert metrics.edit_metric(clean, clean) == "success"  # IOI s/order: answer stays
    cf = clean.copy()
    cf[:10] = 1
    assert metrics.edit_metric(clean, cf) == "accuracy"  # 10 changed >= MIN_CHANGED
    cf[9] = 0
    assert metrics.edit_metric(clean, cf) == "success"  # 9 < 10
    assert metrics.edit_metric(clean, cf, min_changed=5) == "accuracy"
    assert metrics.edit_metric(clean, clean, min_changed=0) == "success"  # never 0 changed


def test_greedy_edit_picks_the_latents_that_close_the_gap():
    directions = torch.eye(4)
    a = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    codes = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    codes_cf = torch.tensor([[0.0, 2.0, 0.5, 0.0]])
    target = torch.tensor([[0.0, 2.0, 0.5, 0.0]])
    edited, chosen, magnitude = metrics.greedy_edit(a, codes, codes_cf, directions, target, k=1)
    assert chosen.tolist() == [[1]]  # adding latent 1 (gain 4) beats removing latent 0 (gain 1)
    torch.testing.assert_close(edited, torch.tensor([[1.0, 2.0, 0.5, 0.0]]))
    assert magnitude.item() == 0.0
    edited, chosen, magnitude = metrics.greedy_edit(a, codes, codes_cf, directions, target, k=4)
    torch.testing.assert_close(edited, target)
    assert sorted(chosen[0, :2].tolist()) == [0, 1] and chosen[0, 2:].tolist() == [-1, -1]
    assert magnitude.item() == pytest.approx(1.0 / 1.5)  # latent 0 of weight 1 out of 1.5


def test_greedy_edit_with_a_frozen_scale():
    directions = torch.eye(2)
    a = torch.zeros(2, 2)
    codes = torch.zeros(2, 2)
    codes_cf = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[2.0, 0.0], [0.5, 0.0]])
    edited, _, _ = metrics.greedy_edit(a, codes, codes_cf, directions, target, k=1,
                                       scale=torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(edited, target)


def test_interpretability_f1_is_measured_on_held_out_prompts():
    labels = pd.DataFrame({"io": ["A", "A", "B", "B"]})
    codes = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=float)
    # held out: latent 0 now fires on a B prompt, latent 2 only on B prompts
    labels_test = pd.DataFrame({"io": ["A", "A", "B", "B"]})
    codes_test = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=float)
    out = metrics.interpretability(codes, labels, codes_test, labels_test)
    # A: latent 0 (F1 1 on fit); held out P=1/2, R=1/2
    assert int(out.latent.sel(attribute="io", value="A")) == 0
    assert out.fit_f1.sel(attribute="io", value="A") == pytest.approx(1.0)
    assert out.best_f1.sel(attribute="io", value="A") == pytest.approx(0.5)
    assert out.precision.sel(attribute="io", value="A") == pytest.approx(0.5)
    assert out.recall.sel(attribute="io", value="A") == pytest.approx(0.5)
    # B: on fit latent 1 has F1 2/3, latent 2 F1 .8 -> latent 2; held out P=1, R=1
    assert int(out.latent.sel(attribute="io", value="B")) == 2
    assert out.fit_f1.sel(attribute="io", value="B") == pytest.approx(0.8)
    assert out.best_f1.sel(attribute="io", value="B") == pytest.approx(1.0)
    assert out.share_interpretable.sel(attribute="io") == pytest.approx(0.5)


def test_f1_activity_threshold_is_chosen_on_fit_prompts():
    """Codes that are not exactly sparse (a pattern-weighted sum over source tokens) are
    non-zero on every prompt: 'active at all' says nothing, a threshold chosen on the fit
    prompts does. Exactly sparse codes keep the reference's threshold 0."""
    labels = pd.DataFrame({"io": ["A", "B"] * 4})
    strong = np.where(labels.io == "A", 1.0, 0.05)  # fires on every prompt, strongly on A
    codes = np.stack([strong, np.full(8, 0.3)], 1)
    fitted = metrics.latent_f1(codes, labels)
    f1, threshold = fitted["io", "A"]
    assert f1[0] == pytest.approx(1.0) and threshold[0] == pytest.approx(0.05)
    assert f1[1] == pytest.approx(2 * 4 / (8 + 4))  # a constant latent: 'always active'
    held_out = metrics.interpretability(codes, labels, codes * 0.9, labels)
    assert held_out.best_f1.sel(attribute="io", value="A") == pytest.approx(1.0)
    sparse = np.where(labels.io.to_numpy()[:, None] == "A", 1.0, 0.0) * np.array([[2.0, 0.5]])
    assert metrics.latent_f1(sparse, labels)["io", "A"][1].tolist() == [0.0, 0.0]
    out = metrics.interpretability(sparse, labels, sparse, labels)
    assert float(out.activity_threshold.sel(attribute="io", value="A")) == 0.0
    # a value no latent fires on has no detector: F1 0, never active
    f1, threshold = metrics.latent_f1(sparse, labels)["io", "B"]
    assert f1.max() == 0.0 and np.isinf(threshold).all()


def test_f1_path_removes_the_clean_values_best_latents_and_adds_the_counterfactuals():
    """Makelov et al.'s interpretation-aware edit: per prompt, the k best-F1 latents of its
    value that are active are removed, the counterfactual value's active ones added."""
    ranked = {"A": np.array([0, 1, 2, 3]), "B": np.array([3, 2, 1, 0])}
    codes = torch.tensor([[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    codes_cf = torch.tensor([[0.0, 0.0, 4.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
    chosen, coefs = metrics.f1_path(codes, codes_cf, ["A", "B"], ["B", "A"], ranked, k=1,
                                    scale=torch.tensor([1.0, 2.0]))
    # row 0 (A -> B): latent 0 is A's best but inactive, so latent 1 goes (-2); B's best
    # active in the counterfactual code is latent 3 (+3)
    assert chosen.tolist() == [[1, 3], [3, 0]]
    torch.testing.assert_close(coefs, torch.tensor([[-2.0, 3.0], [-10.0, 2.0]]))
    # k = 2 interleaves removals and additions: the first 2 columns are the edit at k = 1
    chosen2, _ = metrics.f1_path(codes, codes_cf, ["A", "B"], ["B", "A"], ranked, k=2)
    assert chosen2[:, :2].tolist() == chosen.tolist()
    assert chosen2[0].tolist() == [1, 3, 2, 2] and chosen2[1].tolist() == [3, 0, -1, -1]
    # a value without a ranking (never seen on the fit prompts) moves nothing
    none, _ = metrics.f1_path(codes, codes_cf, ["C", "C"], ["C", "C"], ranked, k=1)
    assert (none == -1).all()


def test_edit_magnitude_counts_signed_codes_by_their_size():
    directions = torch.eye(3)
    codes = torch.tensor([[2.0, -1.0, 1.0]])  # weight 4
    # latent 1 moved from -1 to 0 (removes 1), latent 0 from 2 to -1 (its sign flips: all 2)
    chosen, coefs = torch.tensor([[1, 0]]), torch.tensor([[1.0, -3.0]])
    assert metrics.edit_magnitude(codes, chosen, coefs, directions).item() == pytest.approx(0.75)
    # with a frozen scale the coefficients are code changes times the scale
    half = metrics.edit_magnitude(codes, chosen, 2 * coefs, directions, torch.tensor([2.0]))
    assert half.item() == pytest.approx(0.75)


def test_interpretability_in_sample_choice_overstates_random_codes():
    rng = np.random.default_rng(0)
    n_fit, n_test, n_latents = 20, 200, 4000
    labels = pd.DataFrame({"io": np.tile(list("ABCD"), (n_fit + n_test) // 4)})
    codes = (rng.random((n_fit + n_test, n_latents)) < 0.25) * rng.random((n_fit + n_test,
                                                                            n_latents))
    fit, test = codes[:n_fit], codes[n_fit:]
    labels_fit, labels_test = labels[:n_fit], labels[n_fit:].reset_index(drop=True)
    in_sample = metrics.interpretability(fit, labels_fit, fit, labels_fit)
    held_out = metrics.interpretability(fit, labels_fit, test, labels_test)
    # chosen and scored on the same prompts, some of 4000 random latents fit every value
    assert float(in_sample.best_f1.min()) > 0.85
    assert float(in_sample.share_interpretable.sel(attribute="io")) == 1.0
    assert float(held_out.fit_f1.min()) > 0.85
    # on held-out prompts they are the chance level of a latent firing on 1/4 of prompts
    assert float(held_out.best_f1.max()) < 0.35
    assert float(held_out.share_interpretable.sel(attribute="io")) == 0.0


def test_interpretability_value_missing_from_held_out_prompts_is_nan():
    labels = pd.DataFrame({"io": ["A", "B", "C"]})
    codes = np.eye(3)
    out = metrics.interpretability(codes, labels, codes[:2], labels[:2])
    assert np.isnan(float(out.best_f1.sel(attribute="io", value="C")))
    assert out.best_f1.sel(attribute="io", value="A") == pytest.approx(1.0)
    # share over the values that can be scored: A and B
    assert out.share_interpretable.sel(attribute="io") == pytest.approx(1.0)


def test_alignment_fvu_l0_dead():
    features = np.array([[1.0, 0.0], [1.0, 1.0]])
    directions = np.array([[2.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(metrics.feature_alignment(features, directions),
                               [1.0, 1 / np.sqrt(2)])
    a = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert metrics.fvu(a, a) == 0.0
    assert metrics.fvu(a, np.zeros_like(a)) == pytest.approx(1.0)
    codes = np.array([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    assert metrics.l0(codes) == 1.5 and metrics.dead_share(codes) == pytest.approx(1 / 3)


def test_bootstrap_interval_covers_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = metrics.bootstrap(np.mean, x, n_boot=500, seed=1)
    assert lo < 1.0 < hi and hi - lo < 0.4
    assert (lo, hi) == metrics.bootstrap(np.mean, x, n_boot=500, seed=1)


def test_bootstrap_of_an_undefined_statistic_is_undefined():
    """Edit success on a counterfactual that barely moves LD is NaN; some resamples move
    it more, but an interval around NaN would read as a measurement."""
    clean = np.array([1.0, 1.0, 1.0, 1.0])
    cf = np.array([1.3, 0.8, 1.0, 0.95])  # mean move 0.0125 < 0.1
    edit = np.array([1.2, 0.9, 1.1, 1.0])
    assert np.isnan(metrics.edit_success(edit, clean, cf))
    assert all(np.isnan(metrics.bootstrap(metrics.edit_success, edit, clean, cf, n_boot=200)))


@pytest.mark.parametrize("name", ["sufficiency", "necessity", "loss_increase", "edit_success",
                                  "edit_accuracy"])
def test_bootstrap_of_all_resamples_at_once_equals_one_by_one(name):
    """The metrics take a resample axis, so the bootstrap computes every resample in one
    call; a statistic that cannot (here: the same metric behind float()) goes one by one
    over the same resamples, to the same interval."""
    rng = np.random.default_rng(1)
    if name == "edit_accuracy":
        arrays = [rng.integers(0, 3, 60) for _ in range(3)]
    else:
        arrays = [rng.normal(m, 1.0, 60) for m in (2.0, 0.5, 3.0)][:3 if name in (
            "sufficiency", "necessity", "edit_success") else 2]
    metric, calls = getattr(metrics, name), []

    def counted(*a):
        calls.append(1)
        return metric(*a)

    at_once = metrics.bootstrap(counted, *arrays, n_boot=300, seed=3)
    assert len(calls) == 2  # the point estimate, then all 300 resamples in one call
    one_by_one = metrics.bootstrap(lambda *a: float(metric(*a)), *arrays, n_boot=300, seed=3)
    assert np.isfinite(at_once).all()
    np.testing.assert_allclose(at_once, one_by_one, rtol=1e-12)


def test_signed_codes_are_active_by_their_size():
    """AbsTopK SAEs keep the k codes of largest |value|, so a latent may fire negatively. A
    latent that is -2 exactly on the A prompts is A's perfect detector (not 'never active'),
    and the F1 edit removes it at its signed code; with its sign flipped it detects the same."""
    labels = pd.DataFrame({"io": ["A", "B"] * 4})
    on_a = (labels.io == "A").to_numpy()
    codes = np.stack([np.where(on_a, -2.0, 0.0), np.where(on_a, 0.0, 1.0)], 1)
    f1, threshold = metrics.latent_f1(codes, labels)["io", "A"]
    assert f1.tolist() == [pytest.approx(1.0), 0.0] and threshold[0] == 0.0
    assert metrics.latent_f1(-codes, labels)["io", "A"][0][0] == pytest.approx(1.0)
    held_out = metrics.interpretability(codes, labels, codes, labels)
    assert float(held_out.best_f1.sel(attribute="io", value="A")) == pytest.approx(1.0)
    ranked = {"A": np.array([0, 1]), "B": np.array([1, 0])}
    chosen, coefs = metrics.f1_path(torch.tensor(codes[:1]), torch.tensor(codes[1:2]),
                                    ["A"], ["B"], ranked, k=1)
    assert chosen.tolist() == [[0, 1]]  # A's negative latent removed, B's added
    torch.testing.assert_close(coefs, torch.tensor([[2.0, 1.0]], dtype=torch.float64))
