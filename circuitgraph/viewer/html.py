"""The offline HTML viewer: one pyvis / vis-network page, every script inlined, no network access.

The page opens on the graph pruned as circuit-tracer prunes it (node threshold 0.8, edge threshold
0.98 of cumulative influence) with at most ``max_edges`` edges; a detail control steps to sparser
or denser prunings without reloading (:mod:`circuitgraph.viewer.views`). Nodes sit where
:mod:`circuitgraph.viewer.layout` puts them (token position or offset on x, depth on y; physics
off). Hovering a node dims everything but its ancestors and descendants; clicking opens its card
(top contexts, promoted / suppressed tokens, ablation effects, strongest inputs and outputs as
links); groups of nodes collapse into supernodes and expand again; the header shows the graph's
honest numbers. pyvis's global ``network``, ``nodes`` and ``edges`` stay available to scripts.

Security: every string from a prompt, token or label reaches the page only inside JSON blocks
whose ``<``, ``>`` and ``&`` are escaped, and the page writes it with ``textContent`` or draws it
on the canvas; nothing user-supplied is ever parsed as HTML.
"""

from __future__ import annotations

import html as html_lib
import json
import logging
import re
from pathlib import Path

from circuitgraph.graph.graph import Graph
from circuitgraph.viewer.layout import FONT_PX
from circuitgraph.viewer.page_data import page_data, suggested_groups
from circuitgraph.viewer.style import legend_html
from circuitgraph.viewer.views import compute_views, view_specs

log = logging.getLogger(__name__)

_SCRIPT = Path(__file__).with_name("page.js")

_PANEL = """
<div id="cg-panel" style="position:fixed;top:0;right:0;width:30%;height:100%;overflow-y:auto;overflow-x:hidden;
 overflow-wrap:anywhere;background:#fafafa;
 border-left:1px solid #ccc;font:13px sans-serif;padding:8px;box-sizing:border-box">
 <div id="cg-title" style="font-weight:bold;font-size:15px"></div>
 <div id="cg-metric" style="margin:4px 0;font-family:monospace"></div>
 <div id="cg-outputs" style="margin:4px 0;font-family:monospace"></div>
 <div id="cg-meta" style="margin:4px 0;color:#333"></div>
 <div id="cg-prompt" style="margin:4px 0;font-family:monospace;white-space:pre-wrap"></div>
 <div style="margin:6px 0"><label>detail <input id="cg-view" type="range" min="0" max="0" step="1" value="0"></label>
  <div id="cg-view-info" style="color:#555"></div></div>
 <div><input id="cg-find" placeholder="find node id, e.g. L2.transcoder#12@5" size="32"><button id="cg-go">find</button></div>
 <div id="cg-legend" style="margin:6px 0;line-height:1.5">__LEGEND__</div>
 <div style="margin:6px 0">hover a node: its paths to the output; click: its card; ctrl-click several, then
  <button id="cg-group">group selected</button></div>
 <details id="cg-groups"><summary id="cg-groups-title">supernodes</summary><div id="cg-group-list"></div></details>
 <div id="cg-card"></div>
</div>
<script type="application/json" id="cg-data">__DATA__</script>
<script type="text/javascript">__SCRIPT__</script>
"""


def _json_block(value: object) -> str:
    """JSON for a ``<script type="application/json">`` block: nothing in it can close the block."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).replace("<", "\\u003c").replace(
        ">", "\\u003e").replace("&", "\\u0026")


def render_html(g: Graph, max_nodes: int | None = None, title: str | None = None, max_edges: int = 500) -> str:
    """The page as a string (see the module docstring); ``max_nodes`` caps the features of every
    view; ``title`` defaults to the prompt or task and the metric."""
    from pyvis.network import Network

    views = compute_views(g, view_specs(max_edges), max_nodes)
    data = page_data(g, views, title)
    data["groups"] = suggested_groups(g, views, data["default_view"])
    data["supernodes"] = g.metadata.get("supernodes") if isinstance(g.metadata.get("supernodes"), dict) else None
    net = Network(height="100vh", width="70%", directed=True, cdn_resources="in_line", heading="")
    first_xy: dict[int, tuple[int, int]] = {}
    for v, doc in enumerate(data["views"]):  # each node starts where its sparsest view puts it
        for j, p in enumerate(views.drawn_of(v)):
            first_xy.setdefault(p, (doc["xy"][2 * j], doc["xy"][2 * j + 1]))
    default = data["default_view"]
    for p, n in enumerate(data["nodes"]):
        x, y = first_xy[p]
        style = n.pop("style")  # drawn by vis-network only: the page's own table does not repeat it
        font = {} if n["font"] == FONT_PX else {"font": {"size": n["font"]}}
        net.add_node(n["id"], label=n["label"], x=x, y=y, hidden=not (n["views"] >> default & 1 or n["pin"]), **style,
                     **font)
    net.set_options(json.dumps({
        "physics": {"enabled": False}, "layout": {"improvedLayout": False},
        "interaction": {"hover": True, "multiselect": True, "tooltipDelay": 300},
        "nodes": {"font": {"face": "monospace", "size": FONT_PX, "color": "#222222", "background": "rgba(255,255,255,0.7)"},
                  "borderWidth": 1, "physics": False},
        "edges": {"smooth": False, "arrows": {"to": {"enabled": True, "scaleFactor": 0.35}}}}))
    page = net.generate_html()
    page = _offline(page)
    page = re.sub(r"<title>.*?</title>", lambda _: "<title>" + html_lib.escape(data["title"]) + "</title>", page,
                  count=1, flags=re.S)
    if "<title>" not in page:
        page = page.replace("<head>", "<head><title>" + html_lib.escape(data["title"]) + "</title>", 1)
    signs = {w >= 0 for w in data["edges"][2::4]}
    legend = legend_html([g.nodes[gi] for gi in views.node_index], bool(data["groups"] or data["supernodes"]), signs)
    panel = (_PANEL.replace("__LEGEND__", legend).replace("__SCRIPT__", _SCRIPT.read_text(encoding="utf-8"))
             .replace("__DATA__", _json_block(data)))
    return page.replace("</body>", panel + "</body>")


def _offline(page: str) -> str:
    """pyvis's page without its external resources, its unused vis stylesheet and empty headings."""
    page = re.sub(r'<script[^>]*\bsrc="[^"]*"[^>]*>\s*</script>', "", page)
    page = re.sub(r"<link[^>]*\bhref=\"https?://[^\"]*\"[^>]*/?>", "", page)
    page = re.sub(r"<center>\s*<h1>\s*</h1>\s*</center>", "", page)
    try:
        import pyvis

        css = (Path(pyvis.__file__).parent / "templates" / "lib" / "vis-9.1.2" / "vis-network.css").read_text()
        if css in page:  # the configurator / manipulation / tooltip styles: the page uses none of them
            page = page.replace(css, "")
    except OSError:
        log.debug("pyvis's vis-network.css not found; the page keeps it")
    return page.replace('<div class="card" style="width: 100%">', '<div style="width: 100%">')


def load_for_view(folder: str | Path) -> Graph:
    """The graph a page should show for a saved graph folder: a prompt trace's unpruned ``full/``
    (so every view, dense ones included, prunes the whole graph) with the pruned graph's metadata,
    labels and feature cards; otherwise the saved graph itself."""
    g = Graph.load(folder)
    full_dir = Path(folder).resolve() / "full"
    if not (full_dir / "graph.json").is_file():
        return g
    full = Graph.load(full_dir)
    labels = {n.id: g.labels[i] for i, n in enumerate(g.nodes)}
    for i, n in enumerate(full.nodes):
        card = g.features.get(f"{n.site}#{n.index}") if n.kind == "feature" else None
        full.labels[i] = labels.get(n.id) or (card or {}).get("label") or full.labels[i]
    full.features = g.features
    full.metadata = {**full.metadata, **{k: v for k, v in g.metadata.items() if k != "influence"}}
    return full


def to_html(g: Graph, path: str | Path, max_nodes: int | None = None, max_edges: int = 500) -> Path:
    """Write the viewer page for ``g`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(g, max_nodes, max_edges=max_edges), encoding="utf-8")
    return path
