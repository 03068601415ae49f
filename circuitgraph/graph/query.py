"""Questions a researcher asks of a graph: what drives X, what does X drive, through which paths.

Every function returns typed rows (:class:`QueryRow`, :class:`PathRow`) and takes node ids.
Weights: at one hop, the signed edge weight; beyond one hop, the path influence (the sum over
paths of products of normalised absolute edge weights, see :mod:`circuitgraph.graph.influence`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import normalised_adjacency
from circuitgraph.graph.nodes import Node


class QueryRow(NamedTuple):
    """One node in a query answer."""

    node: str
    """Node id."""
    weight: float
    """Signed edge weight (``hops == 1``) or path influence (``hops > 1``)."""
    activation: float
    """The node's value (feature latent, logit, metric)."""
    label: str
    """Human-readable label (token text, feature description)."""
    hops: int
    """Shortest number of edges between this node and the queried one."""


class PathRow(NamedTuple):
    """One path in a :func:`paths` answer."""

    nodes: list[str]
    """Node ids from source to destination."""
    weight: float
    """Product of normalised absolute edge weights along the path."""


class NodeFilter(NamedTuple):
    """Restricts answers; ``None`` fields do not filter."""

    layer: int | None = None
    """Block index of site / component nodes."""
    site: str | None = None
    """Site id (``L2.transcoder``) or site kind (``transcoder``)."""
    pos: int | None = None
    """Position."""
    kind: str | None = None
    """Node kind (``feature``, ``error``, ``token``, ...)."""

    def accepts(self, node: Node) -> bool:
        if self.kind is not None and node.kind != self.kind:
            return False
        if self.layer is not None and node.layer != self.layer:
            return False
        if self.pos is not None and node.pos != self.pos:
            return False
        if self.site is not None:
            if node.site is None:
                return False
            if self.site != node.site and node.site.split(".", 1)[1] != self.site:
                return False
        return True


def _walk(g: Graph, start: int, depth: int, upstream: bool) -> dict[int, tuple[float, int]]:
    """``{node: (weight, hops)}`` reachable from ``start`` within ``depth`` hops."""
    a = normalised_adjacency(g.sources, g.targets, g.weights, g.n_nodes).to_sparse_coo().coalesce()
    rows, cols = a.indices()
    vals = a.values()
    near_src, near_tgt = (cols, rows) if upstream else (rows, cols)  # step from near_tgt to near_src
    out: dict[int, tuple[float, int]] = {}
    direct = (g.targets == start) if upstream else (g.sources == start)
    for e in direct.nonzero().squeeze(1).tolist():
        other = int(g.sources[e]) if upstream else int(g.targets[e])
        out[other] = (out.get(other, (0.0, 1))[0] + float(g.weights[e]), 1)
    frontier = torch.zeros(g.n_nodes, dtype=torch.float64)
    frontier[start] = 1.0
    for hop in range(1, depth + 1):
        nxt = torch.zeros_like(frontier).index_add_(0, near_src, vals * frontier[near_tgt])
        if hop > 1:
            for i in nxt.nonzero().squeeze(1).tolist():
                if i not in out:
                    out[i] = (float(nxt[i]), hop)
                elif out[i][1] > 1:
                    out[i] = (out[i][0] + float(nxt[i]), out[i][1])
        frontier = nxt
        if not bool(frontier.any()):
            break
    out.pop(start, None)
    return out


def _rows(g: Graph, found: dict[int, tuple[float, int]], top_k: int, flt: NodeFilter | None) -> list[QueryRow]:
    flt = flt or NodeFilter()
    rows = [QueryRow(g.nodes[i].id, w, float(g.activation[i]), g.labels[i], h)
            for i, (w, h) in found.items() if flt.accepts(g.nodes[i])]
    rows.sort(key=lambda r: (r.hops, -abs(r.weight)))
    return rows[:top_k]


def upstream(g: Graph, node: str, depth: int = 1, top_k: int = 10, where: NodeFilter | None = None) -> list[QueryRow]:
    """Nodes that drive ``node``: direct inputs by ``|edge weight|``, then farther ones by influence."""
    return _rows(g, _walk(g, g.index(node), depth, upstream=True), top_k, where)


def downstream(g: Graph, node: str, depth: int = 1, top_k: int = 10, where: NodeFilter | None = None) -> list[QueryRow]:
    """Nodes that ``node`` drives (same ordering as :func:`upstream`)."""
    return _rows(g, _walk(g, g.index(node), depth, upstream=False), top_k, where)


def top_features(g: Graph, target: str, k: int = 10, where: NodeFilter | None = None) -> list[QueryRow]:
    """The ``k`` feature nodes with the largest total influence on ``target`` over all paths."""
    found = _walk(g, g.index(target), g.n_nodes, upstream=True)
    flt = where or NodeFilter()
    flt = flt._replace(kind=flt.kind or "feature")
    a = normalised_adjacency(g.sources, g.targets, g.weights, g.n_nodes).to_sparse_coo().coalesce()
    rows_i, cols_i = a.indices()
    x = torch.zeros(g.n_nodes, dtype=torch.float64)
    x[g.index(target)] = 1.0
    total = torch.zeros_like(x)
    for _ in range(g.n_nodes):
        x = torch.zeros_like(x).index_add_(0, cols_i, a.values() * x[rows_i])
        total += x
        if not bool(x.any()):
            break
    rows = [QueryRow(g.nodes[i].id, float(total[i]), float(g.activation[i]), g.labels[i], found[i][1])
            for i in found if flt.accepts(g.nodes[i])]
    rows.sort(key=lambda r: -r.weight)
    return rows[:k]


def paths(g: Graph, src: str, dst: str, k: int = 5) -> list[PathRow]:
    """The ``k`` strongest paths from ``src`` to ``dst`` (largest product of normalised weights)."""
    import networkx as nx

    s, t = g.index(src), g.index(dst)
    a = normalised_adjacency(g.sources, g.targets, g.weights, g.n_nodes).to_sparse_coo().coalesce()
    dg = nx.DiGraph()
    for (tgt, sr), v in zip(a.indices().T.tolist(), a.values().tolist(), strict=True):
        if v > 0:
            dg.add_edge(sr, tgt, cost=-math.log(v))
    if s not in dg or t not in dg or not nx.has_path(dg, s, t):
        return []
    out = []
    for p in nx.shortest_simple_paths(dg, s, t, weight="cost"):
        cost = sum(dg.edges[u, v]["cost"] for u, v in zip(p, p[1:], strict=False))
        out.append(PathRow([g.nodes[i].id for i in p], math.exp(-cost)))
        if len(out) == k:
            break
    return out
