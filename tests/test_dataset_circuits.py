"""Dataset circuits on the embedded tasks: held-out faithfulness by real ablation, the evaluator
against independent spliced runs, IG against exact site patching, node selection by budget."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.attribution.ablation import Ablator, evaluate_circuit
from circuitgraph.attribution.circuit import CircuitConfig, select_top, trace_dataset
from circuitgraph.attribution.dataset import DatasetAttributionConfig, NodeScores, metric_of, score_nodes
from circuitgraph.attribution.nodeset import AblatedNodes, DatasetNode, KeptNodes
from circuitgraph.replacement import ReplacementModel
from circuitgraph.replacement.model import SpliceSpec
from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset
from dictionaries.architectures.registry import rebuild_as


@pytest.fixture(scope="module")
def rm(default_model, v1_dicts):
    return ReplacementModel(default_model, {s: d for s, d in v1_dicts.items() if s.kind in ("attn_z", "transcoder")})


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ioi", "greater_than"])
def test_attribution_circuit_is_faithful_on_held_out_prompts(rm, default_model, task):
    ds = make_dataset(task, default_model, n=64, seed=0)
    held = make_disjoint_dataset(task, default_model, 64, ds, seed=1)
    assert not set(ds.prompts) & set(held.prompts)
    res = trace_dataset(rm, ds, CircuitConfig("attribution", max_nodes=200, progress=False), held)
    ev, meta = res.evaluation, res.graph.metadata
    assert res.held_out and ev.n_prompts == 64
    assert ev.n_feature_nodes + ev.n_error_nodes == ev.n_nodes <= 200
    assert meta["n_nodes"] == ev.n_nodes == res.graph.n_nodes - 1  # every node but the metric
    assert ev.faithfulness >= 0.8, ev
    assert ev.completeness >= 0.9
    # the headline is the held-out evaluation, not the selection one
    assert meta["faithfulness"] == ev.faithfulness != res.selection.faithfulness
    metric = res.graph.index(f"metric:{ds.metric_kind}")
    assert int((res.graph.targets == metric).sum()) > 0


def _spliced_metric(rm, ds, latents=None, errors=None) -> float:
    """The metric of one spliced run with the given per-site latents / errors (an independent path)."""
    with torch.no_grad():
        return float(metric_of(rm.run(ds.clean_tokens, SpliceSpec(latents=latents or {}, errors=errors or {})).logits,
                               ds).mean())


def test_evaluator_matches_independent_spliced_runs(rm, default_model):
    """Every number of the evaluator equals a hand-built spliced run: sites set to their corrupted
    latents / errors through ``SpliceSpec`` (not the ablator's masks)."""
    check_evaluator_against_spliced_runs(rm, default_model, rm.sites[6])


def check_evaluator_against_spliced_runs(rm, default_model, kept_site) -> None:
    """The evaluator's numbers for the circuit "every node of ``kept_site``" against hand-built runs."""
    ds = make_dataset("ioi", default_model, n=8, seed=2)
    clean = rm.run(ds.clean_tokens)
    corr = rm.run(ds.corrupted_tokens)
    c_lat = {s: r.latents for s, r in corr.sites.items()}
    c_err = {s: r.errors for s, r in corr.sites.items()}
    clean_err = {s: r.errors for s, r in clean.sites.items()}
    with torch.no_grad():
        full = float(metric_of(default_model(ds.clean_tokens), ds).mean())  # no dictionaries at all
    empty = _spliced_metric(rm, ds, c_lat, c_err)
    circuit = KeptNodes.none({s: rm.dicts[s].cfg.d_dict for s in rm.sites})
    circuit.features[kept_site][:] = True
    circuit.errors[kept_site][:] = True
    others = [s for s in rm.sites if s != kept_site]
    m_c = _spliced_metric(rm, ds, {s: c_lat[s] for s in others}, {**clean_err, **{s: c_err[s] for s in others}})
    m_feat = _spliced_metric(rm, ds, {s: c_lat[s] for s in others}, c_err)
    m_err = _spliced_metric(rm, ds, c_lat, clean_err)
    m_ceiling = _spliced_metric(rm, ds, {}, c_err)
    m_removed = _spliced_metric(rm, ds, {kept_site: c_lat[kept_site]}, {**clean_err, kept_site: c_err[kept_site]})
    ev = evaluate_circuit(Ablator(rm, ds, "patch"), circuit)
    span = full - empty
    assert abs(ev.metric_full - full) < 1e-4 and abs(ev.metric_empty - empty) < 1e-4
    assert ev.faithfulness == pytest.approx((m_c - empty) / span, abs=1e-5)
    assert ev.faithfulness_features_only == pytest.approx((m_feat - empty) / span, abs=1e-5)
    assert ev.faithfulness_errors_only == pytest.approx((m_err - empty) / span, abs=1e-5)
    assert ev.ceiling == pytest.approx((m_ceiling - empty) / span, abs=1e-5)
    assert ev.completeness == pytest.approx((full - m_removed) / span, abs=1e-5)
    assert ev.n_nodes == rm.dicts[kept_site].cfg.d_dict + 1
    # the four figures differ: the test would notice one computed from the wrong run
    assert len({round(x, 4) for x in (ev.faithfulness, ev.faithfulness_features_only,
                                      ev.faithfulness_errors_only, ev.ceiling)}) == 4




@pytest.mark.slow
@pytest.mark.parametrize("baseline,steps,tol", [("patch", 32, 0.01), ("mean", 128, 0.015)])
def test_ig_site_total_equals_exact_patching_of_that_site(default_model, v1_dicts, baseline, steps, tol):
    """Integrated gradients of one site (every feature and its error, other sites clean, downstream
    re-encoded) sum to the exact effect of patching the whole site to its corrupted values. The
    dictionaries are continuous (ReLU copies of the committed ones): with TopK dictionaries
    downstream the metric jumps where a latent enters the top k, which no gradient sees
    (``benchmarks/study_ig_completeness.py`` measures that gap)."""
    rm = ReplacementModel(default_model, {s: rebuild_as(d, "relu") for s, d in v1_dicts.items()
                                          if s.kind in ("attn_z", "transcoder")})
    ds = make_dataset("ioi", default_model, n=8, seed=1)
    sc = score_nodes(rm, ds, DatasetAttributionConfig("ig", ig_steps=steps, progress=False, baseline=baseline))
    ap = score_nodes(rm, sc.runs, DatasetAttributionConfig("attribution", progress=False, baseline=baseline))
    ab = Ablator(rm, sc.runs, baseline)  # scores are computed against the ablation the test runs
    full = ab.full()
    d = {s: rm.dicts[s].cfg.d_dict for s in rm.sites}
    worst_ig, worst_ap = 0.0, 0.0
    for s in rm.sites:
        exact = full - ab.metric(AblatedNodes.whole_sites(d, [s]))
        ig_total = float(sc.features[s].sum() + sc.errors[s].sum())
        ap_total = float(ap.features[s].sum() + ap.errors[s].sum())
        worst_ig = max(worst_ig, abs(ig_total - exact) / abs(exact))
        worst_ap = max(worst_ap, abs(ap_total - exact) / abs(exact))
    assert worst_ig < tol, worst_ig  # the midpoint rule's error: the mean baseline's path is longer, so more steps
    assert worst_ap > 5 * worst_ig  # first-order attribution patching is visibly off: the check discriminates


def _hand_scores(features: dict, errors: dict) -> NodeScores:
    return NodeScores({s: torch.tensor(v, dtype=torch.float64) for s, v in features.items()},
                      {s: torch.tensor(v, dtype=torch.float64) for s, v in errors.items()}, [], None, 0.0, 0.0)


def test_select_top_counts_error_nodes_in_the_budget(rm):
    a, b = rm.sites[0], rm.sites[1]
    sc = _hand_scores({a: [0.5, -3.0, 0.0, 1.0], b: [2.0, 0.1, -0.2, 0.0]}, {a: [2.5], b: [0.05]})
    top3 = select_top(sc, 3)
    assert set(top3.nodes()) == {DatasetNode(a, 1), DatasetNode(a, None), DatasetNode(b, 0)}
    assert top3.n_nodes() == 3 and top3.n_errors() == 1
    # a cap on features lets the next error in; zero scores never join
    capped = select_top(sc, 4, max_feature_nodes=2)
    assert set(capped.nodes()) == {DatasetNode(a, 1), DatasetNode(a, None), DatasetNode(b, 0), DatasetNode(b, None)}
    assert select_top(sc, 100).n_nodes() == 8  # 6 non-zero features + 2 errors


def test_node_sets_shorter_than_the_prompts_pad_with_the_right_value(rm, default_model):
    """A position-resolved circuit selected on shorter prompts: offsets it does not cover are not
    kept (a KeptNodes) or not ablated (an AblatedNodes)."""
    ds = make_dataset("ioi", default_model, n=4, seed=5)
    ab = Ablator(rm, ds, "patch")
    d = {s: rm.dicts[s].cfg.d_dict for s in rm.sites}
    n_long = int(ds.answer_pos.max()) + 1
    short = KeptNodes.every(d, 3)
    explicit = KeptNodes.every(d, n_long)
    for s in rm.sites:
        explicit.features[s].view(n_long, -1)[3:] = False
        explicit.errors[s][3:] = False
    assert ab.metric(short) == ab.metric(explicit)
    assert abs(ab.metric(short) - ab.full()) > 1e-3  # the uncovered offsets really were ablated
    assert ab.metric(AblatedNodes.none(d, 3, resolved=True)) == ab.full()


@pytest.mark.slow
def test_acdc_verifies_its_removals_and_stays_faithful(rm, default_model):
    ds = make_dataset("agreement", default_model, n=32, seed=0)
    held = make_disjoint_dataset("agreement", default_model, 32, ds)
    res = trace_dataset(rm, ds, CircuitConfig("acdc", max_nodes=400, progress=False), held)
    meta = res.graph.metadata
    # every candidate is accounted for: no-op group, low group, tested, or kept untested
    assert meta["acdc_no_op"] + meta["acdc_low_group"] + meta["acdc_tested"] + meta["acdc_kept_untested"] \
        == meta["acdc_candidates"]
    assert meta["acdc_suspicious"] == 0 and not meta.get("acdc_capped")
    # fewer evaluations than plain ACDC's one per changed candidate (benchmarks/bench_circuits.py measures plain ACDC)
    assert meta["acdc_evaluations"] < 0.6 * (meta["acdc_candidates"] - meta["acdc_no_op"])
    assert res.selection.faithfulness >= 0.8, res.selection


def test_position_resolved_scores_and_edges_partition_the_aggregated_ones(rm, default_model):
    """One node per feature and offset from the answer: summed over offsets, node scores and edge
    scores equal the position-aggregated ones exactly (the same products, partitioned)."""
    from circuitgraph.attribution.dataset import score_edges

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
    agg_nodes = [DatasetNode(s, f) for s in (up, down) for f in feats[s]] + [DatasetNode(up, None)]
    n_off = pos.n_offsets
    pos_nodes = [DatasetNode(s, f, o) for s in (up, down) for f in feats[s] for o in range(n_off)]
    pos_nodes += [DatasetNode(up, None, o) for o in range(n_off)]
    cfg = DatasetAttributionConfig(progress=False)
    e_agg, m_agg = score_edges(rm, agg_nodes, agg, cfg)
    e_pos, m_pos = score_edges(rm, pos_nodes, pos, cfg)
    group = torch.arange(len(pos_nodes)) // n_off  # pos_nodes[i] belongs to agg_nodes[group[i]]
    fold = torch.zeros(len(agg_nodes), len(pos_nodes), dtype=torch.float64)
    fold[group, torch.arange(len(pos_nodes))] = 1
    torch.testing.assert_close(fold @ m_pos, m_agg, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fold @ e_pos @ fold.T, e_agg, rtol=1e-6, atol=1e-8)
    assert e_agg[2:4, :2].abs().sum() > 0 and e_agg[2:4, 4].abs().sum() > 0  # compared edges are not all zero


def test_position_resolved_ablation_patches_only_its_position(rm, default_model):

    ds = make_dataset("ioi", default_model, n=8, seed=4)
    ab = Ablator(rm, ds, "patch")
    site = rm.sites[5]
    rows = torch.arange(len(ds))
    clean_lat = rm.run(ds.clean_tokens).sites[site].latents
    corr_lat = rm.run(ds.corrupted_tokens).sites[site].latents
    change = (clean_lat - corr_lat).abs()  # [n, P, d]
    at_answer = change[rows, ds.answer_pos].sum(0)
    f = int(at_answer.argmax())  # the feature that changes most at the answer position
    n_off = ds.clean_tokens.shape[1]
    dd = {s: rm.dicts[s].cfg.d_dict for s in rm.sites}
    nodes = AblatedNodes.none(dd, n_off).with_nodes([DatasetNode(site, f, 0)])  # offset 0: the answer position only

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
    assert abs(ab.metric(nodes) - ab.full()) > 1e-3  # the patch had an effect
    later = AblatedNodes.none(dd, n_off).with_nodes([DatasetNode(site, f, 3)])  # 3 tokens earlier: another node
    assert abs(ab.metric(later) - ab.metric(nodes)) > 1e-4
    # an error node at the answer position only
    err_node = AblatedNodes.none(dd, n_off).with_nodes([DatasetNode(site, None, 0)])
    corr_err = rm.run(ds.corrupted_tokens).sites[site].errors
    with torch.no_grad():
        patched = {s: e.clone() for s, e in errors.items()}
        patched[site][rows, ds.answer_pos] = corr_err[rows, ds.answer_pos]
        expected_err = float(metric_of(rm.run(ds.clean_tokens, SpliceSpec(errors=patched)).logits, ds).mean())
    assert abs(ab.metric(err_node) - expected_err) < 1e-5
    assert abs(expected_err - ab.full()) > 1e-4
