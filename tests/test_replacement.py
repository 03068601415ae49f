"""The replacement model reproduces the original forward pass; frozen runs stay exact."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement import ReplacementModel, SpliceSpec
from dictionaries.site import Site

MIXES = [("attn_z", "transcoder"), ("resid_post",), ("attn_z", "mlp_out", "resid_post")]


def _pick(dicts, kinds):
    return {s: d for s, d in dicts.items() if s.kind in kinds}


@pytest.mark.parametrize("kinds", MIXES)
def test_spliced_forward_reproduces_logits(default_model, v1_dicts, kinds):
    rm = ReplacementModel(default_model, _pick(v1_dicts, kinds))
    tokens = default_model.to_tokens(["When Mary and John went to the park, John gave a book to", "The keys"])
    with torch.no_grad():
        clean = default_model(tokens)
        run = rm.run(tokens, record_frozen=True)
        # every site a leaf: output = decode(latents) + error, with frozen patterns / scales / gates
        spec = SpliceSpec(latents={s: r.latents for s, r in run.sites.items()},
                          errors={s: r.errors for s, r in run.sites.items()}, frozen=run.frozen)
        leaf = rm.run(tokens, spec)
    assert (run.logits - clean).abs().max() <= 1e-5
    assert (leaf.logits - clean).abs().max() <= 1e-4  # float32 rounding of decode + (x - decode)
    assert all(bool((r.latents > 0).any()) for r in run.sites.values())


def test_leaf_forward_exact_in_float64(model64, dicts64):
    rm = ReplacementModel(model64, _pick(dicts64, MIXES[2]))
    tokens = model64.to_tokens("The box on the tables is")
    with torch.no_grad():
        clean = model64(tokens)
        run = rm.run(tokens, record_frozen=True)
        spec = SpliceSpec(latents={s: r.latents for s, r in run.sites.items()},
                          errors={s: r.errors for s, r in run.sites.items()}, frozen=run.frozen)
        assert (rm.run(tokens, spec).logits - clean).abs().max() <= 1e-10


def test_ablating_a_feature_changes_output_by_its_decoder_row(default_model, v1_dicts):
    site = Site(2, "resid_post")
    rm = ReplacementModel(default_model, {site: v1_dicts[site]})
    tokens = default_model.to_tokens("The keys to the cabinet are")
    seen = {}
    with torch.no_grad():
        run = rm.run(tokens)
        lat = run.sites[site].latents[0, 3]
        f = int(lat.argmax())

        def edit(s, x):
            x = x.clone()
            x[0, 3, f] = 0
            return x

        with rm.spliced(SpliceSpec(edit_latents=edit)), default_model.hooks(
                fwd_hooks=[(site.output_hook, lambda a, hook: seen.setdefault("x", a.clone()))]):
            default_model(tokens)
        ref = {}
        with default_model.hooks(fwd_hooks=[(site.output_hook, lambda a, hook: ref.setdefault("x", a.clone()))]):
            default_model(tokens)
    d = v1_dicts[site]
    expected = ref["x"][0, 3] - lat[f] * d.decoder_directions()[f]
    assert torch.allclose(seen["x"][0, 3], expected, atol=1e-4)


def test_two_dictionaries_on_one_output_are_refused(default_model, v1_dicts):
    with pytest.raises(CircuitGraphError, match="both replace"):
        ReplacementModel(default_model, _pick(v1_dicts, ("mlp_out", "transcoder")))


def test_too_long_prompt_is_refused(default_model, v1_dicts):
    rm = ReplacementModel(default_model, _pick(v1_dicts, ("resid_post",)))
    with pytest.raises(CircuitGraphError, match="context"):
        rm.run(torch.zeros(1, default_model.cfg.n_ctx + 1, dtype=torch.long))
