"""The views a viewer page offers: one graph pruned at several strengths.

A view is :func:`circuitgraph.graph.pruning.prune_graph` of the whole graph at a node threshold,
an edge threshold (cumulative influence on the outputs, as in circuit-tracer) and a cap on the
number of edges (the most influential). The sparse views keep circuit-tracer's thresholds 0.8 /
0.98 with fewer edges; :data:`CT_VIEW` has at most ``max_edges``; denser views raise both. The page
opens on the densest view up to :data:`CT_VIEW` whose labels are readable in a 1400 x 900 window
(:func:`circuitgraph.viewer.page_data.page_data` decides); its detail control steps through the
others without reloading. Only the nodes and edges some view shows travel in the page,
so a graph of thousands of nodes and hundreds of thousands of edges yields a page of at most
``MAX_FACTOR * max_edges`` edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import influence, normalised_adjacency, prune
from circuitgraph.graph.nodes import Node

MAX_FACTOR = 10
"""The densest view shows at most this many times ``max_edges`` edges."""


@dataclass(frozen=True)
class ViewSpec:
    """One pruning of the graph the page can show."""

    node_threshold: float
    """Features kept up to this fraction of cumulative influence."""
    edge_threshold: float
    """Edges kept up to this fraction of cumulative edge influence."""
    max_edges: int
    """At most this many edges, the most influential."""


CT_VIEW = 3
"""Index in :func:`view_specs` of circuit-tracer's thresholds with at most ``max_edges`` edges: the
densest view a page may open on."""


def view_specs(max_edges: int = 500) -> list[ViewSpec]:
    """The page's views from sparsest to densest; :data:`CT_VIEW` is circuit-tracer's thresholds
    with ``max_edges`` edges, the ones before it the same thresholds with a tenth, a fifth and half
    as many."""
    if max_edges < 1:
        raise ValueError(f"max_edges {max_edges}: show at least one edge")
    m = max_edges
    return [ViewSpec(0.8, 0.98, max(1, m // 10)), ViewSpec(0.8, 0.98, max(1, m // 5)), ViewSpec(0.8, 0.98, max(1, m // 2)),
            ViewSpec(0.8, 0.98, m), ViewSpec(0.8, 0.98, 2 * m), ViewSpec(0.9, 0.99, 4 * m),
            ViewSpec(0.95, 0.995, MAX_FACTOR * m), ViewSpec(1.0, 1.0, MAX_FACTOR * m)]


@dataclass
class PageViews:
    """Which nodes and edges of a graph each view shows."""

    specs: list[ViewSpec]
    """The views, sparsest first."""
    node_index: list[int]
    """Graph index of every node some view shows (ascending): the page's node table."""
    node_views: list[int]
    """Per page node, a bit mask of the views showing it (bit ``v`` for view ``v``)."""
    edge_index: list[int]
    """Graph index of every edge some view shows (ascending): the page's edge table."""
    edge_views: list[int]
    """Per page edge, a bit mask of the views showing it."""
    influence: torch.Tensor
    """``[N]`` every graph node's influence on the outputs."""
    pinned: list[bool]
    """Per page node, whether every view draws it (:func:`pinned`), kept by the view or not."""

    def nodes_of(self, view: int) -> list[int]:
        """Page node indices ``view`` keeps (its pruning)."""
        return [p for p, m in enumerate(self.node_views) if m >> view & 1]

    def drawn_of(self, view: int) -> list[int]:
        """Page node indices ``view`` draws: the ones it keeps and the pinned ones."""
        return [p for p, m in enumerate(self.node_views) if m >> view & 1 or self.pinned[p]]

    def edges_of(self, view: int) -> list[int]:
        """Page edge indices shown by ``view``."""
        return [q for q, m in enumerate(self.edge_views) if m >> view & 1]


def node_influence(g: Graph) -> torch.Tensor:
    """``[N]`` influence of every node of ``g`` on its outputs (0 without edges)."""
    if g.n_edges == 0:
        return torch.zeros(g.n_nodes, dtype=torch.float64)
    return influence(normalised_adjacency(g.sources, g.targets, g.weights, g.n_nodes), g.target_weights)


def pinned(node: Node) -> bool:
    """Whether every view draws ``node``: a prompt's tokens (the whole prompt stays readable along
    the bottom) and the output tokens (with the model's probabilities on top), kept or not."""
    return (node.kind == "token" and node.pos is not None) or node.kind == "logit"


def compute_views(g: Graph, specs: list[ViewSpec], max_nodes: int | None = None) -> PageViews:
    """Prune ``g`` once per view (at most ``max_nodes`` features or components in any view); the
    page holds every node some view keeps and the :func:`pinned` ones."""
    prunable = torch.tensor([n.kind in ("feature", "component") for n in g.nodes], dtype=torch.bool)
    node_bits = torch.zeros(g.n_nodes, dtype=torch.long)
    edge_bits = torch.zeros(g.n_edges, dtype=torch.long)
    inf = None
    for v, s in enumerate(specs):
        res = prune(g.sources, g.targets, g.weights, g.target_weights, prunable, s.node_threshold, s.edge_threshold,
                    max_nodes, s.max_edges)
        node_bits[res.node_mask] |= 1 << v
        edge_bits[res.edge_mask] |= 1 << v
        inf = res.node_influence
    pin = torch.tensor([pinned(n) for n in g.nodes], dtype=torch.bool)
    nodes = ((node_bits != 0) | pin).nonzero().squeeze(1)
    edges = edge_bits.nonzero().squeeze(1)
    return PageViews(list(specs), nodes.tolist(), node_bits[nodes].tolist(), edges.tolist(), edge_bits[edges].tolist(),
                     inf if inf is not None else node_influence(g), pin[nodes].tolist())


def view_graph(g: Graph, views: PageViews, view: int) -> Graph:
    """The subgraph of ``g`` that ``view`` shows (equal to ``prune_graph`` at that view's spec)."""
    keep_n = torch.zeros(g.n_nodes, dtype=torch.bool)
    keep_n[torch.tensor([views.node_index[p] for p in views.nodes_of(view)], dtype=torch.long)] = True
    keep_e = torch.zeros(g.n_edges, dtype=torch.bool)
    keep_e[torch.tensor([views.edge_index[q] for q in views.edges_of(view)], dtype=torch.long)] = True
    return g.subgraph(keep_n, keep_e)
