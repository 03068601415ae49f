"""What a viewer page carries, as one JSON document (read by ``page.js``).

* ``nodes``: the page's node table (every node some view keeps, and the pinned prompt tokens and
  output tokens every view draws): id, kind, displayed label, full label, value, influence, the
  model's probability (output tokens; ``null`` when the graph did not record it), site, position,
  label font size, the key of its feature card, a bit mask of the views that keep it, whether it
  is pinned, and its ``style`` (shape, colours, size), which
  :func:`circuitgraph.viewer.html.render_html` hands to vis-network and removes from the table;
* ``edges``: a flat list ``[source, target, weight, views, ...]`` over page node indices;
* ``views``: per view its pruning (thresholds, edge cap), its node and edge counts, the canvas
  position of each node it draws (``xy``, flat, in page node order), the box around them and
  their labels, the guides drawn beside them, and whether it is readable in a 1400 x 900 window;
  ``default_view``: the densest readable view up to circuit-tracer's (:data:`CT_VIEW`);
* ``cards``: feature cards (top contexts with activations, promoted / suppressed tokens, ablation
  effects) keyed ``<site>#<feature>``; ``groups``: suggested supernodes of the default view;
* ``title`` (of the document: ``heading`` and the metric), ``heading`` (the prompt or task),
  ``metric`` (the metric as a formula with its value), ``outputs`` (the model's top
  next tokens with probabilities), ``summary`` (the header line with the graph's honest numbers).

Every string in it (prompt text, tokens, labels) is data: the page writes it with ``textContent``
or draws it on the canvas, never as HTML.
"""

from __future__ import annotations

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.viewer.layout import FONT_PX, MIN_LABEL_PX, layout, short_label
from circuitgraph.viewer.outputs import metric_formula, output_probabilities, page_heading, page_title, top_outputs_text
from circuitgraph.viewer.style import REACH, node_style
from circuitgraph.viewer.views import CT_VIEW, PageViews, view_graph

HONEST_KEYS = ("faithfulness", "faithfulness_features_only", "faithfulness_errors_only", "ceiling", "completeness",
               "replacement_score", "completeness_score")
"""Graph metadata the header always shows when present."""
MAX_CONTEXTS = 4
"""Top-activating contexts carried per feature card."""


def metric_text(g: Graph, i: int) -> str:
    """Metric node ``i`` as the page names it: its formula and value (``logit(" Mary") − logit(" John") = 16.36``)."""
    return f"{metric_formula(g.metadata, g.nodes[i].name)} = {float(g.activation[i]):.2f}"


def logit_probability(g: Graph, i: int, recorded: dict[int, float]) -> float | None:
    """The model's probability of logit node ``i``'s token: recorded at trace time, else its output
    weight when no metric took the weight (then it is the probability), else unknown."""
    node = g.nodes[i]
    if node.index in recorded:
        return recorded[node.index]
    if not any(n.kind == "metric" for n in g.nodes):
        return float(g.target_weights[i])
    return None


def display_label(g: Graph, i: int, prob: float | None = None) -> str:
    """The short label drawn under node ``i``: token text, feature description, output token with
    the model's probability, metric formula with its value."""
    node, text = g.nodes[i], g.labels[i]
    if node.kind == "feature":
        return short_label(text or f"#{node.index}")
    if node.kind == "error":
        return "error"
    if node.kind == "logit":
        token = short_label(text.strip() or "#" + str(node.index), 10)
        return token if prob is None else f"{token} {prob:.3g}"
    if node.kind == "metric":
        return short_label(metric_text(g, i), 48)
    if node.kind == "component":
        return short_label(node.site or node.id)
    if node.kind == "supernode":
        return short_label(text or node.name or node.id)
    return short_label(text)


def node_font(node: Node) -> float:
    """Label font size: the prompt strip and the outputs a little larger than features."""
    return {"token": 14.0, "logit": 14.0, "metric": 14.0}.get(node.kind, float(FONT_PX))


def node_size(node: Node, influence: float, top: float) -> float:
    """Half-size of the drawn shape: features, errors, components and groups grow with influence."""
    if node.kind == "token":
        return 6.0
    if node.kind in ("logit", "metric"):
        return 9.0
    return 3.5 + 6.5 * (max(influence, 0.0) / top) ** 0.5 if top > 0 else 3.5


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


MAX_QK_INPUTS = 8
"""Incoming edges whose head loadings an attention feature's card lists."""


def qk_cards(info: dict | None, on_page: set[str]) -> dict:
    """For each attention feature on the page: its strongest incoming edges' head loadings (from
    sources on the page) and the QK pairs ``trace --qk`` attached to edges into it."""
    if not info:
        return {}
    out: dict[str, dict] = {}
    for key, values in info.get("loadings", {}).items():
        src, dst = key.split("->")
        if src in on_page and dst in on_page:
            out.setdefault(dst, {"heads": [], "pairs": []})["heads"].append([src, [float(f"{v:.4g}") for v in values]])
    for card in out.values():
        card["heads"].sort(key=lambda r: -abs(sum(r[1])))
        del card["heads"][MAX_QK_INPUTS:]
    for pair in info.get("pairs", []):
        if pair["target"] in out:
            out[pair["target"]]["pairs"].append(
                {k: pair[k] for k in ("source", "layer", "head", "query", "key", "score", "sum_of_terms", "pattern")}
                | {"top_pairs": [[t["query"], t["key"], float(f"{t['value']:.4g}")] for t in pair["top_pairs"][:6]]})
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


def _views(g: Graph, views: PageViews, labels: list[str], sizes: list[float], fonts: list[float],
           shapes: list[str]) -> list[dict]:
    inf = views.influence
    docs = []
    for v, spec in enumerate(views.specs):
        drawn = views.drawn_of(v)
        lay = layout([g.nodes[views.node_index[p]] for p in drawn], [labels[p] for p in drawn],
                     [sizes[p] * REACH.get(shapes[p], 1.0) for p in drawn], [fonts[p] for p in drawn],
                     [-float(inf[views.node_index[p]]) for p in drawn])
        xy: list[int] = []
        for j in range(len(drawn)):
            xy += [round(lay.xy[j][0]), round(lay.xy[j][1])]
        docs.append({"node_threshold": spec.node_threshold, "edge_threshold": spec.edge_threshold,
                     "max_edges": spec.max_edges, "n_nodes": len(views.nodes_of(v)), "n_edges": len(views.edges_of(v)),
                     "xy": xy, "rows": [[round(y), t] for y, t in lay.rows], "cols": [[round(x), t] for x, t in lay.columns],
                     "box": [round(b) for b in lay.box], "readable": lay.fits() if drawn else True})
    return docs


def page_data(g: Graph, views: PageViews, title: str | None = None) -> dict:
    """The JSON document of the page for ``g`` (see the module docstring), without ``groups``."""
    page_of = {gi: p for p, gi in enumerate(views.node_index)}
    inf = views.influence
    scaled = [float(inf[gi]) for gi in views.node_index if g.nodes[gi].kind in ("feature", "error", "component")]
    top = max(scaled, default=0.0)
    recorded = output_probabilities(g.metadata)
    nodes, labels, sizes, fonts, shapes = [], [], [], [], []
    for p, gi in enumerate(views.node_index):
        node = g.nodes[gi]
        prob = logit_probability(g, gi, recorded) if node.kind == "logit" else None
        labels.append(display_label(g, gi, prob))
        sizes.append(node_size(node, float(inf[gi]), top))
        fonts.append(node_font(node))
        style = node_style(node, sizes[-1])
        shapes.append(style["shape"])
        card = f"{node.site}#{node.index}" if node.kind == "feature" and f"{node.site}#{node.index}" in g.features else None
        nodes.append({"id": node.id, "kind": node.kind, "label": labels[-1], "text": g.labels[gi],
                      "act": round(float(g.activation[gi]), 5), "inf": round(float(inf[gi]), 5),
                      "prob": None if prob is None else round(prob, 6), "out_weight": round(float(g.target_weights[gi]), 5),
                      "site": node.site, "pos": node.pos, "card": card, "views": views.node_views[p],
                      "pin": views.pinned[p], "font": fonts[-1], "style": style})
    edges: list = []
    for q, ge in enumerate(views.edge_index):
        edges += [page_of[int(g.sources[ge])], page_of[int(g.targets[ge])], float(f"{float(g.weights[ge]):.4g}"),
                  views.edge_views[q]]
    view_docs = _views(g, views, labels, sizes, fonts, shapes)
    default = next((v for v in range(min(CT_VIEW, len(view_docs) - 1), -1, -1) if view_docs[v]["readable"]), 0)
    meta = dict(g.metadata)
    if g.n_edges and "replacement_score" not in meta and any(n.kind == "token" and n.pos is not None for n in g.nodes):
        from circuitgraph.graph.pruning import scores_of

        scores = scores_of(g)  # a prompt graph: how much of it tokens, not errors, explain
        meta.update(replacement_score=scores.replacement, completeness_score=scores.completeness)
    m = next((i for i, n in enumerate(g.nodes) if n.kind == "metric"), None)
    metric = metric_text(g, m) if m is not None else None
    if metric is None and "prompt_tokens" in meta and any(n.kind == "logit" for n in g.nodes):  # weighed by probability
        metric = "the likeliest next tokens' logits, weighted by their probabilities"
    title = title or page_title(meta, metric)
    wanted = {n["card"] for n in nodes if n["card"]}
    qk = qk_cards(meta.get("qk"), {n["id"] for n in nodes})
    return {"qk": qk, "title": title, "heading": page_heading(meta) if title == page_title(meta, metric) else title, "metric": metric, "outputs": top_outputs_text(meta),
            "summary": f"{g.n_nodes} nodes, {g.n_edges} edges" + honest_numbers(meta),
            "prompt": meta.get("prompt") if isinstance(meta.get("prompt"), str) else None,
            "nodes": nodes, "edges": edges, "views": view_docs, "default_view": default, "ct_view": CT_VIEW,
            "cards": {k: compact_card(g.features[k]) for k in sorted(wanted)}, "font_px": FONT_PX,
            "min_label_px": MIN_LABEL_PX, "n_nodes": g.n_nodes, "n_edges": g.n_edges, "page_edges": len(views.edge_index)}


def suggested_groups(g: Graph, views: PageViews, view: int, threshold: float = 0.8) -> list[dict]:
    """Supernodes of ``view`` by graph-neighbourhood similarity
    (:func:`circuitgraph.features.supernodes.find_supernodes`), as ``{name, members}`` with page
    node indices."""
    from circuitgraph.features.supernodes import find_supernodes

    page_of = {gi: p for p, gi in enumerate(views.node_index)}
    shown = view_graph(g, views, view)
    return [{"name": sn.name, "members": [page_of[g.index(m)] for m in sn.members]}
            for sn in find_supernodes(shown, threshold)]
