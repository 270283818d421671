"""sae_lens/TransformerLens hook names are site names: ``Site.parse`` reads them and
``Site.hook_name`` writes them."""

import pytest

from sage_nn.model.sites import KINDS, Site


@pytest.mark.parametrize("hook, site", [
    ("blocks.8.hook_resid_post", "L8.resid_post"),
    ("blocks.8.hook_resid_pre", "L8.resid_pre"),
    ("blocks.8.hook_resid_mid", "L8.resid_mid"),
    ("blocks.8.hook_attn_out", "L8.attn_out"),
    ("blocks.8.hook_mlp_out", "L8.mlp_out"),
    (" blocks.12.hook_resid_post ", "L12.resid_post"),
])
def test_hook_names_parse_to_sites(hook, site):
    assert Site.parse(hook) == Site.parse(site)
    assert Site.parse(site).hook_name == hook.strip()


def test_sage_names_still_parse():
    assert Site.parse("L8.resid_post") == Site(8, "resid_post")
    assert Site.parse("L9.z.h3") == Site(9, "z", 3)


def test_every_kind_has_a_hook_name_that_parses_back_or_says_how():
    for kind in KINDS:
        site = Site(3, kind, 0 if kind in ("q", "k", "v", "z") else None)
        if site.head is None:
            assert Site.parse(site.hook_name) == site
        else:  # one hook holds every head; the site is one of them
            assert site.hook_name == f"blocks.3.attn.hook_{kind}"


def test_all_heads_hook_is_not_one_site_and_the_error_names_the_fix():
    with pytest.raises(ValueError, match=r"every head of layer 8.*L8\.z\.hN"):
        Site.parse("blocks.8.attn.hook_z")


def test_unknown_hooks_and_junk_are_explained():
    with pytest.raises(ValueError, match=r"unknown hook 'hook_embed'"):
        Site.parse("blocks.8.hook_embed")
    with pytest.raises(ValueError, match=r"cannot parse site 'layer8'.*blocks\.9\.hook_resid_pre"):
        Site.parse("layer8")
