"""Integration on the real embedded default model (SmolLM2-135M-Instruct, from its GGUF)."""

import numpy as np
import pytest
import torch
import xarray as xr

from sage_nn import adapter, collect, open_store

pytestmark = pytest.mark.slow

IOI = "When Mary and John went to the store, John gave a drink to"


def test_embedded_default_is_the_real_model(smollm2):
    ad = adapter(smollm2)
    assert (ad.n_layers, ad.d_model, ad.n_heads, ad.n_kv_heads, ad.d_head) == (30, 576, 9, 3, 64)
    with torch.no_grad(), smollm2.trace(IOI):
        logits = smollm2.lm_head.output[0, -1].save()
    mary, john = (smollm2.tokenizer(w)["input_ids"][0] for w in (" Mary", " John"))
    assert torch.softmax(logits, -1)[mary] > 0.8
    assert 4 < float(logits[mary] - logits[john]) < 9


def test_identities_and_store_on_real_activations(smollm2, tmp_path):
    prompts = [IOI, "The capital of France is", "After the long day at work, Alice and Bob sat"]
    sites = [f"L{l}.{k}" for l in (3, 12, 25) for k in ("resid_pre", "attn_out", "resid_mid")]
    sites += [f"L{l}.z.h{h}" for l in (3, 12, 25) for h in range(9)]
    ds = collect(smollm2, prompts, sites, store=tmp_path / "real.zarr", batch_size=2)
    ds = ds.load()
    torch.testing.assert_close(
        torch.from_numpy((ds.resid_pre + ds.attn_out).values),
        torch.from_numpy(ds.resid_mid.values), equal_nan=True, rtol=0, atol=1e-4)
    # z over all 9 heads, pushed through o_proj, is attn_out
    o_proj = smollm2._module.model.layers[12].self_attn.o_proj
    z = torch.from_numpy(ds.z.sel(layer=12).isel(prompt=0).values).flatten(-2)
    with torch.no_grad():
        torch.testing.assert_close(o_proj(z), torch.from_numpy(
            ds.attn_out.sel(layer=12).isel(prompt=0).values), rtol=1e-4, atol=1e-4)
    again = open_store(tmp_path / "real.zarr", model=smollm2)
    xr.testing.assert_equal(again.load(), ds)
    assert np.isfinite(ds.resid_pre.sel(prompt=1).isel(position=slice(0, 5))).all()
