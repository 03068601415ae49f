"""The dictionary report: an HTML page with the L0-FVU frontier, CE loss recovered per layer and
site, and feature-density histograms, drawn as inline SVG (no plotting dependency, no network)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from circuitgraph.viewer.study_plot import study_html
from dictionaries.metrics import DictionaryMetrics, density_histogram
from dictionaries.site import Site

KIND_COLORS = {"resid_pre": "#1e88e5", "resid_mid": "#42a5f5", "resid_post": "#1565c0", "mlp_out": "#e53935",
               "attn_z": "#fb8c00", "mlp_post": "#d81b60", "transcoder": "#8e24aa",
               "clt": "#6a1b9a"}
MARKERS = ["circle", "square", "diamond", "triangle"]


def _marker(shape: str, x: float, y: float, color: str, tip: str) -> str:
    t = f"<title>{html.escape(tip)}</title>"
    if shape == "square":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{color}">{t}</rect>'
    if shape == "diamond":
        return f'<polygon points="{x},{y - 5} {x + 5},{y} {x},{y + 5} {x - 5},{y}" fill="{color}">{t}</polygon>'
    if shape == "triangle":
        return f'<polygon points="{x},{y - 5} {x + 5},{y + 4} {x - 5},{y + 4}" fill="{color}">{t}</polygon>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}">{t}</circle>'


def frontier_svg(sets: Mapping[str, Mapping[Site, DictionaryMetrics]], w: int = 560, h: int = 360) -> str:
    """L0 (log scale) against FVU, one point per dictionary; marker = set, colour = site kind;
    a line joins each site kind's Pareto frontier (lowest FVU reached at that L0 or less)."""
    pts = [(name, s, m) for name, ms in sets.items() for s, m in ms.items()]
    l0s = [max(m.l0, 1e-3) for _, _, m in pts]
    lo, hi = math.log10(min(l0s)) - 0.1, math.log10(max(l0s)) + 0.1
    fmax = max(m.fvu for _, _, m in pts) * 1.1 or 1.0
    pad = 50

    def xy(l0: float, fvu: float) -> tuple[float, float]:
        return (pad + (math.log10(max(l0, 1e-3)) - lo) / max(hi - lo, 1e-9) * (w - 2 * pad),
                h - pad - fvu / fmax * (h - 2 * pad))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#000"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#000"/>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">L0 (active latents per token, log scale)</text>',
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">FVU</text>',
           f'<text x="{pad - 4}" y="{pad}" text-anchor="end">{fmax:.2f}</text>',
           f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">0</text>']
    for kind in sorted({s.kind for _, s, _ in pts}):
        mine = sorted((m.l0, m.fvu) for _, s, m in pts if s.kind == kind)
        front, best = [], float("inf")
        for l0, fvu in mine:
            if fvu < best:
                best = fvu
                front.append(xy(l0, fvu))
        if len(front) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in front)
            out.append(f'<polyline points="{path}" fill="none" stroke="{KIND_COLORS.get(kind, "#555")}" stroke-dasharray="4 2"/>')
    names = list(sets)
    for name, s, m in pts:
        x, y = xy(m.l0, m.fvu)
        out.append(_marker(MARKERS[names.index(name) % len(MARKERS)], x, y, KIND_COLORS.get(s.kind, "#555"),
                           f"{name} {s.id}: L0 {m.l0:.1f}, FVU {m.fvu:.4f}"))
    out.append("</svg>")
    return "".join(out)


def ce_grid_svg(metrics: Mapping[Site, DictionaryMetrics], cell: int = 64) -> str:
    """Rows site kinds, columns layers; cell shade and number: CE loss recovered."""
    kinds = sorted({s.kind for s in metrics})
    layers = sorted({s.layer for s in metrics})
    w, h = 110 + cell * len(layers), 30 + cell * len(kinds) // 2 + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">']
    for j, layer in enumerate(layers):
        out.append(f'<text x="{110 + j * cell + cell / 2}" y="18" text-anchor="middle">L{layer}</text>')
    for i, kind in enumerate(kinds):
        y = 26 + i * cell // 2
        out.append(f'<text x="104" y="{y + cell / 4 + 4}" text-anchor="end">{html.escape(kind)}</text>')
        for j, layer in enumerate(layers):
            m = metrics.get(Site(layer, kind))
            if m is None:
                continue
            v = m.ce_recovered
            shade = 0 if math.isnan(v) else max(0.0, min(1.0, (v - 0.8) / 0.2))
            color = f"rgb({int(255 - 180 * shade)},{int(255 - 60 * shade)},{int(255 - 180 * shade)})"
            out.append(f'<rect x="{110 + j * cell}" y="{y}" width="{cell - 2}" height="{cell // 2 - 2}" fill="{color}">'
                       f"<title>{html.escape(Site(layer, kind).id)}: CE recovered {v:.4f}</title></rect>")
            out.append(f'<text x="{110 + j * cell + cell / 2}" y="{y + cell / 4 + 4}" text-anchor="middle">{v:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def histogram_svg(site: Site, m: DictionaryMetrics, w: int = 220, h: int = 120) -> str:
    """log10 feature-density histogram of one dictionary (dead latents in the lowest bin)."""
    edges, counts = density_histogram(m.density)
    top = max(counts) or 1
    bw = (w - 20) / len(counts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="10">',
           f'<text x="{w / 2}" y="11" text-anchor="middle">{html.escape(site.id)} (dead {m.dead_frac:.3f})</text>']
    for i, c in enumerate(counts):
        bh = c / top * (h - 40)
        out.append(f'<rect x="{10 + i * bw:.1f}" y="{h - 20 - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="#5c6bc0">'
                   f"<title>10^{edges[i]:.1f}..10^{edges[i + 1]:.1f}: {c}</title></rect>")
    out.append(f'<text x="10" y="{h - 6}">1e{edges[0]:.0f}</text><text x="{w - 10}" y="{h - 6}" text-anchor="end">1</text>')
    out.append("</svg>")
    return "".join(out)


def render_report(sets: Mapping[str, Mapping[Site, DictionaryMetrics]], title: str = "dictionary report",
                  study: Sequence[Mapping] | None = None) -> str:
    """The full page: the ceiling study (when given: rows of ``benchmarks/study_ceiling.py``'s
    results.jsonl), the frontier over every set, then per set its CE grid, table and histograms."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>",
             "<body style='font:13px sans-serif;margin:16px'>", f"<h1>{html.escape(title)}</h1>"]
    if study:
        parts += ["<h2>Ceiling study: features-only ceiling and smallest features-only circuit per recipe</h2>",
                  "<p>Held-out prompts, patch ablation; nodes count error nodes; (x) = held-out features-only "
                  "faithfulness of the smallest circuit reaching 0.8 on the selection prompts.</p>", study_html(study)]
    if sets:
        parts += ["<h2>L0 - FVU frontier</h2>", frontier_svg(sets),
                  "<p>" + ", ".join(f"{html.escape(n)}: {MARKERS[i % len(MARKERS)]}" for i, n in enumerate(sets)) + "</p>"]
    for name, metrics in sets.items():
        parts.append(f"<h2>{html.escape(name)}: CE loss recovered per layer and site</h2>")
        parts.append(ce_grid_svg(metrics))
        parts.append("<table border='1' cellspacing='0' cellpadding='3'><tr><th>site</th><th>L0</th><th>FVU</th>"
                     "<th>dead</th><th>CE recovered</th><th>KL</th></tr>")
        for s, m in sorted(metrics.items()):
            parts.append(f"<tr><td>{html.escape(s.id)}</td><td>{m.l0:.1f}</td><td>{m.fvu:.4f}</td><td>{m.dead_frac:.3f}</td>"
                         f"<td>{m.ce_recovered:.4f}</td><td>{m.kl:.4f}</td></tr>")
        parts.append("</table><h3>feature-density histograms (log10 firing frequency)</h3><div>")
        parts += [histogram_svg(s, m) for s, m in sorted(metrics.items())]
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)
