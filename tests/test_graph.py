"""Graph maths on hand-built graphs with exact answers; persistence; queries; bad input."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import cumulative_keep, graph_scores, influence, normalised_adjacency
from circuitgraph.graph.nodes import Node, parse_node_id
from circuitgraph.graph.pruning import prune_graph


def toy_graph() -> Graph:
    """tok@0 -> f1 (2.0), tok@0 -> f2 (1.0), err -> f2 (1.0), f1 -> logit (3.0), f2 -> logit (-1.0)."""
    nodes = [Node("token", -1, pos=0), Node("error", 0.5, "L0.resid_post", pos=1),
             Node("feature", 0.5, "L0.resid_post", 1, 1), Node("feature", 1.5, "L1.resid_post", 2, 1),
             Node("logit", 2, index=7, pos=1)]
    src = torch.tensor([0, 0, 1, 2, 3])
    tgt = torch.tensor([2, 3, 3, 4, 4])
    w = torch.tensor([2.0, 1.0, 1.0, 3.0, -1.0])
    return Graph(nodes, torch.tensor([0.0, 0.5, 2.0, 2.0, 4.0]), src, tgt, w, torch.tensor([0, 0, 0, 0, 1.0]),
                 labels=["<bos>", "error", "", "", " x"])


def test_influence_exact():
    g = toy_graph()
    a = normalised_adjacency(g.sources, g.targets, g.weights, g.n_nodes)
    dense = a.to_dense()
    assert torch.allclose(dense[4, 2], torch.tensor(0.75, dtype=torch.float64))
    inf = influence(a, g.target_weights)
    # f1: 0.75; f2: 0.25; err: 0.25 * 0.5; tok: 0.75 * 1 + 0.25 * 0.5
    expected = torch.tensor([0.875, 0.125, 0.75, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(inf, expected)


def test_graph_scores_exact():
    g = toy_graph()
    s = graph_scores(g.sources, g.targets, g.weights, g.target_weights,
                     torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool), torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool))
    assert abs(s.replacement - 0.875 / (0.875 + 0.125)) < 1e-9
    # circuit-tracer's formula, every node: tok (.875) and err (.125) have no inputs and count as explained,
    # f1 (.75, no error input), f2 (.25, half error), logit (output weight 1, none)
    assert abs(s.completeness - (0.875 + 0.125 + 0.75 + 0.25 * 0.5 + 1.0) / 3.0) < 1e-9
    # ours, nodes with inputs only
    assert abs(s.completeness_inputs_only - (0.75 + 0.25 * 0.5 + 1.0) / 2.0) < 1e-9


def test_cumulative_keep():
    keep = cumulative_keep(torch.tensor([0.1, 0.5, 0.3, 0.1]), 0.8)
    assert keep.tolist() == [False, True, True, False]


def test_prune_drops_weak_feature():
    g = prune_graph(toy_graph(), node_threshold=0.7, edge_threshold=1.0)
    ids = [n.id for n in g.nodes]
    assert "L0.resid_post#1@1" in ids and "L1.resid_post#2@1" not in ids
    assert "logit#7@1" in ids and g.n_edges == 2


def test_queries():
    g = toy_graph()
    up = g.upstream("logit#7@1")
    assert [r.node for r in up] == ["L0.resid_post#1@1", "L1.resid_post#2@1"]
    assert up[0].weight == 3.0 and up[1].weight == -1.0 and up[0].hops == 1
    deep = g.upstream("logit#7@1", depth=2)
    assert {r.node for r in deep if r.hops == 2} == {"tok@0", "L0.resid_post#err@1"}
    tok = next(r for r in deep if r.node == "tok@0")
    assert abs(tok.weight - 0.875) < 1e-9
    assert [r.node for r in g.downstream("tok@0")] == ["L0.resid_post#1@1", "L1.resid_post#2@1"]
    assert [r.node for r in g.upstream("logit#7@1", layer=1)] == ["L1.resid_post#2@1"]
    top = g.top_features("logit#7@1", k=1)
    assert top[0].node == "L0.resid_post#1@1" and abs(top[0].weight - 0.75) < 1e-9
    p = g.paths("tok@0", "logit#7@1", k=2)
    assert p[0].nodes == ["tok@0", "L0.resid_post#1@1", "logit#7@1"] and abs(p[0].weight - 0.75) < 1e-9
    assert len(p) == 2


def test_node_ids_round_trip():
    for n in toy_graph().nodes + [Node("metric", 3, name="logit_diff"), Node("component", 1, "L1.head2", pos=4)]:
        fields = parse_node_id(n.id)
        assert fields["kind"] == n.kind
        assert fields.get("pos") == n.pos


def test_unknown_and_malformed_node_ids():
    g = toy_graph()
    with pytest.raises(CircuitGraphError, match="not in this graph.*L0.resid_post#1@1"):
        g.upstream("L0.resid_post#1@5")
    with pytest.raises(CircuitGraphError, match="cannot parse node id"):
        g.upstream("feature 12")


def test_corrupt_graph_files(tmp_path):
    g = toy_graph()
    g.save(tmp_path / "g")
    h = Graph.load(tmp_path / "g")
    assert h.labels == g.labels and torch.equal(h.weights, g.weights)
    data = (tmp_path / "g" / "graph.safetensors").read_bytes()
    (tmp_path / "g" / "graph.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CircuitGraphError, match="does not match its recorded digest"):
        Graph.load(tmp_path / "g")
    (tmp_path / "g" / "manifest.json").unlink()  # a folder without a manifest (an older release's)
    with pytest.raises(CircuitGraphError, match="corrupt or truncated"):
        Graph.load(tmp_path / "g")
    with pytest.raises(CircuitGraphError, match="missing"):
        Graph.load(tmp_path / "nowhere")
    (tmp_path / "g" / "graph.json").write_text("{not json")
    with pytest.raises(CircuitGraphError, match="corrupt"):
        Graph.load(tmp_path / "g")


def test_sparse_storage_never_dense():
    n = 20_000
    src = torch.randint(0, n, (50_000,))
    tgt = torch.randint(0, n, (50_000,))
    a = normalised_adjacency(src, tgt, torch.rand(50_000), n)
    assert a.layout == torch.sparse_csr and a.values().numel() <= 50_000


def test_influence_of_edges_equals_the_sparse_series_even_with_duplicate_edges() -> None:
    from circuitgraph.graph.influence import influence_of_edges

    g = torch.Generator().manual_seed(0)
    n = 300
    src = torch.randint(0, n - 10, (4000,), generator=g)
    tgt = src + torch.randint(1, 10, (4000,), generator=g)  # acyclic: edges point forward
    src, tgt = torch.cat([src, src[:500]]), torch.cat([tgt, tgt[:500]])  # 500 duplicated pairs
    w = torch.randn(src.numel(), generator=g)
    out = torch.zeros(n)
    out[-5:] = torch.rand(5, generator=g)
    ref = influence(normalised_adjacency(src, tgt, w, n), out)
    torch.testing.assert_close(influence_of_edges(src, tgt, w, out), ref, rtol=1e-12, atol=1e-14)
    assert float(ref.abs().max()) > 0.01
