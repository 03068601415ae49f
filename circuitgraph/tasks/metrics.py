"""Task metrics as pure functions of the logits at the answer position.

Shapes: ``logits`` is ``[n, vocab]`` (already gathered at ``answer_pos``); id sets are
``[n, K]`` padded with -1.
"""

from __future__ import annotations

import torch

from circuitgraph.tasks.dataset import TaskDataset


def gather_answer_logits(logits_bpv: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
    """``[n, seq, vocab]`` model logits -> ``[n, vocab]`` at each prompt's answer position."""
    return logits_bpv[torch.arange(logits_bpv.shape[0], device=logits_bpv.device), answer_pos.to(logits_bpv.device)]


def _masked_mean(values_nv: torch.Tensor, ids_nk: torch.Tensor) -> torch.Tensor:
    mask = ids_nk >= 0
    picked = values_nv.gather(1, ids_nk.clamp(min=0))
    return (picked * mask).sum(1) / mask.sum(1).clamp(min=1)


def _masked_sum(values_nv: torch.Tensor, ids_nk: torch.Tensor) -> torch.Tensor:
    mask = ids_nk >= 0
    return (values_nv.gather(1, ids_nk.clamp(min=0)) * mask).sum(1)


def _masked_max(values_nv: torch.Tensor, ids_nk: torch.Tensor) -> torch.Tensor:
    picked = values_nv.gather(1, ids_nk.clamp(min=0))
    return picked.masked_fill(ids_nk < 0, float("-inf")).max(1).values


def logit_diff(logits_nv: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` mean logit of the correct tokens minus mean logit of the wrong tokens."""
    return _masked_mean(logits_nv, answer_ids) - _masked_mean(logits_nv, wrong_ids)


def prob_mass(logits_nv: torch.Tensor, ids_nk: torch.Tensor) -> torch.Tensor:
    """``[n]`` total next-token probability on the given ids."""
    return _masked_sum(logits_nv.float().softmax(-1), ids_nk)


def prob_diff(logits_nv: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` probability mass on correct tokens minus mass on wrong tokens."""
    return prob_mass(logits_nv, answer_ids) - prob_mass(logits_nv, wrong_ids)


def task_metric(logits_nv: torch.Tensor, ds: TaskDataset) -> torch.Tensor:
    """``[n]`` the dataset's own metric (its ``metric_kind``); differentiable in the logits."""
    a, w = ds.answer_ids.to(logits_nv.device), ds.wrong_ids.to(logits_nv.device)
    if ds.metric_kind == "logit_diff":
        return logit_diff(logits_nv, a, w)
    return prob_diff(logits_nv, a, w)


def binary_accuracy(logits_nv: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the best correct token out-scores every wrong token."""
    return _masked_max(logits_nv, answer_ids) > _masked_max(logits_nv, wrong_ids)


def top1_accuracy(logits_nv: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the model's top prediction over the whole vocabulary is a correct token."""
    top = logits_nv.argmax(-1, keepdim=True)
    return ((top == answer_ids) & (answer_ids >= 0)).any(1)
