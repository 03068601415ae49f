"""Supernodes: groups of features that act together, found automatically; collapse and expand.

Similarity of two feature nodes is the mean of the signals available:

* graph neighbourhood: cosine similarity of their edge-weight vectors (incoming and outgoing);
* decoder similarity: cosine of their residual-stream directions (nodes of one site);
* co-activation: correlation of their activations over a dataset (``[samples, nodes]``).

Groups are the connected components of the pairs whose similarity reaches ``threshold``
(single linkage), restricted to nodes of the same layer. Collapsing sums edges between groups
(edges inside a group vanish) and activations within a group; ``expand`` restores the original
nodes and edges from the graph the collapse started from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node


@dataclass
class Supernode:
    """A named group of node ids."""

    name: str
    members: list[str]


def _cosine(m: torch.Tensor) -> torch.Tensor:
    m = m / m.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return m @ m.T


def similarity(g: Graph, idx: list[int], directions: torch.Tensor | None = None,
               activations: torch.Tensor | None = None) -> torch.Tensor:
    """``[k, k]`` similarity of the nodes ``idx`` (see the module docstring); ``directions`` is
    ``[k, d]`` and ``activations`` ``[samples, k]``, both aligned with ``idx``."""
    pos = {i: j for j, i in enumerate(idx)}
    k, n = len(idx), g.n_nodes
    vec = torch.zeros(k, 2 * n, dtype=torch.float64)
    for s, t, w in zip(g.sources.tolist(), g.targets.tolist(), g.weights.tolist(), strict=True):
        if s in pos:
            vec[pos[s], n + t] += w  # outgoing
        if t in pos:
            vec[pos[t], s] += w  # incoming
    signals = [_cosine(vec)]
    if directions is not None:
        signals.append(_cosine(directions.double()))
    if activations is not None:
        a = activations.double() - activations.double().mean(0)
        signals.append(_cosine(a.T))
    return torch.stack(signals).mean(0)


def find_supernodes(g: Graph, threshold: float = 0.8, directions: torch.Tensor | None = None,
                    activations: torch.Tensor | None = None, min_size: int = 2) -> list[Supernode]:
    """Groups of feature nodes of ``g`` whose pairwise similarity reaches ``threshold``."""
    idx = [i for i, n in enumerate(g.nodes) if n.kind == "feature"]
    if len(idx) < 2:
        return []
    sim = similarity(g, idx, directions, activations)
    layer = torch.tensor([g.nodes[i].layer for i in idx])
    linked = (sim >= threshold) & (layer[:, None] == layer[None, :])
    parent = list(range(len(idx)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in linked.triu(1).nonzero().tolist():
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for j in range(len(idx)):
        groups.setdefault(root(j), []).append(j)
    out = []
    for members in groups.values():
        if len(members) >= min_size:
            ids = [g.nodes[idx[j]].id for j in members]
            out.append(Supernode(f"L{g.nodes[idx[members[0]]].layer}.group{len(out)}", ids))
    return out


def collapse(g: Graph, supernodes: list[Supernode]) -> Graph:
    """``g`` with each supernode's members replaced by one ``super:<name>`` node."""
    group_of: dict[int, int] = {}
    for gi, sn in enumerate(supernodes):
        for m in sn.members:
            i = g.index(m)
            if i in group_of:
                raise CircuitGraphError(f"node {m} is in two supernodes; supernodes must not overlap")
            group_of[i] = gi
    new_nodes: list[Node] = []
    labels: list[str] = []
    act: list[float] = []
    tw: list[float] = []
    new_index = torch.empty(g.n_nodes, dtype=torch.long)
    super_index: dict[int, int] = {}
    for i, node in enumerate(g.nodes):
        if i in group_of:
            gi = group_of[i]
            if gi not in super_index:
                super_index[gi] = len(new_nodes)
                sn = supernodes[gi]
                depth = min(g.nodes[g.index(m)].depth for m in sn.members)
                new_nodes.append(Node("supernode", depth, name=sn.name))
                labels.append(f"{sn.name} ({len(sn.members)} features)")
                act.append(0.0)
                tw.append(0.0)
            j = super_index[gi]
            act[j] += float(g.activation[i])
            new_index[i] = j
        else:
            new_index[i] = len(new_nodes)
            new_nodes.append(node)
            labels.append(g.labels[i])
            act.append(float(g.activation[i]))
            tw.append(float(g.target_weights[i]))
    src, tgt = new_index[g.sources], new_index[g.targets]
    keep = src != tgt
    n = len(new_nodes)
    key = tgt[keep] * n + src[keep]
    uniq, inv = torch.unique(key, return_inverse=True)
    w = torch.zeros(uniq.numel(), dtype=g.weights.dtype).index_add_(0, inv, g.weights[keep])
    meta = dict(g.metadata)
    meta["supernodes"] = {sn.name: sn.members for sn in supernodes}
    return Graph(new_nodes, torch.tensor(act), uniq % n, uniq // n, w, torch.tensor(tw), labels, metadata=meta,
                 features=dict(g.features))


def expand(collapsed: Graph, original: Graph) -> Graph:
    """The nodes and edges of ``original`` that ``collapsed`` stands for (supernodes opened again)."""
    groups = collapsed.metadata.get("supernodes")
    if groups is None:
        raise CircuitGraphError("this graph has no supernodes to expand (metadata['supernodes'] is missing)")
    wanted = {n.id for n in collapsed.nodes if n.kind != "supernode"}
    for members in groups.values():
        wanted.update(members)
    keep = torch.tensor([n.id in wanted for n in original.nodes])
    out = original.subgraph(keep)
    out.metadata.pop("supernodes", None)
    return out
