"""The viewer in headless Chromium, on the IOI prompt graph and the IOI dataset circuit of the
embedded model: positions read back from the page against the nodes' positions and depths, no
overlaps, the default edge set against Python's pruning, hover against ``Graph.upstream`` /
``downstream``, supernodes against :func:`collapse`, size and time to interactive."""

from __future__ import annotations

import pytest
import torch

import circuitgraph as cg
from circuitgraph.features.descriptions import describe_features
from circuitgraph.features.supernodes import Supernode, collapse
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.graph.pruning import prune_graph
from circuitgraph.toylang.corpus import ToyCorpus
from circuitgraph.viewer.browser import chrome, find_chromium, mouse_to, open_page, overlapping, page_edges, shown
from circuitgraph.viewer.html import to_html
from circuitgraph.viewer.views import DEFAULT_VIEW, view_specs
from dictionaries.site import Site

pytest.importorskip("selenium")
pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium / chromedriver not found "
                                "(Debian: apt-get install chromium chromium-driver)")
PROMPT = "When Mary and John went to the store, John gave a drink to"


def _describe(g: Graph, model, dicts) -> Graph:
    """Feature cards and labels, as ``circuitgraph trace`` writes them."""
    rm = cg.replacement_model(model, dicts)
    wanted = sorted({(Site.parse(n.site), n.index) for n in g.nodes if n.kind == "feature"})
    cards = describe_features(rm, wanted, ToyCorpus().sequences(9_000_000, 32)[:, :64], progress=False)
    for i, n in enumerate(g.nodes):
        if n.kind == "feature":
            g.labels[i] = cards[f"{n.site}#{n.index}"].label
    g.features = {k: c.to_dict() for k, c in cards.items()}
    return g


@pytest.fixture(scope="module")
def driver():
    d = chrome()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def graphs(default_model, default_dicts, tmp_path_factory):
    """``{name: (graph, page path)}``: the IOI prompt graph (whole, 1,000 features) and the IOI
    dataset circuit (200 nodes, selected on 16 prompts, evaluated on 16 others)."""
    prompt = _describe(cg.trace(default_model, default_dicts, PROMPT, answer=" Mary", contrast=" John", progress=False),
                       default_model, default_dicts)
    data = cg.PromptDataset.from_task("ioi", default_model, n=32)
    select, held_out = data.split(n_eval=16)
    circuit = _describe(cg.trace(default_model, default_dicts, select, eval_data=held_out, max_nodes=200, progress=False),
                        default_model, default_dicts)
    out = tmp_path_factory.mktemp("pages")
    return {name: (g, to_html(g, out / f"{name}.html")) for name, g in (("prompt", prompt), ("circuit", circuit))}


def _check_layout(driver, g: Graph) -> None:
    items = shown(driver)
    node = {n.id: n for n in g.nodes}
    for key, coord, sign in (("pos", "x", 1), ("depth", "y", -1)):  # x grows with position, y falls with depth
        groups: dict = {}
        for it in items:
            value = getattr(node[it["id"]], key) if it["id"] in node else None
            if value is not None:
                groups.setdefault(value, []).append(sign * it[coord])
        values = sorted(groups)
        for lo, hi in zip(values, values[1:], strict=False):
            assert max(groups[lo]) < min(groups[hi]), f"{coord} is not monotone in {key} between {lo} and {hi}"
    bad = overlapping(items)
    assert bad == {"nodes": [], "labels": [], "label_on_node": []}
    assert all(it["label"][2] > 0 for it in items)  # every label was laid out


@pytest.mark.parametrize("name", ["prompt", "circuit"])
def test_layout_and_default_view_equal_python(driver, graphs, name):
    g, path = graphs[name]
    open_page(driver, path)
    _check_layout(driver, g)
    for view in (DEFAULT_VIEW, 0, 4):
        if view != DEFAULT_VIEW:
            driver.execute_script("cgSetView(arguments[0])", view)
            _check_layout(driver, g)
        spec = view_specs()[view]
        ref = prune_graph(g, spec.node_threshold, spec.edge_threshold, max_edges=spec.max_edges)
        got = page_edges(driver)
        want = {(ref.nodes[s].id, ref.nodes[t].id): w for s, t, w in
                zip(ref.sources.tolist(), ref.targets.tolist(), ref.weights.tolist(), strict=True)}
        assert set(got) == set(want) and len(want) <= spec.max_edges
        assert all(abs(got[k] - want[k]) <= 1e-3 * abs(want[k]) + 1e-9 for k in want)
        assert {it["id"] for it in shown(driver)} == {n.id for n in ref.nodes}
    if name == "prompt":  # the prompt is the bottom strip, the metric on top
        items = {it["id"]: it for it in shown(driver)}
        tokens = sorted((n.pos, items[n.id]) for n in g.nodes if n.kind == "token" and n.id in items)
        assert max(t["y"] for _, t in tokens) == max(it["y"] for it in items.values())
        assert items["metric:logit_diff"]["y"] == min(it["y"] for it in items.values())


@pytest.mark.parametrize("name", ["prompt", "circuit"])
def test_hover_lights_exactly_ancestors_and_descendants(driver, graphs, name):
    g, path = graphs[name]
    open_page(driver, path)
    spec = view_specs()[DEFAULT_VIEW]
    ref = prune_graph(g, spec.node_threshold, spec.edge_threshold, max_edges=spec.max_edges)
    ids = [n.id for n in ref.nodes][:: 2 if name == "prompt" else 1]
    for node_id in ids:
        lit = driver.execute_script("cgHighlight(arguments[0]); return nodes.get({filter: function (n) {"
                                    " return !n.hidden && n.opacity === 1; }}).map(function (n) { return n.id; })",
                                    node_id)
        lineage = {r.node for r in ref.upstream(node_id, ref.n_nodes, ref.n_nodes)}
        lineage |= {r.node for r in ref.downstream(node_id, ref.n_nodes, ref.n_nodes)}
        assert set(lit) == lineage | {node_id}, node_id
    # a real mouse over a real node, then away from every node
    driver.execute_script("cgHighlight(null)")
    target = max((it for it in shown(driver) if it["shape"] == "dot"), key=lambda it: it["size"])["id"]
    mouse_to(driver, target)
    lit = driver.execute_script("return window.cgLit")
    lineage = {r.node for r in ref.upstream(target, ref.n_nodes, ref.n_nodes)}
    lineage |= {r.node for r in ref.downstream(target, ref.n_nodes, ref.n_nodes)} | {target}
    assert lit is not None and set(lit) == lineage
    mouse_to(driver, None)
    assert driver.execute_script("return window.cgLit") is None


def test_cards_and_links(driver, graphs):
    g, path = graphs["prompt"]
    open_page(driver, path)
    def click(node_id: str) -> str:
        mouse_to(driver, node_id, click=True)
        return driver.find_element("id", "cg-card").text

    text = click("tok@2")
    assert text.startswith("tok@2") and 'token " Mary" at position 2' in text and "activation" not in text
    feature = max((i for i, n in enumerate(g.nodes) if n.kind == "feature" and n.pos == 14),
                  key=lambda i: float(g.activation[i]))
    fid = g.nodes[feature].id
    text = click(fid)
    card = g.features[f"{g.nodes[feature].site}#{g.nodes[feature].index}"]
    assert text.startswith(fid) and "top-activating contexts" in text and card["promoted"][0][0].strip() in text
    assert "strongest inputs" in text and "strongest outputs" in text
    link = driver.find_elements("css selector", "#cg-card a")[0]
    other = link.text.split()[1]
    link.click()
    assert driver.find_element("css selector", "#cg-card h3").text == other


def test_supernodes_collapse_and_expand(driver, graphs):
    g, path = graphs["circuit"]
    open_page(driver, path)
    spec = view_specs()[DEFAULT_VIEW]
    ref = prune_graph(g, spec.node_threshold, spec.edge_threshold, max_edges=spec.max_edges)
    members = [n.id for n in ref.nodes if n.site == "L2.transcoder"][:4]
    driver.execute_script("network.selectNodes(arguments[0])", members)
    driver.find_element("id", "cg-group").click()
    sid = driver.execute_script("return nodes.getIds({filter: function (n) { return n.shape === 'hexagon'; }})")
    assert len(sid) == 1
    merged = collapse(ref, [Supernode(sid[0].removeprefix("super:"), members)])
    want = {(merged.nodes[s].id, merged.nodes[t].id): w for s, t, w in
            zip(merged.sources.tolist(), merged.targets.tolist(), merged.weights.tolist(), strict=True)}
    got = page_edges(driver)
    assert set(got) == set(want)
    assert all(abs(got[k] - want[k]) <= 1e-3 * abs(want[k]) + 1e-6 for k in want)
    assert overlapping(shown(driver))["nodes"] == []
    assert not {it["id"] for it in shown(driver)} & set(members)
    driver.find_element("xpath", "//div[@id='cg-group-list']//button[text()='expand']").click()
    assert set(page_edges(driver)) == {(ref.nodes[s].id, ref.nodes[t].id) for s, t in
                                       zip(ref.sources.tolist(), ref.targets.tolist(), strict=True)}


def test_circuit_page_size_speed_and_header(driver, graphs):
    g, path = graphs["circuit"]
    assert path.stat().st_size <= 1_000_000
    ready_ms = min(open_page(driver, path) for _ in range(2))
    assert ready_ms <= 2000
    header = driver.find_element("id", "cg-meta").text
    for key in ("faithfulness", "faithfulness_features_only", "ceiling", "completeness"):
        assert f"{key.replace('_', ' ')} {g.metadata[key]:.3f}" in header
    assert "node threshold 0.8, edge threshold 0.98" in driver.find_element("id", "cg-view-info").text


def _big_graph(n_pos: int = 12, per_cell: int = 100, n_edges: int = 100_000) -> Graph:
    gen = torch.Generator().manual_seed(0)
    nodes = [Node("token", -1, pos=p) for p in range(n_pos)]
    nodes += [Node("feature", layer + 0.7, f"L{layer}.transcoder", k, p)
              for layer in range(4) for p in range(n_pos) for k in range(per_cell)]
    nodes.append(Node("logit", 4, index=7, pos=n_pos - 1))
    depth = torch.tensor([n.depth for n in nodes])
    pos = torch.tensor([n.pos for n in nodes])
    s = torch.randint(0, len(nodes) - 1, (4 * n_edges,), generator=gen)
    t = torch.randint(n_pos, len(nodes), (4 * n_edges,), generator=gen)
    ok = (depth[s] < depth[t]) & (pos[s] <= pos[t])
    s, t = s[ok][:n_edges], t[ok][:n_edges]
    key = torch.unique(s * len(nodes) + t)
    s, t = key // len(nodes), key % len(nodes)
    w = torch.randn(s.numel(), generator=gen)
    tw = torch.zeros(len(nodes))
    tw[-1] = 1.0
    return Graph(nodes, torch.rand(len(nodes), generator=gen), s, t, w, tw)


def test_thousands_of_nodes_open_on_their_pruned_view(driver, tmp_path):
    g = _big_graph()
    assert g.n_nodes > 4000 and g.n_edges > 50_000
    path = to_html(g, tmp_path / "big.html")
    ready_ms = open_page(driver, path)
    ref = prune_graph(g, 0.8, 0.98, max_edges=500)
    assert set(page_edges(driver)) == {(ref.nodes[s].id, ref.nodes[t].id) for s, t in
                                       zip(ref.sources.tolist(), ref.targets.tolist(), strict=True)}
    assert driver.execute_script("return cgData.page_edges") <= 10 * 500
    assert ready_ms <= 2000 and path.stat().st_size <= 2_000_000
    assert overlapping(shown(driver)) == {"nodes": [], "labels": [], "label_on_node": []}


def test_offsets_from_the_answer_are_columns(driver, tmp_path):
    nodes = [Node("feature", d + 0.7, f"L{d}.transcoder", k, off) for d in range(3) for off in (-3, -2, -1)
             for k in range(3)] + [Node("metric", 3, name="logit_diff")]
    n = len(nodes)
    src = torch.tensor([i for i in range(n - 1) for j in range(n - 1) if nodes[j].depth > nodes[i].depth
                        and nodes[j].pos >= nodes[i].pos] + list(range(n - 1)))
    tgt = torch.tensor([j for i in range(n - 1) for j in range(n - 1) if nodes[j].depth > nodes[i].depth
                        and nodes[j].pos >= nodes[i].pos] + [n - 1] * (n - 1))
    g = Graph(nodes, torch.ones(n), src, tgt, torch.linspace(0.1, 1, src.numel()), torch.eye(n)[-1])
    open_page(driver, to_html(g, tmp_path / "off.html"))
    _check_layout(driver, g)
    cols = driver.execute_script("return cgData.views[cgData.default_view].cols.map(function (c) { return c[1]; })")
    assert cols == ["offset -3", "offset -2", "offset -1 (answer)"]
