"""The labeled activation store on tiny models: layout, padding, disk round trips, errors."""

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from sage_nn import collect, open_store, tiny_random_model
from sage_nn.model.activations import NonFiniteActivationError, StoreError

PROMPTS = ["when Mary and John went to the store", "John gave a ball to", "Alice said",
           "then Bob went to the park and Tom said"]
ATTRS = pd.DataFrame({"io": ["Mary", "John", "Alice", "Bob"], "n": [1, 2, 3, 4]})


@pytest.fixture(scope="module")
def model():
    return tiny_random_model("llama", seed=1)


def test_layout_and_coordinates(model):
    ds = collect(model, PROMPTS, ["L0.resid_pre", "L1.z.h2", "L1.k.h1", "L1.attn_out"],
                 coords=ATTRS, batch_size=3, progress=False)
    n_tok = [len(model.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert ds.resid_pre.dims == ("prompt", "position", "layer", "d_model")
    assert ds.z.dims == ("prompt", "position", "layer", "head", "d_head")
    assert ds.k.dims == ("prompt", "position", "layer", "kv_head", "d_head")  # GQA
    assert ds.sizes["position"] == max(n_tok) and list(ds.layer.values) == [0, 1]
    assert list(ds.io.values) == list(ATTRS.io) and list(ds.n_tokens.values) == n_tok
    assert ds.attrs["model"] == "tiny-llama" and ds.attrs["architecture"] == "llama"
    # padding never leaks in: a short prompt's tail is NaN, its real tokens are finite
    short = ds.resid_pre.sel(prompt=2)
    assert np.isnan(short.isel(position=slice(n_tok[2], None))).all()
    assert np.isfinite(short.isel(position=slice(0, n_tok[2]))).all()
    assert ds.groupby("io").mean().io.size == 4  # attributes select by meaning


def test_batching_does_not_change_values(model):
    """Left padding with correct position ids: batched == one prompt at a time."""
    together = collect(model, PROMPTS, ["L1.resid_post", "L0.z.h0"], batch_size=4, progress=False)
    alone = collect(model, PROMPTS, ["L1.resid_post", "L0.z.h0"], batch_size=1, progress=False)
    xr.testing.assert_allclose(together, alone, atol=1e-5)


def test_named_positions_gather_per_prompt(model):
    full = collect(model, PROMPTS, ["L1.resid_mid"], progress=False)
    ends = [len(model.tokenizer(p)["input_ids"]) - 1 for p in PROMPTS]
    named = collect(model, PROMPTS, ["L1.resid_mid"], positions={"END": [-1] * 4, "X": [1, 0, 1, 2]},
                    progress=False)
    assert list(named.position.values) == ["END", "X"]
    for i, end in enumerate(ends):
        np.testing.assert_allclose(named.resid_mid.sel(prompt=i, position="END"),
                                   full.resid_mid.sel(prompt=i, position=end), atol=1e-6)
    np.testing.assert_allclose(named.resid_mid.sel(prompt=3, position="X"),
                               full.resid_mid.sel(prompt=3, position=2), atol=1e-6)


def test_one_forward_per_batch_whatever_the_sites(model):
    calls = []  # the embedding runs once a forward (the forward stops after the last site)
    handle = model._module.get_input_embeddings().register_forward_hook(
        lambda *a: calls.append(1))
    try:
        ds = collect(model, PROMPTS, ["L0.z.h1", "L0.z.h1", "L0.resid_pre", "L1.z.h3",
                                      "L0.resid_pre", "L1.mlp_out"], batch_size=8, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert list(ds["head"].values) == [1, 3]


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_store_round_trip_is_lazy(model, tmp_path, suffix):
    path = tmp_path / f"acts{suffix}"
    memory = collect(model, PROMPTS, ["L0.resid_pre", "L1.v.h0"], coords=ATTRS, batch_size=2,
                     progress=False)
    stored = collect(model, PROMPTS, ["L0.resid_pre", "L1.v.h0"], coords=ATTRS, batch_size=2,
                     store=path, progress=False)
    assert stored.resid_pre.chunks is not None  # dask-backed, read in chunks
    reopened = open_store(path, model=model)
    xr.testing.assert_allclose(reopened.load(), memory, atol=0)
    assert list(reopened.io.values) == list(ATTRS.io)


def test_store_from_another_model_is_refused(model, tmp_path):
    path = tmp_path / "acts.nc"
    collect(model, PROMPTS, ["L0.resid_pre"], store=path, progress=False)
    other = tiny_random_model("gpt2")
    with pytest.raises(StoreError, match="collected from model 'tiny-llama', not 'tiny-gpt2'"):
        open_store(path, model=other)


def test_truncated_or_corrupt_stores_are_detected(model, tmp_path):
    nc = tmp_path / "acts.nc"
    collect(model, PROMPTS, ["L0.resid_pre"], store=nc, progress=False)
    data = nc.read_bytes()
    nc.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated or corrupt: delete it and collect again"):
        open_store(nc)

    zr = tmp_path / "acts.zarr"
    collect(model, PROMPTS, ["L0.resid_pre"], store=zr, batch_size=2, progress=False)
    chunk = next(p for p in (zr / "resid_pre").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match="delete it and collect again"):
        open_store(zr)


def test_interrupted_zarr_store_is_incomplete(model, tmp_path):
    # a collection stopped after a batch leaves data without the mark written at the end
    part = collect(model, PROMPTS[:2], ["L0.resid_pre"], progress=False)
    part.attrs = {}
    part.to_zarr(tmp_path / "partial.zarr", consolidated=False)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "partial.zarr")


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match="layer 7 out of range"):
        collect(model, PROMPTS, ["L7.resid_pre"], progress=False)
    with pytest.raises(ValueError, match="unknown site kind"):
        collect(model, PROMPTS, ["L0.resid"], progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        collect(model, [], ["L0.resid_pre"], progress=False)
    with pytest.raises(ValueError, match="use a .zarr directory or a .nc file"):
        collect(model, PROMPTS, ["L0.resid_pre"], store="acts.h5", progress=False)


def test_nan_activations_are_reported():
    broken = tiny_random_model("llama", seed=2)
    with torch.no_grad():
        broken._module.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    message = r"NaN or inf in resid_pre activations at layers \[1\] for prompts \[0, 1, 2, 3\]"
    with pytest.raises(NonFiniteActivationError, match=message):
        collect(broken, PROMPTS, ["L0.resid_pre", "L1.resid_post"], progress=False)
    # the evaluation's reads (sage_nn.reads) say the same, naming the sites
    from types import SimpleNamespace

    from sage_nn.model.reads import read_sites

    data = SimpleNamespace(prompts=PROMPTS, positions={"END": np.full(len(PROMPTS), -1)})
    with pytest.raises(NonFiniteActivationError,
                       match=r"NaN or inf in the activations at \['L1.resid_pre'\]: check the "
                             "model's dtype"):
        read_sites(broken, [data], [("L0.resid_pre", "END"), ("L1.resid_pre", "END")])
