"""Every example in examples/ runs, through the public API, and does what it says."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from circuitgraph.cli.main import main as cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_public_api_names():
    import circuitgraph as cg

    for name in cg.__all__:
        assert getattr(cg, name) is not None, name
    with pytest.raises(AttributeError):
        _ = cg.no_such_name


@pytest.mark.slow
def test_own_dataset_example_matches_the_cli(tmp_path, capsys):
    res = _load("own_dataset").main(tmp_path / "ex", n_rows=48, n_eval=16, max_nodes=200)
    assert res["held_out"] and res["ablation"] == "patch"
    assert res["n_feature_nodes"] + res["n_error_nodes"] == res["n_nodes"] <= 200
    assert res["faithfulness"] >= 0.5, res  # the embedded model's IOI circuits hold on hand-written rows
    assert (tmp_path / "ex" / "circuit.html").is_file()
    capsys.readouterr()
    code = cli(["trace", "--dataset", str(tmp_path / "ex" / "prompts.jsonl"), "--eval-n", "16", "--eval-seed", "1",
                "--max-nodes", "200", "--describe-seqs", "0", "--out", str(tmp_path / "cli"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("faithfulness", "faithfulness_features_only", "ceiling", "completeness"):
        assert summary[key] == pytest.approx(res[key], abs=1e-6), key


def test_query_upstream_example_agrees_with_the_model():
    drivers = _load("query_upstream").main(top_k=5)
    assert len(drivers) == 5
    for d in drivers:  # every strong positive driver, zeroed in the real model, lowers the difference
        assert d.edge > 0 and d.ablation_change < 0, d
    assert max(-d.ablation_change for d in drivers) > 0.3


def test_steering_example_moves_the_preference(default_model):
    res = _load("steering").main(scales=(0.0, 1.0, 3.0), new_tokens=2)
    tokens = default_model.to_tokens("When Mary and John went to the park, John gave a book to")
    with torch.no_grad():
        logits = default_model(tokens)[0, -1]
    clean = float(logits[default_model.to_single_token(" Mary")] - logits[default_model.to_single_token(" John")])
    assert res.logit_diff[1.0] == pytest.approx(clean, abs=1e-3)  # scale 1 is the unedited model
    assert res.logit_diff[0.0] < res.logit_diff[1.0] - 0.3 < res.logit_diff[3.0] - 0.6
    assert set(res.continuation) == {0.0, 1.0, 3.0}


@pytest.mark.slow
def test_stories_pipeline_example(tmp_path):
    import circuitgraph as cg

    torch.set_num_threads(2)
    res = _load("stories_pipeline").main(tmp_path / "st", tokens=16_384, n=12, n_eval=12, max_nodes=60)
    assert res["held_out"] and res["n_nodes"] <= 60
    assert all(math.isfinite(res[k]) for k in ("faithfulness", "faithfulness_features_only", "ceiling"))
    graph = cg.Graph.load(tmp_path / "st" / "graph")
    assert graph.metadata["faithfulness"] == res["faithfulness"]
    assert len(cg.load_dictionaries(res["dicts"])) == 10  # attn_z + transcoder at 5 layers


def test_prompt_dataset_padding_side_reaches_the_tokens(default_model):
    import circuitgraph as cg

    rows = [{"prompt": "When Mary and John went to the park, John gave a book to", "answer": " Mary"},
            {"prompt": "Then Mary and John went to the park. John gave a book to", "answer": " Mary"},
            {"prompt": "Mary gave a book to", "answer": " John"}]
    right = cg.PromptDataset.from_records(rows, default_model)
    left = cg.PromptDataset.from_records(rows, default_model, padding_side="left")
    short = 2  # the third prompt is the shortest: padded at its end (right) or its start (left)
    assert int(right.data.attention_mask[short, -1]) == 0 and int(left.data.attention_mask[short, 0]) == 0
    real_r = right.data.clean_tokens[short][right.data.attention_mask[short].bool()]
    real_l = left.data.clean_tokens[short][left.data.attention_mask[short].bool()]
    assert torch.equal(real_r, real_l)  # the same prompt, only the padding moved
