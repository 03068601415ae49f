"""Dataset circuits on the embedded tasks: faithfulness by real ablation, ACDC against attribution."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.attribution.ablation import Ablator, NodeSet, circuit_scores
from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes
from circuitgraph.replacement import ReplacementModel
from circuitgraph.tasks.registry import make_dataset


@pytest.fixture(scope="module")
def rm(default_model, default_dicts):
    return ReplacementModel(default_model, {s: d for s, d in default_dicts.items() if s.kind in ("attn_z", "transcoder")})


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ioi", "greater_than"])
def test_attribution_circuit_is_faithful(rm, default_model, task):
    ds = make_dataset(task, default_model, n=64, seed=0)
    res = trace_dataset(rm, ds, CircuitConfig("attribution", max_feature_nodes=200, progress=False))
    assert res.graph.metadata["n_feature_nodes"] <= 200
    assert res.scores.faithfulness >= 0.8, res.scores
    assert res.scores.completeness >= 0.9
    # the graph holds the circuit's nodes, the metric, and edges into the metric
    metric = res.graph.index(f"metric:{ds.metric_kind}")
    assert int((res.graph.targets == metric).sum()) > 0


def test_scores_sum_close_to_metric_change(rm, default_model):
    """Attribution patching is a first-order estimate: summed node scores track m(clean) - m(corrupt)."""
    ds = make_dataset("ioi", default_model, n=16, seed=1)
    sc = score_nodes(rm, ds, DatasetAttributionConfig("ig", ig_steps=8, progress=False))
    total = sum(float(v.sum()) for v in sc.features.values()) + sum(float(v) for v in sc.errors.values())
    gap = sc.metric_clean - sc.metric_corrupt
    assert gap > 5
    assert 0.5 * gap < total < 2.0 * gap


def test_ablation_extremes(rm, default_model):
    ds = make_dataset("ioi", default_model, n=8, seed=2)
    ab = Ablator(rm, ds, "patch")
    with torch.no_grad():
        clean = default_model(ds.clean_tokens)
    from circuitgraph.attribution.dataset import metric_of

    full = float(metric_of(clean, ds).mean())
    assert abs(ab.metric(NodeSet.empty(rm)) - full) < 1e-4
    everything = circuit_scores(ab, NodeSet.full(rm))  # the circuit is the whole graph
    assert abs(everything.faithfulness - 1) < 1e-5 and abs(everything.completeness - 1) < 1e-5
    nothing = circuit_scores(ab, NodeSet.empty(rm))
    assert abs(nothing.faithfulness) < 1e-5 and abs(nothing.completeness) < 1e-5


@pytest.mark.slow
def test_acdc_uses_far_fewer_passes_and_stays_faithful(rm, default_model):
    ds = make_dataset("agreement", default_model, n=32, seed=0)
    res = trace_dataset(rm, ds, CircuitConfig("acdc", max_feature_nodes=200, tau=0.002, progress=False))
    meta = res.graph.metadata
    assert meta["acdc_forward_passes"] * 4 < meta["plain_acdc_forward_passes"]
    assert res.scores.faithfulness >= 0.8, res.scores
