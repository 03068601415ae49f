"""Feature descriptions, interventions, feature diffs and supernodes on the embedded model."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.features.descriptions import ablation_effect, describe_features
from circuitgraph.features.directions import logit_effects
from circuitgraph.features.interventions import (
    FeatureEdit,
    dataset_feature_diff,
    generate,
    intervene,
    prompt_feature_diff,
)
from circuitgraph.features.supernodes import Supernode, collapse, expand, find_supernodes
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement import ReplacementModel
from circuitgraph.toylang.corpus import ToyCorpus
from dictionaries.site import Site

SITE = Site(3, "resid_post")
PROMPT = "When Mary and John went to the park, John gave a book to"


@pytest.fixture(scope="module")
def rm(default_model, v1_dicts):
    return ReplacementModel(default_model, {SITE: v1_dicts[SITE], Site(1, "attn_z"): v1_dicts[Site(1, "attn_z")]})


def _top_feature(rm, tokens) -> int:
    return int(rm.run(tokens).sites[SITE].latents[0, -1].argmax())


def test_descriptions_match_the_corpus(rm, default_model):
    corpus = ToyCorpus().sequences(5_000_000, 64)
    tokens = default_model.to_tokens(PROMPT)
    f = _top_feature(rm, tokens)
    cards = describe_features(rm, [(SITE, f)], corpus, k=4, progress=False)
    card = cards[f"{SITE.id}#{f}"]
    assert card.contexts and 0 < card.density < 1
    # the reported peak activation is what the model computes on that context
    with torch.no_grad():
        run = rm.run(corpus)
    top = float(run.sites[SITE].latents[:, 1:, f].max())
    ctx = card.contexts[0]
    assert abs(ctx.activations[ctx.peak] - top) < 1e-4
    # promoted tokens are the top of decoder . unembedding
    eff = logit_effects(default_model, SITE, rm.dicts[SITE])[f]
    assert card.promoted[0][0] == default_model.tokenizer.decode([int(eff.argmax())])


def test_ablation_effect_matches_intervention(rm, default_model):
    tokens = default_model.to_tokens(PROMPT)
    f = _top_feature(rm, tokens)
    eff = ablation_effect(rm, tokens, SITE, f)
    res = intervene(rm, tokens, [FeatureEdit(SITE, f, "ablate")])
    lp_c = torch.log_softmax(res.clean_logits[0].double(), -1)
    lp_e = torch.log_softmax(res.edited_logits[0].double(), -1)
    nxt = tokens[0, 1:]
    expected = (lp_e[:-1].gather(1, nxt[:, None]) - lp_c[:-1].gather(1, nxt[:, None]))[:, 0]
    assert torch.allclose(torch.tensor(eff["delta_logprob"], dtype=torch.float64), expected, atol=1e-4)
    assert float(res.kl[0, -1]) > 0


def test_steering_adds_the_decoder_direction(rm, default_model):
    tokens = default_model.to_tokens("The keys to the cabinet")
    eff = logit_effects(default_model, SITE, rm.dicts[SITE])
    f = int(eff.max(1).values.argmax())  # the feature with the strongest single promoted token
    target = int(eff[f].argmax())
    res = intervene(rm, tokens, [FeatureEdit(SITE, f, "add", 50.0)])
    assert default_model.tokenizer.decode([target]) == res.top_after[0]
    out = generate(rm, tokens, [FeatureEdit(SITE, f, "add", 50.0)], max_new_tokens=3)
    assert out.shape[1] == tokens.shape[1] + 3 and int(out[0, tokens.shape[1]]) == target
    with pytest.raises(CircuitGraphError, match="does not exist"):
        intervene(rm, tokens, [FeatureEdit(SITE, 10**6)])
    with pytest.raises(CircuitGraphError, match="no dictionary"):
        intervene(rm, tokens, [FeatureEdit(Site(0, "mlp_out"), 1)])


def test_feature_diffs(rm, default_model):
    prompt = default_model.to_tokens(" John gave a book to", prepend_bos=False)[0]
    pre = default_model.to_tokens("When Mary and John went to the park,", prepend_bos=False)[0]
    rows = prompt_feature_diff(rm, prompt, pre, top_k=5)
    assert len(rows) == 5 and abs(rows[0].score) >= abs(rows[-1].score) > 0
    a = default_model.to_tokens(["The keys to the cabinet are", "The key to the cabinets is"] * 3)
    b = default_model.to_tokens(["When Mary and John went to", "Then, Anna and Bob had a"] * 3)
    rows = dataset_feature_diff(rm, a, b, top_k=5)
    assert abs(rows[0].score) > 2


def _grid_graph() -> Graph:
    """Two features with identical connections (a supernode) and one different."""
    nodes = [Node("token", -1, pos=0), Node("feature", 0.5, "L0.resid_post", 1, 1),
             Node("feature", 0.5, "L0.resid_post", 2, 1), Node("feature", 0.5, "L0.resid_post", 3, 1),
             Node("logit", 2, index=5, pos=1)]
    src = torch.tensor([0, 0, 0, 1, 2, 3])
    tgt = torch.tensor([1, 2, 3, 4, 4, 4])
    w = torch.tensor([1.0, 2.0, -1.0, 1.0, 2.0, -3.0])
    return Graph(nodes, torch.tensor([0, 1.0, 2.0, 1.0, 3.0]), src, tgt, w, torch.tensor([0, 0, 0, 0, 1.0]))


def test_supernodes_collapse_and_expand():
    g = _grid_graph()
    groups = find_supernodes(g, threshold=0.9)
    assert [sorted(s.members) for s in groups] == [["L0.resid_post#1@1", "L0.resid_post#2@1"]]
    c = collapse(g, groups)
    assert c.n_nodes == 4
    sid = f"super:{groups[0].name}"
    assert float(c.weights[(c.sources == c.index(sid)) & (c.targets == c.index("logit#5@1"))]) == 3.0
    assert float(c.weights[(c.sources == c.index("tok@0")) & (c.targets == c.index(sid))]) == 3.0
    back = expand(c, g)
    assert [n.id for n in back.nodes] == [n.id for n in g.nodes] and torch.equal(back.weights, g.weights)
    with pytest.raises(CircuitGraphError, match="two supernodes"):
        collapse(g, [Supernode("a", ["L0.resid_post#1@1"]), Supernode("b", ["L0.resid_post#1@1"])])
