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
