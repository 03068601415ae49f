"""How a viewer page draws each kind of node and edge, and the legend that names what a page holds.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies)
plus greys: edges are blue when they excite and vermillion when they inhibit, and no node uses
either colour. Features are dots coloured by their site kind; components (heads, MLPs) are
downward triangles coloured like the site kind they are made of; tokens, errors, outputs, the
metric and supernodes each have a shape of their own.
"""

from __future__ import annotations

import html as html_lib

from circuitgraph.graph.nodes import Node

EDGE_EXCITE = "#0072B2"
"""Okabe-Ito blue: an edge that raises its target."""
EDGE_INHIBIT = "#D55E00"
"""Okabe-Ito vermillion: an edge that lowers its target."""
SITE_COLORS = {"resid_pre": "#56B4E9", "resid_mid": "#56B4E9", "resid_post": "#56B4E9", "attn_z": "#E69F00",
               "mlp_out": "#CC79A7", "transcoder": "#009E73", "clt": "#F0E442", "mlp_post": "#8C6D31"}
"""Feature colour by site kind (residual sites share sky blue)."""
SITE_NAMES = {"#56B4E9": "residual stream", "#E69F00": "attention (attn_z)", "#CC79A7": "MLP output (mlp_out)",
              "#009E73": "transcoder", "#F0E442": "cross-layer transcoder (clt)", "#8C6D31": "MLP neurons (mlp_post)"}
"""What each feature colour means in the legend."""
KIND_COLORS = {"token": "#555555", "error": "#A6A6A6", "logit": "#000000", "metric": "#000000", "supernode": "#7F7F7F"}
"""Colour of the nodes that are not features or components."""
SHAPES = {"token": "square", "feature": "dot", "error": "diamond", "logit": "triangle", "metric": "star",
          "supernode": "hexagon", "component": "triangleDown"}
"""vis-network shape per node kind (all draw their label underneath)."""
REACH = {"triangle": 1.16, "triangleDown": 1.16, "star": 1.3}
"""How far a vis-network shape reaches beyond its ``size``."""
KIND_TEXT = {"token": "token", "error": "reconstruction error",
             "logit": "output token (the model's probability)", "metric": "metric", "supernode": "supernode"}
"""Legend text per node kind."""
_GLYPHS = {"square": "■", "dot": "●", "diamond": "◆", "triangle": "▲", "triangleDown": "▼", "star": "★",
           "hexagon": "⬢"}


def node_color(node: Node) -> str:
    """Fill colour of ``node``: features by site kind, components by attention / MLP."""
    if node.kind == "feature" and node.site:
        return SITE_COLORS.get(node.site.split(".", 1)[1], "#7F7F7F")
    if node.kind == "component":
        return SITE_COLORS["mlp_out"] if (node.site or "").split(".")[-1].startswith("mlp") else SITE_COLORS["attn_z"]
    return KIND_COLORS.get(node.kind, "#7F7F7F")


def node_style(node: Node, size: float) -> dict:
    """vis-network options of ``node`` drawn at half-size ``size``."""
    fill = node_color(node)
    border = "#8A7D00" if fill == SITE_COLORS["clt"] else fill  # yellow needs an edge on white
    return {"shape": SHAPES.get(node.kind, "dot"), "size": round(size, 2),
            "color": {"background": fill, "border": border, "highlight": {"background": fill, "border": "#000000"},
                      "hover": {"background": fill, "border": "#000000"}}}


def legend_html(nodes: list[Node], has_groups: bool, signs: set[bool]) -> str:
    """The legend of a page holding ``nodes``: only the node kinds, feature colours and edge signs
    it contains (supernodes also when groups are offered). Static text only; escaped anyway."""
    def item(shape: str, color: str, text: str) -> str:
        return f'<span style="color:{color}">{_GLYPHS[shape]}</span> {html_lib.escape(text)} '

    kinds = {n.kind for n in nodes} | ({"supernode"} if has_groups else set())
    out = "".join(item(SHAPES[k], KIND_COLORS[k], KIND_TEXT[k]) for k in SHAPES if k in kinds and k in KIND_COLORS)
    for kind, head in (("feature", "features by site kind: "), ("component", "heads / MLPs: ")):
        colors = list(dict.fromkeys(node_color(n) for n in nodes if n.kind == kind))
        if colors:
            names = SITE_NAMES if kind == "feature" else {SITE_COLORS["attn_z"]: "attention", SITE_COLORS["mlp_out"]: "MLP"}
            out += "<br>" + head + "".join(item(SHAPES[kind], c, names.get(c, "other")) for c in colors)
    if signs:
        out += "<br>edges: " + "".join(
            f'<span style="color:{c}">━</span> {t} ' for s, c, t in ((True, EDGE_EXCITE, "excites"),
                                                                     (False, EDGE_INHIBIT, "inhibits")) if s in signs)
    return out
