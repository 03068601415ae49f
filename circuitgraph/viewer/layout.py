"""Where each node of a viewed graph sits, computed in Python (the page runs no physics).

x is the token position (prompt graphs: the prompt reads left to right as a strip of token nodes
along the bottom), the offset from the answer (position-resolved dataset graphs) or one column
(graphs aggregated over positions); nodes without a position sit in a column of their own on the
right, except the metric, which sits over the last position it explains. y is the depth in the
forward pass, upward: token embeddings at the bottom, then every site row in forward order, the
logits and, above them, the metric at the top.

Nodes sharing a cell (one column, one depth) stand side by side in slots wide enough for the
widest label, wrapping into at most ``k`` sub-rows: a column is as many slots wide as its fullest
cell needs for that, and ``k`` is chosen so the whole picture fits the page's graph area (of aspect
:data:`ASPECT`) at the largest scale. Labels are drawn in a monospace font, so a label's
width is known here: one slot holds any label of at most :data:`MAX_LABEL_UNITS` cells, and a
sub-row is tall enough for the largest node and its label underneath. Hence no two nodes and no
two labels overlap, at any zoom.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

from circuitgraph.graph.nodes import Node

FONT_PX = 12
"""Default label font size (monospace) in canvas units."""
CHAR_EM = 0.62
"""Advance of one monospace cell in font sizes, a little above the common 0.6 em."""
MAX_LABEL_UNITS = 12
"""Labels are cut to this many monospace cells (wide characters count two)."""
LABEL_EM = 1.5
"""Height of a one-line label in font sizes."""
LABEL_PAD = 4.0
"""Distance of a label from its node."""
GAP_PX = 10.0
"""Free space between neighbouring slots, sub-rows and columns."""
ROW_GAP_PX = 16.0
"""Extra space between two depth rows."""
ASPECT = 1.05
"""Width / height the layout aims for (the graph area of a landscape window)."""


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
    left: float = 0.0
    """Smallest x of any slot (guides are drawn left of it)."""
    bottom: float = 0.0
    """Largest y of any label (column guides are drawn under it)."""


def column_key(node: Node, last_pos: int | None) -> tuple[int, int]:
    """Columns in left-to-right order: positions ascending, then nodes without a position."""
    if node.pos is not None:
        return (0, node.pos)
    if node.kind == "metric" and last_pos is not None:
        return (0, last_pos)
    return (1, 0)


def row_key(node: Node) -> tuple[float, int]:
    """Rows in bottom-to-top order: depth, and the metric above the logits it is made of."""
    return (node.depth, 1 if node.kind == "metric" else 0)


def _row_text(members: list[Node]) -> str:
    names: list[str] = []
    for n in members:
        if n.kind == "token":
            name = "tokens"
        elif n.kind in ("logit", "metric"):
            name = n.kind + "s" if n.kind == "logit" else "metric"
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
    cells: dict[tuple, list[int]] = {}
    for i, n in enumerate(nodes):
        cells.setdefault((column_key(n, last_pos), row_key(n)), []).append(i)
    for members in cells.values():
        members.sort(key=lambda i: (nodes[i].kind == "error", order[i], nodes[i].id))
    cols = sorted({c for c, _ in cells})
    rows = sorted({r for _, r in cells})
    slot = {c: max(max(label_units(labels[i]) * CHAR_EM * fonts[i], 2 * radius[i]) for (cc, _), m in cells.items()
                   if cc == c for i in m) + GAP_PX for c in cols}
    reach = {r: max(radius[i] for (_, rr), m in cells.items() if rr == r for i in m) for r in rows}
    lab = {r: max(LABEL_EM * fonts[i] + LABEL_PAD for (_, rr), m in cells.items() if rr == r for i in m) for r in rows}
    pitch = {r: 2 * reach[r] + lab[r] + GAP_PX for r in rows}
    col_slots = _column_slots(cells, cols, rows, slot, pitch)
    col_left, x = {}, 0.0
    for c in cols:
        col_left[c] = x
        x += col_slots[c] * slot[c] + GAP_PX
    xy: dict[int, tuple[float, float]] = {}
    row_guides: list[tuple[float, str]] = []
    base = 0.0
    for ri, r in enumerate(rows):
        n_sub = max(math.ceil(len(m) / col_slots[c]) for (c, rr), m in cells.items() if rr == r)
        for c in cols:
            members, wrap = cells.get((c, r), []), col_slots[c]
            for k in range(0, len(members), wrap):
                line = members[k:k + wrap]
                x0 = col_left[c] + (wrap - len(line)) * slot[c] / 2
                for j, i in enumerate(line):
                    xy[i] = (x0 + (j + 0.5) * slot[c], base - (k // wrap) * pitch[r])
        members_r = [nodes[i] for (_, rr), m in cells.items() if rr == r for i in m]
        row_guides.append((base - (n_sub - 1) * pitch[r] / 2, _row_text(members_r)))
        if ri + 1 < len(rows):  # the next row's labels hang below its nodes: clear this row's top nodes
            base -= (n_sub - 1) * pitch[r] + reach[r] + reach[rows[ri + 1]] + lab[rows[ri + 1]] + GAP_PX + ROW_GAP_PX
    positioned = last_pos is not None
    col_guides = []
    if not any(n.kind == "token" for n in nodes):
        col_guides = [(col_left[c] + col_slots[c] * slot[c] / 2, _column_text(c, positioned)) for c in cols]
    return Layout(xy, row_guides, col_guides, left=0.0, bottom=reach[rows[0]] + lab[rows[0]])


def _column_slots(cells: dict[tuple, list[int]], cols: list, rows: list, slot: dict, pitch: dict) -> dict:
    """Slots per column: for a cap of ``k`` sub-rows per cell, each column is as wide as its fullest
    cell needs; the ``k`` whose picture fits an :data:`ASPECT` frame at the largest scale wins."""
    col_max = {c: max(len(m) for (cc, _), m in cells.items() if cc == c) for c in cols}
    best: dict = {}
    best_extent = math.inf
    for k in range(1, max(col_max.values()) + 1):
        slots = {c: math.ceil(col_max[c] / k) for c in cols}
        width = sum(slots[c] * slot[c] + GAP_PX for c in cols)
        height = sum(max(math.ceil(len(m) / slots[c]) for (c, rr), m in cells.items() if rr == r) * pitch[r]
                     + ROW_GAP_PX for r in rows)
        extent = max(width / ASPECT, height)
        if extent < best_extent - 1e-9:
            best, best_extent = slots, extent
    return best
