"""Where each node of a viewed graph sits, computed in Python (the page runs no physics).

x is the token position (prompt graphs: the prompt reads left to right as a strip of token nodes
along the bottom), the offset from the answer (position-resolved dataset graphs) or one column
(graphs aggregated over positions); nodes without a position sit in a column of their own on the
right, except the metric, which sits over the last position it explains. y is the depth in the
forward pass, upward: token embeddings at the bottom, then every site row in forward order, the
metric and, above it, the output tokens with the model's probabilities.

Nodes sharing a cell (one column, one depth row) stand side by side in slots as wide as the
cell's widest label, wrapping into the row's sub-rows: a crowded cell (the last position of a
prompt holds most features) becomes a block several sub-rows tall within its depth band, not one
long line. How many sub-rows each depth band gets is chosen by :func:`subrows`: the narrowest
picture that fits the reference frame (:data:`FRAME`, the graph area of a 1400 x 900 window at
labels of :data:`MIN_LABEL_PX` screen pixels) or, when none fits, the one with the largest scale;
a prompt too long for the frame keeps the frame's height and grows to the right. Labels are
drawn in a monospace font, so a label's width is known here, and a sub-row is tall enough for the
largest node and its label underneath. Hence no two nodes and no two labels overlap, at any zoom.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

from circuitgraph.graph.nodes import Node

FONT_PX = 12
"""Default label font size (monospace) in canvas units; the smallest label of a page."""
CHAR_EM = 0.62
"""Advance of one monospace cell in font sizes, a little above the common 0.6 em."""
MAX_LABEL_UNITS = 12
"""Labels are cut to this many monospace cells (wide characters count two)."""
LABEL_EM = 1.25
"""Height of a one-line label in font sizes (the browser draws it 1 em tall)."""
LABEL_PAD = 4.0
"""Distance of a label from its node."""
GAP_PX = 6.0
"""Free space between neighbouring slots, sub-rows and columns."""
ROW_GAP_PX = 10.0
"""Extra space between two depth rows."""
MIN_LABEL_PX = 8.0
"""The page opens at a zoom where every label is at least this many screen pixels tall."""
FRAME_PX = (840.0, 735.0)
"""The graph area of a 1400 x 900 browser window (a 1400 x 757 viewport) right of the row names,
in screen pixels: the frame the layout and the page's default view are made for."""
FRAME = (FRAME_PX[0] * FONT_PX / 8.5, FRAME_PX[1] * FONT_PX / 8.5)
""":data:`FRAME_PX` in canvas units at labels of 8.5 px (a margin above :data:`MIN_LABEL_PX`)."""


def label_units(text: str) -> int:
    """Width of ``text`` in monospace cells: East Asian wide and full-width characters and
    characters outside the basic plane count two, combining marks zero."""
    units = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        units += 2 if unicodedata.east_asian_width(ch) in ("W", "F") or ord(ch) > 0xFFFF else 1
    return units


def short_label(text: str, limit: int = MAX_LABEL_UNITS) -> str:
    """``text`` on one line, control characters made visible, cut to ``limit`` cells with ``…``."""
    text = text.replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥")
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else "�" for ch in text)
    if not text.strip():
        text = "␣" * max(1, min(len(text), 3))
    if label_units(text) <= limit:
        return text
    out, used = "", 0
    for ch in text:
        w = label_units(ch)
        if used + w > limit - 1:
            break
        out, used = out + ch, used + w
    return out + "…"


@dataclass
class Layout:
    """Positions of the laid-out nodes and the guides drawn beside them."""

    xy: dict[int, tuple[float, float]]
    """Node index -> canvas ``(x, y)``; y grows downward, so deeper nodes have smaller y."""
    rows: list[tuple[float, str]] = field(default_factory=list)
    """``(y, text)`` per depth row: what the row holds (``tokens``, ``L2 transcoder``, ``logits``)."""
    columns: list[tuple[float, str]] = field(default_factory=list)
    """``(x, text)`` per column of a graph without token nodes (offsets, or ``all positions``)."""
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """``(left, top, right, bottom)`` around every node and label (guides are drawn outside it)."""

    def fits(self, frame: tuple[float, float] | None = None) -> bool:
        """Whether the picture fits ``frame`` (default :data:`FRAME`): readable in a 1400 x 900 window."""
        frame = frame or FRAME
        return self.box[2] - self.box[0] <= frame[0] and self.box[3] - self.box[1] <= frame[1]


def column_key(node: Node, last_pos: int | None) -> tuple[int, int]:
    """Columns in left-to-right order: positions ascending, then nodes without a position."""
    if node.pos is not None:
        return (0, node.pos)
    if node.kind == "metric" and last_pos is not None:
        return (0, last_pos)
    return (1, 0)


def row_key(node: Node) -> tuple[float, int]:
    """Rows in bottom-to-top order: depth, and the output tokens above the metric (no edge joins
    them: the metric reads the residual stream itself, so edges into it never cross the outputs)."""
    return (node.depth, 1 if node.kind == "logit" else 0)


def _row_text(members: list[Node]) -> str:
    names: list[str] = []
    for n in members:
        if n.kind == "token":
            name = "tokens"
        elif n.kind in ("logit", "metric"):
            name = "outputs" if n.kind == "logit" else "metric"
        elif n.kind == "supernode":
            name = "groups"
        elif n.site is not None and n.kind == "component":
            name = f"L{n.layer} " + ("MLP" if n.site.endswith("mlp") else "attention")
        elif n.site is not None:
            name = n.site.replace(".", " ")
        else:
            name = n.kind
        if name not in names:
            names.append(name)
    return " / ".join(names)


def _column_text(key: tuple[int, int], positioned: bool) -> str:
    if key[0] == 1:
        return "all positions" if not positioned else "no position"
    return f"position {key[1]}" if key[1] >= 0 else f"offset {key[1]}" + (" (answer)" if key[1] == -1 else "")


@dataclass
class Cells:
    """The grid: members of each ``(column, row)`` cell and the sizes the packing needs."""

    members: dict[tuple, list[int]]
    """``(column key, row key)`` -> node indices, in drawing order."""
    width: dict[tuple, float]
    """Slot width of each cell: its widest label or node, plus a gap."""
    pitch: dict[tuple, float]
    """Sub-row height of each row: its largest node and label, plus a gap."""


def subrows(cells: Cells, frame: tuple[float, float] = FRAME) -> dict[tuple, int]:
    """Sub-rows per depth row. Starting from one each, the step that narrows the picture most per
    unit of height added (every sub-row count a column's widest cells need to get narrower) is
    taken until no column can narrow; of the pictures passed, the narrowest that fits ``frame``
    wins, else the narrowest no taller than the frame, else the one with the largest scale."""
    rows = sorted({r for _, r in cells.members})
    by_col: dict = {}
    for (c, r), m in cells.members.items():
        by_col.setdefault(c, []).append((r, len(m), cells.width[(c, r)]))
    t = {r: 1 for r in rows}

    def col_width(c, tt) -> float:
        return max(math.ceil(n / tt[r]) * w for r, n, w in by_col[c])

    widths = {c: col_width(c, t) for c in by_col}
    def extent() -> tuple[float, float, dict]:
        return sum(widths.values()) + GAP_PX * len(widths), sum(cells.pitch[r] * t[r] for r in rows), dict(t)

    states = [extent()]
    while True:
        best = None
        for c, cell_list in by_col.items():
            need, ok = {}, True
            for r, n, w in cell_list:  # every cell as wide as the column must get narrower
                if math.ceil(n / t[r]) * w >= widths[c] - 1e-9:
                    k = math.ceil(n / t[r]) - 1
                    if k < 1:
                        ok = False
                        break
                    need[r] = max(need.get(r, t[r]), math.ceil(n / k))
            if not ok or not need:
                continue
            trial = {**t, **need}
            touched = {cc for cc, cl in by_col.items() if any(r in need for r, _, _ in cl)}
            gain = sum(widths[cc] - col_width(cc, trial) for cc in touched)
            cost = sum((need[r] - t[r]) * cells.pitch[r] for r in need)
            if gain > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, need, touched)
        if best is None:
            break
        t.update(best[1])
        for cc in best[2]:
            widths[cc] = col_width(cc, t)
        states.append(extent())
    fits = [s for s in states if s[0] <= frame[0] and s[1] <= frame[1]]
    if fits:
        return min(fits, key=lambda s: (max(s[0] / frame[0], s[1] / frame[1]), s[0]))[2]
    flat = [s for s in states if s[1] <= frame[1]]
    if flat:
        return min(flat, key=lambda s: s[0])[2]
    return min(states, key=lambda s: max(s[0] / frame[0], s[1] / frame[1]))[2]


def layout(nodes: list[Node], labels: list[str], radius: list[float], fonts: list[float], order: list[float]) -> Layout:
    """Lay out ``nodes`` (all of them; pass only the ones to show).

    Args:
        nodes: the nodes.
        labels: their displayed labels (already cut by :func:`short_label`).
        radius: their drawn half-sizes in canvas units.
        fonts: their label font sizes in canvas units.
        order: a sort key per node; a cell lists its nodes by ascending key (e.g. minus influence).
    """
    if not nodes:
        return Layout({})
    last_pos = max((n.pos for n in nodes if n.pos is not None), default=None)
    members: dict[tuple, list[int]] = {}
    for i, n in enumerate(nodes):
        members.setdefault((column_key(n, last_pos), row_key(n)), []).append(i)
    for m in members.values():
        m.sort(key=lambda i: (nodes[i].kind == "error", order[i], nodes[i].id))
    cols = sorted({c for c, _ in members})
    rows = sorted({r for _, r in members})
    width = {k: max(max(label_units(labels[i]) * CHAR_EM * fonts[i], 2 * radius[i]) for i in m) + GAP_PX
             for k, m in members.items()}
    reach = {r: max(radius[i] for (_, rr), m in members.items() if rr == r for i in m) for r in rows}
    lab = {r: max(LABEL_EM * fonts[i] + LABEL_PAD for (_, rr), m in members.items() if rr == r for i in m) for r in rows}
    pitch = {r: 2 * reach[r] + lab[r] + GAP_PX for r in rows}
    t = subrows(Cells(members, width, {r: pitch[r] + ROW_GAP_PX / 2 for r in rows}))
    col_w = {c: max(math.ceil(len(m) / t[r]) * width[(c, r)] for (cc, r), m in members.items() if cc == c) for c in cols}
    col_left, x = {}, 0.0
    for c in cols:
        col_left[c] = x
        x += col_w[c] + GAP_PX
    xy: dict[int, tuple[float, float]] = {}
    row_guides: list[tuple[float, str]] = []
    base = 0.0
    for ri, r in enumerate(rows):
        for c in cols:
            cell = members.get((c, r), [])
            if not cell:
                continue
            wrap, w = math.ceil(len(cell) / t[r]), width[(c, r)]
            for k in range(0, len(cell), wrap):
                line = cell[k:k + wrap]
                x0 = col_left[c] + (col_w[c] - len(line) * w) / 2
                for j, i in enumerate(line):
                    xy[i] = (x0 + (j + 0.5) * w, base - (k // wrap) * pitch[r])
        used = max(math.ceil(len(m) / math.ceil(len(m) / t[r])) for (_, rr), m in members.items() if rr == r)
        row_guides.append((base - (used - 1) * pitch[r] / 2, _row_text([nodes[i] for (_, rr), m in members.items()
                                                                         if rr == r for i in m])))
        if ri + 1 < len(rows):  # the next row's labels hang below its nodes: clear this row's top nodes
            base -= (used - 1) * pitch[r] + reach[r] + reach[rows[ri + 1]] + lab[rows[ri + 1]] + GAP_PX + ROW_GAP_PX
    positioned = last_pos is not None
    col_guides = []
    if not any(n.kind == "token" for n in nodes):
        col_guides = [(col_left[c] + col_w[c] / 2, _column_text(c, positioned)) for c in cols]
    half = [max(label_units(labels[i]) * CHAR_EM * fonts[i], 2 * radius[i]) / 2 for i in range(len(nodes))]
    box = (min(xy[i][0] - half[i] for i in xy), min(xy[i][1] - radius[i] for i in xy),
           max(xy[i][0] + half[i] for i in xy),
           max(xy[i][1] + radius[i] + LABEL_PAD + LABEL_EM * fonts[i] for i in xy))
    return Layout(xy, row_guides, col_guides, box)
