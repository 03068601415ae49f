"""Run a model on task datasets and summarise the metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

from circuitgraph.replacement.masking import run_model
from circuitgraph.tasks.dataset import TaskDataset
from circuitgraph.tasks.metrics import gather_answer_logits
from circuitgraph.tasks.registry import TOY_TASKS, Split, get_task, make_dataset


@torch.no_grad()
def answer_logits(model: HookedTransformer, tokens: torch.Tensor, answer_pos: torch.Tensor, batch_size: int = 64,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, vocab]`` logits at each prompt's answer position, computed in batches
    (``attention_mask``: 1 on real tokens of padded prompts)."""
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start : start + batch_size].to(model.cfg.device)
        mask = None if attention_mask is None else attention_mask[start : start + batch_size]
        logits = run_model(model, chunk, mask, return_type="logits")
        out.append(gather_answer_logits(logits, answer_pos[start : start + batch_size]).float().cpu())
    return torch.cat(out)


def evaluate_dataset(model: HookedTransformer, ds: TaskDataset) -> dict[str, float]:
    """The summary numbers of one task dataset (its task's ``summarise``)."""
    return get_task(ds.name).summarise(answer_logits(model, ds.clean_tokens, ds.answer_pos,
                                                     attention_mask=ds.attention_mask), ds)


def evaluate_tasks(
    model: HookedTransformer, names: Sequence[str] | None = None, n: int = 200, split: Split = "heldout", seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{task: summary}`` for the named tasks (all built-in tasks by default)."""
    names = list(names) if names else list(TOY_TASKS)
    return {name: evaluate_dataset(model, make_dataset(name, model, n=n, split=split, seed=seed)) for name in names}
