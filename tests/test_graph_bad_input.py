"""Bad input to the graph engine: one clear error naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.attribution.ablation import Ablator
from circuitgraph.attribution.components import trace_components
from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.cli.main import main
from circuitgraph.errors import CircuitGraphError
from circuitgraph.features.interventions import dataset_feature_diff
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement import ReplacementModel
from circuitgraph.tasks.registry import make_dataset
from circuitgraph.viewer.export import export_graph
from dictionaries.site import Site
from dictionaries.token_sources import ModelSampledTokens


@pytest.fixture(scope="module")
def rm(default_model, v1_dicts):
    return ReplacementModel(default_model, {Site(1, "resid_post"): v1_dicts[Site(1, "resid_post")]})


def test_prompt_attribution_inputs(rm, default_model):
    cfg = LinearAttributionConfig(progress=False)
    with pytest.raises(CircuitGraphError, match="one prompt, got a batch of 2"):
        attribute_prompt(rm, torch.zeros(2, 5, dtype=torch.long), cfg)
    with pytest.raises(CircuitGraphError, match="at least 2 tokens"):
        attribute_prompt(rm, torch.zeros(1, 1, dtype=torch.long), cfg)
    with pytest.raises(CircuitGraphError, match="token ids must lie in"):
        attribute_prompt(rm, torch.tensor([[0, 10**6]]), cfg)
    bad = MetricTarget("m", torch.zeros(7))
    with pytest.raises(CircuitGraphError, match="has 7 coefficients; the model has d_vocab"):
        attribute_prompt(rm, default_model.to_tokens("The keys are"), cfg, metric=bad)
    with pytest.raises(ValueError, match="logit_probability"):
        LinearAttributionConfig(logit_probability=0)


def test_no_dictionaries_and_unknown_ablation(rm, default_model):
    with pytest.raises(CircuitGraphError, match="no dictionaries given"):
        ReplacementModel(default_model, {})
    with pytest.raises(CircuitGraphError, match="unknown ablation 'drop'"):
        Ablator(rm, make_dataset("ioi", default_model, n=2), "drop")  # type: ignore[arg-type]


def test_flat_metric_is_reported(default_model):
    ds = make_dataset("ioi", default_model, n=2)
    same = ds.subset(slice(0, 2))
    same.corrupted_tokens = same.clean_tokens.clone()  # nothing to patch: every ablation is a no-op
    with pytest.raises(CircuitGraphError, match="does not change when every edge is ablated"):
        trace_components(default_model, same)


def test_gqa_models_refuse_component_graphs(default_model, monkeypatch):
    monkeypatch.setattr(default_model.cfg, "n_key_value_heads", 2)
    with pytest.raises(CircuitGraphError, match="grouped-query attention"):
        trace_components(default_model, make_dataset("ioi", default_model, n=2))


def test_feature_diff_needs_two_prompts_each(rm, default_model):
    one = default_model.to_tokens(["The keys are"])
    with pytest.raises(CircuitGraphError, match="at least 2 prompts"):
        dataset_feature_diff(rm, one, one)


def test_sampler_and_export_inputs(default_model, tmp_path):
    with pytest.raises(ValueError, match="too short to sample"):
        ModelSampledTokens(default_model, seq_len=1)
    g = Graph([Node("token", -1, pos=0)], torch.zeros(1), torch.zeros(0, dtype=torch.long),
              torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(1))
    with pytest.raises(CircuitGraphError, match="unknown export format"):
        export_graph(g, tmp_path / "x", "dot")  # type: ignore[arg-type]
    g.save(tmp_path / "g")
    (tmp_path / "g" / "features.json").write_text("{broken")
    with pytest.raises(CircuitGraphError, match="features.json is corrupt"):
        Graph.load(tmp_path / "g")


@pytest.mark.parametrize("argv,message", [
    (["trace", "--dicts", "/nowhere", "--sites", "resid_post", "--task", "ioi", "--n", "2"], "/nowhere"),
    (["trace", "--model", "default", "--sites", "mlp_post", "--task", "ioi", "--n", "2"], "has no dictionaries for"),
    (["trace", "--granularity", "components", "--prompt", "The keys are"], "drop --granularity components"),
])
def test_trace_cli_bad_input(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
