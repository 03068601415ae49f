"""Pure graph maths over sparse edge lists: normalisation, influence, pruning, graph scores.

Conventions: ``A[t, s]`` is the weight of the edge s -> t (rows are targets). The *normalised*
matrix divides each row's absolute weights by the row's absolute sum, so ``Â[t, s]`` is the
fraction of t's direct input that comes from s. The *influence* of a node on the outputs is the
total over all paths of products of normalised weights, weighted by the output weights ``w``
(logit probabilities, or 1 on a metric node):

    I = w Â + w Â² + w Â³ + ...         (row vectors; the graph is acyclic so the series ends)

computed by power iteration with sparse products, never a dense N x N matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)


def normalised_adjacency(sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, N]`` sparse CSR ``Â`` (see the module docstring)."""
    w = weights.abs().double()
    row_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, targets, w)
    values = w / row_sum[targets].clamp(min=1e-30)
    coo = torch.sparse_coo_tensor(torch.stack([targets, sources]).long(), values, (n, n), check_invariants=False)
    return coo.coalesce().to_sparse_csr()


def _power_series(step, x: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """``step(x) + step(step(x)) + ...`` until a term's largest entry is at most ``tol``."""
    total = torch.zeros_like(x)
    for _ in range(max_iter):
        x = step(x)
        total += x
        if float(x.abs().max()) <= tol:
            break
    return total


def influence(a_norm: torch.Tensor, output_weights: torch.Tensor, max_iter: int = 1000, tol: float = 1e-12) -> torch.Tensor:
    """``[N]`` influence of every node on the outputs (the series in the module docstring)."""
    a_t = a_norm.to_sparse_coo().transpose(0, 1).coalesce().to_sparse_csr()
    x = output_weights.double().unsqueeze(1)
    return _power_series(lambda v: a_t @ v, x, max_iter, tol).squeeze(1)


def influence_of_edges(sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       output_weights: torch.Tensor, max_iter: int = 1000, tol: float = 1e-12) -> torch.Tensor:
    """:func:`influence` of :func:`normalised_adjacency` straight from the edge list: scatter-adds
    over the edges (duplicate pairs add up, as coalescing does), no sorting, so it is cheap to
    recompute while a graph grows."""
    return influence_of_edge_chunks(lambda: [(sources, targets, weights)], output_weights, max_iter, tol)


def influence_of_edge_chunks(chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
                             output_weights: torch.Tensor, max_iter: int = 1000, tol: float = 1e-12) -> torch.Tensor:
    """:func:`influence_of_edges` of an edge list given as ``chunks()``, an iterable of ``(sources,
    targets, weights)`` chunks read once per power-series term: memory of one chunk, not the list."""
    n = output_weights.shape[0]
    row_sum = torch.zeros(n, dtype=torch.float64)
    for _, tgt, w in chunks():
        row_sum.index_add_(0, tgt, w.abs().double())
    row_sum.clamp_(min=1e-30)

    def step(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for src, tgt, w in chunks():
            out.index_add_(0, src, w.abs().double() / row_sum[tgt] * v[tgt])
        return out

    return _power_series(step, output_weights.double(), max_iter, tol)


def edge_influence(sources: torch.Tensor, targets: torch.Tensor, a_norm: torch.Tensor, node_influence: torch.Tensor,
                   output_weights: torch.Tensor) -> torch.Tensor:
    """``[E]`` influence carried by each edge: ``Â[t, s] * (I[t] + w[t])``."""
    coo = a_norm.to_sparse_coo().coalesce()
    n = a_norm.shape[0]
    key = coo.indices()[0] * n + coo.indices()[1]
    order = torch.argsort(key)
    pos = torch.searchsorted(key[order], targets.long() * n + sources.long())
    frac = coo.values()[order][pos.clamp(max=key.numel() - 1)]
    return frac * (node_influence.double() + output_weights.double())[targets]


def cumulative_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[K]`` bool: the highest scores whose sum first reaches ``fraction`` of the total."""
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    s = scores.double().clamp(min=0)
    order = torch.argsort(s, descending=True)
    total = s.sum()
    if total <= 0:
        return torch.zeros_like(s, dtype=torch.bool)
    cum = torch.cumsum(s[order], 0) / total
    n_keep = int((cum < fraction).sum()) + 1
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[order[: min(n_keep, s.numel())]] = True
    return keep


class PruneResult(NamedTuple):
    """What :func:`prune` returns."""

    node_mask: torch.Tensor
    """``[N]`` bool nodes kept."""
    edge_mask: torch.Tensor
    """``[E]`` bool edges kept."""
    node_influence: torch.Tensor
    """``[N]`` influence of each node in the full graph."""


def prune(sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, output_weights: torch.Tensor,
          prunable: torch.Tensor, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          max_nodes: int | None = None, max_edges: int | None = None) -> PruneResult:
    """Keep the prunable nodes (``[N]`` bool: features, components) carrying ``node_threshold`` of the
    total influence (at most ``max_nodes`` of them), all non-prunable nodes (tokens, errors, outputs),
    then the edges among them carrying ``edge_threshold`` of the edge influence (at most
    ``max_edges`` of them, the most influential); nodes left without any edge are dropped (output
    nodes always stay)."""
    n = output_weights.shape[0]
    a = normalised_adjacency(sources, targets, weights, n)
    inf = influence(a, output_weights)
    keep = ~prunable.bool()
    idx = prunable.nonzero().squeeze(1)
    chosen = cumulative_keep(inf[idx], node_threshold)
    if max_nodes is not None and int(chosen.sum()) > max_nodes:
        top = torch.argsort(inf[idx], descending=True)[:max_nodes]
        chosen = torch.zeros_like(chosen)
        chosen[top] = True
    keep[idx[chosen]] = True
    e_in = keep[sources] & keep[targets]
    e_inf = edge_influence(sources, targets, a, inf, output_weights)
    e_keep = torch.zeros_like(e_in)
    cand = e_in.nonzero().squeeze(1)
    e_keep[cand[cumulative_keep(e_inf[cand], edge_threshold)]] = True
    if max_edges is not None and int(e_keep.sum()) > max_edges:
        kept = e_keep.nonzero().squeeze(1)
        e_keep[kept[torch.argsort(e_inf[kept], descending=True, stable=True)[max_edges:]]] = False
    touched = torch.zeros(n, dtype=torch.bool)
    touched[sources[e_keep]] = True
    touched[targets[e_keep]] = True
    keep &= touched | (output_weights > 0)
    return PruneResult(keep, e_keep & keep[sources] & keep[targets], inf)


class GraphScores(NamedTuple):
    """Circuit-tracer's two graph-level scores, in [0, 1] (higher: more of the computation explained)."""

    replacement: float
    """Of the end-to-end influence on the outputs that reaches the graph's leaves, the fraction from
    token nodes rather than error nodes."""
    completeness: float
    """Circuit-tracer's completeness: the mean over *every* node (sources included, which count as
    fully explained), weighted by influence on the outputs plus output weight, of the fraction of
    the node's direct input that does not come from error nodes."""
    completeness_inputs_only: float
    """The same mean over the nodes that have inputs only (ours; sources do not dilute it)."""


def graph_scores(sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, output_weights: torch.Tensor,
                 is_token: torch.Tensor, is_error: torch.Tensor) -> GraphScores:
    """:class:`GraphScores` of a graph (see there)."""
    n = output_weights.shape[0]
    a = normalised_adjacency(sources, targets, weights, n)
    inf = influence(a, output_weights)
    tok, err = float(inf[is_token].sum()), float(inf[is_error].sum())
    replacement = tok / (tok + err) if tok + err > 0 else 0.0
    from_error = torch.zeros(n, dtype=torch.float64)
    coo = a.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    err_edges = is_error[cols]
    from_error.index_add_(0, rows[err_edges], coo.values()[err_edges])
    has_input = torch.zeros(n, dtype=torch.bool)
    has_input[rows] = True
    every = inf + output_weights.double()

    def mean(weight: torch.Tensor) -> float:
        return float(((1 - from_error) * weight).sum() / weight.sum()) if float(weight.sum()) > 0 else 0.0

    return GraphScores(replacement, mean(every), mean(every * has_input))
