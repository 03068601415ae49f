"""Table and SVG chart of the ceiling study (``benchmarks/study_ceiling.py``): the features-only ceiling of
each dictionary recipe on each task, one group of bars per recipe. Shared by the study script
(which writes ``ceiling.svg`` for the README) and ``circuitgraph report --study``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

TASKS = ("ioi", "agreement", "greater_than", "induction")
COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")


def ceiling_svg(rows: Sequence[Mapping], tasks: Sequence[str], bar: int = 9, h: int = 300) -> str:
    """Grouped bars: x = recipe (``row["lever"]``), one bar per task of ``row["tasks"][task]["ceiling"]``;
    dashed lines at the issue's targets (0.9, and 0.8 for induction)."""
    left, top, bottom = 40, 20, 110
    group = bar * len(tasks) + 10
    w = left + group * max(1, len(rows)) + 150
    plot_h = h - top - bottom

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(1.0, v)))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11" font-family="sans-serif">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out.append(f'<line x1="{left}" x2="{w - 150}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for target, dash in ((0.9, "6,3"), (0.8, "2,3")):
        out.append(f'<line x1="{left}" x2="{w - 150}" y1="{y(target):.1f}" y2="{y(target):.1f}" stroke="#333" '
                   f'stroke-dasharray="{dash}"/>')
    for i, row in enumerate(rows):
        x0 = left + 5 + i * group
        for j, task in enumerate(tasks):
            v = float(row["tasks"][task]["ceiling"])
            out.append(f'<rect x="{x0 + j * bar}" y="{y(v):.1f}" width="{bar - 1}" height="{y(0) - y(v):.1f}" '
                       f'fill="{COLOURS[j % len(COLOURS)]}"><title>{escape(str(row["lever"]))} {escape(task)}: '
                       f'{v:.3f}</title></rect>')
        cx = x0 + bar * len(tasks) / 2
        out.append(f'<text x="{cx:.1f}" y="{y(0) + 8:.1f}" transform="rotate(60 {cx:.1f} {y(0) + 8:.1f})">'
                   f'{escape(str(row["lever"]))}</text>')
    for j, task in enumerate(tasks):
        ly = top + 14 * j
        out.append(f'<rect x="{w - 140}" y="{ly}" width="10" height="10" fill="{COLOURS[j % len(COLOURS)]}"/>')
        out.append(f'<text x="{w - 125}" y="{ly + 9}">{escape(task)}</text>')
    out.append(f'<text x="{w - 140}" y="{top + 14 * len(tasks) + 12}">dashed: targets 0.9 / 0.8</text>')
    out.append(f'<text x="{left}" y="{top - 6}">features-only ceiling (held-out prompts, patch ablation)</text>')
    out.append("</svg>")
    return "\n".join(out)


def _cells(row: Mapping, tasks: Sequence[str]) -> list[str]:
    secs = f"{row['train_s']:.0f}" if row.get("train_s") else "–"
    cells = [str(row["lever"]), str(row["latents"]), f"{row['ce_recovered_min']:.3f} / {row['ce_recovered_mean']:.3f}",
             f"{row['fvu_mean']:.3f}", f"{row['l0_mean']:.1f}", f"{row['dead_max']:.3f}", secs]
    for t in tasks:
        m = row["tasks"][t]
        nodes = f"{m['nodes']}" if m["reached_on_selection"] else f">{m['nodes']}"
        cells.append(f"{m['ceiling']:.3f} / {nodes} ({m['features_only']:.2f})")
    return cells


HEADER = ("recipe", "latents", "CE rec. min / mean", "FVU mean", "L0", "dead max", "train s")


def study_markdown(rows: Sequence[Mapping], tasks: Sequence[str] = TASKS) -> str:
    """Markdown table: per recipe, dictionary quality, then per task ``ceiling / nodes (held-out
    features-only faithfulness of that circuit)``; ``>N``: the target was not reached within N nodes."""
    head = [*HEADER, *(f"{t}: ceiling / nodes (feat-only)" for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(_cells(r, tasks)) + " |" for r in rows]
    return "\n".join(lines)


def study_html(rows: Sequence[Mapping], tasks: Sequence[str] = TASKS) -> str:
    """The same table as HTML (every cell escaped), with the chart above it."""
    head = [*HEADER, *(f"{t}: ceiling / nodes (feat-only)" for t in tasks)]
    out = [ceiling_svg(rows, tasks), "<table border='1' cellspacing='0' cellpadding='3'><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in head]
    out.append("</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in _cells(r, tasks)) + "</tr>")
    out.append("</table>")
    return "".join(out)
