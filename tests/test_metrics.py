"""The metric formulas on constructed cases with known answers."""

import numpy as np
import pandas as pd
import pytest
import torch

from sage_nn import metrics


def test_sufficiency_and_necessity():
    clean = np.array([4.0, 6.0])
    assert metrics.sufficiency(np.array([2.0, 3.0]), clean) == pytest.approx(0.5)
    mean_ablated = np.array([1.0, 1.0])
    # removing what the dictionary explains drops LD all the way to the mean ablation: 1
    assert metrics.necessity(mean_ablated, mean_ablated, clean) == pytest.approx(1.0)
    # removing it changes nothing: 0
    assert metrics.necessity(clean, mean_ablated, clean) == pytest.approx(0.0)
    assert metrics.necessity(np.array([3.0, 3.0]), mean_ablated, clean) == pytest.approx(0.5)


def test_loss_increase():
    clean = np.log(np.array([0.5, 0.25]))
    assert metrics.loss_increase(clean, clean) == 0.0
    # halving p(answer) costs log 2 nats
    assert metrics.loss_increase(clean - np.log(2), clean) == pytest.approx(np.log(2))


def test_edit_accuracy():
    assert metrics.edit_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5


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


def test_interpretability_f1():
    labels = pd.DataFrame({"io": ["A", "A", "B", "B"]})
    codes = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=float)
    out = metrics.interpretability(codes, labels)
    assert out.best_f1.sel(attribute="io", value="A") == pytest.approx(1.0)  # latent 0
    assert int(out.latent.sel(attribute="io", value="A")) == 0
    # B: latent 1 has P=1, R=.5 (F1 2/3); latent 2 has P=2/3, R=1 (F1 .8)
    assert out.best_f1.sel(attribute="io", value="B") == pytest.approx(0.8)
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
