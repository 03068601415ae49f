"""Head loadings and QK pairs attached to prompt graphs (``trace --qk``): loadings sum to the graph's
own edges and equal the standalone reference (itself checked against pattern interventions in
test_head_loadings.py) under both BOS conventions; QK pairs equal ``attribute_qk`` and sum to the
model's score; ``query --why-attends`` / ``--head-loadings``; the viewer's card shows them."""

from __future__ import annotations

import json

import pytest
import torch

import circuitgraph as cg
from circuitgraph.attribution.head_loadings import head_loadings
from circuitgraph.attribution.prompt.qk_attach import QKAttachConfig, attach_qk
from circuitgraph.attribution.qk import attribute_qk
from circuitgraph.cli.main import main
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from dictionaries.site import Site

PROMPT = "When Mary and John went to the park, John gave a book to"


@pytest.fixture(scope="module")
def rm(default_model, default_dicts):
    return cg.replacement_model(default_model, default_dicts)


@pytest.mark.parametrize("bos", ["keep", "detach"])
def test_loadings_sum_to_edges_and_equal_the_reference(rm, default_model, bos):
    tokens = cg.api.prompt_tokens(default_model, PROMPT)
    full = cg.trace(rm, None, tokens, bos=bos, progress=False)
    pruned = cg.prune(full)
    info = attach_qk(pruned, rm, tokens, QKAttachConfig(edges=5, top_k=5), also=full)
    assert full.metadata["qk"] is info and info["bos"] == bos
    into_attn = [(pruned.nodes[int(s)].id, pruned.nodes[int(t)].id, float(w))
                 for s, t, w in zip(pruned.sources, pruned.targets, pruned.weights, strict=True)
                 if pruned.nodes[int(t)].kind == "feature" and pruned.nodes[int(t)].site.endswith("attn_z")]
    assert len(into_attn) > 100 and len(info["loadings"]) == len(into_attn)  # every such edge, no other
    for src, dst, w in into_attn:
        parts = pruned.head_loadings(src, dst)
        assert len(parts) == default_model.cfg.n_heads
        assert sum(parts.values()) == pytest.approx(w, rel=1e-4, abs=1e-5)
    # against the standalone reference, for the strongest cross-position edges
    cross = sorted((e for e in into_attn if e[0].split("@")[1] != e[1].split("@")[1]), key=lambda e: -abs(e[2]))[:3]
    for src, dst, _ in cross:
        node = pruned.node(dst)
        ref = head_loadings(rm, tokens, Site.parse(node.site), node.index, node.pos, bos=bos)
        got = torch.tensor(list(pruned.head_loadings(src, dst).values()))
        torch.testing.assert_close(got, ref.of(src).float(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, got.sum() / len(got) * torch.ones_like(got))  # heads differ: not a split by 4


def test_qk_pairs_are_attribute_qk_of_the_main_head(rm, default_model):
    tokens = cg.api.prompt_tokens(default_model, PROMPT)
    graph = cg.trace(rm, None, tokens, qk=QKAttachConfig(edges=4, top_k=3), progress=False)
    pairs = graph.metadata["qk"]["pairs"]
    assert len(pairs) == 4
    weights = [abs(p["edge"]) for p in pairs]
    assert weights == sorted(weights, reverse=True)
    for p in pairs:
        loads = graph.metadata["qk"]["loadings"][f"{p['source']}->{p['target']}"]
        assert p["head"] == max(range(len(loads)), key=lambda h: abs(loads[h]))
        ref = attribute_qk(rm, tokens, p["layer"], p["head"], p["query"], p["key"])
        assert p["query"] == graph.node(p["target"]).pos and p["key"] == graph.node(p["source"]).pos
        assert p["score"] == pytest.approx(ref.score, abs=1e-6) and p["sum_of_terms"] == pytest.approx(ref.score, abs=1e-4)
        assert [(t["query"], t["key"]) for t in p["top_pairs"]] == [(t.query, t.key) for t in ref.top(3)]
        assert graph.why_attends(p["layer"], p["head"], p["query"], p["key"])["score"] == p["score"]


def test_without_qk_and_bad_edges_are_clear_errors(rm, default_model):
    graph = cg.trace(rm, None, PROMPT, progress=False)
    with pytest.raises(CircuitGraphError, match="no head loadings; trace the prompt with --qk"):
        graph.head_loadings("tok@1", "L0.attn_z#530@2")
    with pytest.raises(CircuitGraphError, match="qk= attaches head loadings to a prompt graph"):
        cg.trace(rm, None, cg.PromptDataset.from_task("ioi", default_model, n=4), qk=True)
    with pytest.raises(ValueError, match="qk edges must be >= 0"):
        QKAttachConfig(edges=-1)


def test_cli_trace_qk_query_and_viewer(tmp_path, capsys, rm, default_model):
    out = tmp_path / "g"
    assert main(["trace", "--prompt", PROMPT, "--qk", "--qk-edges", "3", "--describe-seqs", "0", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["qk_pairs"] == 3 and summary["qk_edges_with_loadings"] > 100
    g = Graph.load(out)
    pair = g.metadata["qk"]["pairs"][0]
    spec = f"{pair['layer']}.{pair['head']}@{pair['query']}:{pair['key']}"
    assert main(["query", str(out), "--why-attends", spec, "--top-k", "2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["stored"] is True and row["score"] == pair["score"] and len(row["top_pairs"]) == 2
    # a head the trace did not explain: computed from the graph's model, dictionaries and prompt
    assert main(["query", str(out), "--why-attends", "3.1@14:5", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    ref = attribute_qk(rm, torch.tensor([g.metadata["prompt_tokens"]]), 3, 1, 14, 5)
    assert row["stored"] is False and row["score"] == pytest.approx(ref.score, abs=1e-6)
    assert main(["query", str(out), "--head-loadings", pair["source"], pair["target"], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(r["loading"] for r in rows) == pytest.approx(pair["edge"], rel=1e-4)
    for bad, message in (("3.1@14", "write LAYER.HEAD@QUERY:KEY"), ("9.0@3:2", "layer 9 is out of range"),
                         ("3.1@2:5", "key position 5 is after query position 2")):
        assert main(["query", str(out), "--why-attends", bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["trace", "--task", "ioi", "--qk", "--out", str(tmp_path / "h")]) == 2
    assert "--qk is for --prompt graphs" in capsys.readouterr().err
    # the viewer's data: the target's card lists its inputs by head and the pair
    from circuitgraph.viewer.html import load_for_view
    from circuitgraph.viewer.page_data import page_data
    from circuitgraph.viewer.views import compute_views, view_specs

    full = load_for_view(out)
    doc = page_data(full, compute_views(full, view_specs()))
    on_page = {n["id"] for n in doc["nodes"]}
    if pair["target"] in on_page:
        card = doc["qk"][pair["target"]]
        assert any(p["head"] == pair["head"] and p["key"] == pair["key"] for p in card["pairs"])
    assert doc["qk"] and all(sum(v for v in r[1]) != 0 for c in doc["qk"].values() for r in c["heads"])


def test_the_card_of_an_attention_feature_shows_heads_and_pairs(tmp_path, rm, default_model):
    from circuitgraph.viewer.browser import chrome, find_chromium, mouse_to, open_page

    if find_chromium() is None:
        pytest.skip("Chromium / chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    graph = cg.trace(rm, None, PROMPT, qk=QKAttachConfig(edges=20, top_k=3), progress=False)
    path = cg.view(graph, tmp_path / "p.html")
    driver = chrome()
    try:
        open_page(driver, path)
        drawn = set(driver.execute_script("return nodes.getIds()"))
        pair = next(p for p in graph.metadata["qk"]["pairs"] if p["target"] in drawn)
        mouse_to(driver, pair["target"], click=True)
        text = driver.find_element("id", "cg-card").text
    finally:
        driver.quit()
    layer = pair["layer"]
    assert f"inputs by attention head (L{layer}; the parts sum to the edge)" in text
    assert f"why L{layer}.H{pair['head']} attends {pair['query']} -> {pair['key']}" in text
    assert pair["top_pairs"][0]["query"] in text and pair["top_pairs"][0]["key"] in text


@pytest.mark.parametrize("argv,message", [
    (["--qk-edges", "5"], "--qk-edges set(s) what --qk attaches; add --qk"),
    (["--qk", "--qk-edges", "-2"], "qk edges must be >= 0"),
    (["--qk", "--sites", "transcoder"], "no attn_z site is spliced"),
])
def test_trace_qk_refusals_before_the_build(tmp_path, capsys, argv, message):
    assert main(["trace", "--prompt", PROMPT, *argv, "--describe-seqs", "0", "--out", str(tmp_path / "g")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_attribute_qk_refuses_bad_arguments(rm, default_model):
    tokens = cg.api.prompt_tokens(default_model, PROMPT)
    for args, message in (((default_model, tokens, 0, 0, 3, 1), "needs a ReplacementModel"),
                          ((rm, tokens.float(), 0, 0, 3, 1), "integer tensor of token ids"),
                          ((rm, tokens[:, :0], 0, 0, 3, 1), "one non-empty prompt"),
                          ((rm, PROMPT, 0, 0, 3, 1), "integer tensor of token ids"),
                          ((rm, tokens, 1.0, 0, 3, 1), "layer and head must be integers")):
        with pytest.raises(CircuitGraphError, match=message):
            attribute_qk(*args)
    with pytest.raises(CircuitGraphError, match="qk must be True, False or a QKAttachConfig"):
        cg.trace(rm, None, PROMPT, qk="yes")
    with pytest.raises(CircuitGraphError, match="the prompt must be non-empty text"):
        cg.trace(rm, None, "  ")


def test_why_attends_counts_negative_positions_from_the_end(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["trace", "--prompt", PROMPT, "--qk", "--qk-edges", "1", "--describe-seqs", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    g = Graph.load(out)
    pair, n = g.metadata["qk"]["pairs"][0], len(g.metadata["prompt_tokens"])
    spec = f"{pair['layer']}.{pair['head']}@{pair['query'] - n}:{pair['key'] - n}"
    assert main(["query", str(out), "--why-attends", spec, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["stored"] is True and (row["query"], row["key"]) == (pair["query"], pair["key"])
    # more pairs than were stored: computed, the edge's fields kept
    assert main(["query", str(out), "--why-attends", spec, "--top-k", "30", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["source"] == pair["source"] and len(row["top_pairs"]) == min(30, pair["n_terms"])
    assert row["stored"] is (pair["n_terms"] <= len(pair["top_pairs"]))
