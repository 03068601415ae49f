"""ACDC over dictionary-feature nodes, guided by attribution scores.

Plain ACDC (Conmy et al.) walks from the metric backwards and tries to ablate every node (or
edge), keeping the ablation when the metric moves by less than ``tau``; one forward pass over the
dataset per candidate. Here the attribution scores do two things:

1. *skip*: nodes whose estimated effect ``|score|`` is below ``skip_fraction * tau * |m(full) - m(empty)|``
   are ablated together without being tested one by one (one evaluation checks them as a group);
2. *order*: the remaining candidates are tested from the last site to the first and, within a
   site, from the weakest score up, so the baseline moves as little as possible.

A candidate stays ablated when ``|m(current + candidate ablated) - m(current)| < tau * |m(full) - m(empty)|``.
If more than ``max_features`` features survive, the highest-scoring ones are kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.ablation import Ablator, NodeSet
from circuitgraph.attribution.dataset import NodeScores
from circuitgraph.replacement.model import site_depth


class AcdcResult(NamedTuple):
    """What :func:`acdc_nodes` returns."""

    circuit: NodeSet
    """Nodes kept (not ablated)."""
    tested: int
    """Candidates tested one by one."""
    skipped: int
    """Candidates ablated without a test (attribution below the skip threshold)."""
    forward_passes: int
    """Batched forward passes ACDC made."""
    plain_forward_passes: int
    """Forward passes plain ACDC would make: one evaluation per node, same batching."""


def acdc_nodes(ablator: Ablator, scores: NodeScores, tau: float = 0.01, max_features: int | None = None,
               skip_fraction: float = 0.1, progress: bool = True) -> AcdcResult:
    """Node-level ACDC (see the module docstring)."""
    rm = ablator.rm
    passes0 = rm.forward_passes
    full = ablator.metric(NodeSet.empty(rm))
    empty = ablator.metric(NodeSet.full(rm))
    threshold = tau * abs(full - empty)
    skip_below = skip_fraction * threshold
    ablated = NodeSet.empty(rm)
    candidates: list[tuple[float, float, object, int | None]] = []  # (-depth, |score|, site, index)
    n_nodes = 0
    skipped = 0
    for s in rm.sites:
        sc = scores.features[s].abs()
        n_nodes += sc.numel() + 1
        low = sc < skip_below
        ablated.features[s] |= low
        skipped += int(low.sum())
        for i in (~low).nonzero().squeeze(1).tolist():
            candidates.append((-site_depth(s), float(sc[i]), s, i))
        e = abs(float(scores.errors[s]))
        if e < skip_below:
            ablated.errors.add(s)
            skipped += 1
        else:
            candidates.append((-site_depth(s), e, s, None))
    candidates.sort(key=lambda c: (c[0], c[1]))
    current = ablator.metric(ablated)
    for _, _, site, index in tqdm(candidates, desc="acdc", disable=not progress, leave=False):
        trial = ablated.copy()
        if index is None:
            trial.errors.add(site)
        else:
            trial.features[site][index] = True
        m = ablator.metric(trial)
        if abs(m - current) < threshold:
            ablated, current = trial, m
    circuit = ablated.complement(rm)
    if max_features is not None and circuit.n_features() > max_features:
        flat = torch.cat([scores.features[s].abs() * circuit.features[s] for s in rm.sites])
        thr = float(flat.topk(max_features).values[-1])
        for s in rm.sites:
            circuit.features[s] &= scores.features[s].abs() >= thr
    per_eval = len(ablator.parts)
    # plain ACDC: the same two baselines, then one evaluation per node (no group skip check)
    return AcdcResult(circuit, len(candidates), skipped, rm.forward_passes - passes0, (n_nodes + 2) * per_eval)
