"""Task metrics as pure functions of the logits.

:func:`dataset_metric` is the one entry point every runner uses: ``[n, seq, vocab]`` logits and the
dataset of those prompts give ``[n]``, one value per prompt. A built-in metric is computed at each
of a row's targets (the logits at the target position, its answer and wrong ids) and averaged
over the row's targets:

    logit_diff  mean answer logit - mean wrong logit          (the answer logit alone without wrongs)
    logprob     log sum_{a in answers} p(a)                   (wrong tokens are not used)
    prob_diff   sum_{a in answers} p(a) - sum_{w in wrongs} p(w)
    kl          KL(p_clean || p) = sum_v p_clean(v) (log p_clean(v) - log p(v))

``kl`` compares with the clean model's distribution at the same position, which the runners
attach to each batch (:func:`with_reference`); its clean value is 0 and ablations raise it. A
user metric is a callable ``fn(logits [n, seq, vocab], batch) -> [n]``; it must be differentiable
in the logits for attribution and IG. The ``[n, vocab]`` helpers below (one position per prompt,
id sets ``[n, K]`` padded with -1) serve task summaries.
"""

from __future__ import annotations

import torch

from circuitgraph.errors import TaskError
from circuitgraph.tasks.dataset import Targets, TaskDataset


def gather_answer_logits(logits_bpv: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
    """``[n, seq, vocab]`` model logits -> ``[n, vocab]`` at each prompt's answer position."""
    return logits_bpv[torch.arange(logits_bpv.shape[0], device=logits_bpv.device), answer_pos.to(logits_bpv.device)]


def gather_targets(logits_bpv: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``[n, T, vocab]``: the logits at every target position (padding targets read position 0)."""
    pos = targets.pos.clamp(min=0).to(logits_bpv.device)
    return logits_bpv[torch.arange(logits_bpv.shape[0], device=logits_bpv.device).unsqueeze(1), pos]


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


def logprob(logits_nv: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` log of the total probability on the correct tokens (computed in log space)."""
    lp = logits_nv.log_softmax(-1).gather(1, answer_ids.clamp(min=0))
    return lp.masked_fill(answer_ids < 0, float("-inf")).logsumexp(1)


def kl_divergence(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || softmax(logits))`` over the last axis: ``sum p_ref (log p_ref - log p)``."""
    return (ref_logprobs.exp() * (ref_logprobs - logits.log_softmax(-1))).sum(-1)


def _per_target(logits_kv: torch.Tensor, kind: str, answer_ids: torch.Tensor, wrong_ids: torch.Tensor,
                reference_kv: torch.Tensor | None) -> torch.Tensor:
    """``[K]`` a built-in metric at ``K`` targets (logits ``[K, vocab]``, ids ``[K, A]``)."""
    if kind == "logit_diff":
        return logit_diff(logits_kv, answer_ids, wrong_ids)
    if kind == "prob_diff":
        return prob_diff(logits_kv, answer_ids, wrong_ids)
    if kind == "logprob":
        return logprob(logits_kv, answer_ids)
    if reference_kv is None:
        raise TaskError("the kl metric needs the clean output distribution; the dataset carries none (attach it "
                        "with circuitgraph.tasks.metrics.with_reference(batch, clean_logits))")
    return kl_divergence(reference_kv.to(logits_kv.dtype), logits_kv)


def needs_reference(ds: TaskDataset) -> bool:
    """Whether the metric reads the clean distribution (``kl``; callables get it too)."""
    return ds.metric_kind == "kl" or callable(ds.metric_kind)


def flat_at_clean(ds: TaskDataset) -> bool:
    """Whether the metric's gradient vanishes at the clean run (``kl``: the clean run is its minimum),
    so gradient-based scores must be taken elsewhere (the attribution modules say where)."""
    return ds.metric_kind == "kl"


def with_reference(ds: TaskDataset, clean_logits_bpv: torch.Tensor) -> TaskDataset:
    """A copy of ``ds`` carrying the clean log-probabilities at its target positions (``kl``)."""
    import dataclasses

    at = gather_targets(clean_logits_bpv.detach(), ds.target_table())
    if at.dtype in (torch.float16, torch.bfloat16):
        at = at.float()
    return dataclasses.replace(ds, reference_logprobs=at.log_softmax(-1).cpu())


def dataset_metric(logits_bpv: torch.Tensor, ds: TaskDataset) -> torch.Tensor:
    """``[n]`` the dataset's metric of each prompt from the model's ``[n, seq, vocab]`` logits (the
    mean over the row's targets); differentiable in the logits."""
    if callable(ds.metric_kind):
        out = ds.metric_kind(logits_bpv, ds)
        if not isinstance(out, torch.Tensor) or out.shape != (logits_bpv.shape[0],):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TaskError(f"metric {ds.metric_name!r} returned {got}; a metric returns one value per prompt, a "
                            f"tensor of shape [{logits_bpv.shape[0]}]")
        bad = ~torch.isfinite(out.detach())
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise TaskError(f"metric {ds.metric_name!r} returned NaN or infinite values for {int(bad.sum())} of "
                            f"{bad.numel()} prompts of the batch (the first: {ds.prompts[first][:60]!r}); circuits "
                            "need a finite metric for every prompt")
        if logits_bpv.requires_grad and not out.requires_grad:
            raise TaskError(f"metric {ds.metric_name!r} does not depend differentiably on the logits (its value has no "
                            "gradient): compute it with differentiable torch operations on the logits (no .item(), "
                            "argmax, .detach() or numpy)")
        return out
    t = ds.target_table()
    n, n_t = t.pos.shape
    dev = logits_bpv.device
    at = gather_targets(logits_bpv, t).reshape(n * n_t, -1)
    ref = None if ds.reference_logprobs is None else ds.reference_logprobs.to(dev).reshape(n * n_t, -1)
    vals = _per_target(at, ds.metric_kind, t.answer_ids.to(dev).reshape(n * n_t, -1),
                       t.wrong_ids.to(dev).reshape(n * n_t, -1), ref).reshape(n, n_t)
    if n_t == 1:
        return vals[:, 0]
    real = (t.pos >= 0).to(dev)
    return torch.where(real, vals, torch.zeros_like(vals)).sum(1) / real.sum(1).clamp(min=1)


def task_metric(logits_nv: torch.Tensor, ds: TaskDataset) -> torch.Tensor:
    """``[n]`` the dataset's own built-in metric from ``[n, vocab]`` logits at ``answer_pos`` (one
    target per prompt; ``kl`` and callables need the full logits: :func:`dataset_metric`)."""
    if callable(ds.metric_kind) or ds.metric_kind == "kl":
        raise TaskError(f"metric {ds.metric_name!r} needs the full [n, seq, vocab] logits; use dataset_metric")
    dev = logits_nv.device
    return _per_target(logits_nv, ds.metric_kind, ds.answer_ids.to(dev), ds.wrong_ids.to(dev), None)


def binary_accuracy(logits_nv: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the best correct token out-scores every wrong token."""
    return _masked_max(logits_nv, answer_ids) > _masked_max(logits_nv, wrong_ids)


def top1_accuracy(logits_nv: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: the model's top prediction over the whole vocabulary is a correct token."""
    top = logits_nv.argmax(-1, keepdim=True)
    return ((top == answer_ids) & (answer_ids >= 0)).any(1)
