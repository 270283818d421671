"""Discovery: attribution patching, selection, validation, plots.

The known-answer test builds a tiny llama whose only path from the earlier tokens to the
output is one attention head (L1 head 2), so discovery must find exactly that head.
"""

from __future__ import annotations

import json
import warnings

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from sage_nn import tiny_random_model
from sage_nn.model.activations import encode
from conftest import tiny_task_dataset
from sage_nn.discovery.attribution import RESIDUAL_KINDS, AttributionPatching, load_scores
from sage_nn.discovery.stage import DiscoveryConfig, discover
from sage_nn.discovery.selection import exact_patching, head_grid, ranked, select_cross_section, validate
from sage_nn.discovery.growth import grow_cross_sections
from sage_nn.discovery.plots import plot_cross_section, plot_heatmaps
from sage_nn.model.remote import Remote
from sage_nn.model.patching import logit_diff
from sage_nn.model.sites import Site
from test_interventions import ARCHITECTURES, tiny_ioi

CARRIER = 2  # the one head (layer 1) that carries every earlier token to the output


def one_head_model():
    """Tiny llama (4 heads, 2 KV heads): MLPs and layer 0's attention write nothing, and in
    layer 1 only head 2 writes (its KV head is 1). Every effect of a name reaches END
    through L1 head 2's z at END, which reads the name through KV head 1."""
    model = tiny_random_model("llama", seed=0, n_layers=2)
    hf = model._module
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
        w = hf.model.layers[1].self_attn.o_proj.weight  # [d_model, heads * d_head]
        keep = w[:, CARRIER * 8:(CARRIER + 1) * 8].clone()
        w.zero_()
        w[:, CARRIER * 8:(CARRIER + 1) * 8] = keep
    return model


@pytest.fixture(scope="module")
def carrier():
    model = one_head_model()
    ds = tiny_ioi(model, n=12)
    fit = AttributionPatching(min_effect=0).fit(model, ds)
    return model, ds, fit


def test_finds_the_one_head_that_carries_the_attribute(carrier):
    model, ds, fit = carrier
    for attribute in ("io", "s"):
        s = fit.scores_.score.sel(attribute=attribute)
        z_end = head_grid(s, "z").sel(position="END")
        assert list(z_end["head"].values) == [0, 1, 2, 3]
        assert float(s.sel(site=f"L1.z.h{CARRIER}", position="END")) == float(
            z_end.sel(layer=1, head=CARRIER))
        # the carrier's z at END carries the whole effect (up to the linear approximation)
        assert 0.9 < float(z_end.sel(layer=1, head=CARRIER)) < 1.15
        # heads whose output projection is zero get exactly nothing
        others = z_end.transpose("layer", "head").values.copy()
        others[1, CARRIER] = 0
        assert np.abs(others).max() < 1e-6
        # the name is read through KV head 1 (shared by heads 2 and 3), never KV head 0
        v = head_grid(s, "v").sel(layer=1)
        assert list(v["head"].values) == [0, 1]  # KV heads
        assert float(np.abs(v.sel(head=0)).max()) < 1e-6
        assert float(np.abs(v.sel(head=1)).max()) > 0.3
        top = select_cross_section(fit.scores_, attribute, top_k=1, kinds=["z"])
        assert top[["site", "position"]].values.tolist() == [[f"L1.z.h{CARRIER}", "END"]]
    # io is read at the IO token only: v at S1/S2 contributes nothing for io
    v_io = fit.scores_.score.sel(attribute="io", site="L1.v.h1")
    assert float(v_io.sel(position="IO")) > 0.8 and abs(float(v_io.sel(position="S1"))) < 1e-3


def test_exact_patching_of_the_carrier_recovers_everything(carrier):
    model, ds, fit = carrier
    sel = select_cross_section(fit.scores_, "io", top_k=12)
    table, summary = validate(model, ds, fit.scores_, "io", sel)
    row = table[(table.site == f"L1.z.h{CARRIER}") & (table.position == "END")].iloc[0]
    assert row.exact_score == pytest.approx(1.0, abs=1e-4)
    assert abs(row.score - row.exact_score) < 0.1
    assert summary["recovered"] == pytest.approx(1.0, abs=1e-4)
    # the clean and counterfactual logit differences agree with attribution's own forwards
    assert summary["total_effect"] == pytest.approx(float(fit.scores_.total_effect.sel(
        attribute="io")), rel=1e-3, abs=1e-7)
    assert summary["spearman"] > 0.6


def test_deltas_match_a_hand_computed_gradient():
    """delta at the last block's output at END = (h' - h) . dm/dh, by plain torch hooks."""
    model = tiny_random_model("llama", seed=5, n_layers=2)
    ds = tiny_ioi(model, n=6)
    fit = AttributionPatching(kinds=["resid_post"], positions=["END"], min_effect=0).fit(model, ds)
    hf, block = model._module, model._module.model.layers[-1]
    cache = {}
    handle = block.register_forward_hook(lambda m, i, o: cache.__setitem__("h", o))
    try:
        for attribute in ds.attribute_names:
            cf = ds.counterfactuals[attribute]
            b, b_cf = encode(model, ds.prompts), encode(model, cf.prompts)
            with torch.no_grad():
                ld_cf = logit_diff(hf(**b_cf.inputs).logits, ds.answer_ids, ds.distractor_ids)
                h_cf = cache["h"][:, -1]
            ld = logit_diff(hf(**b.inputs).logits, ds.answer_ids, ds.distractor_ids)
            (grad,) = torch.autograd.grad(ld.sum(), cache["h"])
            expected = ((h_cf - cache["h"][:, -1].detach()) * grad[:, -1]).sum(-1).mean()
            got = fit.scores_.delta.sel(attribute=attribute, site="L1.resid_post",
                                        position="END")
            assert float(got) == pytest.approx(float(expected), rel=1e-4, abs=1e-8)
            total = float((ld_cf - ld.detach()).mean())
            assert float(fit.scores_.total_effect.sel(attribute=attribute)) == pytest.approx(
                total, rel=1e-4, abs=1e-8)
            assert float(fit.scores_.score.sel(attribute=attribute, site="L1.resid_post",
                                               position="END")) == pytest.approx(
                float(expected) / total, rel=1e-3)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_grid_identities_on_every_architecture(arch):
    model = tiny_random_model(arch, seed=2)
    ds = tiny_ioi(model, n=5)
    fit = AttributionPatching(min_effect=0, batch_size=3).fit(model, ds)
    scores = fit.scores_
    d = scores.delta
    # the block output is the next block's input: the same tensor, the same scores; alone
    # in a grid, resid_post is scored at every layer
    post = AttributionPatching(min_effect=0, kinds=["resid_post"]).fit(model, ds).scores_.delta
    assert list(post.site.values) == ["L0.resid_post", "L1.resid_post"]
    np.testing.assert_allclose(post.sel(site="L0.resid_post").values,
                               d.sel(site="L1.resid_pre").values, rtol=1e-5, atol=1e-7)
    if arch != "gemma2":  # attn_out is linear in z (Gemma 2 adds a post-norm)
        for layer in (0, 1):
            np.testing.assert_allclose(head_grid(d, "z").sel(layer=layer).sum("head").values,
                                       d.sel(site=f"L{layer}.attn_out").values, rtol=1e-3,
                                       atol=1e-7)
    kinds = list(scores.kind.values)
    assert ("resid_mid" in kinds) == (arch != "gpt_neox")
    n_kv = 2 if arch in ("llama", "qwen2", "gemma2") else 4
    assert kinds.count("k") == 2 * n_kv and kinds.count("z") == 2 * 4
    assert [str(Site.parse(s)) for s in scores.site.values] == list(scores.site.values)
    # one name per residual tensor: only the last block's output keeps its resid_post name
    mid = ["resid_mid"] if arch != "gpt_neox" else []  # parallel blocks have no resid_mid
    assert [s for s in scores.site.values if "resid" in s] == [
        f"L{layer}.{kind}" for layer in (0, 1) for kind in ["resid_pre", *mid]] + ["L1.resid_post"]
    per_head = np.isin(kinds, ["q", "k", "v", "z"])
    assert np.isnan(scores["head"].values).tolist() == (~per_head).tolist()  # no sentinel
    assert np.isfinite(scores.score.values).all()
    table = ranked(scores, "io")
    assert len(table) == scores.sizes["site"] * 4  # x positions
    assert "L0.resid_post" not in set(table.site) and "L1.resid_pre" in set(table.site)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_residual_stream_at_changed_tokens_is_patched_exactly(arch):
    """At the tokens a counterfactual replaces or moves, residual sites get the exact effect of
    patching them (the sweep skips the blocks below the patch; exact_patching runs them
    all, and patches resid_mid itself rather than the stream it resolves to); everything
    else keeps its attribution estimate."""
    model = tiny_random_model(arch, seed=3, n_layers=3)
    ds = tiny_ioi(model, n=7)
    fit = AttributionPatching(min_effect=0, batch_size=3).fit(model, ds)
    plain = AttributionPatching(min_effect=0, batch_size=3, exact_residuals=False).fit(model, ds)
    r = fit.scores_
    # IOI's io resamples the IO name, s the subject (both mentions), order swaps the first
    # two names (IO and S1 keep their tokens at other places)
    changed = r.changed_token.to_pandas()
    assert changed.loc["io"].tolist() == [True, False, False, False]  # IO, S1, S2, END
    assert changed.loc["s"].tolist() == [False, True, True, False]
    assert changed.loc["order"].tolist() == [True, True, False, False]
    residual = r.kind.isin(["resid_pre", "resid_mid", "resid_post"])
    assert (r.exact == (residual & r.changed_token)).all()
    np.testing.assert_allclose(r.delta.where(~r.exact).values,
                               plain.scores_.delta.where(~r.exact).values, rtol=1e-5, atol=1e-9)
    differs = 0
    for attribute in ("io", "s", "order"):
        table = ranked(r, attribute)
        table = table[table.exact]
        assert len(table) == int(residual.sum()) * int(changed.loc[attribute].sum())
        exact, _ = exact_patching(model, ds, attribute, list(zip(table.site, table.position)),
                                  joint=False)
        np.testing.assert_allclose(table.delta, exact.exact_delta, rtol=1e-4, atol=1e-6)
        estimate = plain.scores_.delta.sel(attribute=attribute).where(
            r.exact.sel(attribute=attribute))
        differs += int((np.abs(estimate - r.delta.sel(attribute=attribute)) > 1e-4).sum())
    assert differs > 0  # the sweep replaced estimates, not copied them
    # selection leaves the changed tokens' own stream out unless asked
    io = select_cross_section(r, "io", top_k=1000)
    assert not io.site.str.contains("resid").where(io.position == "IO", False).any()
    assert len(select_cross_section(r, "io", top_k=1000, changed_tokens=True)) == \
        len(io) + int(r.exact.sel(attribute="io").sum())


def test_a_cross_section_never_names_one_tensor_twice(carrier, tmp_path):
    _, _, fit = carrier
    last = int(fit.scores_.layer[-1])
    for attribute in ("io", "s"):
        sel = ranked(fit.scores_, attribute)  # every site, the candidates of any selection
        assert len(sel) == fit.scores_.sizes["site"] * fit.scores_.sizes["position"]
        post = {(Site.parse(s).layer, p) for s, p in zip(sel.site, sel.position)
                if s.endswith("resid_post")}
        pre = {(Site.parse(s).layer - 1, p) for s, p in zip(sel.site, sel.position)
               if s.endswith("resid_pre")}
        assert post and {layer for layer, _ in post} == {last} and not post & pre



def as_format_1(scores: xr.Dataset) -> xr.Dataset:
    """``scores`` as format 1 wrote them: a (layer, kind, head) grid, ``head = -1`` off
    heads, 0 at cells that are no site, an ``is_site`` mask."""
    sites = [Site.parse(s) for s in scores.site.values]
    layers = sorted({s.layer for s in sites})
    kinds = list(dict.fromkeys(s.kind for s in sites))
    heads = list(range(-1, 1 + max(s.head or 0 for s in sites)))
    cell = {s: (layers.index(s.layer), kinds.index(s.kind), heads.index(
        -1 if s.head is None else s.head)) for s in sites}
    is_site = np.zeros((len(layers), len(kinds), len(heads)), bool)
    grid = {v: np.zeros((scores.sizes["attribute"], *is_site.shape, scores.sizes["position"]))
            for v in ("score", "delta", "exact")}
    for i, s in enumerate(sites):
        is_site[cell[s]] = True
        for v in grid:
            grid[v][(slice(None), *cell[s])] = scores[v].isel(site=i).values
    dims = ("attribute", "layer", "kind", "head", "position")
    return scores.drop_vars(["score", "delta", "exact", "site", "layer", "kind", "head"]).assign(
        {v: (dims, x) for v, x in grid.items()}).assign_coords(
        layer=layers, kind=kinds, head=heads, is_site=(("layer", "kind", "head"), is_site),
        changed_token=scores.changed_token.astype("int8")).assign_attrs(
        format="sage_nn.discovery/1")


def test_scores_written_as_a_grid_load_as_sites(carrier, tmp_path):
    """Format 1 (a (layer, kind, head) grid with head -1 off heads) loads as the site
    layout, also as written before the aliases were dropped and changed tokens marked."""
    _, _, fit = carrier
    old = as_format_1(fit.scores_)
    old.assign(exact=old.exact.astype("int8"), small_effect=old.small_effect.astype("int8")) \
        .to_netcdf(tmp_path / "v1.nc", engine="h5netcdf")
    xr.testing.assert_identical(load_scores(tmp_path / "v1.nc"), fit.scores_)
    # is_site over (kind, head) only, no exact cells, no changed tokens
    older = old.assign_coords(is_site=old.is_site.any("layer")).drop_vars(
        ["exact", "changed_token"]).assign(small_effect=old.small_effect.astype("int8"))
    older.to_netcdf(tmp_path / "v0.nc", engine="h5netcdf")
    back = load_scores(tmp_path / "v0.nc")
    assert list(back.site.values) == list(fit.scores_.site.values)
    np.testing.assert_array_equal(back.score.values, fit.scores_.score.values)
    assert not back.exact.any() and not back.changed_token.any()
    assert len(select_cross_section(back, "io", top_k=3)) == 3


def test_integrated_gradients_are_complete_at_the_embeddings():
    """With ig_steps, the embedding sites' deltas sum to the total effect (completeness of
    integrated gradients; here the prompts differ from their counterfactuals only at named
    positions), which plain attribution patching misses on a random model."""
    model = tiny_random_model("llama", seed=5, n_layers=2)
    ds = tiny_ioi(model, n=6)
    grid = dict(kinds=["resid_pre"], layers=[0], attributes=["io", "s"], min_effect=0,
                exact_residuals=False)  # estimates at the changed tokens, not exact patches
    plain = AttributionPatching(**grid).fit(model, ds).scores_.score.sum("position")
    ig = AttributionPatching(**grid, ig_steps=16).fit(model, ds)
    assert ig.scores_.attrs["ig_steps"] == 16
    for attribute in ("io", "s"):
        assert float(ig.scores_.score.sel(attribute=attribute).sum()) == pytest.approx(
            1, abs=0.01)
        assert abs(float(plain.sel(attribute=attribute).sum()) - 1) > 0.1
    # the interpolation is token by token: a counterfactual of another length is refused
    ds.counterfactuals["io"].prompts[2] = "Well, " + ds.counterfactuals["io"].prompts[2]
    with pytest.raises(ValueError, match="attribute 'io', prompt 2 has .* Use ig_steps=0"):
        AttributionPatching(**grid, ig_steps=2).fit(model, ds)


def test_batching_does_not_change_scores(carrier):
    model, ds, fit = carrier
    other = AttributionPatching(min_effect=0, batch_size=5).fit(model, ds)
    np.testing.assert_allclose(other.scores_.delta.values, fit.scores_.delta.values, rtol=1e-4,
                               atol=1e-8)  # float32 noise


def test_small_effects_are_flagged_with_a_warning(carrier):
    model, ds, _ = carrier
    with pytest.warns(UserWarning, match="attribute 'order': total counterfactual effect"):
        fit = AttributionPatching(min_effect=1e-4, kinds=["z"]).fit(model, ds)
    assert fit.effects_.small_effect.to_dict() == {"io": False, "s": False, "order": True}
    assert set(fit.effects_.columns) >= {"clean_logit_diff", "total_effect"}


def test_selection_top_k_and_coverage(carrier):
    _, _, fit = carrier
    df = ranked(fit.scores_, "io")
    assert (np.diff(np.abs(df.delta.to_numpy())) <= 1e-12).all()
    assert df.cum_share.iloc[-1] == pytest.approx(1.0)
    for share in (0.3, 0.5, 0.9):
        sel = select_cross_section(fit.scores_, "io", coverage=share)
        assert sel.cum_share.iloc[-1] >= share - 1e-9
        assert len(sel) == 1 or sel.cum_share.iloc[-2] < share
    assert len(select_cross_section(fit.scores_, "io", top_k=7)) == 7
    with pytest.raises(ValueError, match="exactly one of top_k"):
        select_cross_section(fit.scores_, "io", top_k=3, coverage=0.5)
    with pytest.raises(ValueError, match="coverage must be in \\(0, 1\\]"):
        select_cross_section(fit.scores_, "io", coverage=1.5)
    with pytest.raises(ValueError, match="attribute 'xx' was not scored"):
        ranked(fit.scores_, "xx")


def test_bad_grid_gets_clear_errors(carrier):
    model, ds, _ = carrier
    neox = tiny_random_model("gpt_neox")
    with pytest.raises(ValueError, match="kind 'resid_mid' is not available for this model"):
        AttributionPatching(kinds=["resid_mid"]).fit(neox, tiny_ioi(neox, n=2))
    with pytest.raises(ValueError, match="layers \\[5\\] out of range"):
        AttributionPatching(layers=[5]).fit(model, ds)
    with pytest.raises(ValueError, match="unknown named positions \\['XX'\\]"):
        AttributionPatching(positions=["XX"]).fit(model, ds)
    with pytest.raises(ValueError, match="attributes \\['color'\\] have no counterfactuals"):
        AttributionPatching(attributes=["color"]).fit(model, ds)


def test_discover_saves_scores_tables_and_plots(carrier, tmp_path):
    model, ds, _ = carrier
    found = discover(model, ds.subset(range(6)), DiscoveryConfig(min_effect=0, top_k=5),
                     out_dir=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"scores.nc", "cross_sections.csv", "summary.json", "cross_section_io.png",
            "heatmap_io_z.png", "heatmap_s_residual.png"} <= names
    for name in names:
        if name.endswith(".png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # the plots are Figures for a notebook; saving them is optional
    figures = plot_heatmaps(found.scores, "io")
    assert set(figures) >= {"z", "residual"} and figures["z"].axes
    assert plot_cross_section(found.cross_sections["io"]).axes
    back = load_scores(tmp_path / "scores.nc")
    xr.testing.assert_identical(back, found.scores)
    assert back.exact.dtype == bool and back.exact.any() and back.attrs["task"] == "tiny_ioi"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["io"]["cross_section"]) == 5 and "spearman" in summary["io"]
    with pytest.raises(ValueError, match="not a sage_nn discovery scores file"):
        xr.Dataset({"a": ("x", [1.0])}).to_netcdf(tmp_path / "x.nc", engine="h5netcdf")
        load_scores(tmp_path / "x.nc")



# -- cross-sections grown by their joint exact patch -------------------------------------

@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    model, ds = tiny_task_dataset(tmp_path_factory.mktemp("task"), n=10)
    fit = AttributionPatching(min_effect=0, batch_size=4).fit(model, ds)
    return model, ds, fit.scores_


def _joint_share(model, ds, attribute, table):
    _, exact = exact_patching(model, ds, attribute, list(zip(table.site, table.position)),
                              batch_size=4)
    return exact["joint_delta"] / exact["total_effect"], exact


def test_grown_recovery_is_the_joint_exact_patch_of_the_set(tiny_task):
    """What a grown cross-section reports is measured: an independent joint exact patch of
    the final set (every block run, no skipping) gives the same share, and the single-site
    values are exact patching's too."""
    model, ds, result = tiny_task
    found = grow_cross_sections(model, ds, result, target=0.6, max_sites=4, batch_size=4,
                                max_rows=24)  # several forwards per batch of prompts
    assert set(found) == {"io", "s"}
    for attribute, (table, summary) in found.items():
        assert 1 <= summary["n_sites"] == len(table) <= 4
        assert set(table.kind) == {"z"}  # default: per-head z only
        share, exact = _joint_share(model, ds, attribute, table)
        assert summary["recovered"] == pytest.approx(share, rel=1e-4, abs=1e-5)
        assert summary["total_effect"] == pytest.approx(exact["total_effect"], rel=1e-4)
        assert summary["total_effect"] == pytest.approx(
            float(result.total_effect.sel(attribute=attribute)), rel=1e-3)
        singles, _ = exact_patching(model, ds, attribute, list(zip(table.site, table.position)),
                                    joint=False, batch_size=4)
        np.testing.assert_allclose(table.exact_delta, singles.exact_delta, rtol=1e-4, atol=1e-6)
        assert summary["reached"] == (summary["recovered"] >= 0.6)
        assert summary["cap_hit"] == (not summary["reached"])  # 32 candidates > 4
        assert len(summary["prefix_recovered"]) == 4  # the pool: max_sites candidates
        # the prefixes run 2 measured: the shortest one reaching the target, or the best one,
        # can only be improved on (pruning), never made worse
        curve = np.array(summary["prefix_recovered"])
        if summary["reached"]:
            assert summary["n_sites"] <= int(np.argmax(curve >= 0.6)) + 1
        else:
            assert summary["recovered"] >= curve.max() - 1e-9
    same = {(a, b) for a in found for b in found if a != b and
            set(zip(found[a][0].site, found[a][0].position)) ==
            set(zip(found[b][0].site, found[b][0].position))}
    assert {(a, b) for a, (_, s) in found.items() for b in s["same_as"]} == same


def test_cap_hit_when_the_target_is_out_of_reach(tiny_task):
    model, ds, result = tiny_task
    found = grow_cross_sections(model, ds, result, ["io"], target=50.0, max_sites=1,
                                batch_size=4)
    table, summary = found["io"]
    assert len(table) == summary["n_sites"] == 1
    assert summary["recovered"] < 50 and not summary["reached"] and summary["cap_hit"]
    assert summary["note"].startswith("cap hit: max_sites=1 reached before the target 50")
    assert summary["recovered"] == pytest.approx(_joint_share(model, ds, "io", table)[0],
                                                 rel=1e-4, abs=1e-5)
    # every candidate allowed: missing the target is not the cap's fault
    few = grow_cross_sections(model, ds, result, ["io"], target=50.0, max_sites=200,
                              candidates=3, kinds=["mlp_out"], positions=["END"],
                              batch_size=4)["io"][1]
    assert not few["reached"] and not few["cap_hit"] and "not reached" in few["note"]
    with pytest.raises(ValueError, match="max_sites must be >= 1"):
        grow_cross_sections(model, ds, result, max_sites=0)
    with pytest.raises(ValueError, match="target must be a positive share"):
        grow_cross_sections(model, ds, result, target=0)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        grow_cross_sections(model, ds, result, candidates=0)
    with pytest.raises(ValueError, match=r"kinds \['nope'\] are not in the attribution grid"):
        grow_cross_sections(model, ds, result, kinds=["nope"])
    with pytest.raises(ValueError, match="set DiscoveryConfig.select_kinds"):
        DiscoveryConfig(select_kinds=["q"]).selectable_kinds(["z", "resid_pre"])


def test_residual_stream_is_a_candidate_only_when_asked(tiny_task):
    model, ds, result = tiny_task
    components = [k for k in result.kind.values if k not in RESIDUAL_KINDS]
    found = grow_cross_sections(model, ds, result, kinds=None, target=50.0, max_sites=6,
                                candidates=12, batch_size=4)
    for table, _ in found.values():
        assert set(table.kind) <= set(components)
    # asked for: residual sites, never at the tokens the counterfactual replaces, exactly
    # patched through the skipped blocks
    found = grow_cross_sections(model, ds, result, kinds=["resid_pre"], target=50.0,
                                max_sites=3, candidates=6, batch_size=4)
    for attribute, (table, summary) in found.items():
        assert set(table.kind) == {"resid_pre"}
        changed = result.changed_token.sel(attribute=attribute)
        assert not any(bool(changed.sel(position=p)) for p in table.position)
        assert summary["recovered"] == pytest.approx(
            _joint_share(model, ds, attribute, table)[0], rel=1e-4, abs=1e-5)
    # discover's selectable kinds: z by default, a residual kind only when named
    assert DiscoveryConfig().selectable_kinds(["z", "resid_pre", "mlp_out"]) == ["z"]
    assert DiscoveryConfig(kinds=["resid_post"]).selectable_kinds(["resid_post"]) == \
        ["resid_post"]
    assert DiscoveryConfig(select_kinds=["resid_pre", "z"]).selectable_kinds(
        ["z", "resid_pre"]) == ["resid_pre", "z"]
    with pytest.raises(ValueError, match="select_kinds \\['z'\\] are not in the attribution"):
        DiscoveryConfig(select_kinds=["z"]).selectable_kinds(["resid_pre"])


def test_same_sets_and_small_effects_are_named(carrier):
    """In the one-head model every attribute reaches END through L1 head 2: each ends with
    that one head, and says so; order (a tiny effect) still gets its set, flagged."""
    model, ds, _ = carrier
    with pytest.warns(UserWarning, match="attribute 'order'"):
        scores = AttributionPatching(min_effect=1e-4, kinds=["z"]).fit(model, ds).scores_
    found = grow_cross_sections(model, ds, scores, positions=["END"], max_sites=3)
    for attribute in ("io", "s"):
        table, summary = found[attribute]
        assert table[["site", "position"]].values.tolist() == [[f"L1.z.h{CARRIER}", "END"]]
        assert summary["recovered"] == pytest.approx(1.0, abs=1e-4)
        assert not summary["small_effect"]
    assert found["order"][1]["small_effect"]
    assert found["order"][0].site.tolist() == [f"L1.z.h{CARRIER}"]
    assert {a: s["same_as"] for a, (_, s) in found.items()} == {
        "io": ["s", "order"], "s": ["io", "order"], "order": ["io", "s"]}


def test_the_search_is_one_request_whatever_the_attributes(tiny_task):
    """Through nnsight's offline NDIF simulation, the whole adaptive search is one request
    for one attribute or all, with the local numbers; with requests capped at fewer
    prompts than the dataset has, each of its runs is its own requests, same numbers."""
    model, ds, result = tiny_task
    here = grow_cross_sections(model, ds, result, max_sites=3, batch_size=5)
    requests = {}
    for attributes, cap in ((["io"], None), (["io", "s"], None), (["io", "s"], 5)):
        remote = Remote("local", max_prompts=cap)
        there = grow_cross_sections(model, ds, result, attributes, max_sites=3, batch_size=5,
                                    remote=remote)
        requests[len(attributes), cap] = [r.kernel for r in remote.requests]
        for a in attributes:
            assert there[a][1]["recovered"] == pytest.approx(here[a][1]["recovered"], rel=1e-5)
            assert there[a][1]["prefix_recovered"] == pytest.approx(
                here[a][1]["prefix_recovered"], rel=1e-5)
            assert there[a][0].site.tolist() == here[a][0].site.tolist()
    assert requests[1, None] == requests[2, None] == ["grow"]
    capped = requests[2, 5]  # 10 prompts, 5 a request: each run takes two
    assert capped[:2] == ["counterfactuals"] * 2 and set(capped[2:]) == {"patch"}
    assert len(capped) >= 6


def test_discover_grows_cross_sections_by_default(tiny_task, tmp_path):
    model, ds, _ = tiny_task
    found = discover(model, ds, DiscoveryConfig(min_effect=0, max_sites=3, batch_size=5),
                     out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = pd.read_csv(tmp_path / "cross_sections.csv")
    assert {"site", "position", "attribute", "exact_delta"} <= set(table.columns)
    for attribute in ("io", "s"):
        info = summary[attribute]
        assert info["method"] == "joint coverage" and info["target"] == 0.6
        assert {"recovered", "reached", "cap_hit", "same_as", "n_sites", "total_effect",
                "small_effect"} <= set(info)
        assert len(info["cross_section"]) == info["n_sites"] <= 3
        assert info == json.loads(json.dumps(found.summary()[attribute]))
        rows = table[table.attribute == attribute]
        assert rows.site.str.contains(".z.h").all()
        assert [f"{s}@{p}" for s, p in zip(rows.site, rows.position)] == info["cross_section"]


# -- real SmolLM2 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_ioi(smollm2):
    from sage_nn.tasks.datasets import load_task

    ds = load_task("ioi").build(smollm2, n=8, seed=0, split="train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a small grid keeps this cheap: the effects come from the forwards whatever the grid,
        # and without resid_pre in the grid every layer's resid_post is scored
        fit = AttributionPatching(kinds=["z", "resid_post"], positions=["END"],
                                  batch_size=8).fit(smollm2, ds)
    return ds, fit, [str(w.message) for w in caught]


@pytest.mark.slow
def test_smollm2_ioi_effects_and_z_ranking(smollm2, smollm2_ioi):
    ds, fit, caught = smollm2_ioi
    effects = fit.effects_
    # resampling IO moves the logit difference by several logits; flipping order barely
    assert effects.total_effect["io"] < -4 and not effects.small_effect["io"]
    assert abs(effects.total_effect["order"]) < 0.3 * abs(effects.total_effect["io"])
    for attribute, row in effects.iterrows():
        assert row.small_effect == (abs(row.total_effect) < 1.0)
        assert row.small_effect == any(f"attribute '{attribute}'" in w for w in caught)
    # the last residual stream at END carries (nearly) the whole effect
    last = fit.scores_.score.sel(attribute="io", site="L29.resid_post", position="END")
    assert 0.8 < float(last) < 1.2
    # attribution ranks heads' z at END like exact patching does
    sel = select_cross_section(fit.scores_, "io", top_k=20, kinds=["z"], positions=["END"])
    table, summary = validate(smollm2, ds, fit.scores_, "io", sel, batch_size=8)
    assert summary["spearman"] > 0.7, table
    assert np.sign(table.exact_delta.iloc[0]) == np.sign(table.delta.iloc[0])


@pytest.mark.slow
def test_smollm2_io_token_stream_is_patched_exactly(smollm2):
    """IOI's IO token carries the io effect in its own residual stream until the heads of
    layers 23-24 read it (exact patching: about 0.97 of the effect); attribution alone
    says about 0.1 there. Discovery's exact cells are exact patching's numbers."""
    from sage_nn.tasks.datasets import load_task

    ds = load_task("ioi").build(smollm2, n=8, seed=0, split="train")
    grid = dict(kinds=["resid_pre"], positions=["IO", "END"], attributes=["io"], batch_size=8)
    fit = AttributionPatching(**grid).fit(smollm2, ds)
    alone = AttributionPatching(**grid, exact_residuals=False).fit(smollm2, ds)
    layers = [f"L{layer}.resid_pre" for layer in range(9, 21)]
    io = fit.scores_.score.sel(attribute="io", site=layers, position="IO")
    assert (io > 0.8).all(), io.values
    assert (alone.scores_.score.sel(attribute="io", site=layers, position="IO") < 0.5).all()
    assert not fit.scores_.exact.sel(position="END").any()  # END's token never changes
    sel = ranked(fit.scores_, "io", positions=["IO"]).iloc[[0, 10, 20]]
    table, _ = validate(smollm2, ds, fit.scores_, "io", sel, batch_size=8)
    np.testing.assert_allclose(table.delta, table.exact_delta, rtol=1e-3, atol=1e-3)


SLOT_FIRST = """
name: slot_first
description: The slot is the prompt's first token (SmolLM2 adds no start token).
vocab:
  countries: {file: %s}
slots: {C: countries, D: countries}
distinct: [[C, D]]
templates:
  - {id: a, text: "{C} has a capital, and unlike {D.capital}, the capital of {C} is"}
  - {id: b, text: "{C}: unlike {D.capital}, the capital city of {C} is"}
attributes: {country: {slot: C}}
answer: " {C.capital}"
distractor: " {D.capital}"
positions: {C: {slot: C}, END: last}
split: {test_templates: [b], vocab_halves: [countries]}
"""


@pytest.mark.slow
def test_a_prompt_that_starts_with_a_slot_is_patched_exactly(smollm2, tmp_path):
    """A slot at the first token: its exact patches recompute the block from token 0, with
    no clean keys and values before it (an empty cache once crashed there), and give the
    numbers of full patched forwards."""
    from sage_nn.tasks.datasets import load_task

    spec = tmp_path / "slot_first.yaml"
    spec.write_text(SLOT_FIRST % (Path(__file__).parents[1] / "tasks/vocab/countries.csv"))
    ds = load_task(spec).build(smollm2, n=8, seed=0)
    first = ds.positions["C"]
    assert (first == ds.positions["C"].min()).all()
    fit = AttributionPatching(kinds=["resid_pre"], positions=["C"], attributes=["country"],
                              layers=[4, 12], batch_size=8).fit(smollm2, ds)
    assert fit.scores_.exact.all()  # the country's token changes: every cell patched exactly
    sel = ranked(fit.scores_, "country", positions=["C"])
    table, _ = validate(smollm2, ds, fit.scores_, "country", sel, batch_size=8)
    np.testing.assert_allclose(table.delta, table.exact_delta, rtol=1e-3, atol=1e-3)
    # a patch that moved the logit difference, not 0 == 0 (little: the first token is the
    # attention sink, measured 0.07 at L12 and 0.02 at L4)
    assert (table.exact_delta.abs() > 0.005).all()


@pytest.mark.slow
def test_smollm2_ioi_cross_sections_of_heads_recover_the_effect(smollm2):
    """On SmolLM2 IOI (16 prompts) a handful of heads' z recovers 0.6 of each attribute's
    effect when patched together (measured: io 6 heads at END, 0.63; s 3 heads, 0.66;
    order one head that overshoots, 2.6), well within 16 sites; the share is an
    independent joint exact patch's."""
    from sage_nn.tasks.datasets import load_task

    ds = load_task("ioi").build(smollm2, n=16, seed=0, split="train")
    scores = AttributionPatching(kinds=["z"], batch_size=16).fit(smollm2, ds).scores_
    found = grow_cross_sections(smollm2, ds, scores)
    for attribute, (table, summary) in found.items():
        assert summary["reached"] and summary["recovered"] >= 0.6, (attribute, summary)
        assert not summary["cap_hit"] and summary["n_sites"] <= 16
        assert set(table.kind) == {"z"}
    table, summary = found["io"]
    assert summary["n_sites"] <= 8 and (table.position == "END").all()
    _, exact = exact_patching(smollm2, ds, "io", list(zip(table.site, table.position)),
                              batch_size=16)
    assert summary["recovered"] == pytest.approx(exact["joint_delta"] / exact["total_effect"],
                                                 abs=1e-3)
    # the heads' top-|score| pick of the same size recovers less
    top = select_cross_section(scores, "io", top_k=summary["n_sites"], kinds=["z"])
    _, plain = validate(smollm2, ds, scores, "io", top, batch_size=16)
    assert plain["recovered"] < summary["recovered"]


@pytest.mark.slow
def test_cli_discover_on_smollm2(tmp_path, capsys):
    from sage_nn.cli import main

    main(["discover", "--task", "ioi", "--n", "4", "--kinds", "z", "--positions", "END",
          "--layers", "20", "21", "22", "--attributes", "io", "--top-k", "3",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "io: total effect" in out and "spearman" in out
    assert (tmp_path / "scores.nc").exists() and (tmp_path / "heatmap_io_z.png").exists()
    with pytest.raises(SystemExit):
        main(["discover", "--task", "ioi", "--out", str(tmp_path), "--top-k", "3",
              "--coverage", "0.5"])
