"""How concentrated each node's input is: the number of incoming edges that carry a fraction of it.

``edges_to_fraction`` answers, for every node, "how many of my strongest incoming edges do I need
to account for 90% of my total |attribution|?" -- the edges-per-feature figure used to compare
dictionaries trained with and without interaction sparsity. Pure tensor functions over edge lists.
"""

from __future__ import annotations

import torch


def edges_to_fraction(targets: torch.Tensor, weights: torch.Tensor, n_nodes: int, fraction: float = 0.9) -> torch.Tensor:
    """``[n_nodes]`` long: for each node, the fewest incoming edges (strongest ``|w|`` first) whose
    absolute weights sum to at least ``fraction`` of all its incoming ``|w|`` (0 without inputs).

    ``targets`` ``[E]`` holds each edge's target index and ``weights`` ``[E]`` its weight."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if targets.numel() == 0:
        return torch.zeros(n_nodes, dtype=torch.long)
    w = weights.abs().double()
    order = torch.argsort(w, descending=True, stable=True)
    order = order[torch.argsort(targets[order], stable=True)]  # grouped by target, strongest first
    t, w = targets[order], w[order]
    total = torch.zeros(n_nodes, dtype=torch.float64).index_add_(0, t, w)
    cum = torch.cumsum(w, 0)
    group_start = torch.zeros(n_nodes, dtype=torch.float64)
    first = torch.ones_like(t, dtype=torch.bool)
    first[1:] = t[1:] != t[:-1]
    group_start[t[first]] = cum[first] - w[first]
    before = cum - w - group_start[t]  # |w| of the stronger edges of the same target
    needed = (before < fraction * total[t] * (1 - 1e-12)) & (w > 0)
    return torch.zeros(n_nodes, dtype=torch.long).index_add_(0, t, needed.long())
