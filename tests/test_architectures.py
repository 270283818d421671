"""Every causal-LM family of the installed transformers, as a tiny random model.

Each family that sage_nn accepts must pass, on a model built from its own config (d_model
32, 2 layers, offline): the residual identities exactly; writes that change only later
tokens; per-head z through the output projection summing to attn_out; exact reconstruction
of every sublayer site with a perfect SAE; patched runs that recompute only their block
equal to full forwards; and one discovery fit. A family sage_nn refuses must say why; one
that cannot be built tiny from its config alone is listed as such.

The outcome of every family is written into ``docs/architectures.md`` by the last test
(``SAGE_NN_WRITE_DOCS=1`` rewrites it; otherwise a stale file fails the test).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sage_nn import tiny_random_model
from sage_nn.model.architectures import UnsupportedArchitectureError, check_config, text_config, tiny_config
from sage_nn.discovery.attribution import AttributionPatching
from sage_nn.discovery.growth import grow_cross_sections
from sage_nn.model.reads import counterfactual_patches
from sage_nn.model.patching import run_patched
from sage_nn.dictionaries.reconstruction import ResidualReconstruction
from sage_nn.model.linear import affine_of
from sage_nn.model.sites import adapter
from test_interventions import _full_forward_patched, tiny_ioi
from test_reconstruction import identity_sae, residual_saes

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
OUTCOMES: dict[str, tuple[str, str]] = {}  # family -> (outcome, detail)
PROMPTS = ["when Mary and John went to the store , John gave a ball to", "the park"]


def _build(family: str):
    """The tiny model, or the outcome that stops it: (model, None) or (None, outcome)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(family)
        check_config(config, family)
        text = text_config(config)
        if text is not config and text.model_type != family:
            return None, ("multimodal", f"its language model is `{text.model_type}`")
        tiny_config(family)
    except UnsupportedArchitectureError as error:
        return None, ("refused", _reason(error))
    except Exception as error:  # noqa: BLE001 - the family's config needs more than defaults
        return None, ("no tiny model", _line(error))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tiny_random_model(family, seed=0), None
        except UnsupportedArchitectureError as error:
            return None, ("refused", _reason(error))
        except Exception as error:  # noqa: BLE001 - the family needs more than its config
            return None, ("no tiny model", _line(error))


def _reason(error: UnsupportedArchitectureError) -> str:
    """What a user is told, less the model's name."""
    text = str(error).splitlines()[0]
    for cut in ("does not support: ", "does not support", "which is "):
        if cut in text:
            return text.split(cut, 1)[1].lstrip(": ")
    return text


def _line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" \
        if not isinstance(error, UnsupportedArchitectureError) else str(error).splitlines()[0]


def _identities(model, ad):
    got, block_in = {}, {}
    with torch.no_grad(), model.trace(PROMPTS):
        for layer in range(ad.n_layers):
            for kind in ad.kinds():
                got[layer, kind] = ad.read(model, layer, kind).save()
                if kind == "resid_pre":  # what the block itself receives (resid_pre is read
                    # as the output of the block before): checked to be the same below
                    block_in[layer] = ad.blocks(model)[layer].input.save()
    for layer in range(ad.n_layers):
        pre, attn, mlp, post = (got[layer, k] for k in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        if ad.parallel:
            torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(pre + attn, got[layer, "resid_mid"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[layer, "resid_mid"] + mlp, post, rtol=1e-5, atol=1e-5)
        if layer + 1 < ad.n_layers:
            torch.testing.assert_close(post, block_in[layer + 1], rtol=0, atol=0)
    return got


def _pattern_from_the_attention_call(model, ad):
    """The clean pattern recomputed from the attention call's inputs (what a read uses, on
    any server) equals the eager pattern the model returns, at every real query token."""
    from sage_nn.model.activations import encode
    from sage_nn.model.linear import attention_call, pattern_rows

    if not ad.arch.attention_call:
        return "no attention call: heads reached only by SAEs at their sites"
    batch = encode(model, PROMPTS)
    T = batch.inputs["input_ids"].shape[1]
    cols = torch.arange(T)[None].expand(len(PROMPTS), T)
    with torch.no_grad(), model.trace(batch.inputs):
        call = attention_call(model, ad.spec, 1)
        P = pattern_rows(call, cols, range(ad.n_heads), ad.n_heads).save()
        eager = getattr(ad.blocks(model)[1], ad.arch.attn).output[1].save()
    real = batch.inputs["attention_mask"].bool()
    for h in range(ad.n_heads):
        torch.testing.assert_close(P[h][real], eager[:, h].float()[real], rtol=1e-4, atol=1e-5)
    return None


def _z_through_output_projection(model, ad, got):
    """sum_h z_h W_O[h] + b_O (then the sandwich norm, if any) is attn_out."""
    block = ad.blocks(model._module)[1]
    attn = getattr(block, ad.arch.attn)
    o_proj = attn
    for part in ad.arch.o_proj.split("."):
        o_proj = getattr(o_proj, part)
    W_O, b_O = affine_of(o_proj, ad.n_heads * ad.d_head)
    z = got[1, "z"]
    out = sum(z[..., h, :] @ W_O[ad.channels("z", h)] for h in range(ad.n_heads)) + b_O
    if ad.arch.attn_post_norm:
        with torch.no_grad():
            out = getattr(block, ad.arch.attn_post_norm)(out)
    torch.testing.assert_close(out, got[1, "attn_out"], rtol=1e-4, atol=1e-5)


def _causal_writes(model, ad):
    with torch.no_grad(), model.trace(PROMPTS):
        ad.tensor(model, 0, "attn_out")[:, -1] = 1.0
        patched = ad.tensor(model, ad.n_layers - 1, "resid_post").save()
    with torch.no_grad(), model.trace(PROMPTS):
        clean = ad.tensor(model, ad.n_layers - 1, "resid_post").save()
    real = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    real[:, -1] = False
    torch.testing.assert_close(patched[real], clean[real], rtol=0, atol=1e-5)
    assert (patched[:, -1] - clean[:, -1]).abs().max() > 1e-3


def _perfect_reconstruction(model, ad):
    rec = ResidualReconstruction(residual_saes(model, identity_sae), mode="input",
                                 freeze_norm=True, freeze_pattern=True).fit(model)
    sites = ad.all_sites(kinds=["q", "k", "v", "z", "attn_out", "mlp_out"])
    result = rec.run(PROMPTS, sites)
    for s in sites:
        torch.testing.assert_close(result.recon[s], result.clean[s], rtol=1e-4, atol=1e-4)


def _blocks_and_discovery(model, ad):
    ds = tiny_ioi(model, n=6)
    pairs = [("L0.resid_pre", "IO"), ("L1.z.h1", "S2"), ("L1.mlp_out", "END")]
    g = torch.Generator().manual_seed(0)
    p = [type(q)(q.site, q.positions, q.values + 3 * torch.randn(q.values.shape, generator=g),
                 q.label) for q in counterfactual_patches(model, ds, ds.counterfactuals["io"], pairs)]
    variants = [[], [p[0]], [p[1], p[2]], [p[2]]]
    out = run_patched(model, ds, variants, batch_size=3, max_rows=6)
    for v, variant in enumerate(variants):
        np.testing.assert_allclose(out.logit_diff.values[v], _full_forward_patched(model, ds, variant),
                                   rtol=1e-4, atol=1e-4, err_msg=f"variant {v}")
    fit = AttributionPatching(min_effect=0, batch_size=3).fit(model, ds)
    found = grow_cross_sections(model, ds, fit.scores_, ["io"], target=0.5, max_sites=3,
                                batch_size=3)
    table, summary = found["io"]
    assert len(table) >= 1 and np.isfinite(summary["recovered"])


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    start = time.perf_counter()
    model, outcome = _build(family)
    if outcome is not None:
        OUTCOMES[family] = outcome
        if outcome[0] == "no tiny model":
            pytest.skip(outcome[1])
        return
    ad = adapter(model)
    got = _identities(model, ad)
    _z_through_output_projection(model, ad, got)
    _causal_writes(model, ad)
    _perfect_reconstruction(model, ad)
    _blocks_and_discovery(model, ad)
    limit = _pattern_from_the_attention_call(model, ad)
    OUTCOMES[family] = ("passed", _describe(ad) + (f"; {limit}" if limit else ""))
    print(f"{family}: {time.perf_counter() - start:.1f} s")


def _describe(ad) -> str:
    a = ad.arch
    parts = [f"`{a.layers}`", "parallel" if a.parallel else "sequential"]
    if a.qkv != "separate":
        parts.append(f"fused qkv (`{a.q_proj}`, {a.qkv})")
    if a.n_kv_heads < a.n_heads:
        parts.append("GQA" if a.n_kv_heads > 1 else "MQA")
    if a.attn_post_norm or a.mlp_post_norm:
        parts.append("sandwich norms")
    if a.attn_norm is None:
        parts.append("no pre-attention norm")
    parts += [f.replace("_", "-") for f in a.features]
    return ", ".join(parts)


def render(outcomes: dict) -> str:
    count = {k: sum(o == k for o, _ in outcomes.values()) for k in
             ("passed", "refused", "multimodal", "no tiny model")}
    lines = [
        "# Architectures",
        "",
        "Generated by `tests/test_architectures.py` from the installed transformers' causal-LM",
        "families (`SAGE_NN_WRITE_DOCS=1 pytest tests/test_architectures.py` rewrites it; the",
        "test fails when this file is stale). Sites are derived from each model's own module",
        "tree and one probe forward (`sage_nn/model/architectures.py`), not from a per-family table.",
        f"Families of transformers {transformers.__version__}.",
        "",
        f"**{count['passed']} families pass** every check on a tiny random model built from",
        "their config: residual identities, causal writes, per-head z through the output",
        "projection summing to attn_out, exact reconstruction with a perfect SAE, patched",
        "blocks equal to full forwards, one discovery fit. "
        f"{count['refused']} are refused (with the reason a user sees, before weights load);",
        f"{count['multimodal']} are multimodal wrappers of a language model listed here;",
        f"{count['no tiny model']} cannot be built tiny from their config alone (untested).",
        "Mixture-of-experts MLPs are one `mlp_out` site (experts are not split).",
        "",
        "| family | outcome | structure, or why |",
        "|---|---|---|",
    ]
    for family, (outcome, detail) in sorted(outcomes.items()):
        lines.append(f"| `{family}` | {outcome} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current():
    if set(OUTCOMES) != set(FAMILIES):
        pytest.skip("run the whole matrix to check docs/architectures.md")
    assert sum(o == "passed" for o, _ in OUTCOMES.values()) >= 40
    text = render(OUTCOMES)
    if os.environ.get("SAGE_NN_WRITE_DOCS"):
        DOCS.write_text(text)
    version = f"Families of transformers {transformers.__version__}."
    if version not in DOCS.read_text():  # another transformers: other families, same checks
        pytest.skip(f"docs/architectures.md lists another transformers' families than "
                    f"{transformers.__version__}: rerun with SAGE_NN_WRITE_DOCS=1")
    assert DOCS.exists() and DOCS.read_text() == text, \
        "docs/architectures.md is stale: rerun with SAGE_NN_WRITE_DOCS=1"


@pytest.mark.parametrize("family, sizes", [
    ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16)),
    ("gpt2", dict(n_embd=48, n_head=3)),
    ("gpt_bigcode", dict(n_embd=48, n_head=3, multi_query=True)),
    ("gpt_neox", dict(hidden_size=48, num_attention_heads=3)),
])
def test_model_without_weights_is_derived_through_its_twin(family, sizes):
    """A remote model is here without weights (meta device): its structure comes from a tiny
    twin and its sizes from its own config and weight shapes; both must equal what the
    model with weights derives."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sage_nn.model.architectures import architecture_of, derive

    config = AutoConfig.for_model(family, num_hidden_layers=3, vocab_size=64, **sizes)
    with torch.device("meta"):
        remote = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    local = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert architecture_of(remote) == derive(local)
    assert derive(local).n_layers == 3
