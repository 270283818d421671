"""Supervised dictionaries: recovery of known features, degenerate input, sklearn API, torch."""

import itertools
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.utils.estimator_checks import parametrize_with_checks

from sage_nn.dictionaries.supervised import ConfoundedAttributesWarning, MeanDictionary, MSEDictionary, RareValueWarning, edit_torch, fit_weights_torch, reconstruct_torch

VALUES = {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1"]}
D = 16


def true_features(rng, d=D):
    """Known features, centred within each attribute (the identifiable part)."""
    out = {}
    for name, vals in VALUES.items():
        u = rng.normal(size=(len(vals), d))
        u -= u.mean(0)
        out.update({(name, v): u[j] for j, v in enumerate(vals)})
    return out


def synth(seed=0, reps=5, noise=0.0, factorial=True, n=200, scales=None):
    """Activations mean + sum_i w_i u_{i,c_i} + noise, with their attribute table."""
    rng = np.random.default_rng(seed)
    feats, mean = true_features(rng), rng.normal(size=D) * 3
    if factorial:
        rows = list(itertools.product(*VALUES.values())) * reps
    else:
        rows = [tuple(rng.choice(v) for v in VALUES.values()) for _ in range(n)]
    table = pd.DataFrame(rows, columns=list(VALUES))
    w = np.ones((len(table), len(VALUES))) if scales is None else scales(rng, len(table))
    X = mean + sum(w[:, i, None] * np.stack([feats[(a, v)] for v in table[a]])
                   for i, a in enumerate(VALUES))
    X = X + noise * rng.normal(size=X.shape)
    return X, table, feats, mean, w


def as_dataarray(X, table):
    coords = {c: ("prompt", table[c].to_numpy()) for c in table}
    coords.update(text=("prompt", [f"p{i}" for i in range(len(X))]),
                  split=("prompt", ["train"] * len(X)), layer=3, position="END")
    return xr.DataArray(X, dims=("prompt", "d_model"), coords=coords)


ESTIMATORS = [MeanDictionary, MSEDictionary]


# -- recovery of known features -------------------------------------------------------

@pytest.mark.parametrize("Est", ESTIMATORS)
def test_recovers_known_features_on_balanced_design(Est):
    X, table, feats, mean, _ = synth(noise=1e-3)
    d = Est().fit(X, table)
    for (a, v), u in feats.items():
        np.testing.assert_allclose(d.features_.sel(attribute=a, value=v).values, u, atol=2e-3)
    np.testing.assert_allclose(d.mean_, mean, atol=1e-3)
    assert d.score(X, table) > 0.9999


def test_mse_is_exact_on_unbalanced_data_and_mean_is_not():
    X, table, feats, _, _ = synth(factorial=False, n=120, seed=1)
    mse, mean = MSEDictionary().fit(X, table), MeanDictionary().fit(X, table)
    np.testing.assert_allclose(mse.reconstruct(X, table), X, atol=1e-9)
    # Within one attribute, differences between values are identifiable: exact for MSE.
    for a, vals in VALUES.items():
        got = mse.features_.sel(attribute=a).values
        want = np.stack([feats[(a, v)] for v in mse.features_.sel(attribute=a).value.values])
        np.testing.assert_allclose(got - got[0], want - want[0], atol=1e-9)
    # Conditional means mix in the other attributes' imbalance: least squares fits better.
    assert mse.score(X, table) > mean.score(X, table) + 1e-4


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_fitted_weights_recover_per_example_scales(Est):
    X, table, _, _, _ = synth()
    Xs, _, _, _, w = synth(scales=lambda rng, n: rng.uniform(0.5, 2.0, size=(n, 3)))
    d = Est(weights="fitted").fit(X, table)
    codes = d.transform(Xs, table)
    active = d.active_features(table)
    np.testing.assert_allclose(np.take_along_axis(codes, active, 1), w, atol=1e-8)
    assert np.count_nonzero(codes, axis=1).max() == 3
    np.testing.assert_allclose(d.inverse_transform(codes), Xs, atol=1e-8)
    # Unit weights cannot follow the scales.
    assert Est().fit(X, table).score(Xs, table) < d.score(Xs, table) - 0.05


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_edit_moves_to_the_counterfactual_activation(Est):
    X, table, _, _, _ = synth(seed=2)
    d = Est().fit(X, table)
    rng = np.random.default_rng(0)
    new = rng.choice(VALUES["b"], size=len(table))
    cf_table = table.assign(b=new)
    # The counterfactual rows exist in the factorial data: look them up.
    key = {tuple(r): i for i, r in enumerate(table.itertuples(index=False))}
    target = X[[key[tuple(r)] for r in cf_table.itertuples(index=False)]]
    np.testing.assert_allclose(d.edit(X, table, "b", new), target, atol=1e-9)
    # One value for all samples.
    one = d.edit(X, table, "c", "c1")
    target = X[[key[(r.a, r.b, "c1")] for r in table.itertuples(index=False)]]
    np.testing.assert_allclose(one, target, atol=1e-9)


def test_codes_are_the_one_hot_design_with_unit_weights():
    X, table, _, _, _ = synth()
    d = MSEDictionary().fit(X, table)
    np.testing.assert_array_equal(d.transform(X, table), d.encoder_.transform(table))
    assert list(d.get_feature_names_out()[:2]) == ["a=a0", "a=a1"]
    assert d.value_counts_.loc[("b", "b1")] == 4 * 2 * 5
    frame = clone(d).set_output(transform="pandas").fit_transform(X, table)
    assert list(frame.columns[-2:]) == ["c=c0", "c=c1"] and frame.shape == (120, 9)


# -- labeled (xarray) input ------------------------------------------------------------

def test_dataarray_input_with_attribute_coordinates():
    X, table, _, _, _ = synth(factorial=False, n=80, seed=3)
    da = as_dataarray(X, table)
    d = MSEDictionary().fit(da)
    assert d.attributes_ == ["a", "b", "c"]  # text/split bookkeeping is left out
    ref = MSEDictionary().fit(X, table)
    np.testing.assert_allclose(d.components_, ref.components_)
    assert d.features_.dims == ("feature", "d_model")
    cube = d.features_.unstack("feature")
    assert set(cube.dims) == {"attribute", "value", "d_model"}
    assert bool(cube.sel(attribute="c", value="a0").isnull().all())  # not a value of c
    codes = d.transform(da)
    assert codes.dims == ("prompt", "feature")
    assert list(codes.text.values[:2]) == ["p0", "p1"]
    np.testing.assert_allclose(codes.sel(attribute="c").sum("value").values, 1)
    rec = d.inverse_transform(codes)
    assert rec.dims == ("prompt", "d_model") and rec.sizes["prompt"] == 80
    np.testing.assert_allclose(rec.values, X, atol=1e-9)
    edited = d.edit(da, None, "a", "a2")
    assert set(edited.a.values) == {"a2"} and edited.dims == da.dims
    # Explicit attributes, and labels as y overriding coordinates.
    d2 = MeanDictionary(attributes=["a"]).fit(da)
    assert d2.attributes_ == ["a"] and d2.components_.shape == (4, D)
    d3 = MeanDictionary().fit(da, table[["b"]])
    assert d3.attributes_ == ["b"]


def test_head_site_dataarray_keeps_its_feature_dim():
    X, table, _, _, _ = synth()
    da = as_dataarray(X, table).rename(d_model="d_head")
    d = MeanDictionary(weights="fitted").fit(da)
    assert d.features_.dims == ("feature", "d_head")
    assert d.reconstruct(da).dims == ("prompt", "d_head")


# -- degenerate input ------------------------------------------------------------------

@pytest.mark.parametrize("Est", ESTIMATORS)
def test_constant_attribute_is_a_clear_error(Est):
    X, table, _, _, _ = synth()
    with pytest.raises(ValueError, match=r"attribute 'k' has the single value 'same'.*drop it"):
        Est().fit(X, table.assign(k="same"))
    d = Est(attributes=["a", "b", "c"]).fit(X, table.assign(k="same"))  # the documented fix
    assert d.attributes_ == ["a", "b", "c"]


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_value_seen_once_warns_and_is_fitted_from_that_example(Est):
    X, table, _, _, _ = synth(noise=0.1)
    table = table.copy()
    table.loc[7, "c"] = "c_rare"
    with pytest.warns(RareValueWarning, match=r"c=c_rare \(1x\)"):
        d = Est().fit(X, table)
    assert d.value_counts_.loc[("c", "c_rare")] == 1
    if Est is MeanDictionary:
        u = d.features_.sel(attribute="c", value="c_rare").values
        np.testing.assert_allclose(u, X[7] - X.mean(0))
    else:  # least squares fits the lone example exactly
        np.testing.assert_allclose(d.reconstruct(X, table)[7], X[7], atol=1e-9)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_confounded_attributes_warn_and_mse_gives_minimum_norm(Est):
    X, table, _, _, _ = synth()
    table = table.assign(a_copy=table["a"].str.replace("a", "x"))  # same partition as a
    with pytest.warns(ConfoundedAttributesWarning, match=r"\['a', 'a_copy'\] are confounded"):
        d = Est().fit(X, table)
    if Est is MSEDictionary:
        np.testing.assert_allclose(d.reconstruct(X, table), X, atol=1e-9)
        # Minimum norm splits the shared effect equally.
        np.testing.assert_allclose(d.features_.sel(attribute="a").values,
                                   d.features_.sel(attribute="a_copy").values, atol=1e-9)


def test_the_command_line_says_each_warning_once_in_its_own_words():
    """Fitted at every site of a run, a rare value and confounded attributes warn each
    time; ``sage`` (sage_nn.notes.cli_warnings) says each once, with what to do from the
    command line, while a Python caller still gets the warnings themselves."""
    import io

    from sage_nn.common.notes import cli_warnings

    X, table, _, _, _ = synth(noise=0.1)
    table = table.copy()
    table.loc[7, "c"] = "c_rare"
    table = table.assign(a_copy=table["a"].str.replace("a", "x"))
    stream = io.StringIO()
    with cli_warnings("sage run", stream=stream):
        for _ in range(14):  # one fit per site
            MSEDictionary().fit(X, table)
    lines = stream.getvalue().splitlines()
    assert lines == [
        f"sage run: warning: 1 attribute value(s) occur fewer than 2 times among the "
        f"{len(X)} prompts the ground truth is fitted on (c=c_rare (1x)), so their supervised "
        "features are noisy; fix: more fit prompts (raise --n-fit)",
        f"sage run: warning: attributes a, a_copy change together among the {len(X)} prompts "
        "the ground truth is fitted on, so their supervised features cannot be told apart "
        "(the effect they share is split between them); fix: more fit prompts (raise "
        "--n-fit); if they stay tied, the task ties them and their results should be read "
        "together"]
    with pytest.warns(RareValueWarning, match="min_count=2"):  # Python callers: as before
        MSEDictionary().fit(X, table)


def test_independent_attributes_do_not_warn():
    X, table, _, _, _ = synth(factorial=False, n=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MSEDictionary().fit(X, table)


# -- bad input: clear errors -----------------------------------------------------------

@pytest.mark.parametrize("Est", ESTIMATORS)
def test_nan_activations_are_a_clear_error(Est):
    X, table, _, _, _ = synth()
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 sample\(s\) \(rows \[3\]\).*drop"):
        Est().fit(X, table)
    d = Est().fit(np.nan_to_num(X), table)
    with pytest.raises(ValueError, match="NaN or inf"):
        d.transform(X, table)
    with pytest.raises(ValueError, match="NaN or inf"):
        Est().fit(as_dataarray(X, table))


def test_bad_input_messages():
    X, table, _, _, _ = synth()
    d = MSEDictionary().fit(X, table)
    with pytest.raises(ValueError, match=r"needs the attribute labels.*transform\(X, y\)"):
        d.transform(X)
    with pytest.raises(ValueError, match=r"requires y to be passed.*attribute labels"):
        MSEDictionary().fit(X)
    with pytest.raises(ValueError, match=r"value\(s\) \['b9'\] not seen in fit; known values"):
        d.transform(X, table.assign(b="b9"))
    with pytest.raises(ValueError, match=r"value\(s\) \['c7'\] not seen"):
        d.edit(X, table, "c", "c7")
    with pytest.raises(ValueError, match=r"cannot edit 'z'"):
        d.edit(X, table, "z", "c1")
    with pytest.raises(ValueError, match=r"labels \['c'\] are missing"):
        d.transform(X, table[["a", "b"]])
    with pytest.raises(ValueError, match=r"labels are missing \(NaN/None\) for \['b'\]"):
        MSEDictionary().fit(X, table.assign(b=[None] + list(table.b[1:])))
    with pytest.raises(ValueError, match=r"attributes \['nope'\] not found"):
        MSEDictionary(attributes=["nope"]).fit(X, table)
    with pytest.raises(ValueError, match=r"59 rows of attribute labels for 120 samples"):
        MSEDictionary().fit(X, table[:59])
    with pytest.raises(ValueError, match=r"weights='ones'"):
        MSEDictionary(weights="ones").fit(X, table)
    with pytest.raises(ValueError, match=r"KNeighborsRegressor has no coef_"):
        MSEDictionary(solver=KNeighborsRegressor()).fit(X, table)
    with pytest.raises(ValueError, match=r"codes must have shape \(n_samples, 9\)"):
        d.inverse_transform(X)
    cube = xr.DataArray(np.zeros((4, 2, 3)), dims=("prompt", "layer", "d_model"))
    with pytest.raises(ValueError, match=r"must be 2-D.*\.sel\(layer=9"):
        d.fit(cube)
    with pytest.raises(ValueError, match=r"no attribute labels found"):
        MSEDictionary().fit(as_dataarray(X, table)[:, :].drop_vars(["a", "b", "c"]))


# -- scikit-learn compatibility --------------------------------------------------------

# Checks that call transform(X) without labels: the codes are defined by the attribute
# labels, which the generic checks cannot pass. Their properties are tested below with labels.
NEED_LABELS = "transform needs the attribute labels, which sklearn's generic checks do not pass"
SKIPPED = {name: NEED_LABELS for name in [
    "check_estimators_dtypes", "check_dtype_object", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_transformer_data_not_an_array",
    "check_transformer_general", "check_transformer_preserve_dtypes",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance",
    "check_dict_unchanged", "check_fit_idempotent"]}


@parametrize_with_checks(
    [MeanDictionary(), MeanDictionary(weights="fitted"), MSEDictionary(),
     MSEDictionary(weights="fitted", solver=Ridge(alpha=1e-3))],
    expected_failed_checks=lambda est: SKIPPED)
def test_sklearn_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RareValueWarning)  # checks fit on continuous y
        warnings.simplefilter("ignore", ConfoundedAttributesWarning)
        check(estimator)


@pytest.mark.parametrize("Est", ESTIMATORS)
def test_skipped_checks_hold_with_labels(Est):
    X, table, _, _, _ = synth(noise=0.1)
    d = Est(weights="fitted").fit(X, table)
    codes = d.transform(X, table)
    # pickle round trip, idempotent fit, sample order and subset invariance
    np.testing.assert_allclose(pickle.loads(pickle.dumps(d)).transform(X, table), codes)
    np.testing.assert_allclose(clone(d).fit(X, table).fit(X, table).transform(X, table), codes)
    perm = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_allclose(d.transform(X[perm], table.iloc[perm]), codes[perm], atol=1e-12)
    np.testing.assert_allclose(d.transform(X[:7], table[:7]), codes[:7], atol=1e-12)
    assert codes.dtype == np.float64


def test_clone_get_params_and_swappable_solver():
    d = MSEDictionary(weights="fitted", solver=Ridge(alpha=1.0))
    params = d.get_params()
    assert params["weights"] == "fitted" and params["solver__alpha"] == 1.0
    c = clone(d).set_params(solver__alpha=100.0)
    assert c.solver.alpha == 100.0 and d.solver.alpha == 1.0
    X, table, _, _, _ = synth()
    ls = MSEDictionary().fit(X, table)
    ridge = c.fit(X, table)
    assert not ridge.solver_.fit_intercept  # the dictionary centres the data itself
    assert np.linalg.norm(ridge.components_) < 0.9 * np.linalg.norm(ls.components_)
    assert not hasattr(d, "components_")  # clone did not fit the original


# -- plain torch helpers ---------------------------------------------------------------

@pytest.mark.parametrize("Est", ESTIMATORS)
def test_torch_helpers_match_the_estimator(Est):
    X, table, _, _, _ = synth(noise=0.2)
    d = Est(weights="fitted").fit(X, table)
    mean, feats = d.to_torch(dtype=torch.float64)
    active = torch.from_numpy(d.active_features(table))
    a = torch.from_numpy(X)
    w = fit_weights_torch(a, mean, feats, active)
    np.testing.assert_allclose(w.numpy(), np.take_along_axis(d.transform(X, table),
                                                             active.numpy(), 1), atol=1e-10)
    np.testing.assert_allclose(reconstruct_torch(mean, feats, active, w).numpy(),
                               d.reconstruct(X, table), atol=1e-10)
    unit = Est().fit(X, table)
    m, f = unit.to_torch(dtype=torch.float64)
    np.testing.assert_allclose(reconstruct_torch(m, f, active).numpy(),
                               unit.reconstruct(X, table), atol=1e-10)
    new = torch.from_numpy(d.active_features(table.assign(b="b2")))[:, 1]
    np.testing.assert_allclose(edit_torch(a, feats, active[:, 1], new, w[:, 1]).numpy(),
                               d.edit(X, table, "b", "b2"), atol=1e-10)
    assert d.to_torch()[1].dtype == torch.float32


def test_reconstruction_inside_a_trace(tiny_models):
    """The torch helpers run on the live activation inside an nnsight trace."""
    from sage_nn.model.activations import collect, encode
    from sage_nn.model.sites import adapter

    model = tiny_models["llama"]
    names = ["Mary", "John", "Alice", "Bob"]
    prompts, rows = [], []
    for io, s in itertools.permutations(names, 2):
        for place in ["store", "park"]:
            prompts.append(f"when {io} and {s} went to the {place} , {s} gave a drink to")
            rows.append({"io": io, "place": place})
    table = pd.DataFrame(rows)
    ds = collect(model, prompts, ["L1.resid_mid"], positions=[-1], coords=table, progress=False)
    da = ds.resid_mid.sel(layer=1, position="-1")
    d = MSEDictionary(weights="fitted").fit(da)
    mean, feats = d.to_torch()
    active = torch.from_numpy(d.active_features(table))
    ad = adapter(model)
    batch = encode(model, prompts)
    last = batch.index([-1] * len(prompts))
    rows_ = torch.arange(len(prompts))
    with torch.no_grad(), model.trace(batch.inputs):
        t = ad.tensor(model, 1, "resid_mid")
        a = t[rows_, last]
        rec = reconstruct_torch(mean, feats, active, fit_weights_torch(a, mean, feats, active))
        t[rows_, last] = rec
        patched = ad.tensor(model, 1, "resid_mid")[rows_, last].save()
    np.testing.assert_allclose(patched.numpy(), d.reconstruct(da).values, atol=1e-4)
    assert not np.allclose(patched.numpy(), da.values, atol=1e-3)  # it did replace something


# -- real model ------------------------------------------------------------------------

IOI_NAMES = [" Mary", " John", " Alice", " Bob", " Tom", " Anna", " James", " Sarah"]
PLACES = [" store", " park"]


def ioi(model):
    """IOI prompts with attributes io, s, place (single-token names for the model)."""
    tok = model.tokenizer
    names = [n for n in IOI_NAMES if len(tok(n)["input_ids"]) == 1]
    prompts, rows = [], []
    for io, s in itertools.permutations(names, 2):
        for place in PLACES:
            prompts.append(f"When{io} and{s} went to the{place},{s} gave a drink to")
            rows.append({"io": io.strip(), "s": s.strip(), "place": place.strip()})
    return prompts, pd.DataFrame(rows)


@pytest.mark.slow
def test_real_smollm2_ioi_dictionaries(smollm2):
    """At the last token of layer 25 the io name is linearly present: on held-out prompts,
    (1) an io-only dictionary explains far more variance with the true labels than with
    shuffled ones, (2) editing io moves the activation most of the way to the real
    counterfactual activation (same s and place, the new io)."""
    from sage_nn.model.activations import collect

    prompts, table = ioi(smollm2)
    assert len(prompts) == 112
    ds = collect(smollm2, prompts, ["L25.resid_post"], positions=[-1], coords=table,
                 progress=False, batch_size=56)
    da = ds.resid_post.sel(layer=25, position="-1")
    test = np.random.default_rng(0).permutation(len(da)) < len(da) // 4
    shuffled = table.assign(io=np.random.default_rng(1).permutation(table["io"].to_numpy()))
    # Counterfactual of each held-out prompt: another io (not its s), same s and place.
    key = {tuple(r): i for i, r in enumerate(table.itertuples(index=False))}
    held = table[test].reset_index(drop=True)
    rng = np.random.default_rng(2)
    names = sorted(table["io"].unique())
    new = [rng.choice([n for n in names if n not in (r.io, r.s)]) for r in held.itertuples()]
    cf = da.values[[key[(n, r.s, r.place)] for n, r in zip(new, held.itertuples())]]
    X = da.values[test]
    results = {}
    for Est in ESTIMATORS:
        for w in ["unit", "fitted"]:
            io_only = Est(weights=w, attributes=["io"]).fit(da[~test])
            ctrl = Est(weights=w, attributes=["io"]).fit(da.values[~test], shuffled[~test])
            edited = Est(weights=w).fit(da[~test]).edit(X, held, "io", new)
            results[Est.__name__, w] = (
                io_only.score(da[test]), ctrl.score(X, shuffled[test]),
                np.median(np.linalg.norm(edited - cf, axis=1) / np.linalg.norm(X - cf, axis=1)))
    print("\n(estimator, weights): held-out R2 io, R2 shuffled io, median edit error")
    for k, v in results.items():
        print(k, np.round(v, 3))
    for r2, r2_shuffled, edit_error in results.values():
        assert r2 > r2_shuffled + 0.2
        assert edit_error < 0.6
