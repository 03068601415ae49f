"""Regenerate the viewer pictures of the README: the IOI prompt graph and the IOI dataset circuit.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/make_viewer_screenshots.py --threads 2

Traces both with the command line as a new user would (``circuitgraph trace --prompt ... --answer
" Mary" --contrast " John"`` and ``circuitgraph trace --task ioi --n 64 --eval-n 64 --max-nodes 200``),
writes each page with ``circuitgraph view``, opens it in headless Chromium (1600 x 1000) and saves
``docs/viewer_prompt.png`` (the default view as it opens, the strongest feature's card open, the
mouse moved off the graph so nothing is dimmed) and ``docs/viewer_circuit.png`` (the mouse on the
strongest feature: its paths to the metric lit, the rest dimmed; its card open). Prints per page
and window (1600 x 1000, and the 1400 x 900 the layout is made for): its size, the time from
navigation to interactive, the view it opens on, the nodes and edges drawn, the default zoom, the
smallest label on screen in pixels, and the number of overlapping node pairs, label pairs and
labels over nodes (read back from vis-network).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from circuitgraph.cli.main import main as cli  # noqa: E402
from circuitgraph.viewer.browser import chrome, mouse_to, open_page, overlapping, shown  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROMPT = "When Mary and John went to the store, John gave a drink to"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DOCS, help="folder for the two PNG files")
    args = ap.parse_args()
    threads = ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assert cli([*threads, "trace", "--prompt", PROMPT, "--answer", " Mary", "--contrast", " John",
                    "--out", str(work / "prompt")]) == 0
        assert cli([*threads, "trace", "--task", "ioi", "--n", "64", "--eval-n", "64", "--max-nodes", "200",
                    "--out", str(work / "circuit")]) == 0
        for width, height in ((1400, 900), (1600, 1000)):
            driver = chrome(width, height)
            try:
                for name in ("prompt", "circuit"):
                    page = work / f"{name}.html"
                    assert cli(["view", str(work / name), "--out", str(page)]) == 0
                    ready_ms = open_page(driver, page)
                    items = shown(driver)
                    bad = overlapping(items)
                    print(json.dumps({"page": name, "window": f"{width}x{height}", "bytes": page.stat().st_size,
                                      "ready_ms": round(ready_ms), "view": driver.execute_script("return cgData.default_view") + 1,
                                      "nodes_drawn": len(items), "edges_drawn": driver.execute_script("return edges.length"),
                                      "scale": round(driver.execute_script("return network.getScale()"), 3),
                                      "min_label_px": round(min(it["label_px"] for it in items), 2),
                                      **{f"overlapping_{k}": len(v) for k, v in bad.items()}}))
                    if width != 1600:
                        continue
                    top = max((it for it in items if it["shape"] == "dot"), key=lambda it: it["size"])["id"]
                    mouse_to(driver, top, click=True)  # its card; the circuit keeps the mouse on it (paths lit)
                    if name == "prompt":
                        mouse_to(driver, None)
                    png = args.out / f"viewer_{name}.png"
                    driver.save_screenshot(str(png))
                    print(json.dumps({"png": str(png)}))
            finally:
                driver.quit()

if __name__ == "__main__":
    main()
