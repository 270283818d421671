"""The report: netCDF, SAEBench-style JSON, plots, Markdown/HTML summary, headline table.

Fixtures are small synthetic results of the schema of ``evaluate_cross_section``
(concatenated over attributes), with numbers chosen so every check has a known answer.
"""

import json
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import xarray as xr

from sage_nn.report import headline_table, sae_eval_output, write_report

KS = [1, 2, 4, 8, 16, 32]
METHODS = ["supervised", "topk-2048", "random:topk-2048", "relu-1024", "random:relu-1024"]
# A per-method base score: ceiling > SAEs > floors.
BASE = {"supervised": 0.9, "topk-2048": 0.6, "random:topk-2048": 0.1, "relu-1024": 0.5,
        "random:relu-1024": 0.05}


def cross_section(attribute: str, offset: float, pairs: list[str],
                  methods=METHODS) -> xr.Dataset:
    """One attribute's results; every number is BASE[method] + offset (+ known shifts)."""
    base = np.array([BASE.get(m, 0.3) for m in methods]) + offset
    n_m, n_k, n_p = len(methods), len(KS), len(pairs)
    edit = base[:, None] * (1 - 0.5 / np.arange(1, n_k + 1))[None, :]   # rising in k
    per_pair = base[:, None] + 0.01 * np.arange(n_p)[None, :]           # known pair means
    ds = xr.Dataset(
        {
            "sufficiency": ("dictionary", base),
            "sufficiency_ci": (("dictionary", "bound"), np.stack([base - 0.05, base + 0.05], -1)),
            "necessity": ("dictionary", base - 0.1),
            "necessity_ci": (("dictionary", "bound"), np.stack([base - 0.2, base], -1)),
            "edit": (("dictionary", "k"), edit),
            "edit_ci": (("dictionary", "k", "bound"),
                                 np.stack([edit - 0.1, edit + 0.1], -1)),
            "edit_magnitude": (("dictionary", "k"), np.tile(np.linspace(0.1, 0.9, n_k), (n_m, 1))),
            "fvu": (("dictionary", "pair"), 1 - per_pair),
            "l0": (("dictionary", "pair"), 10 * per_pair),
            "dead": (("dictionary", "pair"), np.zeros((n_m, n_p))),
            "best_f1": (("dictionary", "pair"), per_pair),
            "share_interpretable": (("dictionary", "pair"), per_pair / 2),
            "alignment": (("dictionary", "pair"), per_pair),
        },
        coords={"dictionary": methods, "k": KS, "pair": pairs, "bound": ["low", "high"]},
        attrs={"attribute": attribute, "n_prompts": 48, "clean_logit_diff": 3.0},
    )
    return ds.expand_dims(attribute=[attribute])


@pytest.fixture
def results() -> xr.Dataset:
    # Different cross-sections per attribute: concat pads the other's pairs with NaN.
    return xr.concat([cross_section("io", 0.0, ["L12.resid_post@END", "L9.z.h3@END"]),
                      cross_section("s", 0.05, ["L3.resid_post@S2"])], "attribute")


def test_headline_table_values(results):
    table = headline_table(results)
    assert list(table.columns) == ["sufficiency", "necessity", "edit_k2",
                                   "best_f1", "fvu", "l0"]
    # rows: attribute x method, ceiling first, each SAE followed by its floor
    assert list(table.loc["io"].index) == ["supervised", "topk-2048", "random:topk-2048",
                                           "relu-1024", "random:relu-1024"]
    row = table.loc[("io", "topk-2048")]
    assert row.sufficiency == pytest.approx(0.6)
    assert row.necessity == pytest.approx(0.5)
    assert row.edit_k2 == pytest.approx(0.6 * 0.75)
    # mean over io's two pairs only (base + 0, base + 0.01), not the NaN-padded s pair
    assert row.best_f1 == pytest.approx(0.605)
    assert row.fvu == pytest.approx(0.395)
    assert row.l0 == pytest.approx(6.05)
    assert table.loc[("s", "supervised")].sufficiency == pytest.approx(0.95)
    assert table.loc[("s", "random:relu-1024")].best_f1 == pytest.approx(0.10)
    assert table.attrs["edit_k"] == 2


def test_headline_table_shows_the_loss_increase_when_evaluated(results):
    loss = xr.zeros_like(results.sufficiency) + 0.25
    table = headline_table(results.assign(loss_increase=loss))
    assert table.columns[-1] == "loss_increase"
    assert (table["loss_increase"] == 0.25).all()


def test_headline_table_smallest_k_at_least_2(results):
    table = headline_table(results.sel(k=[1, 4, 8]))
    assert "edit_k4" in table.columns
    assert table.loc[("io", "supervised")].edit_k4 == pytest.approx(0.9 * (1 - 0.5 / 3))


def test_write_report_files(results, tmp_path):
    disc = tmp_path / "discovery_out"
    disc.mkdir()
    _heatmap(disc / "heatmap_io_resid.png")

    out = tmp_path / "report"
    config = {"model": "smollm2-135m", "task": "ioi", "seed": 0, "n_eval": 48}
    timings = {"task": 0.5, "discovery": 12.25, "evaluation": 30.0}
    summary = write_report(results, out, discovery_dir=disc, config=config, timings=timings,
                           sae_info={"topk-2048": {"sae_lens_release_id": "local",
                                                   "sae_cfg_dict": {"d_sae": 2048}}})
    assert summary == out / "summary.md"

    # 1. the results round-trip through netCDF, config attached as JSON text
    with xr.open_dataset(out / "results.nc", engine="h5netcdf") as back:
        xr.testing.assert_allclose(back.load().drop_attrs(), results.drop_attrs())
        assert json.loads(back.attrs["sage_config"])["task"] == "ioi"

    # 2. one SAEBench-shaped JSON per SAE, carrying the SAE's, ceiling's and floor's numbers,
    # named {release}_{sae_id}_eval_results.json (SAEs without a release are sage_nn's)
    for sae, file in (("topk-2048", "local_topk-2048"), ("relu-1024", "sage_nn_relu-1024")):
        doc = json.loads((out / f"{file}_eval_results.json").read_text())
        assert {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis",
                "eval_result_metrics", "eval_result_details", "sae_bench_commit_hash",
                "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
                "eval_result_unstructured"} <= set(doc)
        assert doc["eval_type_id"] == "sage"
        assert doc["eval_config"]["task"] == "ioi" and doc["eval_config"]["seed"] == 0
        m = doc["eval_result_metrics"]["io"]
        assert m["sufficiency"] == pytest.approx(BASE[sae])
        assert m["sufficiency_ceiling"] == pytest.approx(0.9)
        assert m["sufficiency_floor"] == pytest.approx(BASE["random:" + sae])
        assert m["sufficiency_ci_low"] == pytest.approx(BASE[sae] - 0.05)
        assert m["sufficiency_gap_closed"] == pytest.approx(
            (BASE[sae] - BASE["random:" + sae]) / (0.9 - BASE["random:" + sae]))
        assert m["edit_k32_ceiling"] == pytest.approx(0.9 * (1 - 0.5 / 6))
        assert m["best_f1"] == pytest.approx(BASE[sae] + 0.005)
        # SAEBench's metric categories are flat: no nested dicts
        assert all(not isinstance(v, (dict, list)) for v in m.values())
        assert doc["eval_result_metrics"]["mean"]["sufficiency"] == pytest.approx(
            BASE[sae] + 0.025)
        details = doc["eval_result_details"]
        assert [(d["attribute"], d["pair"]) for d in details] == [
            ("io", "L12.resid_post@END"), ("io", "L9.z.h3@END"), ("s", "L3.resid_post@S2")]
        assert details[1]["alignment_floor"] == pytest.approx(BASE["random:" + sae] + 0.01)
    doc = json.loads((out / "local_topk-2048_eval_results.json").read_text())
    assert doc["sae_lens_release_id"] == "local" and doc["sae_cfg_dict"] == {"d_sae": 2048}

    # 3. plots are valid images; the discovery heatmap was copied in
    pngs = sorted(p.name for p in out.rglob("*.png"))
    for name in ("compare_sufficiency.png", "compare_necessity.png",
                 "compare_edit_k2.png", "compare_best_f1.png",
                 "controllability.png", "heatmap_io_resid.png"):
        assert name in pngs
    for p in out.rglob("*.png"):
        image = mpimg.imread(p)
        assert image.ndim == 3 and min(image.shape[:2]) > 100

    # 4. Markdown links every PNG and shows the numbers; HTML embeds them all
    md = summary.read_text()
    for p in out.rglob("*.png"):
        assert f"]({p.relative_to(out).as_posix()})" in md
    assert "0.600 [0.55, 0.65]" in md          # topk sufficiency with its CI, io
    assert "| discovery | 12.2 |" in md or "| discovery | 12.3 |" in md
    assert '"n_eval": 48' in md
    assert "| topk-2048 | io | 0.62 ✓ |" in md and "violated" not in md
    page = (out / "summary.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(?!data:|#)', page)   # nothing external
    assert "<td>0.600 [0.55, 0.65]</td>" in page


def with_replicates(ds: xr.Dataset, n_boot: int = 200, spread: float = 0.02) -> xr.Dataset:
    """The results as an evaluation now writes them: the edits summarised over k
    (``edit_auc``) and each headline metric's bootstrap replicates, every dictionary on the
    same draws (the value plus one shared shift per draw, so a difference of two is exact)."""
    shift = np.random.default_rng(0).normal(0, spread, n_boot)
    ds = ds.assign(edit_auc=ds.edit.mean("k"))
    ds["edit_auc_ci"] = ds.edit_ci.mean("k")
    for name in ("sufficiency", "necessity", "edit_auc", "best_f1"):
        value = ds[name].mean("pair") if "pair" in ds[name].dims else ds[name]
        ds[f"{name}_boot"] = value + xr.DataArray(shift, dims="boot")
    return ds


def set_headline(ds: xr.Dataset, name: str, value: float, **where) -> None:
    """Set a headline metric's value and move its replicates with it."""
    old = float(ds[name].loc[where])
    ds[name].loc[where] = value
    ds[f"{name}_boot"].loc[where] = ds[f"{name}_boot"].loc[where] + (value - old)


def test_report_flags_a_violated_ordering(results, tmp_path):
    """Each mark comes from the paired interval of a difference: an SAE above its ceiling
    is flagged, a floor above the ceiling leaves no gap to close."""
    bad = with_replicates(results.copy(deep=True))
    set_headline(bad, "sufficiency", 0.95, attribute="io", dictionary="topk-2048")
    set_headline(bad, "sufficiency", 0.99, attribute="s", dictionary="random:relu-1024")
    write_report(bad, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| topk-2048 | io | 1.06 ✗ above the ceiling |" in text
    assert "| relu-1024 | s | – (ceiling ≤ floor) |" in text
    assert "| topk-2048 | s | 0.62 ✓ |" in text
    # an SAE within the noise of its floor is not ranked above it
    close = with_replicates(results.copy(deep=True))
    for d, v in (("relu-1024", 0.14), ("random:relu-1024", 0.1)):
        close["sufficiency"].loc[dict(attribute="io", dictionary=d)] = v
        close["sufficiency_boot"].loc[dict(attribute="io", dictionary=d)] = \
            v + np.random.default_rng(len(d)).normal(0, 0.05, 200)
    write_report(close, tmp_path / "close")
    assert "| relu-1024 | io | 0.05 ~ |" in (tmp_path / "close" / "summary.md").read_text()


def _heatmap(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.arange(9).reshape(3, 3))
    fig.savefig(path)
    plt.close(fig)


def test_discovery_dir_inside_run_dir_is_linked_not_copied(results, tmp_path):
    (tmp_path / "discovery").mkdir()
    _heatmap(tmp_path / "discovery" / "heat.png")
    write_report(results, tmp_path, discovery_dir=tmp_path / "discovery")
    assert "](discovery/heat.png)" in (tmp_path / "summary.md").read_text()
    assert [p.name for p in (tmp_path / "discovery").iterdir()] == ["heat.png"]


def test_single_cross_section_and_nan_json(tmp_path):
    one = cross_section("io", 0.0, ["L12.resid_post@END"])
    one["fvu"][:] = np.nan  # NaN must become JSON null, not the invalid token NaN
    write_report(one.isel(attribute=0, drop=True).assign_attrs(attribute="io"), tmp_path)
    text = (tmp_path / "sage_nn_topk-2048_eval_results.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["eval_result_metrics"]["io"]["fvu"] is None


def test_bad_input_errors(results, tmp_path):
    with pytest.raises(ValueError, match="lack the variable.*evaluate_cross_section"):
        write_report(results.drop_vars("sufficiency"), tmp_path)
    with pytest.raises(ValueError, match="no 'supervised' method"):
        write_report(results.sel({"dictionary": METHODS[1:]}), tmp_path)
    with pytest.raises(ValueError, match="no SAE under test.*floor"):
        write_report(results.sel({"dictionary": ["supervised", "topk-2048"]}), tmp_path)
    with pytest.raises(TypeError, match="must be an xarray.Dataset"):
        write_report({"sufficiency": 1}, tmp_path)
    with pytest.raises(FileNotFoundError, match="discovery_dir .* is not a directory"):
        write_report(results, tmp_path, discovery_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="not an SAE of these results"):
        sae_eval_output(results, "supervised")
    clash = cross_section("io", 0.0, ["p"], methods=["supervised", "a:b", "random:a:b",
                                                      "a_b", "random:a_b"])
    with pytest.raises(ValueError, match="clashing file names"):
        write_report(clash, tmp_path)


def test_sae_eval_output_second_attribute(results):
    m = sae_eval_output(results, "relu-1024")["eval_result_metrics"]["s"]
    # necessity is measured against its ideal (an exact reconstruction's 1), not the
    # supervised dictionary's 0.85: here the floor's 0.0 against 1
    assert m["necessity_ceiling"] == 1 and math.isclose(m["necessity"], 0.45)
    assert math.isclose(m["necessity_gap_closed"], 0.45)
    assert math.isclose(m["sufficiency_ceiling"], 0.95)  # the others: the supervised one
    assert math.isclose(m["edit_magnitude_k1"], 0.1)


def test_gap_closed_scores_sufficiency_by_distance_from_one(results):
    r = results.copy(deep=True)
    r["sufficiency"].loc[{"attribute": "io", "dictionary": "topk-2048"}] = 1.3
    # edit accuracy identical for all methods at k=1: no gap to close
    r["edit"].loc[{"attribute": "io", "k": 1}] = 0.5
    m = sae_eval_output(r, "topk-2048")["eval_result_metrics"]["io"]
    assert m["sufficiency"] == pytest.approx(1.3)          # reported as measured
    assert m["sufficiency_gap_closed"] == pytest.approx((0.7 - 0.1) / (0.9 - 0.1))
    assert m["edit_k1_gap_closed"] is None


def _sae(layer: int, kind: str, d_in: int = 8, d_sae: int = 16, k: int = 4):
    from sage_nn.dictionaries.saes import SparseAutoencoder

    return SparseAutoencoder(torch.zeros(d_in, d_sae), torch.zeros(d_sae),
                             torch.zeros(d_sae, d_in), torch.zeros(d_in), architecture="topk",
                             k=k, layer=layer, kind=kind,
                             hook_name=f"blocks.{layer}.hook_{kind}")


def test_sae_cfg_dict_of_one_sae_and_of_residual_sites(results, tmp_path):
    from sage_nn.report import sae_cfg_dict

    one = sae_cfg_dict(_sae(3, "resid_post"), model_name="m")
    assert one["architecture"] == "topk" and (one["d_in"], one["d_sae"], one["k"]) == (8, 16, 4)
    assert (one["hook_name"], one["hook_layer"], one["site"]) == \
        ("blocks.3.hook_resid_post", 3, "L3.resid_post")
    assert one["model_name"] == "m" and "training" not in one
    training = {"corpus": "task:ioi[2040]", "tokens": 307200, "batch_size": 1024, "seed": 0}
    two = sae_cfg_dict([_sae(22, "resid_post"), _sae(29, "resid_mid")], training=training)
    assert two["hook_name"] == ["blocks.22.hook_resid_post", "blocks.29.hook_resid_mid"]
    assert two["hook_layer"] == [22, 29] and [s["site"] for s in two["sites"]] == \
        ["L22.resid_post", "L29.resid_mid"]
    assert two["d_sae"] == 16 and two["dataset_path"] == "task:ioi[2040]"
    assert two["training"]["tokens"] == 307200
    # members of different widths: the width is per site only
    mixed = sae_cfg_dict([_sae(1, "resid_pre"), _sae(2, "resid_pre", d_sae=32)])
    assert "d_sae" not in mixed and [s["d_sae"] for s in mixed["sites"]] == [16, 32]
    with pytest.raises(ValueError, match="at least one SAE"):
        sae_cfg_dict([])
    # the report writes it into the SAEBench JSON and lists the SAE in the summary
    write_report(results, tmp_path, sae_info={"topk-2048": {"sae_cfg_dict": two}})
    doc = json.loads((tmp_path / "sage_nn_topk-2048_eval_results.json").read_text())
    assert doc["sae_cfg_dict"] == two
    summary = (tmp_path / "summary.md").read_text()
    assert "| topk-2048 | topk | 8 | 16 | 4 | blocks.22.hook_resid_post, " \
           "blocks.29.hook_resid_mid | task:ioi[2040] | – | 300 |" in summary


def test_report_shows_training_curves_and_labels_unconverged_saes(results, tmp_path):
    """Each trained SAE's held-out curve is plotted and its convergence stated; one that
    did not converge is named so in every table its numbers appear in."""
    criterion = "held-out FVU improved by less than 0.002 over the last 60 steps"
    curve = [[0, 1.0, 0.0], [100, 0.3, 0.1], [200, 0.2, 0.05]]

    def info(converged):
        training = {"corpus": "task:ioi[512]", "criterion": criterion,
                    "steps_used": {"L3.resid_post": 200, "L5.resid_post": 200},
                    "held_out_fvu": {"L3.resid_post": 0.2, "L5.resid_post": 0.25},
                    "held_out_dead": {"L3.resid_post": 0.05, "L5.resid_post": 0.1},
                    "corpus_passes": {"L3.resid_post": 5.1, "L5.resid_post": 5.1},
                    "converged": {"L3.resid_post": True, "L5.resid_post": converged},
                    "converged_at_step": {"L3.resid_post": 200},
                    "held_out_curves": {"L3.resid_post": curve, "L5.resid_post": curve}}
        return {"sae_cfg_dict": sae_cfg_dict([_sae(3, "resid_post"), _sae(5, "resid_post")],
                                             training=training)}

    from sage_nn.report import sae_cfg_dict

    write_report(results, tmp_path, sae_info={"topk-2048": info(False), "relu-1024": info(True)})
    summary = (tmp_path / "summary.md").read_text()
    assert criterion in summary and "| 5.1× |" in summary
    assert "`topk-2048` did not converge" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| topk-2048")]
    labelled = [line for line in rows if line.startswith("| topk-2048 (not converged) |")]
    assert labelled and len(labelled) == len(rows)  # wherever its numbers appear
    assert sum(line.startswith("| relu-1024 |") for line in summary.splitlines()) > 3
    assert "| no (1 of 2) |" in summary and "| yes |" in summary
    assert "training.png" in summary
    img = mpimg.imread(tmp_path / "training.png")
    assert img.shape[0] > 100 and img.std() > 0.01
    # no record of convergence: not claimed either way
    write_report(results, tmp_path / "plain", sae_info={"topk-2048": {"sae_cfg_dict": {
        "d_sae": 16, "training": {"steps_used": {"L3.resid_post": 300}}}}})
    plain = (tmp_path / "plain" / "summary.md").read_text()
    assert "not converged" not in plain and "| not checked |" in plain
    assert not (tmp_path / "plain" / "training.png").exists()


def test_saebench_identity_file_names_and_fields(results, tmp_path):
    """SAEBench's meanings: sae_lens ids are sae_lens's (or null), the file is
    {release}_{sae_id}_eval_results.json, sae_bench_commit_hash is not this repo's."""
    release = "gemma-scope-2b-pt-res"
    sae_id = "layer_8/width_16k/average_l0_71"
    write_report(results, tmp_path, sae_info={
        "topk-2048": {"spec": f"{release}:{sae_id}"},
        "relu-1024": {"spec": "train:standard"}})
    pretrained = json.loads((tmp_path / f"{release}_layer_8_width_16k_average_l0_71"
                                         "_eval_results.json").read_text())
    assert (pretrained["sae_lens_release_id"], pretrained["sae_lens_id"]) == (release, sae_id)
    assert pretrained["sae_bench_commit_hash"] == ""  # a string, SAEBench's type; not run
    unstructured = pretrained["eval_result_unstructured"]
    assert unstructured["sage_nn_commit_hash"] and unstructured["release"] == release
    trained = json.loads((tmp_path / "sage_nn_relu-1024_eval_results.json").read_text())
    assert trained["sae_lens_id"] is None and trained["sae_lens_release_id"] is None
    assert trained["eval_result_unstructured"]["sae_id"] == "relu-1024"
    assert f"`{release}_layer_8_width_16k_average_l0_71_eval_results.json`" in \
        (tmp_path / "summary.md").read_text()


def test_a_release_glob_gets_one_saebench_file_per_member_sae(results, tmp_path):
    """RELEASE:ID_GLOB loads several SAEs evaluated as one set: each member gets its own
    {release}_{sae_id} file, with its hook_name and the details of the pairs it feeds;
    the metrics are the set's, and the file says which set."""
    ids = ["blocks.12.hook_resid_post", "blocks.9.hook_resid_pre"]  # L12 and L9
    info = {"spec": "res-jb:blocks.*", "sae_lens_ids": ids,
            "sae_cfg_dict": {"sites": [{"hook_name": h, "d_sae": 2048} for h in ids]}}
    write_report(results, tmp_path, sae_info={"topk-2048": info})
    docs = {h: json.loads((tmp_path / f"res-jb_{h}_eval_results.json").read_text())
            for h in ids}
    assert not (tmp_path / "res-jb_blocks._eval_results.json").exists()
    for h, doc in docs.items():
        assert doc["sae_lens_id"] == h and doc["sae_lens_release_id"] == "res-jb"
        assert doc["sae_cfg_dict"]["hook_name"] == h
        assert doc["eval_result_unstructured"]["set"] == ids
    assert {e["pair"] for e in docs[ids[0]]["eval_result_details"]} == {"L12.resid_post@END"}
    assert {e["pair"] for e in docs[ids[1]]["eval_result_details"]} == {"L9.z.h3@END"}
    assert docs[ids[0]]["eval_result_metrics"] == docs[ids[1]]["eval_result_metrics"]
    assert f"`res-jb_{ids[1]}_eval_results.json`" in (tmp_path / "summary.md").read_text()


def test_sae_identity_of_a_directory(tmp_path):
    from sage_nn.report import eval_results_file, sae_identity

    (tmp_path / "my_saes" / "L5.resid_pre").mkdir(parents=True)
    ident = sae_identity("L5.resid_pre", {"spec": str(tmp_path / "my_saes" / "L5.resid_pre")})
    assert ident == {"release": "my_saes", "sae_id": "L5.resid_pre",
                     "sae_lens_release_id": None, "sae_lens_id": None}
    assert eval_results_file("topk-1024@sites", {"spec": "train:topk@sites"}) == \
        "sage_nn_topk-1024_sites_eval_results.json"


def test_hook_name_per_sae_is_the_transformerlens_name():
    from sage_nn.report import sae_cfg_dict

    sae = _sae(8, "resid_post")
    sae.hook_name = None  # an SAE without a hook name gets its site's
    assert sae_cfg_dict(sae)["hook_name"] == "blocks.8.hook_resid_post"
    head = _sae(5, "z")
    head.heads, head.hook_name = [3], "L5.z.h3"  # trained here at one head
    cfg = sae_cfg_dict(head)
    assert (cfg["hook_name"], cfg["hook_head_index"], cfg["site"]) == \
        ("blocks.5.attn.hook_z", 3, "L5.z.h3")


def test_plots_return_figures_and_save_only_when_asked(results, tmp_path):
    from matplotlib.figure import Figure

    from sage_nn.report import plot_comparison, plot_controllability

    fig = plot_comparison(results, "edit", k=2)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) >= 2 * 5
    assert isinstance(plot_controllability(results), Figure)
    assert list(tmp_path.iterdir()) == []
    saved = plot_comparison(results, "sufficiency", tmp_path / "s.png")
    assert isinstance(saved, Figure) and mpimg.imread(tmp_path / "s.png").ndim == 3


def test_many_saes_comparison_table_sweep_plots_and_orderings(results, tmp_path):
    from matplotlib.figure import Figure

    from sage_nn.report import comparison_table, plot_sweep, sae_orderings

    info = {"topk-2048": {"sae_cfg_dict": {"d_sae": 2048}},
            "relu-1024": {"sae_cfg_dict": {"d_sae": 1024}}}
    table = comparison_table(results, info)
    assert list(table.index) == [("topk-2048", "io"), ("topk-2048", "s"),
                                 ("relu-1024", "io"), ("relu-1024", "s")]
    row = table.loc[("topk-2048", "io")]
    assert row["width"] == 2048 and row["sufficiency"] == pytest.approx(0.6)
    assert row["sufficiency_low"] == pytest.approx(0.55)
    assert row["sufficiency_ceiling"] == pytest.approx(0.9)
    assert row["sufficiency_floor"] == pytest.approx(0.1)
    assert row["edit_k2_gap"] == pytest.approx((0.6 - 0.1) / (0.9 - 0.1))
    assert row["l0"] == pytest.approx(10 * (0.6 + 0.005))  # mean over the io pairs
    assert all(v == ["topk-2048", "relu-1024"] for v in sae_orderings(results).values())

    for x in ("l0", "width"):
        fig = plot_sweep(results, "edit", x=x, sae_info=info)
        assert isinstance(fig, Figure) and not list(tmp_path.iterdir())
    plot_sweep(results, "sufficiency", tmp_path / "s.png")
    assert (tmp_path / "s.png").exists()
    with pytest.raises(ValueError, match="'l0' or 'width'"):
        plot_sweep(results, "edit", x="k")

    out = tmp_path / "report"
    write_report(results, out, sae_info=info)
    for metric in ("sufficiency", "necessity", "edit", "best_f1"):
        for x in ("l0", "width"):
            assert (out / f"sweep_{metric}_vs_{x}.png").exists()
    summary = (out / "summary.md").read_text()
    assert "## Comparison across SAEs" in summary and "sweep_edit_vs_l0.png" in summary
    assert "order the SAEs the same way" in summary
    back = __import__("pandas").read_csv(out / "comparison.csv")
    assert len(back) == 4 and {"sae", "attribute", "width", "l0", "edit_k2"} <= set(back)


def test_an_attribute_without_a_cross_section_is_kept_out_of_claims(results, tmp_path):
    """A cross-section recovering far less than its target was not found: the attribute is
    reported with the layers attribution names, kept out of claims, and gets no gap closed."""
    from sage_nn.report import comparison_table, excluded, sae_metrics

    weak = results.assign(recovered=("attribute", [-0.01, 0.7]),
                          target=("attribute", [0.6, 0.6]),
                          weak_cross_section=("attribute", [True, False]),
                          effect_layers=("attribute", ["23, 29, 28", "23, 24"]))
    assert excluded(weak, "io") == ("no cross-section found (its joint patch recovers -0.01 of "
                                    "the effect, target 0.6); attribution puts the effect at "
                                    "layers 23, 29, 28")
    assert excluded(weak, "s") is None
    assert sae_metrics(weak, "topk-2048", "io")["sufficiency_gap_closed"] is None
    assert sae_metrics(weak, "topk-2048", "s")["sufficiency_gap_closed"] == pytest.approx(
        (0.65 - 0.15) / (0.95 - 0.15))
    table = comparison_table(weak)
    assert np.isnan(table.loc[("topk-2048", "io"), "sufficiency_gap"])
    write_report(weak, tmp_path)
    assert "Kept out of claims: no cross-section found" in (tmp_path / "summary.md").read_text()


def test_the_sae_against_its_floor(results):
    """Above when the SAE's 95% interval lies above its floor's, below when under it,
    overlap otherwise; sufficiency in its distance from 1."""
    from sage_nn.report import Lookup, against_floor, comparison_table, goodness_interval

    look = Lookup(results)
    assert against_floor(look, "topk-2048", "io", "sufficiency") == "above"  # .6±.05 vs .1±.05
    close = results.copy(deep=True)
    close["necessity_ci"].loc[dict(attribute="io", dictionary="random:topk-2048")] = [0.4, 0.6]
    close["edit_ci"].loc[dict(attribute="io", dictionary="random:topk-2048", k=2)] = [0.6, 0.9]
    look = Lookup(close)
    assert against_floor(look, "topk-2048", "io", "necessity") == "overlap"
    assert against_floor(look, "topk-2048", "io", "edit", k=2) == "below"
    table = comparison_table(close)
    assert table.loc[("topk-2048", "io"), "edit_k2_above_floor"] == -1
    assert table.loc[("topk-2048", "io"), "sufficiency_above_floor"] == 1
    # an interval around 1 reaches the best sufficiency
    assert goodness_interval("sufficiency", 0.9, 1.2) == (pytest.approx(0.8), 1.0)
    assert goodness_interval("sufficiency", 1.1, 1.3) == (pytest.approx(0.7), pytest.approx(0.9))


def _cut_artists(fig) -> list[str]:
    """The titles, legends and axis labels of a drawn figure that do not lie wholly on
    its canvas (in the renderer's window extents, to within a pixel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    fig.draw_without_rendering()
    named = [(f"title {ax.get_title()!r}", ax.title) for ax in fig.axes if ax.get_title()]
    named += [(f"label {t.get_text()!r}", t) for ax in fig.axes
              for t in (ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    if fig._suptitle is not None:
        named.append((f"suptitle {fig._suptitle.get_text()!r}", fig._suptitle))
    named += [("figure legend", leg) for leg in fig.legends]
    named += [("axes legend", ax.get_legend()) for ax in fig.axes if ax.get_legend()]
    canvas_box, cut = fig.bbox, []
    for name, artist in named:
        box = artist.get_window_extent(renderer)
        if box.x0 < canvas_box.x0 - 1 or box.y0 < canvas_box.y0 - 1 or \
                box.x1 > canvas_box.x1 + 1 or box.y1 > canvas_box.y1 + 1:
            cut.append(f"{name}: {box.bounds} outside {canvas_box.bounds}")
    return cut


@pytest.mark.parametrize("n_attributes, sae", [(1, "topk-1024"), (2, "topk-1024"),
                                               (3, "topk-1024"), (1, "task-topk-1024-k32")])
def test_saved_plots_hold_their_titles_and_legends_inside_the_canvas(tmp_path, n_attributes,
                                                                     sae):
    """One attribute and long SAE names: the title of compare_edit_k2.png and the legend
    of controllability.png were cut; every plot must keep them on the canvas."""
    from sage_nn.report import plot_comparison, plot_controllability, plot_sweep

    methods = ["supervised", sae, f"random:{sae}", f"{sae}@sites", f"random:{sae}@sites"]
    results = xr.concat([cross_section(a, 0.05 * i, ["L3.resid_post@S2"], methods)
                         for i, a in enumerate(["io", "s", "order"][:n_attributes])],
                        "attribute")
    info = {m: {"sae_cfg_dict": {"d_sae": 1024}} for m in methods}
    figures = {"compare_edit_k2": lambda p: plot_comparison(results, "edit", p, k=2),
               "controllability": lambda p: plot_controllability(results, p),
               "sweep_edit_vs_l0": lambda p: plot_sweep(results, "edit", p),
               "sweep_sufficiency_vs_width": lambda p: plot_sweep(results, "sufficiency", p,
                                                                  x="width", sae_info=info)}
    for name, plot in figures.items():
        path = tmp_path / f"{name}.png"
        fig = plot(path)
        height, width = mpimg.imread(path).shape[:2]  # what is saved is this canvas
        assert (width, height) == pytest.approx(tuple(fig.get_size_inches() * 110), abs=1)
        assert _cut_artists(fig) == [], name


def saebench_output(doc: dict):
    """``doc`` loaded through SAEBench's own ``BaseEvalOutput`` (sae-bench 0.6.0, installed
    without its dependencies: the class needs pydantic only), with categories and details
    typed from the document (SAEBench types them per evaluation: flat metrics of numbers,
    booleans, strings or null)."""
    from dataclasses import make_dataclass

    from pydantic import ConfigDict, TypeAdapter
    from pydantic.dataclasses import dataclass
    from sae_bench.evals.base_eval_output import (
        BaseEvalConfig,
        BaseEvalOutput,
        BaseMetricCategories,
        BaseMetrics,
        BaseResultDetail,
    )

    scalar = float | int | bool | str | None
    config = dataclass(make_dataclass("Config", [(k, object) for k in doc["eval_config"]],
                                      bases=(BaseEvalConfig,)),
                       config=ConfigDict(arbitrary_types_allowed=True))
    categories = dataclass(make_dataclass("Categories", [
        (name, dataclass(make_dataclass(f"M_{i}", [(k, scalar) for k in metrics],
                                        bases=(BaseMetrics,))))
        for i, (name, metrics) in enumerate(doc["eval_result_metrics"].items())],
        bases=(BaseMetricCategories,)))
    keys = dict.fromkeys(k for d in doc["eval_result_details"] for k in d)
    detail = dataclass(make_dataclass("Detail", [(k, scalar) for k in keys],
                                      bases=(BaseResultDetail,)))
    output = dataclass(make_dataclass("Output", [], bases=(
        BaseEvalOutput[config, categories, detail],)))
    return TypeAdapter(output).validate_python(doc)


def test_every_saebench_file_loads_with_saebench_own_class(results, tmp_path):
    """Each ``*_eval_results.json`` validates as SAEBench's ``BaseEvalOutput``: its required
    string ``sae_bench_commit_hash`` (null broke it), flat metric categories, ids."""
    write_report(results, tmp_path, config={"task": "ioi", "seed": 0}, sae_info={
        "topk-2048": {"spec": "gemma-scope-2b-pt-res:layer_8/width_16k/average_l0_71"},
        "relu-1024": {"spec": "train:standard"}})
    files = sorted(tmp_path.glob("*_eval_results.json"))
    assert len(files) == 2
    for path in files:
        doc = json.loads(path.read_text())
        loaded = saebench_output(doc)
        assert loaded.sae_bench_commit_hash == "" and loaded.eval_type_id == "sage"
    doc["sae_bench_commit_hash"] = None  # what the files held: SAEBench refuses it
    with pytest.raises(Exception, match="sae_bench_commit_hash"):
        saebench_output(doc)


def test_plots_mark_attributes_out_of_claims_and_name_the_edit_measure(results, tmp_path):
    """io's counterfactual changes the prediction (its edit is accuracy), s's does not
    (logit-difference success) and s's effect is small (kept out of claims): the bars and
    the curves say both, and draw s on grey with its reason."""
    from sage_nn.report import plot_comparison, plot_controllability

    marked = results.assign(small_effect=("attribute", [False, True]),
                            edit_metric=("attribute", ["accuracy", "success"]))
    fig = plot_comparison(marked, "edit", tmp_path / "edit.png", k=2)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["io\nedit accuracy", "s\nedit success (logit diff.)\nout of claims"]
    assert "kept out of claims (s: small effect)" in fig.get_supxlabel()
    assert len(fig.axes[0].patches) > 0 and (tmp_path / "edit.png").stat().st_size > 0
    plain = plot_comparison(marked, "sufficiency")
    assert [t.get_text() for t in plain.axes[0].get_xticklabels()] == [
        "io", "s\nout of claims"]
    curves = plot_controllability(marked, tmp_path / "controllability.png")
    titles = [ax.get_title() for ax in curves.axes if ax.get_title()]
    assert titles == ["attribute io: edit accuracy",
                      "attribute s: edit success (logit diff.) (out of claims)"]
    assert "s: small effect" in curves.get_suptitle()
    unmarked = plot_comparison(results, "edit", k=2)  # results that say neither
    assert [t.get_text() for t in unmarked.axes[0].get_xticklabels()] == ["io", "s"]
