"""The prompt-graph engine's options: the BOS convention against interventions, batch size and
memory budget (edges spilled to disk) leave the graph unchanged, int32 indices with old files
still loading, the feature budget."""

from __future__ import annotations

import json
import logging
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
from circuitgraph.attribution.prompt.edges import EdgeStore
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement import ReplacementModel, SpliceSpec
from dictionaries.site import Site

PROMPT = "When Mary and John went to the park, John gave a book to"
MIXED = [Site(0, "resid_post"), Site(1, "attn_z"), Site(1, "mlp_out"), Site(2, "transcoder"), Site(3, "attn_z")]
ALL = {"max_feature_nodes": 100_000, "progress": False}


@pytest.fixture(scope="module")
def both(model64, dicts64):
    """The same prompt's graph under both BOS conventions, float64."""
    rm = ReplacementModel(model64, {s: dicts64[s] for s in MIXED})
    tokens = model64.to_tokens(PROMPT)
    keep = attribute_prompt(rm, tokens, LinearAttributionConfig(**ALL))
    detach = attribute_prompt(rm, tokens, LinearAttributionConfig(bos="detach", **ALL))
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
        _, cache = model64.run_with_cache(tokens, names_filter=[s.output_hook for s in MIXED])
    bos = {s: cache[s.output_hook][:, :1].reshape(1, 1, -1) for s in MIXED}  # the plain model's BOS outputs
    return rm, tokens, clean, bos, keep, detach


def _value(rm, tokens, clean, node, zero=None, unspliced=None) -> float:
    """A target's value in the frozen model with source ``zero`` = (kind, site id, pos, index) zeroed;
    ``unspliced``: BOS outputs held at these values."""
    lat = {s: r.latents.clone() for s, r in clean.sites.items()}
    err = {s: r.errors.clone() for s, r in clean.sites.items()}
    embed = rm.model.embed(tokens).clone()
    if zero is not None:
        kind, site_id, pos, index = zero
        site = next((s for s in rm.sites if s.id == site_id), None)
        if kind == "feature":
            lat[site][0, pos, index] = 0
        elif kind == "error":
            err[site][0, pos] = 0
        else:
            embed[0, pos] = 0
    with torch.no_grad():
        run = rm.run(tokens, SpliceSpec(latents=lat, errors=err, embed=embed, frozen=clean.frozen,
                                         unspliced=unspliced or {}, record_active_values=True))
    if node.kind == "logit":
        row = run.logits[0, node.pos]
        return float(row[node.index] - row.mean())
    site = next(s for s in rm.sites if s.id == node.site)
    return float(run.sites[site].active_value[0, node.pos, node.index])


def _edges(g: Graph) -> dict[tuple[str, str], float]:
    ids = [n.id for n in g.nodes]
    return {(ids[s], ids[t]): w for s, t, w in zip(g.sources.tolist(), g.targets.tolist(), g.weights.tolist(), strict=True)}


def test_detach_edges_equal_interventions_with_bos_outputs_held(both):
    rm, tokens, clean, bos, _, g = both
    rng = random.Random(1)
    tok0 = g.index("tok@0")
    from_bos = (g.sources == tok0).nonzero().squeeze(1).tolist()
    big = (g.weights.abs() > 1e-3).nonzero().squeeze(1).tolist()
    kinds = set()
    for e in rng.sample(from_bos, 15) + rng.sample(big, 45):
        src, tgt = g.nodes[int(g.sources[e])], g.nodes[int(g.targets[e])]
        before = _value(rm, tokens, clean, tgt, unspliced=bos)
        after = _value(rm, tokens, clean, tgt, (src.kind, src.site, src.pos, src.index), unspliced=bos)
        w = float(g.weights[e])
        assert abs((before - after) - w) <= 1e-9 + 1e-7 * abs(w), (src.id, tgt.id, before - after, w)
        kinds.add(src.kind)
    assert kinds == {"token", "feature", "error"}


def test_keep_credits_the_bos_outputs_to_tok0(both):
    rm, tokens, clean, _, keep, detach = both
    a, b = _edges(keep), _edges(detach)
    others = [k for k in a if k[0] != "tok@0"]
    assert set(others) == {k for k in b if k[0] != "tok@0"} and {k for k in b if k[0] == "tok@0"} <= a.keys()
    assert max(abs(a[k] - b[k]) for k in others) <= 1e-9 * max(abs(a[k]) for k in others)
    # detached, a spliced residual site holds the whole BOS stream fixed: tok@0 then reaches few targets
    bos_diff = [abs(a[k] - b.get(k, 0.0)) for k in a if k[0] == "tok@0"]
    assert max(bos_diff) > 1e-2  # the BOS outputs matter, and only tok@0's edges carry them
    rng = random.Random(2)
    for source, target in rng.sample([k for k in a if k[0] == "tok@0"], 15):
        node = keep.node(target)
        effect = _value(rm, tokens, clean, node) - _value(rm, tokens, clean, node, ("token", None, 0, None))
        assert abs(effect - a[(source, target)]) <= 1e-9 + 1e-7 * abs(effect), (target, effect, a[(source, target)])


@pytest.mark.parametrize("which", ["keep", "detach"])
def test_incoming_edges_plus_bias_equal_activation(both, which):
    g = both[4] if which == "keep" else both[5]
    incoming = torch.zeros(g.n_nodes, dtype=torch.float64).index_add_(0, g.targets, g.weights.double())
    targets = ~torch.isnan(g.bias)
    total = incoming[targets] + g.bias[targets].double()
    act = g.activation[targets].double()
    assert int(targets.sum()) > 500
    assert (total - act).abs().max() <= 1e-9 * max(1.0, float(act.abs().max()))


def test_batch_size_and_spilled_edges_leave_the_graph_unchanged(model64, dicts64, tmp_path):
    rm = ReplacementModel(model64, {s: dicts64[s] for s in MIXED[:3]})
    tokens = model64.to_tokens(PROMPT)
    ref = attribute_prompt(rm, tokens, LinearAttributionConfig(batch_size=64, **ALL))
    one = attribute_prompt(rm, tokens, LinearAttributionConfig(batch_size=1, **ALL))
    spilled = attribute_prompt(rm, tokens, LinearAttributionConfig(batch_size=64, memory_mb=0.01,
                                                                   spill_dir=str(tmp_path), **ALL))
    assert spilled.metadata["edges_spilled"] and not ref.metadata["edges_spilled"]
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    for g in (spilled, ref):
        assert torch.equal(g.sources, ref.sources) and torch.equal(g.targets, ref.targets)
        assert torch.equal(g.weights, ref.weights)
    a, b = _edges(ref), _edges(one)
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-12 * max(abs(v) for v in a.values())


def test_feature_budget_is_ranked_stated_and_spills_alike(default_model, v1_dicts, caplog, tmp_path):
    sites = [s for s in v1_dicts if s.kind in ("attn_z", "transcoder")]
    rm = ReplacementModel(default_model, {s: v1_dicts[s] for s in sites})
    tokens = default_model.to_tokens(PROMPT)
    cfg = {"max_feature_nodes": 40, "rank_interval": 16, "batch_size": 8, "progress": False}
    with caplog.at_level(logging.WARNING):
        g = attribute_prompt(rm, tokens, LinearAttributionConfig(**cfg))
    active = g.metadata["n_active_features"]
    assert g.metadata["n_visited_features"] == 40 == sum(n.kind == "feature" for n in g.nodes)
    assert f"visiting 40 of {active} active features" in caplog.text
    spilled = attribute_prompt(rm, tokens, LinearAttributionConfig(memory_mb=0.01, spill_dir=str(tmp_path), **cfg))
    assert [n.id for n in spilled.nodes] == [n.id for n in g.nodes]  # the same ranking from spilled edges
    assert torch.equal(spilled.sources, g.sources) and torch.equal(spilled.weights, g.weights)


def test_edge_store_remaps_and_filters_alike_in_memory_and_on_disk(tmp_path):
    gen = torch.Generator().manual_seed(0)
    chunks = [(torch.randint(0, 50, (n,), generator=gen), torch.randint(50, 60, (n,), generator=gen),
               torch.randn(n, generator=gen)) for n in (7, 0, 30, 12)]
    new_index = torch.randperm(60, generator=gen)
    keep = torch.rand(60, generator=gen) > 0.3
    out = []
    for budget, slab in ((10**9, 1 << 24), (10**9, 8), (300, 8), (100, 8)):  # one slab, several, spilled late / early
        store = EdgeStore(budget, spill_dir=str(tmp_path), slab_edges=slab)
        for c in chunks:
            store.add(*c)
        assert store.spilled == (budget < 10**9) and store.n_edges == 49
        assert sum(c.sources.numel() for c in store.chunks(rows=5)) == 49
        out.append(store.finish(new_index, keep))
    store = EdgeStore(10**9)
    for c in chunks:
        store.add(*c)
    whole = store.finish(None, None)  # one slab, nothing remapped: the slab itself
    assert torch.equal(whole.sources.long(), torch.cat([c[0] for c in chunks]))
    src, tgt, w = (torch.cat(x) for x in zip(*chunks, strict=True))
    ok = keep[src]
    for edges in out:
        assert edges.sources.dtype == torch.int32
        assert torch.equal(edges.sources.long(), new_index[src[ok]]) and torch.equal(edges.targets.long(), new_index[tgt[ok]])
        assert torch.equal(edges.weights, w[ok])
    assert list(tmp_path.iterdir()) == []


def test_int32_indices_and_graphs_saved_with_int64_still_load(both, tmp_path):
    g = both[4]
    assert g.sources.dtype == g.targets.dtype == torch.int32
    g.save(tmp_path / "g")
    assert load_file(str(tmp_path / "g" / "graph.safetensors"))["sources"].dtype == torch.int32
    old = tmp_path / "old"  # a plain folder as older releases wrote it: int64 indices, no manifest
    old.mkdir()
    shutil.copy(tmp_path / "g" / "graph.json", old / "graph.json")
    tensors = load_file(str(tmp_path / "g" / "graph.safetensors"))
    tensors["sources"], tensors["targets"] = tensors["sources"].long(), tensors["targets"].long()
    save_file(tensors, str(old / "graph.safetensors"))
    assert json.loads((old / "graph.json").read_text())["format_version"] == 1
    h = Graph.load(old)
    assert h.sources.dtype == torch.int32 and torch.equal(h.sources, g.sources) and torch.equal(h.targets, g.targets)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="bos must be keep or detach"):
        LinearAttributionConfig(bos="drop")
    with pytest.raises(ValueError, match="memory_mb"):
        LinearAttributionConfig(memory_mb=-1)
    with pytest.raises(ValueError, match="rank_interval"):
        LinearAttributionConfig(rank_interval=0)
