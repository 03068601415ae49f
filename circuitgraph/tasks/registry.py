"""The built-in tasks: how to generate each one's prompts and how to summarise its metric.

``make_dataset("ioi", model, n=200)`` gives a :class:`TaskDataset` of held-out prompts (words the
model never saw in the tested role during training); ``split="train"`` uses the training pools.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import TaskError
from circuitgraph.tasks import metrics as M
from circuitgraph.tasks.dataset import MetricKind, PaddingSide, TaskDataset, build_dataset
from circuitgraph.tasks.stories import story_names
from circuitgraph.toylang import templates as tp

Split = Literal["heldout", "train"]


@dataclass(frozen=True)
class Task:
    """A built-in task."""

    name: str
    """Registry key and CLI name."""
    description: str
    """One line for ``--help`` and reports."""
    generate: Callable[[random.Random, tp.WordPools], tp.TaskInstance]
    """Draws one prompt instance from the given word pools."""
    metric_kind: MetricKind
    """The per-prompt metric used for patching, attribution and faithfulness."""
    summarise: Callable[[torch.Tensor, TaskDataset], dict[str, float]]
    """Turns ``[n, vocab]`` answer-position logits into the numbers ``tasks eval`` reports."""
    toy: bool = True
    """Written in the embedded toy language (the default task set); ``False`` for tasks meant for
    other models, such as ``story_names`` for TinyStories models."""


def _summary_binary(logits: torch.Tensor, ds: TaskDataset) -> dict[str, float]:
    return {
        "accuracy": M.binary_accuracy(logits, ds.answer_ids, ds.wrong_ids).float().mean().item(),
        "logit_diff": M.logit_diff(logits, ds.answer_ids, ds.wrong_ids).mean().item(),
        "top1": M.top1_accuracy(logits, ds.answer_ids).float().mean().item(),
    }


def _summary_induction(logits: torch.Tensor, ds: TaskDataset) -> dict[str, float]:
    return {
        "accuracy": M.top1_accuracy(logits, ds.answer_ids).float().mean().item(),
        "logit_diff": M.logit_diff(logits, ds.answer_ids, ds.wrong_ids).mean().item(),
        "answer_prob": M.prob_mass(logits, ds.answer_ids).mean().item(),
    }


def _summary_greater_than(logits: torch.Tensor, ds: TaskDataset) -> dict[str, float]:
    return {
        "prob_mass": M.prob_mass(logits, ds.answer_ids).mean().item(),
        "prob_diff": M.prob_diff(logits, ds.answer_ids, ds.wrong_ids).mean().item(),
        "accuracy": M.binary_accuracy(logits, ds.answer_ids, ds.wrong_ids).float().mean().item(),
    }


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("ioi", "indirect object identification: '..., John gave a drink to' -> ' Mary'",
             tp.ioi, "logit_diff", _summary_binary),
        Task("agreement", "subject-verb number agreement across a relative clause: 'The keys that the man holds' -> ' are'",
             tp.agreement, "logit_diff", _summary_binary),
        Task("induction", "induction: a random span of words repeated; predict the next repeated word",
             lambda rng, pools: tp.induction(rng), "logit_diff", _summary_induction),
        Task("story_names", "story models (stories260K): 'Lily and Tim ... Lily said hello to' -> 'Tim'",
             story_names, "logit_diff", _summary_binary, toy=False),
        Task("greater_than", "greater-than: 'from the year 1732 to the year 17' -> a two-digit year > 32",
             tp.greater_than, "prob_diff", _summary_greater_than),
    )
}


TOY_TASKS: tuple[str, ...] = tuple(name for name, t in TASKS.items() if t.toy)
"""The tasks of the embedded model (the default task set)."""


def get_task(name: str) -> Task:
    """The task called ``name``, or a :class:`TaskError` listing the valid names."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def make_dataset(
    name: str, model: HookedTransformer, n: int = 200, split: Split = "heldout", seed: int = 0,
    padding_side: PaddingSide = "right",
) -> TaskDataset:
    """``n`` prompts of task ``name`` for ``model``, deterministic in ``seed`` (padded on ``padding_side``)."""
    task = get_task(name)
    if n <= 0:
        raise TaskError(f"n={n}: the dataset would be empty; ask for at least one prompt (--n 1 or more)")
    if split not in ("heldout", "train"):
        raise TaskError(f"unknown split {split!r}; use 'heldout' or 'train'")
    pools = tp.HELDOUT_POOLS if split == "heldout" else tp.TRAIN_POOLS
    rng = random.Random(f"{name}:{split}:{seed}")
    return build_dataset(name, [task.generate(rng, pools) for _ in range(n)], model, task.metric_kind, padding_side)


def make_disjoint_dataset(name: str, model: HookedTransformer, n: int, exclude: TaskDataset, seed: int = 1,
                          split: Split = "heldout", padding_side: PaddingSide = "right") -> TaskDataset:
    """``n`` prompts of task ``name`` none of which (clean prompt text) is in ``exclude``: the
    held-out evaluation set of a circuit selected on ``exclude``. Deterministic in ``seed``."""
    task = get_task(name)
    if n <= 0:
        raise TaskError(f"n={n}: the evaluation set would be empty; ask for at least one prompt")
    pools = tp.HELDOUT_POOLS if split == "heldout" else tp.TRAIN_POOLS
    rng = random.Random(f"{name}:{split}:{seed}:eval")
    seen = set(exclude.prompts)
    picked: list[tp.TaskInstance] = []
    for _ in range(50 * n + 1000):
        inst = task.generate(rng, pools)
        if inst.prompt not in seen:
            seen.add(inst.prompt)
            picked.append(inst)
            if len(picked) == n:
                return build_dataset(name, picked, model, task.metric_kind, padding_side)
    raise TaskError(f"task {name!r} has only {len(picked)} prompts outside the {len(exclude)} selection prompts; "
                    f"ask for fewer evaluation prompts (--eval-n {len(picked)} or less)")
