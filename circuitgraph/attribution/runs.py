"""The clean and corrupted runs of a prompt dataset, made once and shared by scoring and ablation.

Node scoring, edge scoring and every ablation run start from the same per-batch values: each
site's latents and error terms on the clean and on the corrupted prompts, the metric on both, and
which positions count. :class:`DatasetRuns` makes them with two forward passes per batch and keeps
them; the ablation baselines (``patch``: the corrupted values; ``mean``: the mean clean value over
the dataset's counted positions; ``zero``) are derived from them.

Counted positions (:func:`position_mask`) are those whose nodes can influence the answer: real
tokens (padding excluded) after each row's first one (BOS, not spliced: in a causal model it
depends on the BOS token alone), up to the answer position (the last target) in a causal model;
every real token in a bidirectional one, where the first reads every position: dataset runs splice
it with its latents held at zero, so its whole output is the error node (:func:`run_batch`) and
ablating every node gives the corrupted run. Padded batches run
with their attention mask, so each prompt's values equal those of the prompt run alone. When the
metric reads the clean distribution (``kl``), each batch carries it (``BatchRun.ds``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, NamedTuple

import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.masking import is_causal
from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec
from circuitgraph.tasks.dataset import TaskDataset
from circuitgraph.tasks.metrics import dataset_metric, needs_reference, with_reference
from dictionaries.distributed import sum_across_ranks, sum_float
from dictionaries.site import Site

AblationKind = Literal["patch", "mean", "zero"]
ABLATIONS: tuple[str, ...] = ("patch", "mean", "zero")


def metric_of(logits: torch.Tensor, ds: TaskDataset) -> torch.Tensor:
    """``[B]`` the metric of each prompt from ``[B, P, vocab]`` logits (the dataset's own metric)."""
    return dataset_metric(logits, ds)


def run_batch(rm: ReplacementModel, b: TaskDataset, spec: SpliceSpec | None = None,
              corrupted: bool = False) -> RunResult:
    """One spliced run of the batch's clean (or corrupted) prompts with its attention mask. In a
    bidirectional model each prompt's first token is spliced too, its whole output in the error term
    (``SpliceSpec.first_as_error``): it reads every position, so ablations must reach it."""
    if not is_causal(rm.model):
        spec = replace(spec, first_as_error=True) if spec is not None else SpliceSpec(first_as_error=True)
    return rm.run(b.corrupted_tokens if corrupted else b.clean_tokens, spec, attention_mask=b.attention_mask)


def batches(ds: TaskDataset, size: int) -> list[TaskDataset]:
    """``ds`` split into consecutive batches."""
    return [ds.subset(slice(i, i + size)) for i in range(0, len(ds), size)]


def position_mask(ds: TaskDataset, n_pos: int, causal: bool = True, include_first: bool | None = None) -> torch.Tensor:
    """``[n, P]`` float, 1 where nodes are counted: real tokens after each row's first, up to the
    answer position when ``causal``; every real token, the first included (its output is an error
    node there, :func:`run_batch`), when not. ``include_first`` overrides whether the first counts."""
    out = ds.real_mask()[:, :n_pos].clone()
    if include_first is None:
        include_first = not causal
    if not include_first:
        out[torch.arange(len(ds)), ds.first_pos()] = False
    if causal:
        out &= torch.arange(n_pos).unsqueeze(0) <= ds.answer_pos.unsqueeze(1)
    return out.float()


def position_offsets(ds: TaskDataset, n_pos: int) -> torch.Tensor:
    """``[n, P]`` each position counted back from the prompt's answer position (clamped at 0)."""
    return (ds.answer_pos.unsqueeze(1) - torch.arange(n_pos)).clamp(min=0)


class BatchRun(NamedTuple):
    """One batch's clean and corrupted values; tensors are ``[B, P, width]`` per site."""

    ds: TaskDataset
    clean_latents: dict[Site, torch.Tensor]
    clean_errors: dict[Site, torch.Tensor]
    corr_latents: dict[Site, torch.Tensor]
    corr_errors: dict[Site, torch.Tensor]
    mask: torch.Tensor
    """``[B, P]`` float: 1 where nodes are counted (:func:`position_mask`)."""
    offset: torch.Tensor
    """``[B, P]`` int64: positions counted back from the answer position (clamped at 0)."""
    metric_clean: torch.Tensor
    """``[B]`` the metric of the clean prompts (the unablated spliced model = the model)."""
    metric_corrupt: torch.Tensor
    """``[B]`` the metric of the corrupted prompts."""


class DatasetRuns:
    """Clean and corrupted spliced runs of ``ds`` in batches of ``batch_size`` (two forward passes a batch)."""

    def __init__(self, rm: ReplacementModel, ds: TaskDataset, batch_size: int = 32) -> None:
        if len(ds) == 0:
            raise CircuitGraphError("the prompt dataset is empty")
        if batch_size < 1:
            raise CircuitGraphError(f"batch size must be at least 1, got {batch_size}")
        self.rm, self.ds, self.batch_size = rm, ds, batch_size
        self.causal = is_causal(rm.model)
        """Causal attention: positions after the answer cannot influence it and are not counted."""
        self.batches: list[BatchRun] = []
        with torch.no_grad():
            for b in batches(ds, batch_size):
                clean = run_batch(rm, b)
                if needs_reference(b):
                    b = with_reference(b, clean.logits)
                corr = run_batch(rm, b, corrupted=True)
                n_pos = b.clean_tokens.shape[1]
                self.batches.append(BatchRun(
                    b, {s: r.latents for s, r in clean.sites.items()}, {s: r.errors for s, r in clean.sites.items()},
                    {s: r.latents for s, r in corr.sites.items()}, {s: r.errors for s, r in corr.sites.items()},
                    position_mask(b, n_pos, self.causal), position_offsets(b, n_pos),
                    metric_of(clean.logits, b), metric_of(corr.logits, b)))
        self.n_prompts = sum_float(float(len(ds)))
        """Prompts over every rank (under torchrun each rank holds its shard)."""
        self._means: tuple[dict, dict] | None = None

    def check_from_end(self) -> None:
        """A clear error when a counted position lies after its answer position (bidirectional
        attention): offsets counted back from the answer cannot name it."""
        for b in self.batches:
            after = b.mask.bool() & (torch.arange(b.mask.shape[1]) > b.ds.answer_pos.unsqueeze(1))
            if bool(after.any()):
                raise CircuitGraphError(
                    "positions 'from_end' count back from the answer position, but with bidirectional attention "
                    "the tokens after it influence the answer too and would have no offset; use positions "
                    "'aggregate' (--positions aggregate), or end every prompt at its last target")

    @property
    def n_positions(self) -> int:
        """Padded prompt length (the number of offsets a position-resolved node set needs)."""
        return int(self.ds.clean_tokens.shape[1])

    @property
    def metric_clean(self) -> float:
        """Mean clean metric over the prompts."""
        return sum_float(sum(float(b.metric_clean.sum()) for b in self.batches)) / self.n_prompts

    @property
    def metric_corrupt(self) -> float:
        """Mean corrupted metric over the prompts."""
        return sum_float(sum(float(b.metric_corrupt.sum()) for b in self.batches)) / self.n_prompts

    def means(self) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
        """Mean clean latents and errors over the counted positions of every prompt (float64; the
        baseline casts them to the run's dtype)."""
        if self._means is None:
            lat = {s: torch.zeros(d.cfg.d_dict, dtype=torch.float64) for s, d in self.rm.dicts.items()}
            err = {s: torch.zeros(d.cfg.error_width, dtype=torch.float64) for s, d in self.rm.dicts.items()}
            count = 0.0
            for b in self.batches:
                m = b.mask.unsqueeze(-1)
                count += float(b.mask.sum())
                for s in self.rm.dicts:
                    lat[s] += (b.clean_latents[s] * m).sum((0, 1)).double()
                    err[s] += (b.clean_errors[s] * m).sum((0, 1)).double()
            count = max(sum_float(count), 1.0)
            self._means = ({s: sum_across_ranks(t) / count for s, t in lat.items()},
                           {s: sum_across_ranks(t) / count for s, t in err.items()})
        return self._means

    def baseline(self, kind: AblationKind, b: BatchRun) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
        """The values ablated nodes take in batch ``b`` (latents, errors), ``[B, P, width]`` per site."""
        if kind == "patch":
            return b.corr_latents, b.corr_errors
        if kind == "zero":
            return ({s: torch.zeros_like(t) for s, t in b.clean_latents.items()},
                    {s: torch.zeros_like(t) for s, t in b.clean_errors.items()})
        if kind == "mean":
            lat, err = self.means()
            return ({s: lat[s].to(t.dtype).expand_as(t) for s, t in b.clean_latents.items()},
                    {s: err[s].to(t.dtype).expand_as(t) for s, t in b.clean_errors.items()})
        raise CircuitGraphError(f"unknown ablation {kind!r}; choose one of {', '.join(ABLATIONS)}")
