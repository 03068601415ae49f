"""Site: the one place hook names are built."""

from __future__ import annotations

import pytest

from dictionaries.site import Site, expand_sites


def test_hook_names_and_ids(default_model) -> None:
    assert Site(2, "resid_post").input_hook == "blocks.2.hook_resid_post"
    tc = Site(1, "transcoder")
    assert (tc.input_hook, tc.output_hook) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    assert Site(3, "attn_z").widths(default_model.cfg) == (128, 128)
    assert Site(0, "mlp_post").widths(default_model.cfg) == (512, 512)
    for layer in range(4):
        for kind in ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_z", "mlp_post", "transcoder"):
            site = Site(layer, kind)
            assert site.input_hook in default_model.hook_dict and site.output_hook in default_model.hook_dict
            assert Site.parse(site.id) == site


def test_expand_and_errors() -> None:
    assert expand_sites("resid,attn", "1-2", 4) == [Site(1, "resid_post"), Site(1, "attn_z"), Site(2, "resid_post"), Site(2, "attn_z")]
    with pytest.raises(ValueError, match="cannot parse site id"):
        Site.parse("layer2-resid")
    with pytest.raises(ValueError, match="cannot parse layers"):
        expand_sites("resid_post", "one", 4)


def test_from_hook_inverts_the_hook_names() -> None:
    for layer in (0, 11):
        for kind in ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_z", "mlp_post", "transcoder"):
            site = Site(layer, kind)
            assert Site.from_hook(site.input_hook, site.output_hook) == site
            if not site.is_transcoder:
                assert Site.from_hook(site.input_hook) == site
    with pytest.raises(ValueError, match="hook hook_embed is not a site; dictionaries here read one of blocks.L.hook_resid_pre"):
        Site.from_hook("hook_embed")
    with pytest.raises(ValueError, match="transcoder reading blocks.2.hook_mlp_in and writing blocks.2.hook_mlp_out is not a site"):
        Site.from_hook("blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out")
    with pytest.raises(ValueError, match="the transcoder site reading blocks.2.ln2.hook_normalized writes blocks.2.hook_mlp_out"):
        Site.from_hook("blocks.2.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    with pytest.raises(ValueError, match="the transcoder site reading blocks.2.ln2.hook_normalized writes"):
        Site.from_hook("blocks.2.ln2.hook_normalized")  # an SAE of the normalised MLP input is no site
