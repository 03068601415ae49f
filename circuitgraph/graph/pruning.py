"""Graph-level wrappers of the pure functions in :mod:`circuitgraph.graph.influence`."""

from __future__ import annotations

import torch

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import GraphScores, graph_scores, prune


def _kinds(g: Graph, *kinds: str) -> torch.Tensor:
    return torch.tensor([n.kind in kinds for n in g.nodes], dtype=torch.bool)


def prune_graph(g: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98, max_nodes: int | None = None,
                max_edges: int | None = None) -> Graph:
    """Keep features / components up to ``node_threshold`` of cumulative influence (at most
    ``max_nodes``), then edges up to ``edge_threshold`` (at most ``max_edges``, the most influential);
    tokens, errors and outputs are kept while they touch a kept edge. Node influence is stored in
    ``metadata['influence']`` order-aligned."""
    res = prune(g.sources, g.targets, g.weights, g.target_weights, _kinds(g, "feature", "component"),
                node_threshold, edge_threshold, max_nodes, max_edges)
    out = g.subgraph(res.node_mask, res.edge_mask)
    out.metadata.update({"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                         "pruned_from_nodes": g.n_nodes, "pruned_from_edges": g.n_edges})
    if max_edges is not None:
        out.metadata["max_edges"] = max_edges
    out.metadata["influence"] = res.node_influence[res.node_mask].tolist()
    return out


def scores_of(g: Graph) -> GraphScores:
    """Circuit-tracer's replacement and completeness scores of ``g``."""
    return graph_scores(g.sources, g.targets, g.weights, g.target_weights, _kinds(g, "token"), _kinds(g, "error"))
