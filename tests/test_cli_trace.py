"""`circuitgraph trace` and `circuitgraph query` end to end on the embedded model."""

from __future__ import annotations

import json

import pytest

from circuitgraph.cli.main import main
from circuitgraph.graph.graph import Graph
from circuitgraph.models.loading import V1_DICTS_DIR


def _json(capsys, argv) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


HONEST_KEYS = {"faithfulness", "faithfulness_features_only", "faithfulness_errors_only", "ceiling", "n_feature_nodes",
               "n_error_nodes", "n_nodes", "completeness", "held_out", "selection_faithfulness"}


def _python_api_trace(task: str, n: int, eval_n: int, cfg):
    """The same circuit through the Python API (independent of the CLI's plumbing)."""
    from circuitgraph.attribution.circuit import trace_dataset
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR, load_default
    from circuitgraph.replacement import ReplacementModel
    from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset
    from dictionaries.persistence import load_dictionaries

    model = load_default()
    rm = ReplacementModel(model, load_dictionaries(DEFAULT_DICTS_DIR))  # the CLI's default: every site of the set
    ds = make_dataset(task, model, n=n, seed=0)
    return trace_dataset(rm, ds, cfg, make_disjoint_dataset(task, model, eval_n, ds, seed=1))


def test_trace_and_query_dataset(tmp_path, capsys):
    from circuitgraph.attribution.circuit import CircuitConfig

    out = tmp_path / "g"
    summary = _json(capsys, ["trace", "--model", "default", "--task", "greater_than", "--n", "16", "--eval-n", "16",
                             "--method", "attribution", "--max-nodes", "50", "--out", str(out), "--json"])
    assert set(summary) >= HONEST_KEYS | {"n_edges", "forward_passes", "seconds"}
    g = Graph.load(out)
    assert summary["n_graph_nodes"] == g.n_nodes and summary["n_edges"] == g.n_edges
    assert summary["n_feature_nodes"] + summary["n_error_nodes"] == summary["n_nodes"] == g.n_nodes - 1 <= 50
    assert summary["held_out"] and summary["forward_passes"] > 0
    api = _python_api_trace("greater_than", 16, 16, CircuitConfig("attribution", max_nodes=50, progress=False))
    for key in ("faithfulness", "faithfulness_features_only", "faithfulness_errors_only", "ceiling", "completeness"):
        assert summary[key] == pytest.approx(getattr(api.evaluation, key), abs=1e-9), key
        assert summary[f"selection_{key}"] == pytest.approx(getattr(api.selection, key), abs=1e-9), key
    rows = _json(capsys, ["query", str(out), "--upstream", "metric:prob_diff", "--top-k", "5", "--json"])
    assert 0 < len(rows) <= 5 and set(rows[0]) == {"node", "weight", "activation", "label", "hops"}
    weights = [abs(r["weight"]) for r in rows]
    assert weights == sorted(weights, reverse=True)
    feats = _json(capsys, ["query", str(out), "--top-features", "metric:prob_diff", "--site", "transcoder", "--json"])
    assert all(".transcoder#" in r["node"] for r in feats)

    # supernodes: collapse the graph's co-acting features, then expand back to the same graph
    coll = _json(capsys, ["supernodes", str(out), "--threshold", "0.5", "--out", str(tmp_path / "s"), "--json"])
    assert coll["n_supernodes"] > 0 and coll["n_nodes"] == g.n_nodes - coll["grouped_features"] + coll["n_supernodes"]
    collapsed = Graph.load(tmp_path / "s")
    assert sum(n.kind == "supernode" for n in collapsed.nodes) == coll["n_supernodes"]
    members = [m for ms in coll["supernodes"].values() for m in ms]
    assert len(members) == len(set(members)) and all(g.index(m) >= 0 for m in members)
    back = _json(capsys, ["supernodes", str(tmp_path / "s"), "--expand", str(out), "--out", str(tmp_path / "e"), "--json"])
    assert (back["n_nodes"], back["n_edges"]) == (g.n_nodes, g.n_edges)


def test_trace_smallest_faithful_circuit(tmp_path, capsys):
    """--target-faithfulness: the circuit is the smallest top-score set found that reaches it, and
    the budgets tried just below it do not reach it."""
    s = _json(capsys, ["trace", "--task", "greater_than", "--n", "16", "--target-faithfulness", "0.8",
                       "--max-nodes", "400", "--describe-seqs", "0", "--out", str(tmp_path / "t"), "--json"])
    meta = Graph.load(tmp_path / "t").metadata
    tried = {int(k): v for k, v in meta["budgets_tried"].items()}
    # the search runs on the selection prompts; the headline is the held-out evaluation
    assert s["selection_faithfulness"] >= 0.8 and s["n_nodes"] <= max(tried) and meta["target_reached"]
    chosen = min(k for k, v in tried.items() if v >= 0.8)
    assert s["n_nodes"] <= chosen and s["selection_faithfulness"] == pytest.approx(tried[chosen], abs=1e-6)
    below = [k for k, v in tried.items() if k < chosen]
    assert below and all(tried[k] < 0.8 for k in below if k >= chosen * 0.9)


def test_trace_position_resolved_dataset_circuit(tmp_path, capsys):
    """--positions from_end: feature nodes are (feature, offset from the answer); ids end in @-k,
    queries accept them, ACDC and the graph's metric edges work on them."""
    out = tmp_path / "p"
    s = _json(capsys, ["trace", "--task", "ioi", "--n", "8", "--eval-n", "8", "--positions", "from_end",
                       "--max-nodes", "40", "--describe-seqs", "0", "--out", str(out), "--json"])
    g = Graph.load(out)
    feats = [n for n in g.nodes if n.kind == "feature"]
    errors = [n for n in g.nodes if n.kind == "error"]
    assert len(feats) + len(errors) == s["n_nodes"] == 40 and len(errors) == s["n_error_nodes"]
    assert all(n.pos is not None and n.pos <= -1 for n in feats + errors)
    assert g.metadata["positions"] == "from_end"
    from circuitgraph.attribution.circuit import CircuitConfig

    api = _python_api_trace("ioi", 8, 8, CircuitConfig(max_nodes=40, positions="from_end", progress=False))
    assert s["faithfulness"] == pytest.approx(api.evaluation.faithfulness, abs=1e-9)
    assert s["ceiling"] == pytest.approx(api.evaluation.ceiling, abs=1e-9)
    top = _json(capsys, ["query", str(out), "--upstream", "metric:logit_diff", "--top-k", "3", "--json"])
    assert all("@-" in r["node"] or "#err" in r["node"] for r in top)
    feature_id = next(r["node"] for r in top if "@-" in r["node"])
    assert _json(capsys, ["query", str(out), "--downstream", feature_id, "--json"])
    acdc = _json(capsys, ["trace", "--task", "ioi", "--n", "8", "--eval-n", "8", "--positions", "from_end",
                          "--method", "acdc", "--describe-seqs", "0", "--out", str(tmp_path / "a"), "--json"])
    assert acdc["acdc_forward_passes"] > 0 and acdc["acdc_suspicious"] == 0 and all(
        n.pos is not None for n in Graph.load(tmp_path / "a").nodes if n.kind == "feature")


def test_trace_prompt_and_components(tmp_path, capsys):
    s = _json(capsys, ["trace", "--prompt", "When Mary and John went to the park, John gave a book to",
                       "--prompt-max-feature-nodes", "64", "--out", str(tmp_path / "p"), "--json"])
    assert s["method"] == "linear" and s["n_nodes"] < s["full_nodes"]
    assert 0 < s["replacement_score"] <= 1 and 0 < s["completeness_score"] <= 1
    g = Graph.load(tmp_path / "p")
    card = next(iter(g.features.values()))
    assert len(card["ablation"]["delta_logprob"]) == len(card["ablation"]["tokens"]) - 1
    top = g.nodes[int(g.target_weights.argmax())].id
    rows = _json(capsys, ["query", str(tmp_path / "p"), "--upstream", top, "--json"])
    assert rows
    c = _json(capsys, ["trace", "--granularity", "components", "--task", "ioi", "--n", "16", "--eval-n", "16",
                       "--method", "attribution", "--max-edges", "40", "--out", str(tmp_path / "c"), "--json"])
    assert c["n_edges"] == 40 and c["n_circuit_edges"] == 40 and c["held_out"] and c["eval_n_prompts"] == 16
    from circuitgraph.attribution.components import ComponentCircuitConfig, trace_components
    from circuitgraph.models.loading import load_default
    from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset

    model = load_default()
    ds = make_dataset("ioi", model, n=16, seed=0)
    _, meta = trace_components(model, ds, ComponentCircuitConfig("attribution", max_edges=40, progress=False),
                               make_disjoint_dataset("ioi", model, 16, ds, seed=1))
    for key in ("faithfulness", "completeness", "selection_faithfulness", "selection_completeness"):
        assert c[key] == pytest.approx(meta[key], abs=1e-9), key
    assert c["faithfulness"] != c["selection_faithfulness"]  # two prompt sets, two measurements


@pytest.mark.parametrize("argv,message", [
    (["trace", "--dicts", str(V1_DICTS_DIR), "--sites", "mlp_out,transcoder", "--task", "ioi", "--n", "4"], "both replace"),
    (["trace", "--dicts", str(V1_DICTS_DIR), "--task", "ioi", "--n", "4"], "several dictionaries for one output"),
    (["trace", "--task", "nope", "--n", "4"], "unknown task"),
    (["trace", "--task", "ioi", "--n", "4", "--method", "acdc", "--target-faithfulness", "0.8"], "target_faithfulness"),
    (["trace", "--sites", "resid_post", "--layers", "7", "--task", "ioi", "--n", "4"], "out of range"),
    (["trace", "--task", "ioi", "--n", "4", "--method", "acdc", "--tau", "nan"], "tau must be a positive finite"),
    (["trace", "--task", "ioi", "--n", "4", "--method", "acdc", "--tau", "-5"], "tau must be a positive finite"),
    (["trace", "--task", "ioi", "--n", "4", "--method", "acdc", "--acdc-group-size", "0"], "group_size must be at least 1"),
    (["trace", "--task", "ioi", "--n", "4", "--method", "acdc", "--acdc-keep-factor", "0"], "keep_factor must be > 0"),
    (["trace", "--task", "ioi", "--n", "4", "--ig-steps", "4"], "--ig-steps set(s) --method ig, but the method is attribution"),
    (["trace", "--task", "ioi", "--n", "4", "--plain-acdc"], "--plain-acdc set(s) --method acdc"),
    (["trace", "--task", "ioi", "--n", "4", "--target-kind", "faithfulness"], "give --target-faithfulness too"),
    (["trace", "--task", "ioi", "--n", "4", "--eval-n", "-1"], "--eval-n must be >= 0"),
    (["trace", "--task", "ioi", "--n", "4", "--max-nodes", "0"], "max_nodes must be at least 1"),
])
def test_trace_bad_input(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


PROMPT = "When Mary and John went to the park, John gave a book to"


@pytest.mark.parametrize("argv,message", [
    # flags the chosen mode would silently ignore
    (["--prompt", PROMPT, "--task", "ioi"], "--task is for a --task dataset, which --prompt"),
    (["--prompt", PROMPT, "--method", "ig"], "--method is for dataset circuits, which --prompt"),
    (["--prompt", PROMPT, "--eval-n", "4", "--padding-side", "left"], "--eval-n, --padding-side are for dataset"),
    (["--prompt", PROMPT, "--max-feature-nodes", "10"], "a --prompt graph's budget is --prompt-max-feature-nodes"),
    (["--dataset", "DATA", "--task", "ioi", "--n", "5"], "--task, --n are for a built-in --task's prompts"),
    (["--dataset", "DATA", "--prompt-max-feature-nodes", "10"], "--prompt-max-feature-nodes is the budget of a --prompt"),
    (["--dataset", "DATA", "--bos", "detach"], "--bos is for --prompt graphs"),
    (["--task", "ioi", "--node-threshold", "0.5"], "--node-threshold is for --prompt graphs"),
    (["--task", "ioi", "--max-edges", "10"], "--max-edges is for --granularity components"),
    (["--task", "ioi", "--granularity", "components", "--max-nodes", "10"], "--max-nodes is for --granularity features"),
    # values that used to give raw tracebacks or were accepted
    (["--prompt", PROMPT, "--max-logits", "0"], "max_logits is 0 and no answer was given"),
    (["--prompt", PROMPT, "--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--prompt", PROMPT, "--device", "mps"], "prompt graphs are built on cpu or cuda"),
    (["--dataset", "DATA", "--answer", " Mary"], "--dataset DATA gives its answers in its rows"),
    (["--prompt", PROMPT, "--memory-mb", "inf"], "memory_mb must be a finite number >= 0"),
    (["--prompt", PROMPT, "--memory-mb", "nan"], "memory_mb must be a finite number >= 0"),
    (["--prompt", PROMPT, "--memory-mb", "1", "--spill-dir", "DATA"], "is a file, not a folder"),
    (["--task", "ioi", "--n", "4", "--target-faithfulness", "1.5"], "use a value in (0, 1]"),
])
def test_trace_refuses_flags_it_would_ignore(tmp_path, capsys, argv, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "answer": " Mary", "wrong": " John"}) + "\n")
    argv = [str(data) if a == "DATA" else a for a in argv]
    assert main(["trace", *argv, "--describe-seqs", "0", "--out", str(tmp_path / "x")]) == 2
    assert message.replace("DATA", str(data)) in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_qk_prompt_with_dataset_head_choices_names_the_conflict(tmp_path, capsys):
    assert main(["qk", "--prompt", PROMPT, "--circuit", str(tmp_path), "--layer", "2", "--head", "3"]) == 2
    assert "--circuit chooses heads for a dataset (--task / --dataset)" in capsys.readouterr().err


def test_trace_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    assert main(["trace", "--prompt", PROMPT, "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_dictionaries_for_layers_the_model_lacks(tmp_path, capsys):
    import shutil

    from circuitgraph.models.loading import DEFAULT_DICTS_DIR

    d = tmp_path / "d"
    shutil.copytree(DEFAULT_DICTS_DIR / "L0.attn_z", d / "L9.attn_z")
    cfg = d / "L9.attn_z" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"L0.attn_z"', '"L9.attn_z"'))
    assert main(["trace", "--dicts", str(d), "--prompt", PROMPT, "--out", str(tmp_path / "x")]) == 2
    assert "layers the model does not have (L9.attn_z; the model has 4 layers" in capsys.readouterr().err


def test_one_row_dataset_says_it_is_evaluated_on_its_selection(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "answer": " Mary", "wrong": " John",
                                "corrupted_prompt": "When Mary and John went to the park, Mary gave a book to"}) + "\n")
    assert main(["trace", "--dataset", str(data), "--max-nodes", "5", "--describe-seqs", "0",
                 "--out", str(tmp_path / "g"), "--json"]) == 0
    out = capsys.readouterr()
    assert "has 1 row: too few to hold one out" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["n_nodes"] > 0


def test_supernodes_bad_input(tmp_path, capsys):
    assert main(["supernodes", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err
    g = tmp_path / "g"
    assert main(["trace", "--task", "greater_than", "--n", "4", "--eval-n", "4", "--max-nodes", "10", "--describe-seqs", "0",
                 "--out", str(g), "--json"]) == 0
    capsys.readouterr()
    assert main(["supernodes", str(g), "--threshold", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--threshold 0.0: use a similarity in (0, 1]" in capsys.readouterr().err


def test_query_bad_input(tmp_path, capsys):
    assert main(["query", str(tmp_path / "none"), "--upstream", "tok@0"]) == 2
    assert "missing" in capsys.readouterr().err


def test_prompt_answer_and_contrast(tmp_path, capsys):
    """`trace --prompt P --answer A --contrast C` explains logit(A) - logit(C): the metric node's value
    is that difference as the model itself computes it, and its incoming edges + bias add up to it."""
    import torch

    from circuitgraph.graph.graph import Graph
    from circuitgraph.models.loading import load_default

    prompt = "When Mary and John went to the park, John gave a book to"
    assert main(["trace", "--prompt", prompt, "--answer", " Mary", "--contrast", " John", "--describe-seqs", "0",
                 "--out", str(tmp_path / "g"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = load_default()
    with torch.no_grad():
        logits = model(model.to_tokens(prompt))[0, -1]
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    assert summary["metric"] == "logit_diff"
    assert summary["metric_value"] == pytest.approx(float(logits[mary] - logits[john]), abs=1e-4)
    full = Graph.load(tmp_path / "g" / "full")
    m = next(i for i, n in enumerate(full.nodes) if n.kind == "metric")
    incoming = float(full.weights[full.targets == m].double().sum()) + float(full.bias[m])
    assert incoming == pytest.approx(summary["metric_value"], abs=1e-3)
    assert not any(n.kind == "logit" for n in full.nodes if full.target_weights[full.nodes.index(n)] > 0)


@pytest.mark.parametrize("extra,message", [
    (["--answer", " Zyx"], "not in the model's vocabulary"),
    (["--answer", " Mary John"], "is 2 tokens"),
    (["--contrast", " John"], "--contrast needs --answer"),
    (["--answer", " Mary", "--contrast", " Mary"], "the same token"),
])
def test_prompt_answer_refusals(tmp_path, capsys, extra, message):
    argv = ["trace", "--prompt", "When Mary and John went to the park, John gave a book to", *extra,
            "--describe-seqs", "0", "--out", str(tmp_path / "g")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert main(["trace", "--task", "ioi", "--n", "4", "--answer", " Mary", "--out", str(tmp_path / "h")]) == 2


def test_out_of_vocabulary_prompt_refused(tmp_path, capsys):
    """A prompt of unknown words used to run as a row of <unk> tokens and exit 0."""
    assert main(["trace", "--prompt", "When Mary and Zorblax went to the quasar", "--describe-seqs", "0",
                 "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "'Zorblax'" in err and "'quasar'" in err and "outside the model's vocabulary" in err
    from circuitgraph.errors import TaskError
    from circuitgraph.models.loading import load_default
    from circuitgraph.tasks.dataset import build_dataset
    from circuitgraph.toylang.templates import TaskInstance

    inst = TaskInstance("When Mary and John went to the park, John gave a book to", (" Mary",), (" John",),
                        "When Mary and Blorp went to the park, John gave a book to", " Mary.")
    with pytest.raises(TaskError, match="corrupted prompt 0 has text outside the model's vocabulary: 'Blorp'"):
        build_dataset("mine", [inst], load_default(), "logit_diff")
