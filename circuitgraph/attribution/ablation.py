"""Running the replacement model with sets of nodes ablated: faithfulness and completeness.

A node set is given per site as a bool mask of ablated features and one of ablated error nodes.
A ``[d_dict]`` feature mask and a ``[1]`` error mask hold position-aggregated nodes (ablated at
every position); ``[n_offsets * d_dict]`` and ``[n_offsets]`` masks hold one node per feature (per
error) and position counted back from the answer position (``DatasetAttributionConfig.positions
== "from_end"``), ablated only there. Ablation replaces a latent / error by

* ``patch``: its value on the corrupted prompt (ACDC's convention),
* ``mean``: its mean over the dataset's counted positions (Marks et al.),
* ``zero``: zero.

Non-ablated latents are re-encoded from the (possibly changed) site input; non-ablated errors keep
their clean values. Scores (m = task metric averaged over prompts; M = full model, C = circuit):

    faithfulness = (m(C) - m(empty)) / (m(M) - m(empty))
    completeness = (m(M) - m(M without C)) / (m(M) - m(empty))   # 1: removing C removes everything
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from circuitgraph.attribution.dataset import batches, metric_of, position_mask, position_offsets
from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from circuitgraph.tasks.dataset import TaskDataset
from dictionaries.distributed import sum_across_ranks, sum_float
from dictionaries.site import Site

AblationKind = Literal["patch", "mean", "zero"]


@dataclass
class NodeSet:
    """Ablated (or kept) nodes: per-site feature masks and error-node masks."""

    features: dict[Site, torch.Tensor]
    """``[n_offsets * d_dict]`` bool per site (``n_offsets`` 1: aggregated over positions)."""
    errors: dict[Site, torch.Tensor]
    """``[n_offsets]`` bool per site: its error node(s)."""

    @classmethod
    def empty(cls, rm: ReplacementModel, n_offsets: int = 1) -> NodeSet:
        return cls({s: torch.zeros(n_offsets * d.cfg.d_dict, dtype=torch.bool) for s, d in rm.dicts.items()},
                   {s: torch.zeros(n_offsets, dtype=torch.bool) for s in rm.dicts})

    @classmethod
    def full(cls, rm: ReplacementModel, n_offsets: int = 1) -> NodeSet:
        return cls({s: torch.ones(n_offsets * d.cfg.d_dict, dtype=torch.bool) for s, d in rm.dicts.items()},
                   {s: torch.ones(n_offsets, dtype=torch.bool) for s in rm.dicts})

    def complement(self, rm: ReplacementModel) -> NodeSet:
        return NodeSet({s: ~m for s, m in self.features.items()}, {s: ~m for s, m in self.errors.items()})

    def n_features(self) -> int:
        return int(sum(int(m.sum()) for m in self.features.values()))

    def n_errors(self) -> int:
        return int(sum(int(m.sum()) for m in self.errors.values()))

    def copy(self) -> NodeSet:
        return NodeSet({s: m.clone() for s, m in self.features.items()}, {s: m.clone() for s, m in self.errors.items()})


class _Batch(NamedTuple):
    ds: TaskDataset
    offset: torch.Tensor  # [B, P] positions counted back from the answer
    clean_errors: dict[Site, torch.Tensor]
    corr_latents: dict[Site, torch.Tensor]
    corr_errors: dict[Site, torch.Tensor]


class Ablator:
    """Evaluates the metric with node sets ablated; caches clean / corrupted values per batch."""

    def __init__(self, rm: ReplacementModel, ds: TaskDataset, kind: AblationKind = "patch", batch_size: int = 64) -> None:
        if kind not in ("patch", "mean", "zero"):
            raise CircuitGraphError(f"unknown ablation {kind!r}; choose patch, mean or zero")
        self.rm, self.kind = rm, kind
        self.parts: list[_Batch] = []
        sums_l = {s: torch.zeros(d.cfg.d_dict) for s, d in rm.dicts.items()}
        sums_e = {s: torch.zeros(d.cfg.out_width) for s, d in rm.dicts.items()}
        count = 0.0
        with torch.no_grad():
            for b in batches(ds, batch_size):
                clean = rm.run(b.clean_tokens)
                corr = rm.run(b.corrupted_tokens)
                mask = position_mask(b, b.clean_tokens.shape[1]).unsqueeze(-1)
                count += float(mask.sum())
                for s in rm.dicts:
                    sums_l[s] += (clean.sites[s].latents * mask).sum((0, 1))
                    sums_e[s] += (clean.sites[s].errors * mask).sum((0, 1))
                self.parts.append(_Batch(b, position_offsets(b, b.clean_tokens.shape[1]),
                                         {s: r.errors for s, r in clean.sites.items()},
                                         {s: r.latents for s, r in corr.sites.items()},
                                         {s: r.errors for s, r in corr.sites.items()}))
        count = sum_float(count)  # under torchrun: this rank's shard, summed over ranks
        self.mean_latents = {s: sum_across_ranks(t) / count for s, t in sums_l.items()}
        self.mean_errors = {s: sum_across_ranks(t) / count for s, t in sums_e.items()}
        self.n_prompts = sum_float(float(len(ds)))

    def _replacement(self, part: _Batch, site: Site, which: str, like: torch.Tensor) -> torch.Tensor:
        if self.kind == "zero":
            return torch.zeros_like(like)
        if self.kind == "mean":
            table = self.mean_latents if which == "latents" else self.mean_errors
            return table[site].expand_as(like)
        return (part.corr_latents if which == "latents" else part.corr_errors)[site]

    def _ablate(self, part: _Batch, site: Site, which: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (``[B, P, width]`` latents or errors) with the nodes of ``mask`` ablated: a
        ``[width]`` mask (features) or ``[1]`` (the error) at every position, a ``[n_offsets *
        width]`` / ``[n_offsets]`` one at each node's offset from the answer position only."""
        if mask is None or not bool(mask.any()):
            return x
        width = x.shape[-1] if which == "latents" else 1
        if mask.numel() != width:  # one node per offset: a [B, P, width] mask
            if mask.numel() != x.shape[1] * width:
                raise CircuitGraphError(
                    f"the node set of {site.id} has {mask.numel() // width} positions per node but these prompts "
                    f"have {x.shape[1]}; score and ablate with the same dataset")
            mask = mask.view(-1, width)[part.offset]
        return torch.where(mask, self._replacement(part, site, which, x), x)

    @torch.no_grad()
    def metric(self, ablated: NodeSet) -> float:
        """Mean task metric with ``ablated`` nodes ablated (one forward pass per batch)."""
        total = 0.0
        for part in self.parts:
            errors = {s: self._ablate(part, s, "errors", e, ablated.errors.get(s)) for s, e in part.clean_errors.items()}

            def edit(site: Site, lat: torch.Tensor, part: _Batch = part) -> torch.Tensor:
                return self._ablate(part, site, "latents", lat, ablated.features.get(site))

            logits = self.rm.run(part.ds.clean_tokens, SpliceSpec(errors=errors, edit_latents=edit)).logits
            total += float(metric_of(logits, part.ds).sum())
        return sum_float(total) / self.n_prompts


class CircuitScores(NamedTuple):
    """Faithfulness and completeness of a node set (see the module docstring)."""

    faithfulness: float
    completeness: float
    metric_full: float
    metric_empty: float
    metric_circuit: float
    metric_without_circuit: float


def circuit_scores(ablator: Ablator, circuit: NodeSet) -> CircuitScores:
    """Four ablation runs: full model, everything ablated, only the circuit kept, the circuit removed."""
    rm = ablator.rm
    full = ablator.metric(NodeSet.empty(rm))
    empty = ablator.metric(NodeSet.full(rm))  # aggregated masks: every node at every position
    kept = ablator.metric(circuit.complement(rm))
    removed = ablator.metric(circuit)
    span = full - empty
    if abs(span) < 1e-9:
        raise CircuitGraphError("the metric does not change when every node is ablated; faithfulness is undefined "
                                "(try another ablation, e.g. --ablation mean)")
    return CircuitScores((kept - empty) / span, (full - removed) / span, full, empty, kept, removed)
