"""Task datasets and metrics: exact metric values on hand-set logits, alignment, targets, bad input."""

from __future__ import annotations

import pytest
import torch

from circuitgraph.errors import TaskError
from circuitgraph.tasks import metrics as M
from circuitgraph.tasks.dataset import build_dataset
from circuitgraph.tasks.evaluate import evaluate_tasks
from circuitgraph.tasks.registry import TOY_TASKS, make_dataset
from circuitgraph.toylang.templates import TaskInstance


def test_metrics_on_hand_set_logits() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 0.0]])
    ans = torch.tensor([[0, -1], [2, 3]])
    wrong = torch.tensor([[1, 2], [1, -1]])
    assert torch.allclose(M.logit_diff(logits, ans, wrong), torch.tensor([2.0 - 0.5, 0.0 - 3.0]))
    p = logits.softmax(-1)
    assert torch.allclose(M.prob_mass(logits, ans), torch.stack([p[0, 0], p[1, 2] + p[1, 3]]))
    assert M.binary_accuracy(logits, ans, wrong).tolist() == [True, False]
    assert M.top1_accuracy(logits, ans).tolist() == [True, False]


@pytest.mark.parametrize("name", list(TOY_TASKS))
def test_dataset_alignment(default_model, name: str) -> None:
    ds = make_dataset(name, default_model, n=16, seed=1)
    assert ds.clean_tokens.shape == ds.corrupted_tokens.shape
    assert len(ds) == 16
    for i in range(16):
        pos = ds.answer_pos[i].item()
        assert default_model.to_string(ds.clean_tokens[i, 1 : pos + 1]) == ds.prompts[i]
    # corrupted prompts change the answer: the clean metric beats the corrupted one on average
    from circuitgraph.tasks.evaluate import answer_logits

    clean = M.task_metric(answer_logits(default_model, ds.clean_tokens, ds.answer_pos), ds)
    corrupt = M.task_metric(answer_logits(default_model, ds.corrupted_tokens, ds.answer_pos), ds)
    assert clean.mean() > corrupt.mean()


def test_induction_corruption_is_a_minimal_pair(default_model) -> None:
    """The corrupted induction prompt differs in one token, the answer's first occurrence, which
    becomes the wrong answer; the model then predicts the wrong answer by the same induction."""
    from circuitgraph.tasks.evaluate import answer_logits

    ds = make_dataset("induction", default_model, n=32, seed=2)
    diff = ds.clean_tokens != ds.corrupted_tokens
    assert diff.sum(1).eq(1).all()
    rows, cols = diff.nonzero(as_tuple=True)
    assert ds.clean_tokens[rows, cols].equal(ds.answer_ids[:, 0])
    assert ds.corrupted_tokens[rows, cols].equal(ds.wrong_ids[:, 0])
    corrupt = M.task_metric(answer_logits(default_model, ds.corrupted_tokens, ds.answer_pos), ds)
    assert (corrupt < 0).float().mean() >= 0.9


def test_induction_rejects_an_unknown_corruption() -> None:
    import random

    from circuitgraph.toylang.templates import induction

    with pytest.raises(ValueError, match="corrupt must be 'answer' or 'span', got 'tokens'"):
        induction(random.Random(0), corrupt="tokens")


def test_datasets_are_deterministic(default_model) -> None:
    a = make_dataset("ioi", default_model, n=8, seed=5)
    b = make_dataset("ioi", default_model, n=8, seed=5)
    assert a.prompts == b.prompts and a.clean_tokens.equal(b.clean_tokens)


def test_targets_hold_on_heldout_prompts(default_model) -> None:
    r = evaluate_tasks(default_model, n=200, split="heldout")
    assert r["ioi"]["accuracy"] >= 0.9
    assert r["agreement"]["accuracy"] >= 0.9
    assert r["induction"]["accuracy"] >= 0.9
    assert r["greater_than"]["prob_mass"] >= 0.8


def test_bad_input_errors(default_model) -> None:
    with pytest.raises(TaskError, match="unknown task 'nope'.*ioi"):
        make_dataset("nope", default_model)
    with pytest.raises(TaskError, match="n=0.*at least one"):
        make_dataset("ioi", default_model, n=0)
    with pytest.raises(TaskError, match="empty"):
        build_dataset("ioi", [], default_model, "logit_diff")
    long_prompt = " the" * (default_model.cfg.n_ctx + 5)
    inst = TaskInstance(long_prompt, (" Mary",), (" John",), long_prompt, "")
    with pytest.raises(TaskError, match="context is 128; shorten"):
        build_dataset("custom", [inst], default_model, "logit_diff")
    two_tokens = TaskInstance("When Mary", (" Mary John",), (" John",), "When John", "")
    with pytest.raises(TaskError, match="not one"):
        build_dataset("custom", [two_tokens], default_model, "logit_diff")


def test_held_out_prompts_are_disjoint_and_deterministic(default_model) -> None:
    from circuitgraph.tasks.registry import make_disjoint_dataset

    sel = make_dataset("greater_than", default_model, n=64, seed=0)
    a = make_disjoint_dataset("greater_than", default_model, 64, sel, seed=1)
    b = make_disjoint_dataset("greater_than", default_model, 64, sel, seed=1)
    assert a.prompts == b.prompts and len(set(a.prompts)) == 64
    assert not set(a.prompts) & set(sel.prompts)
    # another seed drawn as a plain dataset does repeat a selection prompt: the exclusion is doing work
    plain = make_dataset("greater_than", default_model, n=64, seed=1)
    assert set(plain.prompts) & set(sel.prompts)


def test_held_out_prompts_that_cannot_be_found_are_a_clear_error(default_model, monkeypatch) -> None:
    """A task with a single possible prompt has none left outside the selection set."""
    import dataclasses
    import random

    from circuitgraph.errors import TaskError
    from circuitgraph.tasks import registry
    from circuitgraph.toylang.templates import HELDOUT_POOLS

    only = registry.TASKS["ioi"].generate(random.Random(0), HELDOUT_POOLS)
    monkeypatch.setitem(registry.TASKS, "one", dataclasses.replace(registry.TASKS["ioi"], name="one",
                                                                    generate=lambda rng, pools: only))
    sel = registry.make_dataset("one", default_model, n=1)
    with pytest.raises(TaskError, match="has only 0 prompts outside the 1 selection prompts"):
        registry.make_disjoint_dataset("one", default_model, 2, sel)
