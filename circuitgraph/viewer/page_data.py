"""What a viewer page carries, as one JSON document (read by ``page.js``).

* ``nodes``: the page's node table (every node some view shows): id, kind, displayed label, full
  label, value, influence, probability (logits), site, position, label font size, the key of its
  feature card, a bit mask of the views that show it, and its ``style`` (shape, colour, size), which
  :func:`circuitgraph.viewer.html.render_html` hands to vis-network and removes from the table;
* ``edges``: a flat list ``[source, target, weight, views, ...]`` over page node indices;
* ``views``: per view its pruning (thresholds, edge cap), its node and edge counts, the canvas
  position of each of its nodes (``xy``, flat, in page node order) and the guides drawn beside them;
* ``cards``: feature cards (top contexts with activations, promoted / suppressed tokens, ablation
  effects) keyed ``<site>#<feature>``; ``groups``: suggested supernodes of the default view;
* ``summary``: the header line with the graph's honest numbers.

Every string in it (prompt text, tokens, labels) is data: the page writes it with ``textContent``
or draws it on the canvas, never as HTML.
"""

from __future__ import annotations

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.viewer.layout import FONT_PX, layout, short_label
from circuitgraph.viewer.views import DEFAULT_VIEW, PageViews, view_graph

COLORS = {"token": "#616161", "error": "#9e9e9e", "logit": "#43a047", "metric": "#1b5e20", "supernode": "#8e24aa",
          "component": "#ff9800", "resid_pre": "#1e88e5", "resid_mid": "#1e88e5", "resid_post": "#1565c0",
          "attn_z": "#fb8c00", "mlp_out": "#e53935", "mlp_post": "#d81b60", "transcoder": "#c62828",
          "clt": "#ad1457", "neurons": "#6d4c41"}
"""Node colours: by kind, and features by site kind."""
SHAPES = {"token": "square", "feature": "dot", "error": "diamond", "logit": "triangle", "metric": "star",
          "supernode": "hexagon", "component": "dot"}
"""vis-network shape per node kind (all draw their label underneath)."""
REACH = {"triangle": 1.16, "star": 1.3}
"""How far a vis-network shape reaches beyond its ``size``."""
HONEST_KEYS = ("faithfulness", "faithfulness_features_only", "faithfulness_errors_only", "ceiling", "completeness",
               "replacement_score", "completeness_score")
"""Graph metadata the header always shows when present."""
MAX_CONTEXTS = 4
"""Top-activating contexts carried per feature card."""


def node_color(node: Node) -> str:
    """Colour of ``node`` (features by their site kind)."""
    if node.kind == "feature" and node.site:
        return COLORS.get(node.site.split(".", 1)[1], "#607d8b")
    return COLORS.get(node.kind, "#607d8b")


def display_label(g: Graph, i: int) -> str:
    """The short label drawn under node ``i``: token text, feature description, output token with
    its probability, metric with its value."""
    node, text = g.nodes[i], g.labels[i]
    if node.kind == "feature":
        return short_label(text or f"#{node.index}")
    if node.kind == "error":
        return "error"
    if node.kind == "logit":
        return short_label(f"{text.strip() or '#' + str(node.index)} {float(g.target_weights[i]):.2f}", 18)
    if node.kind == "metric":
        return short_label(f"{node.name} {float(g.activation[i]):.2f}", 18)
    if node.kind == "component":
        return short_label(node.site or node.id)
    if node.kind == "supernode":
        return short_label(text or node.name or node.id)
    return short_label(text)


def node_font(node: Node) -> float:
    """Label font size: the prompt strip and the outputs larger than features."""
    return {"token": 20.0, "logit": 16.0, "metric": 16.0}.get(node.kind, float(FONT_PX))


def node_size(node: Node, influence: float, top: float) -> float:
    """Half-size of the drawn shape: features, errors, components and groups grow with influence."""
    if node.kind == "token":
        return 7.0
    if node.kind == "logit":
        return 10.0
    if node.kind == "metric":
        return 11.0
    return 4.0 + 9.0 * (max(influence, 0.0) / top) ** 0.5 if top > 0 else 4.0


def compact_card(card: dict) -> dict:
    """A feature card as the page needs it: at most :data:`MAX_CONTEXTS` contexts, values rounded."""
    out = {"label": card.get("label", ""), "density": round(float(card.get("density", 0.0)), 5),
           "contexts": [{"tokens": c["tokens"], "acts": [round(float(a), 2) for a in c["activations"]],
                         "peak": c.get("peak", -1)} for c in card.get("contexts", [])[:MAX_CONTEXTS]],
           "promoted": [[t, round(float(v), 3)] for t, v in card.get("promoted", [])],
           "suppressed": [[t, round(float(v), 3)] for t, v in card.get("suppressed", [])]}
    if card.get("ablation"):
        ab = card["ablation"]
        out["ablation"] = {"tokens": ab["tokens"], "delta": [round(float(d), 4) for d in ab["delta_logprob"]]}
    return out


def honest_numbers(meta: dict) -> str:
    """The circuit's node counts and scores as the header shows them (held-out when it was)."""
    parts = []
    if isinstance(meta.get("n_nodes"), int) and "n_error_nodes" in meta:
        parts.append(f"circuit {meta['n_nodes']} nodes = {meta['n_feature_nodes']} features + "
                     f"{meta['n_error_nodes']} error nodes")
    if "held_out" in meta:
        parts.append(f"evaluated on {meta.get('eval_n_prompts')} held-out prompts" if meta["held_out"]
                     else "evaluated on the selection prompts")
    parts += [f"{k.replace('_', ' ')} {meta[k]:.3f}" for k in HONEST_KEYS if isinstance(meta.get(k), float)]
    return "".join(f"; {p}" for p in parts)


def page_data(g: Graph, views: PageViews, title: str, groups: list[tuple[str, list[str]]]) -> dict:
    """The JSON document of the page for ``g`` (see the module docstring); ``groups`` are suggested
    supernodes ``(name, member ids)``."""
    page_of = {gi: p for p, gi in enumerate(views.node_index)}
    inf = views.influence
    scaled = [float(inf[gi]) for gi in views.node_index if g.nodes[gi].kind in ("feature", "error", "component")]
    top = max(scaled, default=0.0)
    nodes, labels, sizes, fonts = [], [], [], []
    for p, gi in enumerate(views.node_index):
        node = g.nodes[gi]
        label = display_label(g, gi)
        size = node_size(node, float(inf[gi]), top)
        labels.append(label)
        sizes.append(size)
        fonts.append(node_font(node))
        card = f"{node.site}#{node.index}" if node.kind == "feature" and f"{node.site}#{node.index}" in g.features else None
        nodes.append({"id": node.id, "kind": node.kind, "label": label, "text": g.labels[gi],
                      "act": round(float(g.activation[gi]), 5), "inf": round(float(inf[gi]), 5),
                      "prob": round(float(g.target_weights[gi]), 5), "site": node.site, "pos": node.pos,
                      "card": card, "views": views.node_views[p], "font": fonts[-1],
                      "style": {"shape": SHAPES.get(node.kind, "dot"), "color": node_color(node), "size": round(size, 2)}})
    edges: list = []
    for q, ge in enumerate(views.edge_index):
        edges += [page_of[int(g.sources[ge])], page_of[int(g.targets[ge])], float(f"{float(g.weights[ge]):.4g}"),
                  views.edge_views[q]]
    view_docs = []
    for v, spec in enumerate(views.specs):
        members = views.nodes_of(v)
        lay = layout([g.nodes[views.node_index[p]] for p in members], [labels[p] for p in members],
                     [sizes[p] * REACH.get(nodes[p]["style"]["shape"], 1.0) for p in members], [fonts[p] for p in members],
                     [-float(inf[views.node_index[p]]) for p in members])
        xy: list[int] = []
        for j in range(len(members)):
            xy += [round(lay.xy[j][0]), round(lay.xy[j][1])]
        view_docs.append({"node_threshold": spec.node_threshold, "edge_threshold": spec.edge_threshold,
                          "max_edges": spec.max_edges, "n_nodes": len(members), "n_edges": len(views.edges_of(v)),
                          "xy": xy, "rows": [[round(y), t] for y, t in lay.rows],
                          "cols": [[round(x), t] for x, t in lay.columns], "left": round(lay.left),
                          "bottom": round(lay.bottom)})
    wanted = {n["card"] for n in nodes if n["card"]}
    meta = dict(g.metadata)
    if g.n_edges and "replacement_score" not in meta and any(n.kind == "token" for n in g.nodes):
        from circuitgraph.graph.pruning import scores_of

        scores = scores_of(g)  # a prompt graph: how much of it tokens, not errors, explain
        meta.update(replacement_score=scores.replacement, completeness_score=scores.completeness)
    summary = f"{title}: {g.n_nodes} nodes, {g.n_edges} edges" + honest_numbers(meta)
    return {"title": title, "summary": summary, "prompt": meta.get("prompt") if isinstance(meta.get("prompt"), str)
            else None, "nodes": nodes, "edges": edges, "views": view_docs, "default_view": DEFAULT_VIEW,
            "cards": {k: compact_card(g.features[k]) for k in sorted(wanted)}, "font_px": FONT_PX,
            "groups": [{"name": name, "members": [page_of[g.index(m)] for m in members]} for name, members in groups],
            "n_nodes": g.n_nodes, "n_edges": g.n_edges, "page_edges": len(views.edge_index)}


def suggested_groups(g: Graph, views: PageViews, threshold: float = 0.8) -> list[tuple[str, list[str]]]:
    """Supernodes of the default view by graph-neighbourhood similarity
    (:func:`circuitgraph.features.supernodes.find_supernodes`), as ``(name, member ids)``."""
    from circuitgraph.features.supernodes import find_supernodes

    shown = view_graph(g, views, DEFAULT_VIEW)
    return [(sn.name, sn.members) for sn in find_supernodes(shown, threshold)]
