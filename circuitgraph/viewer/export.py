"""Exports other tools read: the circuit-tracer / Neuronpedia attribution-graph JSON, networkx
node-link JSON and GraphML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.viewer.views import node_influence

Format = Literal["circuit-tracer", "node-link", "graphml"]

_FEATURE_TYPE = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit", "metric": "logit", "component": "component", "supernode": "supernode"}


def circuit_tracer_json(g: Graph) -> dict:
    """The attribution-graph schema of circuit-tracer's frontend and Neuronpedia: ``metadata``,
    ``nodes`` (node_id, feature, layer, ctx_idx, feature_type, activation, influence, ...) and
    ``links`` (source, target, weight). ``node_id`` is our stable id."""
    inf = node_influence(g)
    n_layers = max((n.layer for n in g.nodes if n.layer is not None), default=-1) + 1
    nodes = []
    for i, node in enumerate(g.nodes):
        if node.kind == "token":
            layer = "E"
        elif node.kind in ("logit", "metric"):
            layer = str(n_layers)
        else:
            layer = str(node.layer)
        nodes.append({
            "node_id": node.id, "jsNodeId": node.id, "feature": node.index, "layer": layer, "ctx_idx": node.pos,
            "feature_type": _FEATURE_TYPE[node.kind], "activation": float(g.activation[i]),
            "influence": float(inf[i]), "clerp": g.labels[i], "is_target_logit": node.kind in ("logit", "metric"),
            "token_prob": float(g.target_weights[i]), "site": node.site,
        })
    links = [{"source": g.nodes[s].id, "target": g.nodes[t].id, "weight": w}
             for s, t, w in zip(g.sources.tolist(), g.targets.tolist(), g.weights.tolist(), strict=True)]
    meta = {k: v for k, v in g.metadata.items() if isinstance(v, (str, int, float, bool, list)) or v is None}
    meta.setdefault("slug", str(g.metadata.get("task") or "circuitgraph"))
    meta.setdefault("scan", ",".join(g.metadata.get("sites", [])))
    return {"metadata": meta, "qParams": {}, "nodes": nodes, "links": links}


def export_graph(g: Graph, path: str | Path, fmt: Format) -> Path:
    """Write ``g`` to ``path`` in format ``fmt``."""
    import networkx as nx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "circuit-tracer":
        path.write_text(json.dumps(circuit_tracer_json(g)))
    elif fmt == "node-link":
        path.write_text(json.dumps(nx.node_link_data(g.to_networkx(), edges="links")))
    elif fmt == "graphml":
        nx.write_graphml(g.to_networkx(), path)
    else:
        raise CircuitGraphError(f"unknown export format {fmt!r}; choose circuit-tracer, node-link or graphml")
    return path
