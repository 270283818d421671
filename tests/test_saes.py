import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from sae_lens import (SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,  # noqa: E402
                      StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from sage_nn.model.loading import tiny_random_model
from sage_nn.dictionaries.saes import SAEMismatchError, SparseAutoencoder, check_sae, from_sae_lens, load_sae
from sage_nn.model.sites import parse_site

D_IN, D_SAE = 32, 96


def _randomise(sae, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1.0))
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.abs_()
    return sae


def _sae(arch, hook="blocks.1.hook_resid_pre", seed=0, **cfg):
    meta = SAEMetadata(hook_name=hook)
    classes = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
               "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "gated": (GatedSAE, GatedSAEConfig)}
    cls, cfg_cls = classes[arch]
    if arch == "topk":
        cfg.setdefault("k", 7)
    return _randomise(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=meta, **cfg)), seed)


CASES = [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("standard", {"normalize_activations": "constant_norm_rescale"}),
    ("topk", {}), ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}), ("jumprelu", {"normalize_activations": "layer_norm"}),
    ("gated", {}), ("gated", {"apply_b_dec_to_input": False}),
]


@pytest.mark.parametrize("arch,cfg", CASES, ids=[f"{a}-{'-'.join(map(str, c.values())) or 'default'}"
                                                  for a, c in CASES])
def test_plain_module_reproduces_sae_lens(arch, cfg):
    ref = _sae(arch, **cfg)
    ours = from_sae_lens(ref)
    x = torch.randn(5, 11, D_IN) * 3 + 1
    with torch.no_grad():
        codes_ref = ref.encode(x)
        recon_ref = ref.decode(codes_ref)
        codes = ours.encode(x)
        recon = ours.decode(codes, x)
    assert codes.shape == (5, 11, D_SAE)
    assert (codes != 0).any() and (codes == 0).any()  # sparse, not trivial
    torch.testing.assert_close(codes, codes_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, recon_ref, rtol=1e-4, atol=1e-4)  # float rounding of the norm
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_normalising_sae_needs_input_to_decode():
    ours = from_sae_lens(_sae("standard", normalize_activations="layer_norm"))
    with pytest.raises(ValueError, match=r"pass the input, decode\(codes, x\)"):
        ours.decode(torch.zeros(2, D_SAE))


def test_centred_sae_adds_the_mean_back():
    ref = _sae("standard")
    ref.cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": True}
    ours = from_sae_lens(ref)
    assert ours.center
    x = torch.randn(4, D_IN) + 5.0  # a large mean, which TransformerLens would have removed
    mean = x.mean(-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x - mean))
        torch.testing.assert_close(ours(x), ref(x - mean) + mean)


def test_save_and_load_from_disk_roundtrip(tmp_path):
    ref = _sae("topk", hook="blocks.1.hook_mlp_out", rescale_acts_by_decoder_norm=True)
    ref.save_model(tmp_path / "sae")
    model = tiny_random_model("llama")
    ours = load_sae(tmp_path / "sae", model=model)
    assert (ours.layer, ours.kind, ours.architecture, ours.k) == (1, "mlp_out", "topk", 7)
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    # the loaded state is also what sae_lens itself reads back
    with torch.no_grad():
        torch.testing.assert_close(SAE.load_from_disk(tmp_path / "sae")(x), ref(x))


def test_from_pretrained_offline_fails_clearly():
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1.*load_sae\\(path\\)"):
        load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def test_missing_directory_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sae_lens SAE directory"):
        load_sae(tmp_path)


@pytest.mark.parametrize("name,expected", [
    ("blocks.8.hook_resid_pre", (8, "resid_pre", None)),
    ("blocks.3.hook_resid_mid", (3, "resid_mid", None)),
    ("blocks.3.hook_resid_post", (3, "resid_post", None)),
    ("blocks.2.hook_attn_out", (2, "attn_out", None)),
    ("blocks.2.hook_mlp_out", (2, "mlp_out", None)),
    ("blocks.4.attn.hook_z", (4, "z", None)),
    ("L4.z.h2", (4, "z", [2])),
    ("model.layers.6", (6, "resid_post", None)),
    ("model.layers.6.mlp", (6, "mlp_out", None)),
    ("model.layers.6.self_attn.o_proj.input", (6, "z", None)),
    ("model.layers.6.post_attention_layernorm.input", (6, "resid_mid", None)),
    ("transformer.h.1.attn", (1, "attn_out", None)),
    ("gpt_neox.layers.0.mlp.output", (0, "mlp_out", None)),
])
def test_parse_site_names(name, expected):
    assert parse_site(name) == expected


def test_parse_site_with_model_fills_heads_and_post_norms():
    llama = tiny_random_model("llama")
    assert parse_site("blocks.1.attn.hook_z", llama) == (1, "z", [0, 1, 2, 3])
    assert parse_site("blocks.1.attn.hook_k", llama) == (1, "k", [0, 1])  # GQA: KV heads
    gemma = tiny_random_model("gemma2")
    assert parse_site("model.layers.1.post_feedforward_layernorm", gemma) == (1, "mlp_out", None)
    with pytest.raises(ValueError, match="cannot map 'blocks.1.hook_embed'"):
        parse_site("blocks.1.hook_embed")


def test_mismatched_width_fails_before_any_forward():
    model = tiny_random_model("llama")
    sae = SparseAutoencoder(torch.zeros(48, 8), torch.zeros(8), torch.zeros(8, 48), torch.zeros(48),
                            layer=0, kind="resid_pre")
    with pytest.raises(SAEMismatchError, match="d_in=48 does not match site L0.resid_pre.*= 32"):
        check_sae(sae, model)
    far = SparseAutoencoder(torch.zeros(32, 8), torch.zeros(8), torch.zeros(8, 32), torch.zeros(32),
                            layer=9, kind="resid_pre")
    with pytest.raises(SAEMismatchError, match="layer 9 out of range"):
        check_sae(far, model)
    neox = tiny_random_model("gpt_neox")
    mid = SparseAutoencoder(torch.zeros(32, 8), torch.zeros(8), torch.zeros(8, 32), torch.zeros(32),
                            layer=0, kind="resid_mid")
    with pytest.raises(SAEMismatchError, match="no resid_mid"):
        check_sae(mid, neox)
    z = from_sae_lens(_sae("standard", hook="blocks.1.attn.hook_z"), model=model)
    assert z.heads == [0, 1, 2, 3]  # 4 heads x d_head 8 = 32


def test_sae_without_site_message():
    ref = _sae("standard", hook=None)
    with pytest.raises(SAEMismatchError, match="pass site="):
        from_sae_lens(ref, model=tiny_random_model("llama"))
    assert from_sae_lens(ref, site="L1.resid_post", model=tiny_random_model("llama")).kind == \
        "resid_post"
