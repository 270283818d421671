"""Calibration on the real model: supervised ceiling > trained residual SAE > random floor.

The pipeline runs on SmolLM2-135M and IOI with the quickstart's settings (prompts, SAE
width, steps and corpus, edit budgets, bootstrap), for the attribute whose ground truth is
meaningful here: ``io`` (the indirect object, which the model predicts). Its cross-section
is grown from attention heads' outputs until their joint patch recovers 60% of the effect,
and the residual SAEs reach those heads through the residual-to-sublayer reconstruction.

Every comparison is strict and can fail: the random floor is the SAE itself with random
directions (same architecture, its L0 matched on the data), and the SAE must beat it with
non-overlapping 95% bootstrap intervals, on sufficiency and on edit over the no-edit
baseline at some k <= 8 (where the ceiling must beat the SAE too), and on held-out F1. The
ceiling must pass its own ground-truth checks. With 48 held-out prompts the SAE's and the
floor's edit intervals overlapped at every k <= 8 (k = 8: 0.11 [0.04, 0.21] vs 0.02
[0, 0.07]); with 144 they are apart from k = 4 on, hence the quickstart's 96.

What does not hold is tested as measured: a near-lossless SAE is as sufficient as the
ceiling (inside its interval), so sufficiency cannot rank it below.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sage_nn.pipeline import RunConfig, run  # noqa: E402

pytestmark = pytest.mark.slow
EDIT_KS = (1, 2, 4, 8)


def calibration_config(run_dir) -> RunConfig:
    """The quickstart's settings; only io, and only the residual SAEs under test."""
    return RunConfig(model="smollm2-135m", task="ioi", saes=["train:topk"], run_dir=str(run_dir),
                     attributes=["io"])


def goodness(value):
    """Sufficiency is best at 1: scored by its distance from 1 (as the report does)."""
    return 1 - np.abs(1 - np.asarray(value))


def disjoint(a, b) -> bool:
    return a[1] < b[0] or b[1] < a[0]


@pytest.fixture(scope="module")
def calibration(smollm2, tmp_path_factory):
    """The run, with SAEs trained for it alone; io's results and the SAE's and floor's names."""
    root = tmp_path_factory.mktemp("calibration")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAGE_NN_CACHE", str(root / "cache"))  # SAEs trained here only
        result = run(calibration_config(root / "run"), model=smollm2, progress=False)
    io = result.results.sel(attribute="io")
    sae = next(str(d) for d in io.dictionary.values if str(d).startswith("topk-"))
    return result, io, sae, f"random:{sae}"


def test_io_cross_section_is_heads_and_its_ceiling_is_ground_truth(calibration):
    result, io, _, _ = calibration
    where = (result.cross_sections, float(io.recovered))
    assert float(io.recovered) >= 0.6, where
    assert all(".z." in site for site in result.cross_sections["io"]), where  # components
    assert bool(io.ground_truth), (str(io.ground_truth_note.values), where)


def test_trained_residual_sae_between_floor_and_ceiling(calibration):
    result, io, sae, floor = calibration
    # sufficiency: the SAE keeps the task far better than its floor, intervals apart
    suff = {m: float(io.sufficiency.sel(dictionary=m)) for m in ("supervised", sae, floor)}
    assert goodness(suff[sae]) > goodness(suff[floor]), suff
    assert disjoint(io.sufficiency_ci.sel(dictionary=sae).values,
                    io.sufficiency_ci.sel(dictionary=floor).values), suff
    # edits over the no-edit baseline: ceiling > SAE > floor, SAE and floor intervals apart
    baseline = float(io.edit_baseline)
    edit = io.edit - baseline
    separated = [k for k in EDIT_KS
                 if float(edit.sel(dictionary="supervised", k=k)) > float(edit.sel(dictionary=sae, k=k))
                 > float(edit.sel(dictionary=floor, k=k))
                 and float(io.edit_ci.sel(dictionary=sae, k=k, bound="low"))
                 > float(io.edit_ci.sel(dictionary=floor, k=k, bound="high"))]
    assert separated, (str(io.edit_metric.values), baseline,
                       io.edit.sel(k=list(EDIT_KS)).to_pandas(),
                       io.edit_ci.sel(k=list(EDIT_KS)).to_dataframe())
    # interpretability: each name's best latent (chosen on fit prompts, held-out F1)
    f1 = {m: float(io.best_f1.sel(dictionary=m).mean()) for m in ("supervised", sae, floor)}
    assert f1["supervised"] > f1[sae] > f1[floor], f1


def test_sufficiency_cannot_rank_a_near_lossless_sae_below_the_ceiling(calibration):
    """What the issue asked, ceiling > SAE on sufficiency, does not hold, and this says why:
    the residual SAEs reconstruct the heads almost losslessly, so their sufficiency falls
    inside the ceiling's own 95% interval (quickstart: 0.991 vs 1.012 [0.97, 1.07]), as does
    1. Sufficiency rewards fidelity; edits and F1 are what rank the SAE below the ceiling."""
    _, io, sae, _ = calibration
    low, high = io.sufficiency_ci.sel(dictionary="supervised").values
    assert low <= float(io.sufficiency.sel(dictionary=sae)) <= high
    assert low <= 1.0 <= high
