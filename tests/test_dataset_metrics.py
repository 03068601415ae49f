"""Dataset metrics (logit_diff, logprob, prob_diff, kl, callables), answers at several positions and
token-id rows, checked against metrics computed by hand from plain ``model(tokens)`` runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from circuitgraph.attribution.ablation import Ablator, evaluate_circuit
from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes
from circuitgraph.attribution.nodeset import AblatedNodes, KeptNodes
from circuitgraph.attribution.runs import metric_of, position_mask
from circuitgraph.errors import TaskError
from circuitgraph.replacement import ReplacementModel
from circuitgraph.replacement.masking import run_model
from circuitgraph.replacement.model import SpliceSpec
from circuitgraph.tasks.files import dataset_from_file, dataset_from_rows
from circuitgraph.tasks.metrics import kl_divergence, with_reference
from circuitgraph.tasks.registry import make_dataset
from dictionaries.architectures.registry import rebuild_as


@pytest.fixture(scope="module")
def rm(default_model, v1_dicts):
    """Continuous (ReLU) copies of the committed attention-z and transcoder dictionaries."""
    return ReplacementModel(default_model, {s: rebuild_as(d, "relu") for s, d in v1_dicts.items()
                                            if s.kind in ("attn_z", "transcoder")})


@pytest.fixture(scope="module")
def rows(default_model):
    """IOI prompts with three targets each: after ' and' (the second name), after ',' (the repeated
    name) and at the end (the indirect object, two alternatives against the subject)."""
    ds = make_dataset("ioi", default_model, n=6, seed=3)
    out = []
    for p, c in zip(ds.prompts, ds.corrupted_prompts, strict=True):
        t = default_model.to_tokens(p)[0].tolist()
        tok = default_model.tokenizer.decode
        out.append({"prompt": p, "corrupted_prompt": c, "targets": [
            {"position": 3, "answer": tok([t[4]]), "wrong": tok([t[2]])},
            {"position": 9, "answer_ids": t[10], "wrong_ids": [t[2], t[4]]},
            {"position": -1, "answer": [tok([t[2]]), tok([t[4]])], "wrong": tok([t[10]])},
        ]})
    return out


def _by_hand(model, rows, kind: str) -> torch.Tensor:
    """Each row alone through ``model``; the metric at each target from its logits; the mean over targets."""
    out = []
    for r in rows:
        tokens = model.to_tokens(r["prompt"])
        with torch.no_grad():
            logits = model(tokens)[0].double()
            corrupt = model(model.to_tokens(r["corrupted_prompt"]))[0].double()
        vals = []
        for t in r["targets"]:
            pos = t["position"] % tokens.shape[1]
            ids = t.get("answer_ids", None)
            a = [ids] if isinstance(ids, int) else [model.to_single_token(x) for x in
                                                   (t["answer"] if isinstance(t["answer"], list) else [t["answer"]])]
            w = t.get("wrong_ids") or [model.to_single_token(t["wrong"])]
            w = [w] if isinstance(w, int) else w
            row = logits[pos]
            p = row.softmax(-1)
            if kind == "logit_diff":
                vals.append(row[a].mean() - row[w].mean())
            elif kind == "logprob":
                vals.append(torch.log(p[a].sum()))
            elif kind == "prob_diff":
                vals.append(p[a].sum() - p[w].sum())
            else:  # KL(clean || corrupted) at the target position
                vals.append(F.kl_div(corrupt[pos].log_softmax(-1), row.log_softmax(-1), log_target=True,
                                     reduction="sum"))
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["logit_diff", "logprob", "prob_diff", "kl"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_metrics_at_several_positions_equal_hand_computation(default_model, rows, kind, side):
    ds = dataset_from_rows(rows, default_model, metric=kind, padding_side=side).dataset
    assert ds.targets is not None and ds.targets.pos.shape == (6, 3)
    assert ds.attention_mask is not None  # the prompts differ in length
    with torch.no_grad():
        clean = run_model(default_model, ds.clean_tokens, ds.attention_mask)
        if kind == "kl":  # the clean distribution is the reference; the corrupted prompts move away from it
            ds = with_reference(ds, clean)
            assert metric_of(clean, ds).abs().max() == 0
            clean = run_model(default_model, ds.corrupted_tokens, ds.attention_mask)
        got = metric_of(clean, ds).double()
    torch.testing.assert_close(got, _by_hand(default_model, rows, kind), rtol=1e-4, atol=2e-5)


def test_multi_target_rows_count_positions_up_to_the_last_target(default_model, rows):
    early = [dict(r, targets=r["targets"][:2]) for r in rows]  # the last target at position 9
    ds = dataset_from_rows(early, default_model).dataset
    assert ds.answer_pos.tolist() == [9] * len(rows)
    mask = position_mask(ds, ds.clean_tokens.shape[1])
    assert mask[:, 1:10].all() and not mask[:, 0].any() and not mask[:, 10:].any()
    left = dataset_from_rows(early, default_model, padding_side="left").dataset
    lm = position_mask(left, left.clean_tokens.shape[1])
    assert (lm.sum(1) == 9).all()  # the same nine positions, shifted by each row's padding
    assert torch.equal(left.answer_pos - left.first_pos(), torch.full((len(rows),), 9))


def test_token_id_rows_equal_text_rows_and_csv(default_model, rows, tmp_path):
    text = dataset_from_rows(rows, default_model).dataset
    ids = []
    for r in rows:
        t = default_model.to_tokens(r["prompt"])[0].tolist()
        c = default_model.to_tokens(r["corrupted_prompt"])[0].tolist()
        targets = [{"position": 3, "answer_ids": [t[4]], "wrong_ids": t[2]},
                   {"position": 9, "answer_ids": t[10], "wrong_ids": [t[2], t[4]]},
                   {"position": len(t) - 1, "answer_ids": [t[2], t[4]], "wrong_ids": [t[10]]}]
        ids.append({"prompt_ids": t, "corrupted_prompt_ids": c, "targets": targets})
    by_ids = dataset_from_rows(ids, default_model).dataset
    assert torch.equal(by_ids.clean_tokens, text.clean_tokens) and torch.equal(by_ids.targets.pos, text.targets.pos)
    with torch.no_grad():
        logits = run_model(default_model, text.clean_tokens, text.attention_mask)
    assert torch.equal(metric_of(logits, by_ids), metric_of(logits, text))
    f = tmp_path / "ids.csv"
    f.write_text("prompt_ids,corrupted_prompt_ids,targets\n" + "".join(
        f"\"{' '.join(map(str, r['prompt_ids']))}\",\"{json.dumps(r['corrupted_prompt_ids'])}\","
        f"\"{json.dumps(r['targets']).replace(chr(34), chr(34) * 2)}\"\n" for r in ids))
    from_csv, has_corrupted = dataset_from_file(f, default_model)
    assert has_corrupted and torch.equal(from_csv.clean_tokens, text.clean_tokens)
    assert torch.equal(metric_of(logits, from_csv), metric_of(logits, text))


@pytest.mark.parametrize("row,message", [
    ({"prompt_ids": [0, 5, 900], "answer_ids": 3}, "row 2 has token ids outside the model's vocabulary 0..885: [900]"),
    ({"prompt_ids": [0, 5, -1], "answer_ids": 3}, "row 2 has token ids outside"),
    ({"prompt_ids": [0, 5, 7], "answer_ids": 886}, "row 2: the answer at position -1 has token ids outside"),
    ({"prompt_ids": [0, True], "answer_ids": 3}, "row 2: 'prompt_ids' must be a token id or a list"),
    ({"prompt_ids": "0 five", "answer_ids": 3}, "row 2: 'prompt_ids' must hold integer token ids"),
    ({"prompt": "When Mary went", "prompt_ids": [0, 5], "answer_ids": 3}, "row 2: give 'prompt' (text) or 'prompt_ids'"),
    ({"prompt_ids": [0, 5], "answer_ids": 3, "targets": [{"position": 1, "answer_ids": 3}]},
     "row 2: give 'targets' or 'answer_ids', not both"),
    ({"prompt_ids": [0, 5], "targets": [{"position": 2, "answer_ids": 3}]},
     "row 2: target position 2 is outside the prompt's 2 tokens"),
    ({"prompt_ids": [0, 5, 6], "targets": [{"position": 1, "answer_ids": 3}, {"position": -2, "answer_ids": 4}]},
     "row 2: two targets at the same position"),
    ({"prompt_ids": [0, 5], "targets": [{"pos": 1, "answer_ids": 3}]}, "row 2 target 1: unknown field(s) ['pos']"),
    ({"prompt_ids": [0, 5], "targets": [{"position": "1", "answer_ids": 3}]}, "row 2 target 1: 'position' must be"),
    ({"prompt_ids": [0, 5], "targets": [{"position": 1}]}, "row 2 target 1: no 'answer'"),
    ({"prompt_ids": [0, 5], "answer_ids": 3, "corrupted_prompt_ids": [0, 5, 6]}, "row 2 has 2 tokens but its corrupted"),
    ({"prompt_ids": [0, 5], "answer_ids": [3, 4], "wrong_ids": [4, 3]}, "the answers and the wrong answers are the same"),
    ({"prompt_ids": [0, 5], "targets": [{"position": 1, "answer_ids": 3, "wrong_ids": 3}]},
     "row 2: the answers and the wrong answers are the same tokens"),
    ({"prompt_ids": [0, 5], "targets": "x"}, "'targets' must be a non-empty list of objects like [{"),
    ({"prompt_ids": [0, 5], "targets": {"position": 1}}, "got dict {'position': 1}"),
])
def test_bad_token_id_rows_named(default_model, row, message):
    good = {"prompt_ids": [0, 5, 7], "answer_ids": 3}
    if "corrupted_prompt_ids" in row:
        good["corrupted_prompt_ids"] = [0, 5, 8]
    with pytest.raises(TaskError) as err:
        dataset_from_rows([good, row], default_model, name="mine")
    assert message in str(err.value) and "mine row 2" in str(err.value)


def test_tokenizer_less_model_traces_token_id_rows():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from dictionaries.architectures.registry import build_dictionary
    from dictionaries.config import DictionaryConfig
    from dictionaries.site import Site

    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=20,
                                                      d_mlp=32, act_fn="gelu", seed=0))
    assert model.tokenizer is None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n = 4 + i % 3
        p = [1] + torch.randint(2, 20, (n - 1,), generator=gen).tolist()
        c = [1] + torch.randint(2, 20, (n - 1,), generator=gen).tolist()
        rows.append({"prompt_ids": p, "corrupted_prompt_ids": c, "answer_ids": [i + 2], "wrong_ids": 3})
    ds, has_corrupted = dataset_from_rows(rows, model, metric="logprob", padding_side="left")
    assert has_corrupted and ds.prompts[0] == "ids: " + " ".join(map(str, rows[0]["prompt_ids"]))
    dicts = {s: build_dictionary(DictionaryConfig("relu", 16, 32, site=s.id), seed=s.layer)
             for s in (Site(0, "resid_post"), Site(1, "resid_post"))}
    res = trace_dataset(ReplacementModel(model, dicts), ds.subset(slice(0, 4)), CircuitConfig(max_nodes=10, progress=False),
                        ds.subset(slice(4, 8)))
    assert res.graph.metadata["metric"] == "logprob" and res.graph.index("metric:logprob") >= 0
    with torch.no_grad():  # the full model's metric is the plain model's mean log-probability of the answer
        alone = [model(torch.tensor([r["prompt_ids"]]))[0, -1].log_softmax(-1)[r["answer_ids"][0]] for r in rows[4:]]
    assert res.evaluation.metric_full == pytest.approx(float(torch.stack(alone).mean()), abs=1e-5)
    with pytest.raises(TaskError, match="row 1: 'prompt' is text, but this model has no tokenizer; give 'prompt_ids'"):
        dataset_from_rows([{"prompt": "hello", "answer_ids": 3}], model)
    with pytest.raises(TaskError, match="row 1: 'answer' is text, but this model has no tokenizer"):
        dataset_from_rows([{"prompt_ids": [1, 2], "answer": " x"}], model)


def test_kl_evaluation_equals_hand_built_runs_and_scores_need_the_midpoint(rm, default_model):
    ds = make_dataset("ioi", default_model, n=8, seed=1).with_metric("kl")
    sc = score_nodes(rm, ds, DatasetAttributionConfig(progress=False))
    ab = Ablator(rm, sc.runs, "patch")
    ev = evaluate_circuit(ab, KeptNodes.every({s: d.cfg.d_dict for s, d in rm.dicts.items()}).without_errors())
    with torch.no_grad():  # every site at its corrupted latents and errors, against the plain model
        clean = default_model(ds.clean_tokens)
        corr = rm.run(ds.corrupted_tokens)
        spliced = rm.run(ds.clean_tokens, SpliceSpec(latents={s: r.latents for s, r in corr.sites.items()},
                                                     errors={s: r.errors for s, r in corr.sites.items()})).logits
    rows = torch.arange(len(ds))
    empty = F.kl_div(spliced[rows, ds.answer_pos].log_softmax(-1), clean[rows, ds.answer_pos].log_softmax(-1),
                     log_target=True, reduction="none").sum(-1).mean()
    assert abs(ev.metric_full) < 1e-6 and ev.metric_empty == pytest.approx(float(empty), rel=1e-5)
    assert ev.ceiling == pytest.approx(1 - ev.metric_circuit / ev.metric_empty, abs=1e-6)
    # attribution takes the midpoint gradient: site totals near the exact patching effect; IG closer still
    ig = score_nodes(rm, sc.runs, DatasetAttributionConfig("ig", ig_steps=16, progress=False))

    def clean_gradient_kl(logits, batch):  # the same KL as a callable: scored at the clean run, where it is flat
        at = logits[torch.arange(len(batch)), batch.answer_pos]
        return kl_divergence(batch.reference_logprobs[:, 0].to(at.dtype), at)

    flat = score_nodes(rm, ds.with_metric(clean_gradient_kl), DatasetAttributionConfig(progress=False))
    d = {s: rm.dicts[s].cfg.d_dict for s in rm.sites}
    full = ab.full()
    for s in rm.sites:
        exact = full - ab.metric(AblatedNodes.whole_sites(d, [s]))
        assert exact < -1e-3  # patching a site moves the distribution away from the clean one
        assert abs(float(sc.features[s].sum() + sc.errors[s].sum()) - exact) < 0.5 * abs(exact)
        assert abs(float(ig.features[s].sum() + ig.errors[s].sum()) - exact) < 0.01 * abs(exact)
        assert abs(float(flat.features[s].sum() + flat.errors[s].sum())) < 1e-3 * abs(exact)


@pytest.mark.slow
def test_kl_acdc_circuit_is_faithful(rm, default_model):
    ds = make_dataset("ioi", default_model, n=8, seed=1)
    res = trace_dataset(rm, ds, CircuitConfig("acdc", max_nodes=5000, progress=False), metric="kl")
    meta = res.graph.metadata
    assert meta["metric"] == "kl" and meta["acdc_suspicious"] == 0 and res.graph.index("metric:kl") >= 0
    assert abs(res.selection.metric_full) < 1e-6 and res.selection.metric_empty > 1
    assert res.selection.faithfulness >= 0.8, res.selection


def test_callable_metric_reaches_every_runner(rm, default_model):
    ds = make_dataset("greater_than", default_model, n=6, seed=0)

    def answer_margin(logits, batch):
        at = logits[torch.arange(len(batch)), batch.answer_pos]
        return at.gather(1, batch.answer_ids[:, :1]).squeeze(1) - at.mean(-1)

    res = trace_dataset(rm, ds, CircuitConfig(max_nodes=20, progress=False), metric=answer_margin)
    assert res.graph.metadata["metric"] == "answer_margin" and res.graph.index("metric:answer_margin") >= 0
    with torch.no_grad():
        at = default_model(ds.clean_tokens)[torch.arange(len(ds)), ds.answer_pos]
    hand = (at[torch.arange(len(ds)), ds.answer_ids[:, 0]] - at.mean(-1)).mean()
    assert res.evaluation.metric_full == pytest.approx(float(hand), abs=1e-4)
    from circuitgraph.attribution.components import ComponentCircuitConfig, trace_components

    graph, meta = trace_components(default_model, ds, ComponentCircuitConfig(max_edges=5, progress=False),
                                   metric=answer_margin)
    assert meta["metric"] == "answer_margin" and meta["metric_full"] == pytest.approx(float(hand), abs=1e-4)
    with pytest.raises(TaskError, match="metric 'custom' returned .*one value per prompt"):
        trace_dataset(rm, ds, CircuitConfig(max_nodes=5, progress=False), metric=lambda logits, batch: logits.sum())
    with pytest.raises(TaskError, match="unknown metric 'kld'"):
        ds.with_metric("kld")

    def top_is_answer(logits, batch):  # argmax: no gradient
        at = logits[torch.arange(len(batch)), batch.answer_pos]
        return (at.argmax(-1) == batch.answer_ids[:, 0]).float()

    with pytest.raises(TaskError, match="does not depend differentiably on the logits"):
        trace_dataset(rm, ds, CircuitConfig(max_nodes=5, progress=False), metric=top_is_answer)

    def log_of_negative(logits, batch):  # NaN for every prompt
        return (answer_margin(logits, batch) - 1e9).log()

    with pytest.raises(TaskError, match="returned NaN or infinite values for 6 of 6 prompts"):
        trace_dataset(rm, ds, CircuitConfig(max_nodes=5, progress=False), metric=log_of_negative)


def _cli_json(capsys, argv) -> dict:
    from circuitgraph.cli.main import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_metric_flag_equals_the_python_api(tmp_path, capsys, default_model, default_dicts):
    from circuitgraph.graph.graph import Graph
    from circuitgraph.tasks.registry import make_disjoint_dataset

    out = _cli_json(capsys, ["trace", "--task", "ioi", "--n", "8", "--eval-n", "8", "--metric", "kl", "--max-nodes",
                             "30", "--describe-seqs", "0", "--out", str(tmp_path / "g"), "--json"])
    assert out["metric"] == "kl" and Graph.load(tmp_path / "g").index("metric:kl") >= 0
    ds = make_dataset("ioi", default_model, n=8, seed=0)
    api = trace_dataset(ReplacementModel(default_model, default_dicts), ds, CircuitConfig(max_nodes=30, progress=False),
                        make_disjoint_dataset("ioi", default_model, 8, ds, seed=1), metric="kl")
    assert out["faithfulness"] == pytest.approx(api.evaluation.faithfulness, abs=1e-6)
    assert out["metric_full"] == pytest.approx(0.0, abs=1e-6) and out["metric_empty"] > 0


def test_cli_dataset_with_targets_left_padding_equals_right(tmp_path, capsys, rows):
    f = tmp_path / "multi.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["trace", "--dataset", str(f), "--eval-n", "2", "--max-nodes", "20", "--describe-seqs", "0", "--json"]
    right = _cli_json(capsys, [*base, "--out", str(tmp_path / "r")])
    left = _cli_json(capsys, [*base, "--padding-side", "left", "--metric", "logit_diff", "--out", str(tmp_path / "l")])
    assert right["metric"] == left["metric"] == "logit_diff" and right["ablation"] == "patch"
    for key in ("faithfulness", "ceiling", "completeness", "metric_full", "metric_empty", "selection_faithfulness"):
        assert left[key] == pytest.approx(right[key], abs=1e-4), key


@pytest.mark.parametrize("extra,message", [
    (["--metric", "kl"], "--metric kl is not linear in the logits"),
    (["--metric", "logit_diff", "--answer", " Mary"], "needs --answer and --contrast"),
])
def test_cli_prompt_metric_refusals(tmp_path, capsys, extra, message):
    from circuitgraph.cli.main import main

    argv = ["trace", "--prompt", "When Mary and John went to the park, John gave a book to", *extra,
            "--out", str(tmp_path / "g")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_held_out_split_never_selects_on_a_held_out_prompt(default_model, rows):
    from circuitgraph.tasks.files import split_held_out

    ds = dataset_from_rows(rows + rows[:3], default_model).dataset  # three prompts occur twice
    select, held = split_held_out(ds, 4, seed=1)
    assert not set(select.prompts) & set(held.prompts) and len(held) == 4
    assert len(select) == sum(p not in set(held.prompts) for p in ds.prompts) < len(ds) - 4  # repeats dropped
    with pytest.raises(TaskError, match="every selection row repeats a held-out prompt"):
        split_held_out(dataset_from_rows([rows[0]] * 4, default_model).dataset, 2, seed=0)
