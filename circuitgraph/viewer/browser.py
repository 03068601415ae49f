"""A viewer page in headless Chromium, and what it drew, read back from vis-network itself: node
positions, sizes and label boxes, drawn edges, overlaps; the real mouse on a node. Used by the
viewer tests and ``benchmarks/make_viewer_screenshots.py``. Needs ``selenium`` (the ``dev`` extra)
and Chromium with its driver (Debian: ``chromium`` + ``chromium-driver``; ``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from circuitgraph.errors import CircuitGraphError

SHOWN_JS = """
var shown = nodes.get({filter: function (n) { return !n.hidden; }}), ids = shown.map(function (n) { return n.id; });
var scale = network.getScale(), at = network.getViewPosition(), pos = network.getPositions(ids);
var r = document.querySelector('#mynetwork canvas').getBoundingClientRect(), screen = {};
ids.forEach(function (id) {
  var d = network.canvasToDOM(pos[id]);
  screen[id] = d.x >= 0 && d.y >= 0 && d.x <= r.width && d.y <= r.height;
});
// vis-network lays out the labels of the nodes it draws, and draws only those in the window: show
// them all for a moment to read every label box, then go back
network.fit({animation: false});
network.redraw();
var out = shown.map(function (n) {
  var b = network.body.nodes[n.id], L = b.labelModule.size;
  return {id: n.id, x: pos[n.id].x, y: pos[n.id].y, size: b.options.size, shape: b.options.shape,
          opacity: b.options.opacity === undefined ? 1 : b.options.opacity, label: [L.left, L.top, L.width, L.height],
          label_px: b.options.font.size * scale, color: b.options.color.background, on_screen: screen[n.id]};
});
network.moveTo({position: at, scale: scale, animation: false});
network.redraw();
return out;
"""
"""Every drawn node: position, size, shape, opacity, label box (canvas units), label height on screen
(font size times zoom, in pixels), fill colour and whether its centre is in the window, all read
from vis-network itself."""

REACH = {"star": 1.3, "triangle": 1.16}
"""How far vis-network draws a shape beyond its ``size`` (its star's points, its triangle's apex)."""


def find_chromium() -> tuple[str, str] | None:
    """``(browser, chromedriver)`` paths, or ``None`` when either is missing."""
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver_bin = shutil.which("chromedriver")
    return (binary, driver_bin) if binary and driver_bin else None


def chrome(width: int = 1400, height: int = 900):
    """A headless Chromium driver with a ``width`` x ``height`` window."""
    found = find_chromium()
    if found is None:
        raise CircuitGraphError("Chromium / chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(found[1]), options=opts)


def open_page(driver, path: Path, timeout: float = 30.0) -> float:
    """Load ``path`` and wait until the viewer says it is ready; milliseconds from navigation to ready."""
    driver.get(Path(path).resolve().as_uri())
    end = time.monotonic() + timeout
    while not driver.execute_script("return window.cgReady === true"):
        if time.monotonic() > end:
            raise CircuitGraphError(f"{path}: the viewer was not ready after {timeout} s")
        time.sleep(0.02)
    return float(driver.execute_script("return window.cgReadyMs"))


def shown(driver) -> list[dict]:
    """:data:`SHOWN_JS` at the current zoom (vis-network lays out the label of every node it draws,
    also where the label is too small to be painted)."""
    return driver.execute_script(SHOWN_JS)


def page_edges(driver) -> dict[tuple[str, str], float]:
    """The drawn edges, ``(source id, target id) -> weight``."""
    return {(e["from"], e["to"]): e["w"] for e in driver.execute_script("return edges.get()")}


def boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two ``(left, top, right, bottom)`` boxes share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def overlapping(items: list[dict]) -> dict[str, list]:
    """Pairs of drawn nodes whose shapes overlap, whose labels overlap, and labels over other nodes."""
    shapes, labels = [], []
    for it in items:
        r = it["size"] * REACH.get(it["shape"], 1.0)
        shapes.append((it["x"] - r, it["y"] - r, it["x"] + r, it["y"] + r))
        left, top, w, h = it["label"]
        labels.append((left, top, left + w, top + h) if w > 0 else None)
    out: dict[str, list] = {"nodes": [], "labels": [], "label_on_node": []}
    for i in range(len(items)):
        for j in range(len(items)):
            pair = (items[i]["id"], items[j]["id"])
            if i < j and boxes_overlap(shapes[i], shapes[j]):
                out["nodes"].append(pair)
            if i < j and labels[i] and labels[j] and boxes_overlap(labels[i], labels[j]):
                out["labels"].append(pair)
            if i != j and labels[i] and boxes_overlap(labels[i], shapes[j]):
                out["label_on_node"].append(pair)
    return out


def mouse_to(driver, node_id: str | None, click: bool = False) -> None:
    """Move the real mouse (W3C actions, viewport coordinates) onto a node's centre, or onto the
    graph's top-left corner for ``None``; optionally click there."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    at = driver.execute_script(
        "var r = document.querySelector('#mynetwork canvas').getBoundingClientRect();"
        "if (arguments[0] === null) return {x: r.left + 3, y: r.top + 3};"
        "var p = network.canvasToDOM(network.getPositions([arguments[0]])[arguments[0]]);"
        "return {x: r.left + p.x, y: r.top + p.y};", node_id)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(round(at["x"]), round(at["y"]))
    if click:
        actions.pointer_action.click()
    actions.perform()
