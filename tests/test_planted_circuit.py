"""A hand-built 2-layer model with a planted circuit: ACDC and attribution find exactly its edges.

Residual dims: 0-1 token identity, 2-3 written by L0.head0, 4-5 written by L1.head0 (read by the
unembedding), 6-7 written by the decoys (read by nobody). Q and K are zero, so attention is
uniform. Planted edges: tok -> L0.head0 -> L1.head0 -> metric. Decoys: L0.head1 reads the tokens,
L1.head1 reads L0.head0's output; both write where nothing reads.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

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
    model, ds = planted_model(), planted_dataset()
    graph, meta = trace_components(model, ds, ComponentCircuitConfig("acdc", tau=0.01, skip_fraction=0.0, progress=False))
    assert _edges(graph) == PLANTED
    assert abs(meta["faithfulness"] - 1.0) < 1e-5 and abs(meta["completeness"] - 1.0) < 1e-5
    # plain ACDC: every edge tested; with skip_fraction 0 that is what ran
    assert meta["forward_passes"] >= meta["plain_acdc_forward_passes"]


def test_acdc_skips_untested_edges_with_attribution():
    model, ds = planted_model(), planted_dataset()
    _, meta = trace_components(model, ds, ComponentCircuitConfig("acdc", tau=0.01, progress=False))
    assert meta["acdc_tested"] == 3  # only the planted edges have non-zero attribution
    # 2 baselines + 1 skip check + 3 tests + 2 final scores, against 13 edges + 4 for plain ACDC
    assert meta["forward_passes"] == 8 and meta["plain_acdc_forward_passes"] == 17


def test_component_hooks_restored():
    model = planted_model()
    trace_components(model, planted_dataset(), ComponentCircuitConfig("attribution", progress=False))
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result
