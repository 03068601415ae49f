"""The offline HTML viewer: a pyvis page with its JavaScript inlined and no external resources.

Layout: x by depth (tokens -> layers -> outputs), y by position; colour by node kind / site kind;
size by influence; edge width by |weight|, colour by sign (blue positive, red negative). Clicking
or hovering a node shows its card in a side panel: label, activation, top-activating contexts
with the activating token highlighted (background proportional to activation), per-token
ablation effects when present, top promoted / suppressed tokens. Controls hide weak edges and
find a node by id. Graphs above ``max_nodes`` are shown pruned by influence.

Security: every string from a prompt, token or label reaches the page only inside a JSON block
whose ``<`` are escaped, and the panel writes it with ``textContent``; nothing user-supplied is
ever parsed as HTML.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import influence, normalised_adjacency

COLORS = {"token": "#9e9e9e", "error": "#bdbdbd", "logit": "#4caf50", "metric": "#2e7d32", "supernode": "#8e24aa",
          "component": "#ff9800", "resid_pre": "#1e88e5", "resid_mid": "#1e88e5", "resid_post": "#1565c0",
          "attn_z": "#fb8c00", "mlp_out": "#e53935", "mlp_post": "#d81b60", "transcoder": "#c62828",
          "clt": "#ad1457"}

_PANEL = """
<div id="cg-panel" style="position:fixed;top:0;right:0;width:34%;height:100%;overflow:auto;background:#fafafa;
 border-left:1px solid #ccc;font:13px sans-serif;padding:8px;box-sizing:border-box">
 <div><label>hide edges with |weight| below <input id="cg-min" type="range" min="0" max="1" step="0.01" value="0">
 <span id="cg-min-val">0</span></label></div>
 <div><input id="cg-find" placeholder="find node id, e.g. L2.transcoder#12@5" size="34"><button id="cg-go">find</button></div>
 <div id="cg-meta" style="margin:6px 0;color:#555"></div>
 <div id="cg-card"></div>
</div>
<script type="application/json" id="cg-data">__DATA__</script>
<script type="text/javascript">
(function () {
  var data = JSON.parse(document.getElementById('cg-data').textContent);
  window.cgData = data;
  function el(tag, text, style) { var e = document.createElement(tag); if (text !== undefined) e.textContent = text;
    if (style) e.setAttribute('style', style); return e; }
  document.getElementById('cg-meta').textContent = data.summary;
  function show(id) {
    var card = document.getElementById('cg-card'); card.replaceChildren();
    var n = data.nodes[id]; if (!n) return;
    card.appendChild(el('h3', id));
    card.appendChild(el('div', 'label: ' + n.label));
    card.appendChild(el('div', 'activation: ' + n.activation + '   influence: ' + n.influence));
    var f = n.card;
    if (f) {
      card.appendChild(el('div', 'density: ' + f.density));
      card.appendChild(el('h4', 'top-activating contexts'));
      f.contexts.forEach(function (c) {
        var line = el('div', undefined, 'margin:2px 0;font-family:monospace;white-space:pre-wrap');
        var mx = Math.max.apply(null, c.activations.concat([1e-9]));
        c.tokens.forEach(function (t, i) {
          var a = Math.max(0, c.activations[i]) / mx;
          var s = el('span', t, 'background:rgba(255,120,0,' + a.toFixed(3) + ')' + (i === c.peak ? ';outline:1px solid #000' : ''));
          s.title = 'activation ' + c.activations[i];
          line.appendChild(s);
        });
        card.appendChild(line);
      });
      if (f.ablation) {
        card.appendChild(el('h4', 'ablation effect on the prompt (next-token log-likelihood)'));
        var ab = el('div', undefined, 'font-family:monospace;white-space:pre-wrap');
        f.ablation.tokens.forEach(function (t, i) {
          var d = i > 0 ? f.ablation.delta_logprob[i - 1] : 0, m = Math.min(1, Math.abs(d));
          var col = d < 0 ? 'rgba(220,0,0,' + m + ')' : 'rgba(0,0,220,' + m + ')';
          var s = el('span', t, 'text-decoration:underline;text-decoration-thickness:3px;text-decoration-color:' + col);
          s.title = 'change ' + d; ab.appendChild(s);
        });
        card.appendChild(ab);
      }
      card.appendChild(el('h4', 'promotes'));
      card.appendChild(el('div', f.promoted.map(function (p) { return p[0] + ' (' + p[1] + ')'; }).join(', ')));
      card.appendChild(el('h4', 'suppresses'));
      card.appendChild(el('div', f.suppressed.map(function (p) { return p[0] + ' (' + p[1] + ')'; }).join(', ')));
    }
  }
  window.cgShow = show;
  function ready() {
    if (typeof network === 'undefined') { setTimeout(ready, 50); return; }
    network.on('click', function (p) { if (p.nodes.length) show(p.nodes[0]); });
    network.on('hoverNode', function (p) { show(p.node); });
    var slider = document.getElementById('cg-min');
    slider.max = data.max_weight;
    slider.step = data.max_weight / 100;
    slider.addEventListener('input', function () {
      var v = parseFloat(slider.value); document.getElementById('cg-min-val').textContent = v.toFixed(3);
      edges.update(edges.get().map(function (e) { return {id: e.id, hidden: Math.abs(e.weight) < v}; }));
    });
    document.getElementById('cg-go').addEventListener('click', function () {
      var id = document.getElementById('cg-find').value.trim();
      if (nodes.get(id)) { network.selectNodes([id]); network.focus(id, {scale: 1.2}); show(id); }
      else { document.getElementById('cg-card').textContent = 'no node ' + id; }
    });
    window.cgReady = true;
  }
  ready();
})();
</script>
"""


def _influence(g: Graph) -> torch.Tensor:
    if g.n_edges == 0:
        return torch.zeros(g.n_nodes, dtype=torch.float64)
    return influence(normalised_adjacency(g.sources, g.targets, g.weights, g.n_nodes), g.target_weights)


def _color(node) -> str:
    if node.kind in ("feature", "error") and node.site:
        kind = node.site.split(".", 1)[1]
        return COLORS["error"] if node.kind == "error" else COLORS.get(kind, "#607d8b")
    return COLORS.get(node.kind, "#607d8b")


def render_html(g: Graph, max_nodes: int = 500, title: str = "circuitgraph") -> str:
    """The page as a string (see the module docstring)."""
    from pyvis.network import Network

    from circuitgraph.graph.pruning import prune_graph

    shown = g
    if g.n_nodes > max_nodes:
        shown = prune_graph(g, node_threshold=0.8, edge_threshold=0.98, max_nodes=max_nodes)
    inf = _influence(shown)
    top = float(inf.max()) if inf.numel() and float(inf.max()) > 0 else 1.0
    max_w = float(shown.weights.abs().max()) if shown.n_edges else 1.0
    net = Network(height="100vh", width="66%", directed=True, cdn_resources="in_line", heading="")
    depths = sorted({n.depth for n in shown.nodes})
    column = {d: i for i, d in enumerate(depths)}
    per_column: dict[int, int] = {}
    cards = {}
    for i, node in enumerate(shown.nodes):
        col = column[node.depth]
        row = node.pos if node.pos is not None else per_column.get(col, 0)
        per_column[col] = per_column.get(col, 0) + 1
        size = 6 + 24 * (float(inf[i]) / top) ** 0.5 if node.kind not in ("logit", "metric") else 18
        net.add_node(node.id, label=shown.labels[i][:24] or node.id, x=col * 160, y=row * 60 + (per_column[col] % 3) * 12,
                     color=_color(node), size=size, physics=False)
        key = f"{node.site}#{node.index}"
        cards[node.id] = {"label": shown.labels[i], "activation": round(float(shown.activation[i]), 5),
                          "influence": round(float(inf[i]), 5), "card": g.features.get(key) if node.kind == "feature" else None}
    for e, (s, t, w) in enumerate(zip(shown.sources.tolist(), shown.targets.tolist(), shown.weights.tolist(), strict=True)):
        net.add_edge(shown.nodes[s].id, shown.nodes[t].id, id=e, weight=w, width=0.5 + 6 * abs(w) / max_w,
                     color="#1e88e5" if w >= 0 else "#e53935", arrows="to")
    net.set_options(json.dumps({"physics": {"enabled": False}, "interaction": {"hover": True},
                                "edges": {"smooth": False}}))
    html = net.generate_html()
    # no network access: drop every external script / stylesheet pyvis's template links
    html = re.sub(r'<script[^>]*\bsrc="[^"]*"[^>]*>\s*</script>', "", html)
    html = re.sub(r"<link[^>]*\bhref=\"https?://[^\"]*\"[^>]*/?>", "", html)
    meta = shown.metadata
    summary = (f"{title}: {shown.n_nodes} nodes, {shown.n_edges} edges"
               + (f" (pruned from {g.n_nodes} nodes)" if shown is not g else "") + _honest_numbers(meta))
    data = {"nodes": cards, "summary": summary, "max_weight": max_w, "n_nodes": shown.n_nodes, "n_edges": shown.n_edges}
    blob = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return html.replace("</body>", _PANEL.replace("__DATA__", blob) + "</body>")


HONEST_KEYS = ("faithfulness", "faithfulness_features_only", "faithfulness_errors_only", "ceiling", "completeness",
               "replacement_score", "completeness_score")


def _honest_numbers(meta: dict) -> str:
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


def to_html(g: Graph, path: str | Path, max_nodes: int = 500) -> Path:
    """Write the viewer page for ``g`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(g, max_nodes), encoding="utf-8")
    return path
