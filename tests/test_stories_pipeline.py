"""The pipeline on real pretrained weights (stories260K): sampled text, the story task, a traced
circuit over freshly trained dictionaries."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
from circuitgraph.attribution.dataset import metric_of
from circuitgraph.models.loading import resolve_model
from circuitgraph.replacement import ReplacementModel
from circuitgraph.tasks.evaluate import evaluate_tasks
from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset
from dictionaries.site import Site
from dictionaries.token_sources import ModelSampledTokens
from dictionaries.training import TrainConfig, train_dictionaries

from .conftest import STORIES_DIR

MODEL = STORIES_DIR / "stories260K.bin"


@pytest.fixture(scope="module")
def stories():
    return resolve_model(str(MODEL))


def test_sampled_text_is_deterministic_by_index(stories):
    src = ModelSampledTokens(stories, seq_len=24, seed=3, chunk=4)
    a = src.sequences(0, 10)
    b = ModelSampledTokens(stories, seq_len=24, seed=3, chunk=4).sequences(5, 3)
    assert torch.equal(a[5:8], b)
    assert (a[:, 0] == src.bos).all() and a.shape == (10, 24)
    # sampled text is the model's own: it scores far better than uniform (6.24 nats/token)
    with torch.no_grad():
        lp = torch.log_softmax(stories(a), -1)[:, :-1].gather(2, a[:, 1:, None])
    assert float(-lp.mean()) < 3.0


@pytest.mark.slow
def test_story_task_and_circuit(stories, tmp_path):
    res = evaluate_tasks(stories, ["story_names"], n=64)["story_names"]
    assert res["accuracy"] >= 0.75
    sites = [Site(layer, kind) for layer in range(stories.cfg.n_layers) for kind in ("attn_z", "transcoder")]
    cfg = TrainConfig.of(tokens=40_000, batch_tokens=1024, k=8, expansion=2)
    dicts = train_dictionaries(stories, sites, ModelSampledTokens(stories, seq_len=64, seed=1), cfg, tmp_path / "d").dictionaries
    rm = ReplacementModel(stories, dicts)
    ds = make_dataset("story_names", stories, n=16, seed=0)
    held = make_disjoint_dataset("story_names", stories, 16, ds)
    out = trace_dataset(rm, ds, CircuitConfig("attribution", max_nodes=100, progress=False), held)
    ev = out.evaluation
    assert ev.n_nodes <= 100 and ev.n_prompts == 16
    with torch.no_grad():  # the evaluator's full-model metric is the model's own, on the held-out prompts
        assert ev.metric_full == pytest.approx(float(metric_of(stories(held.clean_tokens), held).mean()), abs=1e-4)
    print(ev)
    assert ev.faithfulness >= 0.5, ev
    _check_prompt_graph_is_exact(stories, dicts)


def _check_prompt_graph_is_exact(stories, dicts) -> None:
    """Direct linear attribution on a llama-style model (RMSNorm, rotary, gated SiLU MLP), in
    float64: incoming edges + bias = every visited target's value, and random edges equal the
    effect of zeroing their source in the frozen model."""
    import copy
    import random

    from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt

    from .test_linear_attribution import _frozen_value

    model = copy.deepcopy(stories).to(torch.float64)
    rm = ReplacementModel(model, {s: copy.deepcopy(d).double() for s, d in dicts.items()})
    tokens = model.to_tokens("Lily and Tim went to the park. Lily said hello to")
    g = attribute_prompt(rm, tokens, LinearAttributionConfig(max_feature_nodes=100_000, progress=False))
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    visited = ~torch.isnan(g.bias)
    incoming = torch.zeros(g.n_nodes, dtype=torch.float64).index_add_(0, g.targets, g.weights.double())
    total = incoming[visited] + g.bias[visited].double()
    torch.testing.assert_close(total, g.activation[visited].double(), rtol=1e-9, atol=1e-9)
    rng = random.Random(0)
    for e in rng.sample((g.weights.abs() > 1e-3).nonzero().squeeze(1).tolist(), 20):
        src, tgt = g.nodes[int(g.sources[e])], g.nodes[int(g.targets[e])]
        site = next((s for s in rm.sites if s.id == src.site), None)
        full = _frozen_value(rm, tokens, clean, tgt, None, 0, "none")
        without = _frozen_value(rm, tokens, clean, tgt, (site, src.index), src.pos, src.kind)
        assert abs((full - without) - float(g.weights[e])) <= 1e-6 * max(1.0, abs(float(g.weights[e]))), (src, tgt)
