"""The offline HTML viewer, its security, exports, and (when Chromium exists) a real browser."""

from __future__ import annotations

import json
import re

import networkx as nx
import pytest
import torch

from circuitgraph.cli.main import main
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.graph.pruning import prune_graph
from circuitgraph.viewer.browser import chrome, find_chromium, open_page
from circuitgraph.viewer.export import circuit_tracer_json, export_graph
from circuitgraph.viewer.html import render_html, to_html
from circuitgraph.viewer.style import EDGE_EXCITE, EDGE_INHIBIT, SHAPES, SITE_COLORS, legend_html, node_color
from circuitgraph.viewer.views import CT_VIEW

HOSTILE = ['<script>window.cgPwned=1</script>', '"><img src=x onerror="window.cgPwned=2">', "</script><b>x</b>"]


def hostile_graph() -> Graph:
    nodes = [Node("token", -1, pos=0), Node("token", -1, pos=1), Node("feature", 0.7, "L0.transcoder", 3, 1),
             Node("feature", 1.7, "L1.transcoder", 9, 1), Node("error", 0.7, "L0.transcoder", pos=1),
             Node("logit", 2, index=4, pos=1)]
    card = {"site": "L0.transcoder", "feature": 3, "label": HOSTILE[0], "density": 0.1,
            "contexts": [{"tokens": [HOSTILE[1], " a", HOSTILE[2]], "activations": [0.0, 1.0, 2.0], "peak": 2}],
            "promoted": [[HOSTILE[0], 1.0]], "suppressed": [[HOSTILE[1], -1.0]]}
    return Graph(nodes, torch.tensor([0, 0, 1.0, 2.0, 0.3, 5.0]), torch.tensor([0, 1, 2, 4, 3, 2]),
                 torch.tensor([2, 2, 3, 3, 5, 5]), torch.tensor([0.5, 1.0, 2.0, -0.5, 3.0, -1.0]),
                 torch.tensor([0, 0, 0, 0, 0, 1.0]), labels=[HOSTILE[0], HOSTILE[1], HOSTILE[2], "f9", "err", "x"],
                 metadata={"prompt": HOSTILE[0]}, features={"L0.transcoder#3": card})


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="cg-data">(.*?)</script>', page, re.S).group(1))


def test_page_is_offline_and_escapes_everything(tmp_path):
    html = render_html(hostile_graph())
    assert not re.findall(r'<script[^>]*\bsrc=', html)
    assert not re.findall(r'<link[^>]*href="https?://', html)
    for text in HOSTILE:
        assert text not in html
    data = _data(html)
    assert data["n_nodes"] == 6 and data["n_edges"] == 6
    assert data["cards"]["L0.transcoder#3"]["label"] == HOSTILE[0]
    assert {n["id"]: n["text"] for n in data["nodes"]}["tok@1"] == HOSTILE[1]


def test_large_graph_page_holds_only_its_views(tmp_path):
    """800 features: the page opens on the pruning at circuit-tracer's thresholds with at most
    ``max_edges`` edges, and carries only what some view shows."""
    n = 800
    nodes = [Node("feature", float(i % 4), f"L{i % 4}.resid_post", i, 1) for i in range(n)] + [Node("logit", 5, index=0, pos=1)]
    src = torch.arange(n)
    g = Graph(nodes, torch.ones(n + 1), src, torch.full((n,), n), torch.rand(n, generator=torch.Generator().manual_seed(0)),
              torch.cat([torch.zeros(n), torch.ones(1)]))
    data = _data(render_html(g, max_edges=20))
    assert data["default_view"] == CT_VIEW  # 20 features in one column: readable, so circuit-tracer's view
    default = data["views"][data["default_view"]]
    ref = prune_graph(g, 0.8, 0.98, max_edges=20)
    assert (default["n_nodes"], default["n_edges"]) == (ref.n_nodes, ref.n_edges) == (21, 20)
    assert data["page_edges"] == len(data["edges"]) // 4 == 10 * 20 and len(data["nodes"]) == 10 * 20 + 1
    assert data["summary"].startswith("801 nodes, 800 edges") and data["title"] == "graph"


def test_exports_round_trip(tmp_path):
    g = hostile_graph()
    ct = circuit_tracer_json(g)
    assert {"metadata", "nodes", "links"} <= set(ct)
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "activation", "influence"} <= set(ct["nodes"][0])
    assert {"source", "target", "weight"} == set(ct["links"][0])
    assert len(ct["links"]) == g.n_edges and ct["nodes"][0]["layer"] == "E"
    nl = export_graph(g, tmp_path / "g.json", "node-link")
    back = nx.node_link_graph(json.loads(nl.read_text()), edges="links")
    assert back.number_of_nodes() == g.n_nodes and back.number_of_edges() == g.n_edges
    gm = nx.read_graphml(export_graph(g, tmp_path / "g.graphml", "graphml"))
    assert gm.number_of_nodes() == g.n_nodes
    assert gm.edges["L0.transcoder#3@1", "L1.transcoder#9@1"]["weight"] == 2.0


def test_cli_view_and_export(tmp_path, capsys):
    g = hostile_graph()
    g.save(tmp_path / "g")
    assert main(["view", str(tmp_path / "g"), "--out", str(tmp_path / "v.html")]) == 0
    assert (tmp_path / "v.html").read_text().count("cg-data") >= 1
    assert main(["export", str(tmp_path / "g"), "--format", "circuit-tracer", "--out", str(tmp_path / "ct.json")]) == 0
    assert json.loads((tmp_path / "ct.json").read_text())["nodes"]


def test_browser_renders_graph_and_never_runs_markup(tmp_path):
    pytest.importorskip("selenium")
    if find_chromium() is None:
        pytest.skip("Chromium / chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    driver = chrome()
    try:
        path = to_html(hostile_graph(), tmp_path / "v.html")
        open_page(driver, path)
        assert driver.execute_script("return nodes.get({filter: function (n) { return !n.hidden; }}).length") == 6
        assert driver.execute_script("return edges.length") == 6
        assert driver.execute_script("return window.cgPwned") is None
        driver.execute_script("cgShow('L0.transcoder#3@1')")
        card = driver.execute_script("return document.getElementById('cg-card').textContent")
        assert HOSTILE[0] in card and HOSTILE[1] in card and driver.execute_script("return window.cgPwned") is None
        assert driver.title == f'prompt graph of "{HOSTILE[0]}"'
        assert driver.find_element("id", "cg-title").text == driver.title
        driver.execute_script("cgShow('tok@1')")
        assert HOSTILE[1].replace('"', '\\"') in driver.execute_script("return document.getElementById('cg-card').textContent")
        driver.execute_script("cgHighlight('tok@1'); cgHighlight(null)")
        assert driver.execute_script("return window.cgPwned") is None
        driver.save_screenshot(str(tmp_path / "viewer.png"))
        assert (tmp_path / "viewer.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_report_pictures(default_model, v1_dicts, tmp_path, capsys):
    from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
    from circuitgraph.viewer.report import render_report
    from dictionaries.metrics import evaluate_dictionaries

    sites = [s for s in v1_dicts if s.layer == 1 and s.kind in ("resid_post", "attn_z")]
    tokens = ToyCorpus(CorpusConfig(seed=7, seq_len=32)).tokens(4)
    m = evaluate_dictionaries(default_model, {s: v1_dicts[s] for s in sites}, tokens)
    page = render_report({"set <a>": m, "again": m})
    assert page.count("<svg") == 1 + 2 * (1 + len(sites))  # frontier; per set: CE grid + histograms
    assert "set <a>" not in page and "set &lt;a&gt;" in page
    for s in sites:
        assert f"{m[s].ce_recovered:.3f}" in page
    assert main(["report", "--dicts", "circuitgraph/models/v1_dicts", "--n-seq", "2", "--density-seqs", "4",
                 "--seq-len", "32", "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().count("<svg") == 1 + 1 + 16


def test_header_shows_the_honest_numbers():
    g = hostile_graph()
    g.metadata.update({"n_nodes": 5, "n_feature_nodes": 4, "n_error_nodes": 1, "held_out": True, "eval_n_prompts": 64,
                       "faithfulness": 0.824, "faithfulness_features_only": 0.189, "faithfulness_errors_only": 0.212,
                       "ceiling": 0.357, "completeness": 1.003})
    s = _data(render_html(g))["summary"]
    assert "circuit 5 nodes = 4 features + 1 error nodes" in s and "64 held-out prompts" in s
    for text in ("faithfulness 0.824", "faithfulness features only 0.189", "faithfulness errors only 0.212",
                 "ceiling 0.357", "completeness 1.003"):
        assert text in s


def test_colours_and_shapes_tell_kinds_apart():
    """Okabe-Ito colours: site kinds distinct (residual sites share one), none in an edge colour;
    components a shape of their own; the legend names only what a page holds."""
    kinds = {k: c for k, c in SITE_COLORS.items() if not k.startswith("resid")} | {"resid": SITE_COLORS["resid_post"]}
    assert len(set(kinds.values())) == len(kinds)
    assert not {c.lower() for c in SITE_COLORS.values()} & {EDGE_EXCITE.lower(), EDGE_INHIBIT.lower()}
    assert SHAPES["component"] not in {SHAPES[k] for k in SHAPES if k != "component"}
    head, mlp = Node("component", 0.5, "L0.head1"), Node("component", 1.5, "L1.mlp")
    assert node_color(head) != node_color(mlp)
    legend = legend_html([Node("feature", 0.7, "L0.transcoder", 1, 0), Node("metric", 2, name="m")], False, {True})
    assert "transcoder" in legend and "metric" in legend and "excites" in legend
    for absent in ("token", "error", "attention", "MLP", "supernode", "inhibits", "output"):
        assert absent not in legend


def test_component_circuit_header_shows_only_its_numbers():
    """A component circuit (heads and MLPs, an embedding node without a position): no prompt-graph
    replacement / completeness scores, which would read 1.000 by construction."""
    nodes = [Node("token", -1.0), Node("component", 0.5, "L0.head1"), Node("component", 1.5, "L1.mlp"),
             Node("metric", 1e3, name="logit_diff")]
    g = Graph(nodes, torch.tensor([0.0, 1.0, 1.0, 3.0]), torch.tensor([0, 1, 0, 2]), torch.tensor([1, 2, 2, 3]),
              torch.tensor([1.0, 0.5, 0.2, 2.0]), torch.tensor([0, 0, 0, 1.0]),
              metadata={"task": "ioi", "n_prompts": 8, "metric": "logit_diff", "completeness": 0.9, "faithfulness": 0.8})
    data = _data(render_html(g))
    assert "replacement" not in data["summary"] and "completeness score" not in data["summary"]
    assert "faithfulness 0.800" in data["summary"] and "completeness 0.900" in data["summary"]
    assert data["metric"] == "mean logit(answer) − logit(wrong) = 3.00"
    assert data["title"] == "ioi circuit (8 prompts) → mean logit(answer) − logit(wrong) = 3.00"
    assert {n["id"]: n["kind"] for n in data["nodes"]}["L0.head1"] == "component"


def test_prompt_graph_without_metric_shows_the_models_probabilities(default_model, default_dicts):
    """Without --answer the logits are the outputs: each is labelled with the model's own
    probability (recorded at trace time, equal to its output weight) and the page says what the
    graph explains."""
    import circuitgraph as cg
    from circuitgraph.api import prompt_tokens

    prompt = "When Mary and John went to the store, John gave a drink to"
    g = cg.trace(default_model, default_dicts, prompt, max_feature_nodes=40, progress=False)
    with torch.no_grad():
        probs = torch.softmax(default_model(prompt_tokens(default_model, prompt))[0, -1].double(), -1)
    data = _data(render_html(g))
    logits = [n for n in data["nodes"] if n["kind"] == "logit"]
    assert logits and data["metric"] == "the likeliest next tokens' logits, weighted by their probabilities"
    for n in logits:
        token = int(n["id"].split("#")[1].split("@")[0])
        assert abs(n["prob"] - float(probs[token])) < 1e-5 and abs(n["out_weight"] - float(probs[token])) < 1e-4
        assert n["label"].endswith(f" {float(probs[token]):.3g}")
    assert data["title"] == f'prompt graph of "{prompt}" → {data["metric"]}'
