"""`trace --dataset FILE`: the user's own prompts from .jsonl / .json / .csv."""

from __future__ import annotations

import csv
import json

import pytest

from circuitgraph.cli.main import main
from circuitgraph.tasks.registry import make_dataset


@pytest.fixture(scope="module")
def ioi_rows(default_model):
    ds = make_dataset("ioi", default_model, n=24, seed=3)
    tok = default_model.tokenizer
    return [{"prompt": p, "answer": tok.decode([int(a[0])]), "wrong": tok.decode([int(w[0])]), "corrupted_prompt": c}
            for p, c, a, w in zip(ds.prompts, ds.corrupted_prompts, ds.answer_ids, ds.wrong_ids, strict=True)]


def test_jsonl_dataset_equals_the_python_api(tmp_path, capsys, ioi_rows, default_model):
    from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR
    from circuitgraph.replacement import ReplacementModel
    from circuitgraph.tasks.files import dataset_from_file, split_held_out
    from dictionaries.persistence import load_dictionaries

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ioi_rows))
    assert main(["trace", "--dataset", str(f), "--max-nodes", "30", "--describe-seqs", "0",
                 "--out", str(tmp_path / "g"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ablation"] == "patch" and out["held_out"] is True and out["task"] == str(f)
    assert out["n_prompts"] == 12  # half of the 24 rows select, the other half is held out
    ds, has_corrupted = dataset_from_file(f, default_model)
    sel, held = split_held_out(ds, 12, 1)
    res = trace_dataset(ReplacementModel(default_model, load_dictionaries(DEFAULT_DICTS_DIR)), sel,
                        CircuitConfig("attribution", max_nodes=30), held)
    assert has_corrupted and len(held) == 12 and set(sel.prompts).isdisjoint(held.prompts)
    assert out["faithfulness"] == pytest.approx(res.evaluation.faithfulness, abs=1e-6)
    assert out["ceiling"] == pytest.approx(res.evaluation.ceiling, abs=1e-6)


def test_csv_without_corrupted_prompts_uses_mean_ablation(tmp_path, capsys, ioi_rows):
    f = tmp_path / "mine.csv"
    with f.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "answer", "wrong"])
        w.writeheader()
        for r in ioi_rows[:10]:
            w.writerow({"prompt": r["prompt"], "answer": r["answer"], "wrong": r["wrong"]})
    assert main(["trace", "--dataset", str(f), "--max-nodes", "20", "--describe-seqs", "0",
                 "--out", str(tmp_path / "g"), "--json"]) == 0
    cap = capsys.readouterr()
    assert "no corrupted prompts" in cap.err and json.loads(cap.out.strip().splitlines()[-1])["ablation"] == "mean"
    assert main(["trace", "--dataset", str(f), "--ablation", "patch", "--out", str(tmp_path / "h")]) == 2
    assert "needs a corrupted_prompt" in capsys.readouterr().err


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "When Mary and John went to the park, John gave a book to", "answr": " Mary"}],
     "row 1: unknown field(s) ['answr']"),
    ([{"prompt": "When Mary and John went", "answer": " Mary"}, {"prompt": "When Mary", "answer": ""}],
     "row 2: no 'answer'"),
    ([{"prompt": "When Mary and Zorblax went to the park", "answer": " Mary"}, {"prompt": "Mary", "answer": " John"}],
     "'Zorblax'"),
    ([{"prompt": "When Mary went", "answer": " Mary", "corrupted_prompt": "When John went"},
      {"prompt": "When John went", "answer": " John"}], "rows [2] have no 'corrupted_prompt'"),
    ([{"prompt": "When Mary went", "answer": " Mary Jane"}, {"prompt": "Mary", "answer": " John"}], "is 2 tokens"),
])
def test_bad_rows_named(tmp_path, capsys, rows, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["trace", "--dataset", str(f), "--eval-n", "0", "--out", str(tmp_path / "g")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name,text,message", [
    ("x.txt", "prompt,answer\n", "unknown prompt file type '.txt'"),
    ("x.jsonl", '{"prompt": "When Mary went", "answer": " Mary"\n', "not valid JSON"),
    ("x.json", '["When Mary went"]', "row 1: expected an object"),
    ("x.json", '[{"prompt": "When Mary went", "answer": 7}]', "row 1: 'answer' must be a string or a list"),
    ("x.json", "[]", "holds no rows"),
    ("x.json", '[{"prompt": "  ", "answer": " Mary"}]', "row 1: 'prompt' must be non-empty"),
])
def test_bad_files_named(tmp_path, capsys, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    assert main(["trace", "--dataset", str(f), "--eval-n", "0", "--out", str(tmp_path / "g")]) == 2
    assert message in capsys.readouterr().err


def test_held_out_split_and_flag_refusals(tmp_path, capsys, ioi_rows):
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ioi_rows[:2]))
    assert main(["trace", "--dataset", str(f), "--eval-n", "2", "--out", str(tmp_path / "g")]) == 2
    assert "has 2 rows; holding out 2 leaves none" in capsys.readouterr().err
    assert main(["trace", "--dataset", str(f), "--prompt", "When Mary went", "--out", str(tmp_path / "g")]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_answer_needs_a_tokenizer():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from circuitgraph.errors import TaskError
    from circuitgraph.tasks.dataset import single_token_id

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, n_ctx=4, d_vocab=10,
                                                      attn_only=True))
    with pytest.raises(TaskError, match="needs a tokenizer"):
        single_token_id(model, " Mary")


def test_malformed_jsonl_line_is_named(tmp_path, default_model):
    from circuitgraph.errors import TaskError
    from circuitgraph.tasks.files import dataset_from_file

    path = tmp_path / "bad.jsonl"
    good = '{"prompt": "When Mary and John went to the park, John gave a book to", "answer": " Mary"}'
    path.write_text(good + "\n\n" + good + "\n{\"prompt\": oops}\n")
    with pytest.raises(TaskError, match="line 4: not valid JSON"):
        dataset_from_file(path, default_model)
