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

What does not hold is tested as such (strict xfail): a near-lossless SAE is as sufficient
as the ceiling, so sufficiency cannot rank it below.
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


@pytest.mark.xfail(strict=True, reason=(
    "measured at the quickstart's settings: the residual SAEs reconstruct the heads almost "
    "losslessly (FVU 0.05), so their sufficiency (0.999) is as close to 1 as the ceiling's "
    "(1.014, interval [0.95, 1.10]): sufficiency does not rank a good SAE below the ceiling. "
    "Strict: this fails loudly if it starts to hold."))
def test_ceiling_above_trained_sae_on_sufficiency(calibration):
    _, io, sae, _ = calibration
    assert goodness(float(io.sufficiency.sel(dictionary="supervised"))) > goodness(
        float(io.sufficiency.sel(dictionary=sae)))
