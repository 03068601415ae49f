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


def test_position_resolved_scores_and_edges_partition_the_aggregated_ones(rm, default_model):
    """One node per feature and offset from the answer: summed over offsets, node scores and edge
    scores equal the position-aggregated ones exactly (the same products, partitioned)."""
    from circuitgraph.attribution.dataset import NodeRef, score_edges

    ds = make_dataset("ioi", default_model, n=8, seed=3)
    agg = score_nodes(rm, ds, DatasetAttributionConfig(progress=False))
    pos = score_nodes(rm, ds, DatasetAttributionConfig(positions="from_end", progress=False))
    assert pos.n_offsets == ds.clean_tokens.shape[1]
    for s in rm.sites:
        d = rm.dicts[s].cfg.d_dict
        torch.testing.assert_close(pos.features[s].view(-1, d).sum(0), agg.features[s], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pos.errors[s].sum(0, keepdim=True), agg.errors[s], rtol=1e-6, atol=1e-7)
    # two upstream and two downstream features and the upstream error, every offset of each as its own node
    up, down = rm.sites[1], rm.sites[4]
    feats = {s: agg.features[s].abs().topk(2).indices.tolist() for s in (up, down)}
    agg_nodes = [NodeRef(s, f) for s in (up, down) for f in feats[s]] + [NodeRef(up, None)]
    n_off = pos.n_offsets
    pos_nodes = [NodeRef(s, o * rm.dicts[s].cfg.d_dict + f) for s in (up, down) for f in feats[s] for o in range(n_off)]
    pos_nodes += [NodeRef(up, None, o) for o in range(n_off)]
    cfg = DatasetAttributionConfig(progress=False)
    e_agg, m_agg = score_edges(rm, ds, agg_nodes, agg, cfg)
    e_pos, m_pos = score_edges(rm, ds, pos_nodes, pos, cfg)
    group = torch.arange(len(pos_nodes)) // n_off  # pos_nodes[i] belongs to agg_nodes[group[i]]
    fold = torch.zeros(len(agg_nodes), len(pos_nodes), dtype=torch.float64)
    fold[group, torch.arange(len(pos_nodes))] = 1
    torch.testing.assert_close(fold @ m_pos, m_agg, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fold @ e_pos @ fold.T, e_agg, rtol=1e-6, atol=1e-8)
    assert e_agg[2:4, :2].abs().sum() > 0 and e_agg[2:4, 4].abs().sum() > 0  # compared edges are not all zero


def test_position_resolved_ablation_patches_only_its_position(rm, default_model):
    from circuitgraph.attribution.dataset import metric_of
    from circuitgraph.replacement.model import SpliceSpec

    ds = make_dataset("ioi", default_model, n=8, seed=4)
    ab = Ablator(rm, ds, "patch")
    site = rm.sites[5]
    d = rm.dicts[site].cfg.d_dict
    rows = torch.arange(len(ds))
    clean_lat = rm.run(ds.clean_tokens).sites[site].latents
    corr_lat = rm.run(ds.corrupted_tokens).sites[site].latents
    change = (clean_lat - corr_lat).abs()  # [n, P, d]
    at_answer = change[rows, ds.answer_pos].sum(0)
    f = int(at_answer.argmax())  # the feature that changes most at the answer position
    n_off = ds.clean_tokens.shape[1]
    nodes = NodeSet.empty(rm, n_off)
    nodes.features[site][0 * d + f] = True  # offset 0: the answer position only

    def edit(s, lat):
        if s != site:
            return lat
        lat = lat.clone()
        lat[rows, ds.answer_pos, f] = corr_lat[rows, ds.answer_pos, f]
        return lat

    with torch.no_grad():
        errors = {s: r.errors for s, r in rm.run(ds.clean_tokens).sites.items()}
        expected = float(metric_of(rm.run(ds.clean_tokens, SpliceSpec(errors=errors, edit_latents=edit)).logits, ds).mean())
    assert abs(ab.metric(nodes) - expected) < 1e-5
    assert abs(ab.metric(nodes) - ab.metric(NodeSet.empty(rm))) > 1e-3  # the patch had an effect
    later = NodeSet.empty(rm, n_off)
    later.features[site][3 * d + f] = True  # the same feature 3 tokens earlier: another node
    assert abs(ab.metric(later) - ab.metric(nodes)) > 1e-4
    # an error node at the answer position only
    err_node = NodeSet.empty(rm, n_off)
    err_node.errors[site][0] = True
    corr_err = rm.run(ds.corrupted_tokens).sites[site].errors
    with torch.no_grad():
        patched = {s: e.clone() for s, e in errors.items()}
        patched[site][rows, ds.answer_pos] = corr_err[rows, ds.answer_pos]
        expected_err = float(metric_of(rm.run(ds.clean_tokens, SpliceSpec(errors=patched)).logits, ds).mean())
    assert abs(ab.metric(err_node) - expected_err) < 1e-5
    assert abs(expected_err - ab.metric(NodeSet.empty(rm))) > 1e-4


def test_position_resolved_nodes_of_another_dataset_are_refused(rm, default_model):
    ds = make_dataset("ioi", default_model, n=4, seed=5)
    nodes = NodeSet.empty(rm, ds.clean_tokens.shape[1] + 3)
    nodes.features[rm.sites[0]][-1] = True
    from circuitgraph.errors import CircuitGraphError

    with pytest.raises(CircuitGraphError, match="positions per node but these prompts have"):
        Ablator(rm, ds, "patch").metric(nodes)
