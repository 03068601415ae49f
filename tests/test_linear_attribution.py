"""Direct linear attribution: edges equal interventions; incoming edges + bias = activation."""

from __future__ import annotations

import random

import pytest
import torch

from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement import ReplacementModel, SpliceSpec
from dictionaries.site import Site

PROMPT = "When Mary and John went to the park, John gave a book to"
# every site kind at least once, one dictionary per output hook
MIXED = [Site(0, "resid_post"), Site(1, "attn_z"), Site(1, "mlp_out"), Site(2, "transcoder"), Site(2, "attn_z"),
         Site(3, "resid_post")]


def _frozen_value(rm: ReplacementModel, tokens, clean, node, source, source_pos, which: str) -> float:
    """Re-run the frozen model with one source zeroed and return the target's value."""
    lat = {s: r.latents.clone() for s, r in clean.sites.items()}
    err = {s: r.errors.clone() for s, r in clean.sites.items()}
    embed = rm.model.embed(tokens).clone()
    if which == "feature":
        lat[source[0]][0, source_pos, source[1]] = 0
    elif which == "error":
        err[source[0]][0, source_pos] = 0
    elif which == "token":
        embed[0, source_pos] = 0
    with torch.no_grad():
        run = rm.run(tokens, SpliceSpec(latents=lat, errors=err, embed=embed, frozen=clean.frozen,
                                         record_active_values=True))
    if node.kind == "logit":
        row = run.logits[0, node.pos]
        return float(row[node.index] - row.mean())
    site = next(s for s in rm.sites if s.id == node.site)
    return float(run.sites[site].active_value[0, node.pos, node.index])


@pytest.fixture(scope="module")
def mixed64(model64, dicts64):
    rm = ReplacementModel(model64, {s: dicts64[s] for s in MIXED})
    tokens = model64.to_tokens(PROMPT)
    graph = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=100_000, progress=False))
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    return rm, tokens, graph, clean


def test_edges_equal_interventions(mixed64):
    rm, tokens, g, clean = mixed64
    rng = random.Random(0)
    big = (g.weights.abs() > 1e-3).nonzero().squeeze(1).tolist()
    checked = {"feature": 0, "error": 0, "token": 0}
    for e in rng.sample(big, 60):
        src, tgt = g.nodes[int(g.sources[e])], g.nodes[int(g.targets[e])]
        site = next((s for s in rm.sites if s.id == src.site), None)
        source = (site, src.index)
        before = _frozen_value(rm, tokens, clean, tgt, source, src.pos, "none")
        after = _frozen_value(rm, tokens, clean, tgt, source, src.pos, src.kind)
        w = float(g.weights[e])
        assert abs((before - after) - w) <= 1e-4 * abs(w), (src.id, tgt.id, before - after, w)
        checked[src.kind] += 1
    assert all(v > 0 for v in checked.values()), checked


def test_incoming_edges_plus_bias_equal_activation(mixed64):
    _, _, g, _ = mixed64
    incoming = torch.zeros(g.n_nodes, dtype=torch.float64).index_add_(0, g.targets, g.weights.double())
    targets = ~torch.isnan(g.bias)
    assert int(targets.sum()) > 100
    total = incoming[targets] + g.bias[targets].double()
    act = g.activation[targets].double()
    assert (total - act).abs().max() <= 1e-4 * max(1.0, float(act.abs().max()))


def test_every_site_kind_has_edges(mixed64):
    _, _, g, _ = mixed64
    kinds = {g.nodes[int(s)].site.split(".")[1] for s in g.sources if g.nodes[int(s)].kind == "feature"}
    assert kinds == {"resid_post", "attn_z", "mlp_out", "transcoder"}


def test_float32_graph_and_budget(default_model, v1_dicts):
    sites = [s for s in v1_dicts if s.kind in ("attn_z", "transcoder")]
    rm = ReplacementModel(default_model, {s: v1_dicts[s] for s in sites})
    tokens = default_model.to_tokens(PROMPT)
    g = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=50, batch_size=16, progress=False))
    n_feat = sum(n.kind == "feature" for n in g.nodes)
    assert n_feat == 50 == g.metadata["n_visited_features"]
    assert {n.kind for n in g.nodes} == {"token", "feature", "error", "logit"}
    # the visited features are the most influential ones: every one reaches a logit
    logit_idx = [i for i, n in enumerate(g.nodes) if n.kind == "logit"]
    assert abs(float(g.target_weights[logit_idx].sum()) - 1) < 0.06
    assert abs(float(g.target_weights.sum()) - float(g.target_weights[logit_idx].sum())) < 1e-9


def test_metric_target(default_model, v1_dicts):
    sites = [s for s in v1_dicts if s.kind == "resid_post"]
    rm = ReplacementModel(default_model, {s: v1_dicts[s] for s in sites})
    tokens = default_model.to_tokens(PROMPT)
    mary, john = default_model.to_single_token(" Mary"), default_model.to_single_token(" John")
    metric = MetricTarget.logit_diff([mary], [john], default_model.cfg.d_vocab)
    g = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=200, progress=False), metric=metric)
    i = g.index("metric:logit_diff")
    with torch.no_grad():
        logits = default_model(tokens)[0, -1]
    assert abs(float(g.activation[i]) - float(logits[mary] - logits[john])) < 1e-4
    assert float(g.target_weights[i]) == 1.0
    incoming = float(g.weights[g.targets == i].sum()) + float(g.bias[i])
    assert abs(incoming - float(g.activation[i])) < 1e-3


def test_graph_round_trip(mixed64, tmp_path):
    _, _, g, _ = mixed64
    g.save(tmp_path / "g")
    h = Graph.load(tmp_path / "g")
    assert [n.id for n in h.nodes] == [n.id for n in g.nodes]
    assert torch.equal(h.sources, g.sources) and torch.equal(h.targets, g.targets)
    assert torch.allclose(h.weights, g.weights.float())
    assert torch.allclose(h.bias, g.bias.float(), equal_nan=True)
    nxg = h.to_networkx()
    assert nxg.number_of_nodes() == g.n_nodes and nxg.number_of_edges() == g.n_edges
