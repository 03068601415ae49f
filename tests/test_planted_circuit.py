"""A hand-built 2-layer model with a planted circuit: ACDC and attribution find exactly its edges.

Residual dims: 0-1 token identity, 2-3 written by L0.head0, 4-5 written by L1.head0 (read by the
unembedding), 6-7 written by the decoys (read by nobody). Q and K are zero, so attention is
uniform. Planted edges: tok -> L0.head0 -> L1.head0 -> metric. Decoys: L0.head1 reads the tokens,
L1.head1 reads L0.head0's output; both write where nothing reads.
"""

from __future__ import annotations

import math

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.attribution.acdc import AcdcConfig
from circuitgraph.attribution.components import ComponentCircuitConfig, trace_components
from circuitgraph.tasks.dataset import TaskDataset

PLANTED = {("tok", "L0.head0"), ("L0.head0", "L1.head0"), ("L1.head0", "metric")}


def planted_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=2, n_heads=2, d_vocab=4, attn_only=True,
                                  normalization_type=None, act_fn="relu", seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[1, 0] = 1.0
        model.W_E[2, 1] = 1.0
        model.W_E[3, :2] = 0.5

        def route(layer: int, head: int, read: int, write: int) -> None:
            blk = model.blocks[layer].attn
            blk.W_V[head, read, 0] = blk.W_V[head, read + 1, 1] = 1.0
            blk.W_O[head, 0, write] = blk.W_O[head, 1, write + 1] = 1.0

        route(0, 0, 0, 2)  # planted
        route(0, 1, 0, 6)  # decoy: reads tokens, writes nowhere read
        route(1, 0, 2, 4)  # planted
        route(1, 1, 2, 6)  # decoy: reads L0.head0, writes nowhere read
        model.W_U[4, 1] = 1.0
        model.W_U[5, 2] = 1.0
    return model


def planted_dataset() -> TaskDataset:
    clean = torch.tensor([[0, 1, 1], [0, 1, 3], [0, 3, 1], [0, 1, 2]])
    corrupt = torch.tensor([[0, 2, 2], [0, 2, 3], [0, 3, 2], [0, 2, 1]])
    n = clean.shape[0]
    return TaskDataset("planted", ["p"] * n, ["c"] * n, clean, corrupt, torch.full((n,), 2),
                       torch.ones(n, 1, dtype=torch.long), torch.full((n, 1), 2), "logit_diff")


def _edges(graph) -> set[tuple[str, str]]:
    name = {i: (n.site or n.kind.replace("token", "tok")) for i, n in enumerate(graph.nodes)}
    return {(name[int(s)], name[int(t)]) for s, t in zip(graph.sources, graph.targets, strict=True)}


def test_attribution_recovers_exactly_the_planted_edges():
    model, ds = planted_model(), planted_dataset()
    graph, meta = trace_components(model, ds, ComponentCircuitConfig("attribution", max_edges=50, progress=False))
    assert _edges(graph) == PLANTED
    assert abs(meta["faithfulness"] - 1.0) < 1e-5


def test_ig_recovers_exactly_the_planted_edges():
    model, ds = planted_model(), planted_dataset()
    graph, _ = trace_components(model, ds, ComponentCircuitConfig("ig", max_edges=50, ig_steps=4, progress=False))
    assert _edges(graph) == PLANTED


def test_acdc_recovers_exactly_the_planted_edges():
    """Plain ACDC (every edge tested alone) and the guided search both find exactly the planted
    edges; the guided one with fewer evaluations, measured by running both."""
    model, ds = planted_model(), planted_dataset()
    graph, plain = trace_components(model, ds, ComponentCircuitConfig("acdc", acdc=AcdcConfig.plain(0.01),
                                                                      progress=False))
    assert _edges(graph) == PLANTED
    assert abs(plain["faithfulness"] - 1.0) < 1e-5 and abs(plain["completeness"] - 1.0) < 1e-5
    assert plain["acdc_tested"] == plain["acdc_candidates"] == 13 and plain["acdc_evaluations"] == 13
    graph, guided = trace_components(model, ds, ComponentCircuitConfig("acdc", acdc=AcdcConfig(0.01, keep_factor=math.inf),
                                                                       progress=False))
    assert _edges(graph) == PLANTED
    # the 10 zero-attribution edges form the low group (one verifying evaluation passes); 3 tested
    assert guided["acdc_low_group"] == 10 and guided["acdc_rescued"] == 0 and guided["acdc_tested"] == 3
    assert guided["acdc_evaluations"] == 4 < plain["acdc_evaluations"]


def test_acdc_low_group_that_fails_its_test_is_split():
    """With a tau high enough that the planted edges are 'low', the low group's joint test fails and
    the split finds them again: nothing is removed untested."""
    model, ds = planted_model(), planted_dataset()
    graph, meta = trace_components(model, ds, ComponentCircuitConfig("acdc", acdc=AcdcConfig(0.01, skip_fraction=1e6),
                                                                     progress=False))
    assert meta["acdc_low_group"] == 13 and meta["acdc_rescued"] == 3
    assert _edges(graph) == PLANTED


def test_component_hooks_restored():
    model = planted_model()
    trace_components(model, planted_dataset(), ComponentCircuitConfig("attribution", progress=False))
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result


def test_empty_component_acdc_is_flagged(caplog):
    model, ds = planted_model(), planted_dataset()
    with caplog.at_level("WARNING"):
        graph, meta = trace_components(model, ds, ComponentCircuitConfig("acdc", acdc=AcdcConfig(1e6), progress=False))
    assert meta["n_circuit_edges"] == 0 and meta["acdc_suspicious"] & 1 and "kept no edge" in caplog.text
