"""QK attribution: terms against the model's own attention scores, single terms against
interventions, and a hand-built induction circuit whose top pair is known."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.attribution.qk import QKContext, attribute_qk
from circuitgraph.attribution.qk_dataset import aggregate_qk, circuit_heads, feature_heads
from circuitgraph.attribution.residual_writes import ResidualWriter, record_writes
from circuitgraph.cli.main import main
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.models.loading import resolve_model
from circuitgraph.replacement import ReplacementModel, SpliceSpec
from circuitgraph.tasks.registry import make_dataset
from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.site import ModelHooks, Site

from .conftest import STORIES_DIR

PROMPT = "When Mary and John went to the park, John gave a book to"
MIXED = [Site(0, "resid_post"), Site(1, "attn_z"), Site(1, "mlp_out"), Site(2, "transcoder"), Site(2, "attn_z"),
         Site(3, "resid_post")]


def _model_scores(model: HookedTransformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's ``[H, P, P]`` scores from a plain (unspliced) forward pass."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_scores") or
                                        n.endswith("hook_resid_pre"))
    return [cache[ModelHooks.attn_scores(layer)][0] for layer in range(model.cfg.n_layers)], \
        [cache[ModelHooks.resid_pre(layer)][0] for layer in range(model.cfg.n_layers)]


def _check_every_score(rm: ReplacementModel, tokens: torch.Tensor, queries: list[int], fold: bool) -> float:
    """Largest relative gap between the terms' sum and the model's score over every head, the given
    queries and every key; also checks the source vectors sum to the model's residual stream."""
    scores, resid = _model_scores(rm.model, tokens)
    ctx = QKContext(rm, tokens, fold_skips=fold)
    worst = 0.0
    for layer in range(rm.model.cfg.n_layers):
        for q in queries:
            torch.testing.assert_close(ctx.writer.sources(layer, q).vectors.sum(0), resid[layer][q], rtol=0, atol=1e-10)
        for head in range(rm.model.cfg.n_heads):
            for q in queries:
                for a in ctx.attribute_keys(layer, head, q):
                    ref = float(scores[layer][head, q, a.key_pos])
                    worst = max(worst, abs(a.total() - ref) / max(1.0, abs(ref)))
    return worst


@pytest.mark.parametrize("fold", [True, False])
def test_terms_sum_to_the_models_scores_default_dicts(model64, fold):
    """Embedded model, committed attention-z + transcoder (with skip) dictionaries, float64."""
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR
    from dictionaries.persistence import load_dictionaries

    rm = ReplacementModel(model64, {s: copy.deepcopy(d).double() for s, d in load_dictionaries(DEFAULT_DICTS_DIR).items()})
    tokens = model64.to_tokens(PROMPT)
    assert _check_every_score(rm, tokens, [5, tokens.shape[1] - 1], fold) <= 1e-9


def test_terms_sum_to_the_models_scores_mixed_sites(model64, dicts64):
    """Residual-stream sites (which replace everything before them), MLP-out, transcoder, attention-z."""
    rm = ReplacementModel(model64, {s: dicts64[s] for s in MIXED})
    tokens = model64.to_tokens(PROMPT)
    assert _check_every_score(rm, tokens, [1, tokens.shape[1] - 1], True) <= 1e-9
    ids = ResidualWriter(rm, record_writes(rm, tokens)).sources(3, 4).ids
    assert not any(i.startswith("tok@") for i in ids) and any(i.startswith("L0.resid_post#") for i in ids)


def _random_dict(model, site: Site, seed: int):
    """A random dictionary (exactness does not depend on training) with nonzero biases and skip."""
    d_in, d_out = site.widths(model.cfg)
    cfg = DictionaryConfig("topk", d_in, 4 * model.cfg.d_model, d_out=0 if d_out == d_in else d_out, k=6,
                           skip=site.is_transcoder, out_layers=site.output_layers(model.cfg.n_layers), site=site.id)
    d = build_dictionary(cfg, seed).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (d.b_dec, d.b_enc, *(() if d.W_skip is None else (d.W_skip,))):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return d


def test_stories260k_every_site_kind():
    """RMSNorm, rotary on adjacent pairs, grouped-query attention (8 query heads, 4 key heads), and
    every site kind: attention-z, neurons, residual mid / pre, transcoder with skip, a cross-layer
    transcoder (whose features write several MLP outputs)."""
    model = copy.deepcopy(resolve_model(str(STORIES_DIR / "stories260K.bin"))).to(torch.float64)
    assert model.cfg.n_key_value_heads == 4 and model.cfg.positional_embedding_type == "rotary"
    sites = [Site(0, "attn_z"), Site(0, "mlp_post"), Site(1, "resid_mid"), Site(1, "transcoder"), Site(2, "attn_z"),
             Site(2, "clt"), Site(3, "clt"), Site(4, "clt"), Site(3, "resid_pre")]
    rm = ReplacementModel(model, {s: _random_dict(model, s, i) for i, s in enumerate(sites)})
    tokens = model.to_tokens("Lily and Tim went to the park. Lily said hello to")
    for fold in (True, False):
        assert _check_every_score(rm, tokens, [3, tokens.shape[1] - 1], fold) <= 1e-9
    ids = ResidualWriter(rm, record_writes(rm, tokens)).sources(4, 3).ids
    assert any(i.startswith("L2.clt#") for i in ids) and "L3.clt#err@3" in ids and "L3.attn@3" in ids


def test_single_terms_equal_interventions(model64, dicts64):
    """Each of the strongest terms equals s - s(no i) - s(no j) + s(no i, no j), with the query-side
    source i and the key-side source j zeroed in the spliced model (every site a leaf, scales frozen):
    the model's own score, not a sum we built."""
    rm = ReplacementModel(model64, {s: dicts64[s] for s in dicts64 if s.kind in ("attn_z", "transcoder")})
    assert all(d.W_skip is None for d in rm.dicts.values())  # no path besides the direct writes
    tokens = model64.to_tokens(PROMPT)
    layer, head, q, k = 3, 1, tokens.shape[1] - 1, 4
    attr = attribute_qk(rm, tokens, layer, head, q, k)
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    site_of = {s.id: s for s in rm.sites}

    def score(zeroed: list[str]) -> float:
        lat = {s: r.latents.clone() for s, r in clean.sites.items()}
        err = {s: r.errors.clone() for s, r in clean.sites.items()}
        embed = rm.model.embed(tokens).clone()
        for source in zeroed:
            name, pos = source.rsplit("@", 1)
            if name == "tok":
                embed[0, int(pos)] = 0
            else:
                site, what = name.split("#")
                if what == "err":
                    err[site_of[site]][0, int(pos)] = 0
                else:
                    lat[site_of[site]][0, int(pos), int(what)] = 0
        seen: dict[str, float] = {}

        def read(act: torch.Tensor, hook) -> None:
            seen["s"] = float(act[0, head, q, k])

        spec = SpliceSpec(latents=lat, errors=err, embed=embed, frozen=clean.frozen)
        with torch.no_grad(), rm.spliced(spec), rm.model.hooks(fwd_hooks=[(ModelHooks.attn_scores(layer), read)]):
            rm.model(tokens)
        return seen["s"]

    base = score([])
    assert abs(base - attr.score) < 1e-9
    leafy = [t for t in attr.terms if not t.query.startswith("bias:") and not t.key.startswith("bias:")
             and not t.query.startswith("pos@") and not t.key.startswith("pos@")]
    with_token = next(t for t in leafy if "tok@" in t.query + t.key)
    with_error = next(t for t in leafy if "#err@" in t.query + t.key)
    checked = set()
    for t in [*leafy[:6], with_token, with_error]:
        expected = base - score([t.query]) - score([t.key]) + score([t.query, t.key])
        assert abs(expected - t.value) <= 1e-8 * max(1.0, abs(t.value)), (t, expected)
        checked.add(t.query.split("#")[0].split("@")[0])
        checked.add(t.key.split("#")[0].split("@")[0])
    assert {"tok", "L0.transcoder", "L2.attn_z"} <= checked  # token, feature and (with_error) error sources


def planted_induction_model() -> tuple[ReplacementModel, int]:
    """Two attention-only layers. Residual layout: tokens (0-5), positions (6-13), the previous
    token (14-19, written by L0.head0), the induction output (20-25, written by L1.head0). L0.head0
    matches position p with p-1; L1.head0 matches the query's token with the key's previous token.
    An identity dictionary on L0.attn_z makes feature a = 'the previous token was a'."""
    v, n_ctx, c = 6, 8, 40.0
    cfg = HookedTransformerConfig(n_layers=2, d_model=26, n_ctx=n_ctx, d_head=8, n_heads=2, d_vocab=v, attn_only=True,
                                  normalization_type=None, act_fn="relu", seed=0, dtype=torch.float64)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, :v] = torch.eye(v, dtype=torch.float64)
        model.W_pos[:, v : v + n_ctx] = torch.eye(n_ctx, dtype=torch.float64)
        prev, ind = model.blocks[0].attn, model.blocks[1].attn
        for p in range(n_ctx):
            prev.W_Q[0, v + p, p] = c  # query at p ...
            if p + 1 < n_ctx:
                prev.W_K[0, v + p, p + 1] = 1.0  # ... meets the key at p - 1
        for a in range(v):
            prev.W_V[0, a, a] = 1.0
            prev.W_O[0, a, 14 + a] = 1.0  # writes the previous token
            ind.W_Q[0, a, a] = c  # the query's token ...
            ind.W_K[0, 14 + a, a] = 1.0  # ... meets the key's previous token
            ind.W_K[0, a, a] = 0.3  # a decoy: the key's own token
            ind.W_V[0, a, a] = 1.0
            ind.W_O[0, a, 20 + a] = 1.0
            model.W_U[20 + a, a] = 1.0
        prev.W_Q[1, :v, :v] = torch.eye(v) * 0.5  # decoy head 1 of each layer: token-token matching
        prev.W_K[1, :v, :v] = torch.eye(v)
    d = build_dictionary(DictionaryConfig("relu", 16, 16, site="L0.attn_z")).double()
    with torch.no_grad():
        d.W_enc.copy_(torch.eye(16))
        d.W_dec.copy_(torch.eye(16))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return ReplacementModel(model, {Site(0, "attn_z"): d}), c


def test_planted_induction_head_top_pair():
    rm, c = planted_induction_model()
    tokens = torch.tensor([[0, 1, 2, 3, 4, 1]])  # ... 1 2 ... 1 -> the induction head attends to 2 (after 1)
    ctx = QKContext(rm, tokens)
    assert int(ctx.record.patterns[1][0, 5].argmax()) == 2
    attr = ctx.attribute(1, 0, 5, 2)
    top = attr.top(1)[0]
    assert (top.query, top.key) == ("tok@5", "L0.attn_z#1@2")  # the planted pair, exactly
    weight = float(ctx.record.patterns[0][0, 2, 1])  # how much of token 1 the previous-token head moved to 2
    assert weight > 0.99 and abs(top.value - c / 8**0.5 * weight) < 1e-9 and abs(attr.total() - attr.score) < 1e-9
    prev = ctx.attribute(0, 0, 4, 3).top(1)[0]  # the previous-token head matches positions
    assert (prev.query, prev.key) == ("pos@4", "pos@3")
    decoy = ctx.attribute(1, 0, 5, 1)  # the key holding the query's own token: only the decoy term
    assert decoy.top(1)[0][:2] == ("tok@5", "tok@1") and decoy.score < attr.score


def test_dataset_means_match_the_models_padded_scores(default_model, default_dicts):
    """Mean scores over a task equal the model's own scores from a padded batch at the positions
    counted from the answer (left and right padding alike); induction keys hold the query's token
    one position earlier."""
    rm = ReplacementModel(default_model, default_dicts)
    out = {}
    for side in ("right", "left"):
        ds = make_dataset("induction", default_model, n=6, seed=1, padding_side=side)
        (res,) = aggregate_qk(rm, ds, [(2, 3)], query_offset=-1, key=-10, contrast=False)
        with torch.no_grad():
            _, cache = default_model.run_with_cache(ds.clean_tokens, attention_mask=ds.attention_mask)
        rows = torch.arange(6)
        ref = cache[ModelHooks.attn_scores(2)][rows, 3, ds.answer_pos, ds.answer_pos - 9]
        assert abs(res.mean_score - float(ref.mean())) < 1e-4 and abs(res.total() - res.mean_score) < 1e-4
        assert bool((ds.clean_tokens[rows, ds.answer_pos - 10] == ds.clean_tokens[rows, ds.answer_pos]).all())
        assert res.key_offsets == {-10: 6} and all(t.query.endswith("@-1") and t.key.endswith("@-10") for t in res.top(50))
        out[side] = res
    assert abs(out["left"].mean_score - out["right"].mean_score) < 1e-4
    left, right = out["left"].top(5), out["right"].top(5)
    assert [t[:2] for t in left] == [t[:2] for t in right]
    assert [t.value for t in left] == pytest.approx([t.value for t in right], abs=1e-4)


def test_circuit_heads_reads_components_and_attention_features(default_model, default_dicts):
    rm = ReplacementModel(default_model, default_dicts)
    site = Site(2, "attn_z")
    row = default_dicts[site].decoder_directions()[7].detach().reshape(4, -1)
    head = int(row.norm(dim=1).argmax())
    assert int(feature_heads(rm)[site.id][7]) == head
    nodes = [Node("component", 1.2, "L1.head2"), Node("feature", 2.2, site.id, 7), Node("component", 0.2, "L0.head1")]
    empty = torch.zeros(0, dtype=torch.long)
    graph = Graph(nodes, torch.zeros(3), empty, empty, torch.zeros(0), torch.zeros(3),
                  node_scores=torch.tensor([0.5, -2.0, 0.1]))
    assert circuit_heads(graph, rm, 3) == [(2, head), (1, 2), (0, 1)]


def test_cli_json(capsys, default_model):
    args = ["qk", "--prompt", PROMPT, "--layer", "2", "--head", "3", "--query", "-1", "--key", "4", "--top-k", "5",
            "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"score", "sum_of_terms", "top_pairs"} <= set(out) and len(out["top_pairs"]) == 5
    tokens = default_model.to_tokens(PROMPT)
    scores, _ = _model_scores(default_model, tokens)
    assert abs(out["score"] - float(scores[2][3, -1, 4])) < 1e-5
    assert abs(out["sum_of_terms"] - out["score"]) < 1e-4 * max(1.0, abs(out["score"]))
    assert all(set(p) == {"query", "key", "value"} for p in out["top_pairs"])
    assert main(args[:-5] + ["--key", "all", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert [e["key"] for e in every["keys"]] == list(range(tokens.shape[1]))
    logits = torch.tensor([e["score"] for e in every["keys"]])
    assert torch.allclose(logits, scores[2][3, -1].float(), atol=1e-5)
    assert main(["qk", "--prompt", PROMPT, "--layer", "2", "--head", "3", "--json"]) == 0  # --key top
    top = json.loads(capsys.readouterr().out)
    assert top["key"] == int(logits.argmax())


@pytest.mark.parametrize("bad", [["--key", "20"], ["--head", "9"], ["--key", "nowhere"], ["--query", "99"]])
def test_cli_refuses_bad_positions_and_heads(capsys, bad):
    args = ["qk", "--prompt", PROMPT, "--layer", "2", "--head", "3", "--key", "2", *bad]
    assert main(args) == 2
    assert "error" in capsys.readouterr().err


def test_cli_dataset_and_circuit_heads_equal_the_api(capsys, tmp_path, default_model, default_dicts):
    """``qk --task`` prints what ``aggregate_qk`` returns; ``--circuit`` reads a saved graph's heads."""
    rm = ReplacementModel(default_model, default_dicts)
    ds = make_dataset("induction", default_model, n=4, seed=0)
    (api,) = aggregate_qk(rm, ds, [(2, 3)], key=-10)
    assert main(["qk", "--task", "induction", "--n", "4", "--heads", "2.3", "--key", "-10", "--top-k", "5",
                 "--json"]) == 0
    (cli,) = json.loads(capsys.readouterr().out)["heads"]
    assert cli["mean_score"] == pytest.approx(api.mean_score, abs=1e-6)
    assert [(p["query"], p["key"]) for p in cli["top_pairs"]] == [(t.query, t.key) for t in api.top(5)]
    assert cli["group_pairs"][0]["other_keys"] is not None and cli["key_offsets"] == {"-10": 4}
    empty = torch.zeros(0, dtype=torch.long)
    graph = Graph([Node("component", 2.1, "L2.head3"), Node("component", 1.2, "L1.head1")], torch.zeros(2), empty,
                  empty, torch.zeros(0), torch.zeros(2), node_scores=torch.tensor([3.0, 1.0]))
    graph.save(tmp_path / "circuit")
    assert main(["qk", "--task", "induction", "--n", "4", "--circuit", str(tmp_path / "circuit"), "--n-heads", "1",
                 "--key", "-10", "--no-contrast", "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)["heads"]
    assert (only["layer"], only["head"]) == (2, 3) and only["mean_score"] == pytest.approx(api.mean_score, abs=1e-6)
    assert main(["qk", "--task", "induction", "--n", "4", "--heads", "2.3", "--key", "3"]) == 2  # offsets count back
