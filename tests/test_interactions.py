"""Interaction-sparsity training: the penalised interactions are the graph's edges (and the exact
MLP Jacobian for pairs around an MLP), the penalty makes them sparser, bad pairs are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
from circuitgraph.graph.sparsity import edges_to_fraction
from circuitgraph.replacement import ReplacementModel
from circuitgraph.tasks.registry import make_dataset
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from dictionaries.activations import ActivationStore
from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.interactions import (
    InteractionPair,
    InteractionPenalty,
    _Path,
    attention_interactions,
    attention_keys,
    pair_interactions,
    parse_pairs,
)
from dictionaries.persistence import dictionary_state_equal
from dictionaries.site import ModelHooks, Site
from dictionaries.training import TrainConfig, train_dictionaries

TC0, TC1, AZ1 = Site(0, "transcoder"), Site(1, "transcoder"), Site(1, "attn_z")


def test_edges_to_fraction_counts_strongest_edges() -> None:
    targets = torch.tensor([2, 2, 2, 1, 1, 0])
    weights = torch.tensor([1.0, 8.0, -1.0, -5.0, 5.0, 0.0])
    assert edges_to_fraction(targets, weights, 4, 0.9).tolist() == [0, 2, 2, 0]
    assert edges_to_fraction(targets, weights, 4, 0.8).tolist() == [0, 2, 1, 0]
    assert edges_to_fraction(targets, weights, 4, 0.5).tolist() == [0, 1, 1, 0]
    assert edges_to_fraction(targets, weights, 4, 1.0).tolist() == [0, 2, 3, 0]
    with pytest.raises(ValueError, match="fraction"):
        edges_to_fraction(targets, weights, 4, 0.0)


def _prompt_graph(model, v1_dicts, task: str, seed: int):
    """attn_z + transcoder dictionaries, one task prompt, its full direct-attribution graph as
    ``{node id: index}`` and ``{(source, target): weight}``."""
    dicts = {s: d for s, d in v1_dicts.items() if s.kind in ("attn_z", "transcoder")}
    tokens = make_dataset(task, model, n=1, seed=seed).clean_tokens[0:1]
    graph = attribute_prompt(ReplacementModel(model, dicts), tokens,
                             LinearAttributionConfig(max_feature_nodes=100_000, progress=False))
    index = {n.id: i for i, n in enumerate(graph.nodes)}
    edges = {(int(s), int(t)): float(w) for s, t, w in zip(graph.sources, graph.targets, graph.weights, strict=True)}
    return dicts, tokens, index, edges


def test_penalised_interactions_are_the_graph_edges(default_model, v1_dicts) -> None:
    """a_i * J[i, j] from the training penalty equals the same-position direct edge that the graph
    engine computes between the two features (attention and normalisation frozen)."""
    dicts, tokens, index, edges = _prompt_graph(default_model, v1_dicts, "ioi", 3)
    _, cache = default_model.run_with_cache(tokens)
    n_pos = tokens.shape[1]
    frozen = {ModelHooks.ln_scale(1, "ln2"): cache[ModelHooks.ln_scale(1, "ln2")][0].reshape(n_pos, 1)}
    checked = 0
    for writer in (TC0, AZ1):
        pair = InteractionPair(writer, TC1)
        w_lat = dicts[writer].encode(cache[writer.input_hook][0].reshape(n_pos, -1))
        r_lat = dicts[TC1].encode(cache[TC1.input_hook][0])
        w_idx, r_idx = w_lat.topk(16).indices, r_lat.topk(16).indices
        with torch.no_grad():
            j = pair_interactions(_Path(default_model, pair), dicts[writer], dicts[TC1], w_idx, r_idx, frozen)
            e = w_lat.gather(1, w_idx).unsqueeze(-1) * j
        for t in range(1, n_pos):
            for a in range(16):
                for b in range(16):
                    src = f"{writer.id}#{int(w_idx[t, a])}@{t}"
                    dst = f"{TC1.id}#{int(r_idx[t, b])}@{t}"
                    if src in index and dst in index:
                        got = edges.get((index[src], index[dst]), 0.0)
                        assert got == pytest.approx(float(e[t, a, b]), rel=1e-3, abs=1e-4), (src, dst)
                        checked += 1
    assert checked > 1000


def test_attention_interactions_are_the_cross_position_graph_edges(default_model, v1_dicts) -> None:
    """Writer -> attn_z reader: a_i(s) * J[t, s, i, j] through the frozen pattern equals the graph's
    edge from feature i at key position s to feature j at query position t."""
    dicts, tokens, index, edges = _prompt_graph(default_model, v1_dicts, "induction", 2)
    reader = Site(2, "attn_z")
    penalty = InteractionPenalty(default_model, [InteractionPair(TC0, reader), InteractionPair(AZ1, reader)], n_keys=64)
    acts = penalty.capture(tokens)
    n_pos = tokens.shape[1]
    keys, valid = attention_keys(acts[penalty.paths[0].pattern_hook], 64)
    checked = 0
    for path in penalty.paths:
        writer = path.pair.writer
        w_lat = dicts[writer].encode(acts[writer.input_hook][0].reshape(n_pos, -1))
        r_lat = dicts[reader].encode(acts[reader.input_hook][0].reshape(n_pos, -1))
        w_idx, r_idx = w_lat.topk(16).indices, r_lat.topk(16).indices
        with torch.no_grad():
            j = attention_interactions(path, dicts[writer], dicts[reader], w_idx[None], r_idx[None], keys, acts)[0]
        for t in range(1, n_pos):
            for kk in range(keys.shape[-1]):
                if not valid[0, t, kk]:
                    continue
                s_pos = int(keys[0, t, kk])
                for a in range(16):
                    src = f"{writer.id}#{int(w_idx[s_pos, a])}@{s_pos}"
                    for b in range(0, 16, 3):
                        dst = f"{reader.id}#{int(r_idx[t, b])}@{t}"
                        if src in index and dst in index:
                            expected = float(w_lat[s_pos, w_idx[s_pos, a]].detach() * j[t, kk, a, b])
                            got = edges.get((index[src], index[dst]), 0.0)
                            assert got == pytest.approx(expected, rel=1e-3, abs=1e-4), (src, dst)
                            checked += 1
    assert checked > 1000


def _frozen_ln(block, x: torch.Tensor, scale: torch.Tensor, center: bool) -> torch.Tensor:
    if center:
        x = x - x.mean(-1, keepdim=True)
    x = x / scale
    if getattr(block.ln2, "w", None) is not None:
        x = x * block.ln2.w
    if getattr(block.ln2, "b", None) is not None:
        x = x + block.ln2.b
    return x


@pytest.mark.parametrize("variant", ["gelu_ln", "gated_silu_rms"])
def test_mlp_pair_jacobian_matches_autograd(variant: str) -> None:
    """A resid_mid SAE -> mlp_out SAE pair: the penalty's per-token Jacobian (through ln2 with its
    scale frozen and the MLP itself) equals autograd's, for plain and gated MLPs."""
    torch.manual_seed(1)
    gated = variant.startswith("gated")
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=30, n_ctx=8,
                                  act_fn="silu" if gated else "gelu", gated_mlp=gated,
                                  normalization_type="RMS" if gated else "LN", dtype=torch.float64)
    model = HookedTransformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    up, down = Site(0, "resid_mid"), Site(0, "mlp_out")
    mk = lambda: build_dictionary(DictionaryConfig("topk", 16, 40, k=5), seed=0).double()  # noqa: E731
    u, d = mk(), mk()
    u.norm_out.fill_(1.7)
    d.norm_in.fill_(0.6)
    tokens = torch.randint(0, 30, (1, 6))
    _, cache = model.run_with_cache(tokens)
    pair = InteractionPair(up, down)
    penalty = InteractionPenalty(model, [pair])
    frozen = {h: cache[h][0].reshape(6, -1) for h in penalty.hooks}
    w_idx = torch.randint(0, 40, (6, 5))
    r_idx = torch.randint(0, 40, (6, 4))
    j = pair_interactions(penalty.paths[0], u, d, w_idx, r_idx, frozen)
    block = model.blocks[0]
    for t in range(6):
        resid = cache[up.input_hook][0, t]
        scale = cache[ModelHooks.ln_scale(0, "ln2")][0, t]

        def f(a: torch.Tensor, t=t, resid=resid, scale=scale) -> torch.Tensor:
            x = resid + a @ u.decoder_directions()[w_idx[t]]
            out = block.mlp(_frozen_ln(block, x, scale, center=not gated).reshape(1, 1, -1)).reshape(-1)
            return d.active_value(out.reshape(1, -1))[0, r_idx[t]]

        expected = torch.autograd.functional.jacobian(f, torch.zeros(5, dtype=torch.float64))  # [k_D, k_U]
        torch.testing.assert_close(j[t].detach(), expected.T, rtol=1e-9, atol=1e-10)


def test_parse_pairs_adjacent_all_and_explicit() -> None:
    sites = [Site(layer, kind) for layer in range(3) for kind in ("attn_z", "transcoder")]
    adjacent = {p.id for p in parse_pairs("adjacent", sites)}
    assert adjacent == {"L0.attn_z>L0.transcoder", "L0.attn_z>L1.transcoder", "L0.transcoder>L1.transcoder",
                        "L1.attn_z>L1.transcoder", "L1.attn_z>L2.transcoder", "L1.transcoder>L2.transcoder",
                        "L2.attn_z>L2.transcoder", "L0.attn_z>L1.attn_z", "L0.transcoder>L1.attn_z",
                        "L1.attn_z>L2.attn_z", "L1.transcoder>L2.attn_z"}
    assert len(parse_pairs("all", sites)) == (1 + 3 + 5) + (2 + 4)
    assert parse_pairs("none", sites) == []
    assert [p.id for p in parse_pairs("L0.transcoder>L2.transcoder", sites)] == ["L0.transcoder>L2.transcoder"]
    resid = [Site(0, "resid_post"), Site(1, "resid_post"), Site(1, "resid_mid"), Site(1, "mlp_out")]
    assert {p.id for p in parse_pairs("adjacent", resid)} == {
        "L0.resid_post>L1.resid_post", "L0.resid_post>L1.resid_mid", "L0.resid_post>L1.mlp_out",
        "L1.resid_mid>L1.mlp_out", "L1.resid_mid>L1.resid_post", "L1.mlp_out>L1.resid_post"}


@pytest.mark.parametrize(("spec", "message"), [
    ("L1.transcoder>L0.transcoder", "before the reader"),
    ("L0.transcoder>L0.attn_z", "before the reader"),
    ("L0.attn_z>L1.mlp_post", "not supported as readers"),
    ("L0.transcoder>L5.transcoder", "not being trained"),
    ("L0.transcoder-L1.transcoder", "WRITER>READER"),
    ("L1.mlp_out>L1.mlp_out", "after the MLP"),
])
def test_bad_pairs_are_refused(spec: str, message: str) -> None:
    sites = [Site(layer, kind) for layer in range(2) for kind in ("attn_z", "transcoder", "mlp_out", "mlp_post")]
    with pytest.raises(ValueError, match=message):
        parse_pairs(spec, sites)


SMALL = TrainConfig.of(arch="topk", k=8, expansion=2, tokens=1024 * 40, batch_tokens=1024, chunk_sequences=24,
                    model_batch=8, checkpoint_every=5, warmup_steps=5, interaction_sequences=4)


def _corpus() -> ToyCorpus:
    return ToyCorpus(CorpusConfig(seed=1, seq_len=64))


def _mean_interaction(dicts, penalty: InteractionPenalty) -> float:
    tokens = ToyCorpus(CorpusConfig(seed=99, seq_len=64)).sequences(0, 16)
    with torch.no_grad():
        return float(penalty(dicts, penalty.capture(tokens)).total())


def test_penalty_makes_interactions_sparser(default_model, tmp_path) -> None:
    sites = [TC0, TC1]
    plain = train_dictionaries(default_model, sites, _corpus(), SMALL, tmp_path / "plain").dictionaries
    cfg = SMALL.replace(interaction_penalty=1.0)
    sparse = train_dictionaries(default_model, sites, _corpus(), cfg, tmp_path / "sparse").dictionaries
    penalty = InteractionPenalty(default_model, parse_pairs("adjacent", sites))
    before, after = _mean_interaction(plain, penalty), _mean_interaction(sparse, penalty)
    assert after < 0.5 * before, (before, after)
    saved = json.loads((tmp_path / "sparse" / "train_config.json").read_text())
    assert saved["interaction_penalty"] == 1.0 and saved["interaction_pairs"] == "adjacent"


def test_penalised_run_resumes_to_identical_weights(default_model, tmp_path, monkeypatch) -> None:
    cfg = SMALL.replace(tokens=1024 * 12, interaction_penalty=0.5)
    straight = train_dictionaries(default_model, [TC0, TC1], _corpus(), cfg, tmp_path / "a").dictionaries
    real = ActivationStore.batches

    def dying(self, start_step=0):
        for i, b in enumerate(real(self, start_step)):
            if i == 7:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(ActivationStore, "batches", dying)
    with pytest.raises(KeyboardInterrupt):
        train_dictionaries(default_model, [TC0, TC1], _corpus(), cfg, tmp_path / "b")
    monkeypatch.setattr(ActivationStore, "batches", real)
    resumed = train_dictionaries(default_model, [TC0, TC1], _corpus(), cfg, tmp_path / "b").dictionaries
    for site in (TC0, TC1):
        assert dictionary_state_equal(straight[site], resumed[site]), site


def test_penalty_without_pairs_is_a_clear_error(default_model, tmp_path) -> None:
    cfg = SMALL.replace(interaction_penalty=0.1)
    with pytest.raises(DictionaryError, match="gives no pair"):
        train_dictionaries(default_model, [Site(0, "mlp_post"), Site(1, "mlp_post")], _corpus(), cfg, tmp_path)
    bad = SMALL.replace(interaction_penalty=0.1, interaction_pairs="L0.transcoder>L3.transcoder")
    with pytest.raises(DictionaryError, match="not being trained"):
        train_dictionaries(default_model, [TC0, TC1], _corpus(), bad, tmp_path)
    with pytest.raises(ValueError, match="interaction_penalty"):
        TrainConfig.of(interaction_penalty=-1.0)


def test_concentration_is_a_scale_free_effective_edge_count(default_model, v1_dicts) -> None:
    """The concentration penalty is the mean log effective number of incoming edges (L1^2 / L2^2) of
    each active reader latent: between 0 and log(number of edges), unchanged when the reader's
    pre-activations are rescaled, while the edge L1 scales with them."""
    import copy

    dicts = {s: copy.deepcopy(d) for s, d in v1_dicts.items() if s in (TC0, AZ1, TC1)}
    pairs = parse_pairs("all", sorted(dicts))
    conc, edge = InteractionPenalty(default_model, pairs, "concentration"), InteractionPenalty(default_model, pairs, "edge")
    acts = conc.capture(ToyCorpus(CorpusConfig(seed=5, seq_len=32)).sequences(0, 4))
    with torch.no_grad():
        c0, e0 = conc(dicts, acts), edge(dicts, acts)
        assert set(c0) == {"into L1.transcoder", "into L1.attn_z"}
        # per target: 2 writers x 16 latents into a transcoder; 1 writer x 8 keys x 16 latents into attn_z
        assert 0.0 < float(c0["into L1.transcoder"]) <= math.log(32) and 0.0 < float(c0["into L1.attn_z"]) <= math.log(128)
        dicts[TC1].W_enc.mul_(3.0)
        dicts[TC1].b_enc.mul_(3.0)
        c1, e1 = conc(dicts, acts), edge(dicts, acts)
    assert float(c1["into L1.transcoder"]) == pytest.approx(float(c0["into L1.transcoder"]), rel=1e-5)
    for pair in ("L0.transcoder>L1.transcoder", "L1.attn_z>L1.transcoder"):
        assert float(e1[pair]) == pytest.approx(3.0 * float(e0[pair]), rel=1e-5)


def test_committed_sparse_interaction_set_is_more_concentrated(default_model, v1_dicts) -> None:
    """The committed sparse-interaction dictionaries fit the model and every reader's effective
    fan-in (held-out text) is lower than with the committed plain dictionaries."""
    from circuitgraph.models.loading import SPARSE_INTERACTION_DICTS_DIR
    from dictionaries.persistence import check_against_model, load_dictionaries

    sparse = load_dictionaries(SPARSE_INTERACTION_DICTS_DIR)
    check_against_model(sparse, default_model.cfg)
    plain = {s: d for s, d in v1_dicts.items() if s in sparse}
    assert set(plain) == set(sparse) and len(sparse) == 8
    penalty = InteractionPenalty(default_model, parse_pairs("all", sorted(sparse)), "concentration")
    acts = penalty.capture(ToyCorpus(CorpusConfig(seed=777, seq_len=64)).sequences(0, 8))
    with torch.no_grad():
        before, after = penalty(plain, acts), penalty(sparse, acts)
    for reader in before:
        assert float(after[reader]) < float(before[reader]) - 0.1, reader


def test_bad_penalty_settings_are_refused(default_model) -> None:
    pairs = [InteractionPair(TC0, TC1)]
    with pytest.raises(ValueError, match="unknown interaction weighting"):
        InteractionPenalty(default_model, pairs, "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one key"):
        InteractionPenalty(default_model, pairs, n_keys=0)
    with pytest.raises(ValueError, match="interaction_sequences"):
        TrainConfig.of(interaction_sequences=0)


@pytest.mark.parametrize("term", ["interaction", "e2e"])
def test_non_finite_extra_term_stops_with_step_and_keeps_checkpoint(default_model, tmp_path, monkeypatch, term) -> None:
    """A NaN interaction penalty (or end-to-end KL) stops training with an error naming the step;
    the last atomic checkpoint survives."""
    import dictionaries.training as training
    from dictionaries.checkpoint import load_checkpoint
    from dictionaries.interactions import InteractionTerms

    calls = {"n": 0}
    if term == "interaction":
        real = InteractionPenalty.__call__

        def poisoned(self, dicts, acts):
            out = real(self, dicts, acts)
            calls["n"] += 1
            return InteractionTerms({k: v * float("nan") for k, v in out.items()}) if calls["n"] == 7 else out

        monkeypatch.setattr(InteractionPenalty, "__call__", poisoned)
        cfg = SMALL.replace(interaction_penalty=0.5)
    else:
        real_kl = training.e2e_kl

        def poisoned_kl(model, dicts, tokens):
            out = real_kl(model, dicts, tokens)
            calls["n"] += 1
            return {k: v * float("nan") for k, v in out.items()} if calls["n"] == 7 else out

        monkeypatch.setattr(training, "e2e_kl", poisoned_kl)
        cfg = SMALL.replace(e2e_kl_coeff=1.0)
    with pytest.raises(DictionaryError, match="at step 6.*checkpoint .* is intact"):
        train_dictionaries(default_model, [TC0, TC1], _corpus(), cfg, tmp_path)
    assert load_checkpoint(tmp_path / "train_checkpoint.safetensors").meta["step"] == 5
