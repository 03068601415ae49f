"""Padding and bidirectional attention, checked against prompts run alone and real interventions.

A padded batch (left or right) must give every prompt the numbers it gets alone: metrics, node
scores, mean-ablation means and circuit evaluations. In a bidirectional model every real token can
influence the answer, also the ones after it, so dataset node scores and edges must count them:
on a tiny bidirectional model whose sites are linear in each other (uniform attention, no
normalisation, always-active ReLU latents) every score equals the effect of a real intervention.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.attribution.ablation import Ablator
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_edges, score_nodes
from circuitgraph.attribution.nodeset import DatasetNode, KeptNodes
from circuitgraph.attribution.runs import DatasetRuns, metric_of, position_mask
from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement import ReplacementModel
from circuitgraph.replacement.masking import run_model
from circuitgraph.replacement.model import SpliceSpec
from circuitgraph.tasks.dataset import RowTarget, TokenRow, build_from_rows
from circuitgraph.tasks.registry import make_dataset
from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.site import Site

UP, DOWN = Site(0, "attn_z"), Site(1, "attn_z")


def linear_bidirectional_model() -> HookedTransformer:
    """Two attention-only layers, no normalisation, Q = K = 0: every position attends uniformly to
    every real token of its prompt, so each site is an affine function of the upstream ones."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=10, d_head=4, n_heads=2, d_vocab=12, attn_only=True,
                                  normalization_type=None, attention_dir="bidirectional", act_fn="relu", seed=3,
                                  dtype=torch.float64)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K):
                p.zero_()
            for p in (block.attn.W_V, block.attn.W_O):  # unit-scale paths: the second layer's reading matters
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-2] ** 0.5)
        for p in (model.W_E, model.W_pos, model.W_U):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def always_active(site: Site, seed: int) -> object:
    """A rotation of the site's 8 dimensions with every latent active everywhere (an affine dictionary)."""
    d = build_dictionary(DictionaryConfig("relu", 8, 8, site=site.id), seed=seed).double()
    rot = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    with torch.no_grad():
        d.W_enc.copy_(rot)
        d.W_dec.copy_(0.8 * rot.T)  # reconstructs 80%: the error term carries the rest
        d.b_dec.zero_()
        d.b_enc.fill_(40.0)
    return d


@pytest.fixture(scope="module")
def linear_rm():
    model = linear_bidirectional_model()
    return ReplacementModel(model, {UP: always_active(UP, 1), DOWN: always_active(DOWN, 2)})


def _rows(lengths, target_pos, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        clean = torch.randint(1, 12, (n,), generator=gen).tolist()
        corrupt = torch.randint(1, 12, (n,), generator=gen).tolist()
        clean[0] = corrupt[0] = 0  # a BOS
        rows.append(TokenRow(f"row {i + 1}", str(clean), str(corrupt), clean, corrupt,
                             [RowTarget(target_pos, (3,), (5,))]))
    return rows


@pytest.fixture(scope="module")
def bidir_ds(linear_rm):
    # the answer is read at position 2; the tokens after it still influence it
    return build_from_rows("bidir", _rows([6, 5, 7, 6], 2), linear_rm.model, "logit_diff", "left")


def _metric(rm, ds, spec=None) -> torch.Tensor:
    with torch.no_grad():
        return metric_of(rm.run(ds.clean_tokens, spec, attention_mask=ds.attention_mask).logits, ds)


def test_padded_bidirectional_batch_equals_prompts_alone(linear_rm, bidir_ds):
    rows = _rows([6, 5, 7, 6], 2)
    for side in ("left", "right"):
        ds = build_from_rows("bidir", rows, linear_rm.model, "logit_diff", side)
        batch = _metric(linear_rm, ds)
        alone = torch.cat([_metric(linear_rm, build_from_rows("one", [r], linear_rm.model)) for r in rows])
        torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)
    # without the mask the padding is attended to: the check discriminates
    unmasked = metric_of(linear_rm.run(bidir_ds.clean_tokens).logits, bidir_ds)
    assert (unmasked - alone).abs().max() > 1e-3


def test_bidirectional_counts_every_real_token(bidir_ds):
    mask = position_mask(bidir_ds, bidir_ds.clean_tokens.shape[1], causal=False)
    assert torch.equal(mask.bool(), bidir_ds.attention_mask.bool())  # the first token too, never padding
    assert bool((mask.bool() & (torch.arange(mask.shape[1]) > bidir_ds.answer_pos.unsqueeze(1))).any())


@pytest.mark.parametrize("kind", ["patch", "mean"])
def test_bidirectional_ablation_reaches_the_first_token(linear_rm, bidir_ds, kind):
    """Position 0 reads every position in a bidirectional model, so ablating a site's nodes must
    ablate its output there too. Only layer 0 spliced (layer 1 then reads position 0 live): every
    node ablated equals the plain model with layer 0's hook_z set, at every real position, to its
    corrupted value (patch) or its mean over the real positions (mean), set by hand with a hook."""
    rm = ReplacementModel(linear_rm.model, {UP: linear_rm.dicts[UP]})
    ab = Ablator(rm, bidir_ds, kind)
    model, ds, hook = rm.model, bidir_ds, UP.output_hook
    cache = {}

    def save(name):
        def hook_fn(act, hook):
            cache[name] = act.detach().clone()
        return hook_fn

    with torch.no_grad():  # run_model masks padded keys, as the replacement model does
        run_model(model, ds.clean_tokens, ds.attention_mask, [(hook, save("clean"))])
        run_model(model, ds.corrupted_tokens, ds.attention_mask, [(hook, save("corrupted"))])
    real = ds.attention_mask.bool()[..., None, None]
    if kind == "patch":
        value = cache["corrupted"]
    else:
        z = cache["clean"]
        value = ((z * real).sum((0, 1)) / real.sum()).expand_as(z)
    with torch.no_grad():
        logits = run_model(model, ds.clean_tokens, ds.attention_mask, [(hook, lambda act, hook: value.clone())])
    expected = float(metric_of(logits, ds).mean())
    assert ab.empty() == pytest.approx(expected, rel=1e-9, abs=1e-10)
    assert ab.full() == pytest.approx(float(metric_of(run_model(model, ds.clean_tokens, ds.attention_mask), ds).mean()),
                                      abs=1e-10)
    assert abs(ab.full() - ab.empty()) > 0.1  # the ablation changes the metric: the check discriminates


def _clean(rm, ds):
    with torch.no_grad():
        # dataset runs of a bidirectional model splice position 0 with its output in the error term
        clean = rm.run(ds.clean_tokens, SpliceSpec(first_as_error=True), attention_mask=ds.attention_mask)
        corr = rm.run(ds.corrupted_tokens, SpliceSpec(first_as_error=True), attention_mask=ds.attention_mask)
    return clean, corr


def _patched(values, site, f, source, positions):
    out = {s: v.clone() for s, v in values.items()}
    out[site][..., f] = torch.where(positions, source[..., f], out[site][..., f])
    return out


def test_bidirectional_node_scores_and_edges_equal_interventions(linear_rm, bidir_ds):
    rm, ds = linear_rm, bidir_ds
    sc = score_nodes(rm, ds, DatasetAttributionConfig(progress=False, reduce="sum"))
    clean, corr = _clean(rm, ds)
    lat = {s: r.latents for s, r in clean.sites.items()}
    err = {s: r.errors for s, r in clean.sites.items()}
    c_lat = {s: r.latents for s, r in corr.sites.items()}
    counted = position_mask(ds, ds.clean_tokens.shape[1], causal=False).bool()
    before_answer = counted & (torch.arange(counted.shape[1]) <= ds.answer_pos.unsqueeze(1))
    m_clean = float(_metric(rm, ds).sum())
    for f in range(3):
        # node score: patch the feature at every counted position, downstream re-encoded, errors clean
        def edit(site, x, f=f, where=counted):
            return _patched({site: x}, site, f, c_lat[site], where)[site] if site == UP else x

        exact = m_clean - float(_metric(rm, ds, SpliceSpec(first_as_error=True, errors=err, edit_latents=edit)).sum())
        assert float(sc.features[UP][f]) == pytest.approx(exact, rel=1e-8, abs=1e-10)

        def causal_edit(site, x, f=f):
            return edit(site, x, f, before_answer)

        causal_only = m_clean - float(_metric(rm, ds, SpliceSpec(first_as_error=True, errors=err, edit_latents=causal_edit)).sum())
        assert abs(causal_only - exact) > 0.05 * abs(exact)  # the later tokens matter: a causal mask would miss them
    for site in (UP, DOWN):  # error nodes (position 0's whole output among them): patched at every counted position
        errs = {**err, site: torch.where(counted.unsqueeze(-1), corr.sites[site].errors, err[site])}
        exact = m_clean - float(_metric(rm, ds, SpliceSpec(first_as_error=True, errors=errs)).sum())
        assert float(sc.errors[site][0]) == pytest.approx(exact, rel=1e-8, abs=1e-10)
    nodes = [DatasetNode(UP, 0), DatasetNode(UP, 1), DatasetNode(DOWN, 0), DatasetNode(DOWN, 4), DatasetNode(UP, None)]
    edges, metric_edges = score_edges(rm, nodes, sc, DatasetAttributionConfig(progress=False, reduce="sum"))
    for j, u in enumerate(nodes):
        # into the metric: u patched with every site a leaf at its clean values (the direct effect)
        if u.feature is None:
            errs = {**err, u.site: torch.where(counted.unsqueeze(-1), corr.sites[u.site].errors, err[u.site])}
            direct = _metric(rm, ds, SpliceSpec(first_as_error=True, latents=lat, errors=errs))
        else:
            direct = _metric(rm, ds, SpliceSpec(first_as_error=True, latents=_patched(lat, u.site, u.feature, c_lat[u.site], counted),
                                                errors=err))
        assert float(metric_edges[j]) == pytest.approx(m_clean - float(direct.sum()), rel=1e-8, abs=1e-10)
        if u.site != UP:
            continue
        for i, d in enumerate(nodes):
            if d.site != DOWN:
                continue
            # u -> d: u's direct change of d's latent (DOWN re-encoded, everything else a clean leaf),
            # then only that change of d carried to the metric
            with torch.no_grad():
                up_lat = _patched(lat, UP, u.feature, c_lat[UP], counted) if u.feature is not None else lat
                up_err = err if u.feature is not None else \
                    {**err, UP: torch.where(counted.unsqueeze(-1), corr.sites[UP].errors, err[UP])}
                moved = rm.run(ds.clean_tokens, SpliceSpec(first_as_error=True, latents={UP: up_lat[UP]}, errors=up_err),
                               attention_mask=ds.attention_mask).sites[DOWN].latents
            only_d = {**lat, DOWN: _patched(lat, DOWN, d.feature, moved, counted)[DOWN]}
            exact = m_clean - float(_metric(rm, ds, SpliceSpec(first_as_error=True, latents=only_d, errors=err)).sum())
            assert float(edges[i, j]) == pytest.approx(exact, rel=1e-7, abs=1e-9), (u, d)
    assert edges[2:4, :2].abs().min() > 1e-4 and metric_edges.abs().min() > 1e-4  # checked edges are not all zero


def test_position_resolved_refused_when_tokens_follow_the_answer(linear_rm, bidir_ds):
    with pytest.raises(CircuitGraphError, match="positions 'from_end' count back from the answer"):
        score_nodes(linear_rm, bidir_ds, DatasetAttributionConfig(progress=False, positions="from_end"))
    # ending every prompt at its answer makes offsets well defined again
    at_end = build_from_rows("end", _rows([6, 5, 7, 6], -1), linear_rm.model, "logit_diff", "left")
    sc = score_nodes(linear_rm, at_end, DatasetAttributionConfig(progress=False, positions="from_end"))
    assert sc.n_offsets == at_end.clean_tokens.shape[1]


# --- a causal model (the embedded one), left and right padding against prompts alone --------------------


@pytest.fixture(scope="module")
def causal_rm(default_model, default_dicts):
    return ReplacementModel(default_model, default_dicts)


def _alone(ds, i):
    one = ds.subset(slice(i, i + 1))
    keep = one.real_mask()[0]
    trimmed = copy.copy(one)
    trimmed.clean_tokens = one.clean_tokens[:, keep]
    trimmed.corrupted_tokens = one.corrupted_tokens[:, keep]
    trimmed.answer_pos = one.answer_pos - int(one.first_pos()[0])
    trimmed.attention_mask = None
    return trimmed


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_causal_batch_equals_prompts_alone(causal_rm, default_model, side):
    ds = make_dataset("induction", default_model, n=6, seed=2, padding_side=side)
    assert ds.attention_mask is not None and not bool(ds.attention_mask.bool().all())
    alone = [_alone(ds, i) for i in range(len(ds))]
    runs = DatasetRuns(causal_rm, ds)
    torch.testing.assert_close(runs.batches[0].metric_clean,
                               torch.cat([metric_of(default_model(a.clean_tokens), a) for a in alone]),
                               rtol=0, atol=2e-5)
    cfg = DatasetAttributionConfig(progress=False, reduce="sum")
    batch = score_nodes(causal_rm, runs, cfg)
    single = [score_nodes(causal_rm, a, cfg) for a in alone]
    for s in causal_rm.sites:
        total = sum(sc.features[s] for sc in single)
        torch.testing.assert_close(batch.features[s], total, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(batch.errors[s], sum(sc.errors[s] for sc in single), rtol=1e-3, atol=1e-4)
    assert max(float(batch.features[s].abs().max()) for s in causal_rm.sites) > 0.05
    # mean-ablation means: over positions 1..answer of each prompt alone, never padding
    lat_mean, err_mean = runs.means()
    for s in causal_rm.sites[:3]:
        with torch.no_grad():
            per = [causal_rm.run(a.clean_tokens).sites[s] for a in alone]
        lat = torch.cat([r.latents[0, 1:] for r in per])
        err = torch.cat([r.errors[0, 1:] for r in per])
        torch.testing.assert_close(lat_mean[s].float(), lat.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(err_mean[s].float(), err.mean(0), rtol=1e-4, atol=1e-5)
    # a circuit evaluated by patch ablation: the batch's mean metric is the mean over prompts alone
    circuit = KeptNodes.none({s: d.cfg.d_dict for s, d in causal_rm.dicts.items()})
    for s in causal_rm.sites[::2]:
        circuit.features[s][:200] = True
        circuit.errors[s][:] = True
    per_prompt = [Ablator(causal_rm, a, "patch").metric(circuit) for a in alone]
    assert Ablator(causal_rm, runs, "patch").metric(circuit) == pytest.approx(sum(per_prompt) / len(ds), abs=2e-5)


def test_prompt_graph_of_a_bidirectional_model_equals_interventions():
    """Direct linear attribution with bidirectional attention: a target reads later positions too;
    every sampled edge equals zeroing its source in the frozen model, and incoming edges + bias
    equal every target's value."""
    from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
    from tests.test_linear_attribution import _frozen_value

    cfg = HookedTransformerConfig(n_layers=3, d_model=16, n_ctx=8, d_head=8, n_heads=2, d_vocab=20, d_mlp=32,
                                  act_fn="gelu", attention_dir="bidirectional", seed=1, dtype=torch.float64)
    model = HookedTransformer(cfg)
    sites = [Site(0, "resid_post"), Site(1, "transcoder"), Site(2, "attn_z")]
    dicts = {s: build_dictionary(DictionaryConfig("relu", 16, 24, site=s.id), seed=s.layer).double() for s in sites}
    with torch.no_grad():
        for d in dicts.values():
            d.W_enc.mul_(4)  # larger latents, so features at every position matter
    rm = ReplacementModel(model, dicts)
    tokens = torch.tensor([[0, 5, 9, 3, 14, 7]])
    # small target batches: each chunk of rows then ends at its own targets (where causality would cut)
    g = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=10_000, batch_size=4, progress=False))
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    checked_later = 0
    into_features = [e for e in range(g.n_edges) if g.nodes[int(g.targets[e])].kind == "feature"
                     and abs(float(g.weights[e])) > 1e-6]
    later = [e for e in into_features if g.nodes[int(g.sources[e])].pos > g.nodes[int(g.targets[e])].pos
             and g.nodes[int(g.sources[e])].kind == "feature"]
    earlier = [e for e in into_features if e not in set(later)]
    for e in later[:: max(1, len(later) // 40)] + earlier[:: max(1, len(earlier) // 40)]:
        src, tgt = g.nodes[int(g.sources[e])], g.nodes[int(g.targets[e])]
        site = next((s for s in rm.sites if s.id == src.site), None)
        before = _frozen_value(rm, tokens, clean, tgt, (site, src.index), src.pos, "none")
        after = _frozen_value(rm, tokens, clean, tgt, (site, src.index), src.pos, src.kind)
        assert abs((before - after) - float(g.weights[e])) <= 1e-8 + 1e-6 * abs(float(g.weights[e]))
        checked_later += src.pos > tgt.pos
    assert checked_later > 10  # edges from features at later positions exist and were checked
    incoming = torch.zeros(g.n_nodes, dtype=torch.float64).index_add_(0, g.targets, g.weights.double())
    targets = ~torch.isnan(g.bias)
    total = incoming[targets] + g.bias[targets].double()
    torch.testing.assert_close(total, g.activation[targets].double(), rtol=1e-8, atol=1e-8)


def test_component_circuits_agree_for_left_and_right_padding(default_model):
    """EAP scores and every ablation (patch and mean; means over real tokens only) of a padded batch
    do not depend on the side it is padded on."""
    from circuitgraph.attribution.components import EdgeAblator, edge_scores

    right = make_dataset("induction", default_model, n=6, seed=4)
    left = make_dataset("induction", default_model, n=6, seed=4, padding_side="left")
    assert right.attention_mask is not None
    a, b = edge_scores(default_model, right), edge_scores(default_model, left)
    assert a.scores.abs().max() > 0.05
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-3, atol=2e-4)
    assert a.metric_clean == pytest.approx(b.metric_clean, abs=1e-4)
    for kind in ("patch", "mean"):
        ra, la = EdgeAblator(default_model, right, kind), EdgeAblator(default_model, left, kind)
        removed = torch.zeros(len(ra.rcv), len(ra.snd), dtype=torch.bool)
        removed[-1, 1:5] = True  # some heads' edges into the metric
        removed[3, 0] = True
        assert ra.metric(removed) == pytest.approx(la.metric(removed), abs=1e-4)
        assert abs(ra.metric(removed) - ra.metric(torch.zeros_like(removed))) > 1e-3


def test_kl_metric_edges_add_up_along_the_leaves_path(linear_rm):
    """KL is flat at the clean run, so its incoming edges take the gradient with every leaf halfway to
    its baseline: for a near-quadratic KL (one token corrupted) they add up to m(clean) - m(every leaf
    at its baseline), measured by a real run. The same KL scored at the clean run gives 0."""
    from circuitgraph.tasks.metrics import kl_divergence

    rows = [r._replace(corrupted=r.clean[:3] + [r.clean[3] % 11 + 1] + r.clean[4:]) for r in _rows([6, 5, 7, 6], 2)]
    ds = build_from_rows("kl", rows, linear_rm.model, "kl", "left")
    cfg = DatasetAttributionConfig(progress=False, reduce="sum")
    sc = score_nodes(linear_rm, ds, cfg)
    nodes = [DatasetNode(s, f) for s in (UP, DOWN) for f in range(8)] + [DatasetNode(UP, None), DatasetNode(DOWN, None)]
    _, metric_edges = score_edges(linear_rm, nodes, sc, cfg)
    v = sc.runs.batches[0]
    with torch.no_grad():
        every_leaf_at_base = metric_of(linear_rm.run(v.ds.clean_tokens, SpliceSpec(latents=v.corr_latents,
                                                                                     errors=v.corr_errors),
                                                     attention_mask=v.ds.attention_mask).logits, v.ds).sum()
    assert float(every_leaf_at_base) > 0.5
    assert float(metric_edges.sum()) == pytest.approx(-float(every_leaf_at_base), rel=0.01)

    def kl_at_clean(logits, batch):
        at = logits[torch.arange(len(batch)), batch.answer_pos]
        return kl_divergence(batch.reference_logprobs[:, 0].to(at.dtype), at)

    flat = score_nodes(linear_rm, ds.with_metric(kl_at_clean), cfg)
    _, flat_edges = score_edges(linear_rm, nodes, flat, cfg)
    assert float(flat_edges.abs().max()) < 1e-9


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_component_circuits_without_corrupted_prompts_score_against_the_ablation(default_model, kind):
    """Without corrupted prompts (mean / zero ablation) EAP scores each edge against the ablated
    sender output, not a corrupted run that equals the clean one (which scored every edge 0 and
    returned an empty circuit): the strongest edges' scores have the sign of ablating that edge alone."""
    from circuitgraph.attribution.components import ComponentCircuitConfig, EdgeAblator, edge_scores, trace_components

    ds = make_dataset("ioi", default_model, n=8, seed=0)
    ds.corrupted_tokens = ds.clean_tokens.clone()  # a file without corrupted prompts
    ablator = EdgeAblator(default_model, ds, kind)
    sc = edge_scores(default_model, ds, baselines=[abl for _, abl in ablator.parts])
    valid = torch.tensor([[s.order < r.order for s in sc.senders] for r in sc.receivers])
    full = ablator.metric(torch.zeros_like(valid))
    top = torch.argsort((sc.scores * valid).abs().flatten(), descending=True)[:5]
    for flat in top.tolist():
        r, s = divmod(flat, len(sc.senders))
        removed = torch.zeros_like(valid)
        removed[r, s] = True
        exact = full - ablator.metric(removed)
        assert float(sc.scores[r, s]) * exact > 0, (sc.receivers[r], sc.senders[s], float(sc.scores[r, s]), exact)
    graph, meta = trace_components(default_model, ds, ComponentCircuitConfig(max_edges=40, ablation=kind,
                                                                             progress=False))
    assert graph.n_edges > 0 and meta["n_circuit_edges"] == 40
    assert abs(meta["metric_circuit"] - meta["metric_empty"]) > 0.1  # not the empty circuit
