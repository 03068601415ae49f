"""ACDC over dictionary-feature nodes, guided by attribution scores.

Plain ACDC (Conmy et al.) walks from the metric backwards and tries to ablate every node (or
edge), keeping the ablation when the metric moves by less than ``tau``; one forward pass over the
dataset per candidate. Here the attribution scores do two things:

1. *skip* and *keep*: nodes whose estimated effect ``|score|`` is below ``skip_fraction * tau *
   |m(full) - m(empty)|`` are ablated together without being tested one by one (one evaluation
   checks them as a group); nodes estimated above ``keep_factor`` times the threshold are kept
   without a test (their ablation would move the metric by several tau);
2. *order*: the remaining candidates are tested from the last site to the first and, within a
   site, from the weakest score up, so the baseline moves as little as possible;
3. *groups*: consecutive candidates of a site are tested together (adaptive group testing): a
   group whose joint ablation moves the metric by less than ``tau`` is ablated with one forward
   pass; a group that fails is split in halves, down to single nodes. The group size doubles after
   a success and shrinks after a failure, so runs of weak nodes cost one pass per group while
   strong nodes are tested one by one as in plain ACDC. A group passes only if its *joint* effect
   is below ``tau`` (stricter than one-by-one acceptance of its members).

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
    """Candidates tested (alone or in groups)."""
    skipped: int
    """Candidates ablated without a test (attribution below the skip threshold)."""
    kept_untested: int
    """Nodes kept without a test (attribution above ``keep_factor`` times the threshold)."""
    forward_passes: int
    """Batched forward passes ACDC made."""
    plain_forward_passes: int
    """Forward passes plain ACDC would make: one evaluation per node, same batching."""


def acdc_nodes(ablator: Ablator, scores: NodeScores, tau: float = 0.01, max_features: int | None = None,
               skip_fraction: float = 0.1, progress: bool = True, group_size: int = 8,
               keep_factor: float = 4.0) -> AcdcResult:
    """Node-level ACDC (see the module docstring); ``group_size=1`` tests candidates one by one."""
    rm = ablator.rm
    passes0 = rm.forward_passes
    full = ablator.metric(NodeSet.empty(rm))
    empty = ablator.metric(NodeSet.full(rm))
    threshold = tau * abs(full - empty)
    skip_below = skip_fraction * threshold
    keep_above = keep_factor * threshold
    ablated = NodeSet.empty(rm, scores.n_offsets)
    candidates: list[tuple[float, float, object, int]] = []  # (-depth, |score|, site, index; -1 - offset: error)
    n_nodes = 0
    skipped = kept = 0
    for s in rm.sites:
        sc = scores.features[s].abs()
        n_nodes += sc.numel()
        low = sc < skip_below
        ablated.features[s] |= low
        skipped += int(low.sum())
        high = sc >= keep_above
        kept += int(high.sum())
        for i in (~low & ~high).nonzero().squeeze(1).tolist():
            candidates.append((-site_depth(s), float(sc[i]), s, i))
        for o, e in enumerate(scores.errors[s].abs().tolist()):  # the error node(s): one per offset
            n_nodes += 1
            if e < skip_below:
                ablated.errors[s][o] = True
                skipped += 1
            elif e >= keep_above:
                kept += 1
            else:
                candidates.append((-site_depth(s), e, s, -(o + 1)))  # errors: negative indices
    candidates.sort(key=lambda c: (c[0], c[1]))
    state = {"ablated": ablated, "current": ablator.metric(ablated), "evals": 0}
    bar = tqdm(total=len(candidates), desc="acdc", disable=not progress, leave=False)

    def try_group(group: list) -> bool:
        trial = state["ablated"].copy()
        for _, _, site, index in group:
            if index < 0:
                trial.errors[site][-index - 1] = True
            else:
                trial.features[site][index] = True
        m = ablator.metric(trial)
        state["evals"] += 1
        if abs(m - state["current"]) < threshold:
            state["ablated"], state["current"] = trial, m
            bar.update(len(group))
            return True
        if len(group) == 1:
            bar.update(1)
            return False
        half = len(group) // 2
        try_group(group[:half])
        try_group(group[half:])
        return False

    size, i = group_size, 0
    while i < len(candidates):
        group = candidates[i : i + size]
        group = [c for c in group if c[2] == group[0][2]]  # a group never spans two sites
        ok = try_group(group)
        i += len(group)
        size = min(size * 2, 256) if ok else max(1, size // 4)
    bar.close()
    ablated = state["ablated"]
    circuit = ablated.complement(rm)
    if max_features is not None and circuit.n_features() > max_features:
        flat = torch.cat([scores.features[s].abs() * circuit.features[s] for s in rm.sites])
        thr = float(flat.topk(max_features).values[-1])
        for s in rm.sites:
            circuit.features[s] &= scores.features[s].abs() >= thr
    per_eval = len(ablator.parts)
    # plain ACDC: the same two baselines, then one evaluation per node (no group skip check)
    return AcdcResult(circuit, len(candidates), skipped, kept, rm.forward_passes - passes0, (n_nodes + 2) * per_eval)
