"""The viewer in headless Chromium, on the IOI prompt graph and the IOI dataset circuit of the
embedded model: positions read back from the page against the nodes' positions and depths, no
overlaps, labels readable at the default zoom, the default edge set against Python's pruning, the
whole prompt along the bottom, hover against ``Graph.upstream`` / ``downstream``, the metric and
the model's probabilities against the model, supernodes against :func:`collapse`, size and time
to interactive."""

from __future__ import annotations

import re

import pytest
import torch

import circuitgraph as cg
from circuitgraph.api import prompt_tokens
from circuitgraph.features.descriptions import describe_features
from circuitgraph.features.supernodes import Supernode, collapse
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.graph.pruning import prune_graph
from circuitgraph.tasks.dataset import single_token_id
from circuitgraph.toylang.corpus import ToyCorpus
from circuitgraph.viewer.browser import chrome, find_chromium, mouse_to, open_page, overlapping, page_edges, shown
from circuitgraph.viewer.html import to_html
from circuitgraph.viewer.views import CT_VIEW, view_specs
from dictionaries.site import Site

pytest.importorskip("selenium")
pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium / chromedriver not found "
                                "(Debian: apt-get install chromium chromium-driver)")
PROMPT = "When Mary and John went to the store, John gave a drink to"
LONG = "When Mary and John went to the store, John gave a drink to Mary. " * 3 + PROMPT
MIN_PX = 8.0


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


def _reference(g: Graph, view: int) -> Graph:
    spec = view_specs()[view]
    return prune_graph(g, spec.node_threshold, spec.edge_threshold, max_edges=spec.max_edges)


def _pinned(g: Graph) -> set[str]:
    """Nodes every view draws: the prompt's tokens and the output tokens."""
    return {n.id for n in g.nodes if (n.kind == "token" and n.pos is not None) or n.kind == "logit"}


def _check_layout(driver, g: Graph) -> list[dict]:
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
    return items


def _check_view(driver, g: Graph, view: int) -> list[dict]:
    """The drawn view against Python: its edges are ``prune_graph``'s, its full-opacity nodes are
    the pruned graph's nodes, and the pinned tokens and outputs are drawn as well (dimmed)."""
    items = _check_layout(driver, g)
    ref = _reference(g, view)
    got = page_edges(driver)
    want = {(ref.nodes[s].id, ref.nodes[t].id): w for s, t, w in
            zip(ref.sources.tolist(), ref.targets.tolist(), ref.weights.tolist(), strict=True)}
    assert set(got) == set(want) and len(want) <= view_specs()[view].max_edges
    assert all(abs(got[k] - want[k]) <= 1e-3 * abs(want[k]) + 1e-9 for k in want)
    kept = {n.id for n in ref.nodes}
    assert {it["id"] for it in items} == kept | _pinned(g)
    assert {it["id"] for it in items if it["opacity"] == 1} == kept
    assert all(it["opacity"] < 1 for it in items if it["id"] not in kept)
    return items


@pytest.mark.parametrize("name", ["prompt", "circuit"])
def test_layout_readable_and_default_view_equal_python(driver, graphs, name):
    g, path = graphs[name]
    open_page(driver, path)
    default = driver.execute_script("return cgData.default_view")
    assert 0 <= default <= CT_VIEW
    items = _check_view(driver, g, default)
    # readable: every label of the default view at least 8 px tall on screen, every node in the window
    assert min(it["label_px"] for it in items) >= MIN_PX
    assert all(it["on_screen"] for it in items)
    if default < CT_VIEW:  # it opened on a sparser view because the next denser one is not readable
        assert not driver.execute_script("return cgData.views[arguments[0] + 1].readable", default)
    for view in sorted({0, CT_VIEW, 5} - {default}):
        driver.execute_script("cgSetView(arguments[0])", view)
        items = _check_view(driver, g, view)
        assert min(it["label_px"] for it in items) >= MIN_PX  # denser views open zoomed in, panned to the outputs
    if name == "prompt":  # the whole prompt is the bottom strip; the outputs on top, the metric below them
        items = {it["id"]: it for it in items}
        tokens = [n.id for n in g.nodes if n.kind == "token"]
        assert len(tokens) == len(g.metadata["prompt_tokens"])
        assert max(items[t]["y"] for t in tokens) == max(it["y"] for it in items.values())
        top = min(it["y"] for it in items.values())
        assert all(items[n.id]["y"] == top for n in g.nodes if n.kind == "logit")
        assert items["metric:logit_diff"]["y"] > top
        assert items["metric:logit_diff"]["y"] < min(it["y"] for i, it in items.items() if i.startswith("L"))


def test_long_prompt_keeps_every_token(driver, default_model, default_dicts, tmp_path):
    """A long prompt: every token along the bottom in every view, the kept ones at full opacity;
    the default zoom keeps labels readable and shows the outputs' corner."""
    g = cg.trace(default_model, default_dicts, LONG, answer=" Mary", contrast=" John", progress=False)
    n_tok = prompt_tokens(default_model, LONG).shape[1]
    assert n_tok > 50
    open_page(driver, to_html(g, tmp_path / "long.html"))
    for view in range(len(view_specs())):
        driver.execute_script("cgSetView(arguments[0])", view)
        items = _check_view(driver, g, view)
        assert {it["id"] for it in items if it["id"].startswith("tok@")} == {f"tok@{p}" for p in range(n_tok)}
        assert min(it["label_px"] for it in items) >= MIN_PX
        on = {it["id"] for it in items if it["on_screen"]}
        assert "metric:logit_diff" in on and f"tok@{n_tok - 1}" in on


@pytest.mark.parametrize("name", ["prompt", "circuit"])
def test_hover_lights_exactly_ancestors_and_descendants(driver, graphs, name):
    g, path = graphs[name]
    open_page(driver, path)
    ref = _reference(g, driver.execute_script("return cgData.default_view"))
    for node_id in [n.id for n in ref.nodes]:
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


def test_cards_links_metric_and_probabilities(driver, graphs, default_model):
    """Cards opened by real clicks; the metric named as a formula with its value in the title,
    header and node; the output tokens' probabilities are the model's own."""
    g, path = graphs["prompt"]
    open_page(driver, path)
    view = driver.execute_script("return cgData.default_view")
    ref = _reference(g, view)
    def click(node_id: str) -> str:
        mouse_to(driver, node_id, click=True)
        return driver.find_element("id", "cg-card").text

    text = click("tok@2")
    assert text.startswith("tok@2") and 'token " Mary" at position 2' in text and "activation" not in text
    feature = max((i for i, n in enumerate(ref.nodes) if n.kind == "feature" and n.pos == 14),
                  key=lambda i: float(ref.activation[i]))
    fid = ref.nodes[feature].id
    text = click(fid)
    card = g.features[f"{ref.nodes[feature].site}#{ref.nodes[feature].index}"]
    assert text.startswith(fid) and "top-activating contexts" in text and card["promoted"][0][0].strip() in text
    n_in = int((ref.targets == feature).sum())
    n_out = int((ref.sources == feature).sum())
    assert f"strongest inputs ({n_in} in view {view + 1})" in text
    assert f"strongest outputs ({n_out} in view {view + 1})" in text
    link = driver.find_elements("css selector", "#cg-card a")[0]
    other = link.text.split()[1]
    link.click()
    assert driver.find_element("css selector", "#cg-card h3").text == other
    # the metric and the model's probabilities, against the model itself
    tokens = prompt_tokens(default_model, PROMPT)
    with torch.no_grad():
        logits = default_model(tokens)[0, -1].double()
    probs = torch.softmax(logits, -1)
    mary, john = single_token_id(default_model, " Mary"), single_token_id(default_model, " John")
    value = float(logits[mary] - logits[john])
    formula = f'logit(" Mary") − logit(" John") = {value:.2f}'
    assert abs(float(g.activation[g.index("metric:logit_diff")]) - value) < 1e-3
    assert PROMPT in driver.title and formula in driver.title
    assert PROMPT in driver.find_element("id", "cg-title").text
    assert formula in driver.find_element("id", "cg-metric").text
    top = torch.argsort(probs, descending=True)[:5].tolist()
    assert top[0] == mary and float(probs[mary]) > 0.99
    outputs = driver.find_element("id", "cg-outputs").text
    got = re.findall(r'"([^"]*)" ([0-9.e+-]+)', outputs)
    assert [(t, float(p)) for t, p in got] == [(default_model.tokenizer.decode([i]), float(f"{float(probs[i]):.3g}"))
                                                for i in top]
    assert driver.execute_script("return nodes.get('metric:logit_diff').label") == formula
    text = click("metric:logit_diff")
    assert formula in text and '" Mary" ' + f"{float(probs[mary]):.3g}" in text
    logit = f"logit#{mary}@{tokens.shape[1] - 1}"
    assert driver.execute_script("return nodes.get(arguments[0]).label", logit) == f"Mary {float(probs[mary]):.3g}"
    text = click(logit)
    assert f"the model's probability {float(probs[mary]):.3g}" in text and "weight in influence 0" in text


def test_legend_lists_what_the_page_holds(driver, graphs):
    """Colours: each drawn feature's fill is its site kind's legend colour, no node is drawn in an
    edge colour, and the legend lists only kinds the page holds."""
    for name in ("prompt", "circuit"):
        g, path = graphs[name]
        open_page(driver, path)
        legend = driver.find_element("id", "cg-legend")
        colors = {c.lower() for c in driver.execute_script(
            "return Array.from(document.querySelectorAll('#cg-legend span')).map(function (s) {"
            " return s.getAttribute('style').split('color:')[1]; })")}
        edge_colors = set(driver.execute_script("return edges.get().map(function (e) { return e.base.toLowerCase(); })"))
        items = shown(driver)
        assert not {it["color"].lower() for it in items} & edge_colors and edge_colors <= colors
        node = {n.id: n for n in g.nodes}
        by_kind: dict[str, set[str]] = {}
        for it in items:
            if node[it["id"]].kind == "feature":
                by_kind.setdefault(node[it["id"]].site.split(".")[1], set()).add(it["color"].lower())
        assert all(len(c) == 1 for c in by_kind.values()) and len(set.union(*by_kind.values())) == len(by_kind)
        assert set.union(*by_kind.values()) <= colors
        text = legend.text
        assert ("token" in text) == (name == "prompt") and ("output token" in text) == (name == "prompt")
        assert "MLP" not in text and "head" not in text and "cross-layer" not in text


def test_supernodes_collapse_and_expand(driver, graphs):
    g, path = graphs["circuit"]
    open_page(driver, path)
    ref = _reference(g, driver.execute_script("return cgData.default_view"))
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
    metric = float(g.activation[g.index("metric:logit_diff")])
    formula = f"mean logit(answer) − logit(wrong) = {metric:.2f}"
    assert driver.title == f"ioi circuit ({g.metadata['n_prompts']} prompts) → {formula}"
    assert formula in driver.find_element("id", "cg-metric").text
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
    ref = _reference(g, driver.execute_script("return cgData.default_view"))
    assert set(page_edges(driver)) == {(ref.nodes[s].id, ref.nodes[t].id) for s, t in
                                       zip(ref.sources.tolist(), ref.targets.tolist(), strict=True)}
    assert driver.execute_script("return cgData.page_edges") <= 10 * 500
    assert ready_ms <= 2000 and path.stat().st_size <= 2_000_000
    items = shown(driver)
    assert overlapping(items) == {"nodes": [], "labels": [], "label_on_node": []}
    assert min(it["label_px"] for it in items) >= MIN_PX


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
