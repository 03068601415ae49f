"""ACDC that tests everything it removes, guided by attribution scores; one search for any node kind.

Plain ACDC (Conmy et al.) walks from the metric backwards and tries to ablate every candidate
(node or edge), keeping the ablation when the metric moves by less than
``tau * |m(full) - m(empty)|``; one evaluation (a forward pass per batch) per candidate.
:func:`acdc_search` does the same walk with three savings, none of which removes anything untested:

1. *no-op and low groups*: candidates whose ablation changes nothing on these prompts (their
   clean value equals the ablated one at every counted position) and candidates whose estimated
   effect ``|score|`` is below ``skip_fraction`` times the threshold are removed as two groups,
   each *verified* by one evaluation of its joint effect; a group that moves the metric by ``tau``
   or more is split in halves and retested, down to single candidates, which are kept when they fail;
2. *keep*: candidates estimated above ``keep_factor`` times the threshold are kept without a test
   (``keep_factor=inf`` tests them too); this can only make the circuit larger, never remove a node;
3. *adaptive group testing*: the remaining candidates, from the last site to the first and within a
   site from the weakest score up, are tried in groups of one site; a group is removed when its
   *joint* effect is below the threshold (stricter than one-by-one acceptance of its members), a
   failing group is halved down to single candidates; the group size doubles after a success and
   shrinks after a failure.

The scores that order, skip and keep candidates must estimate the same ablation the tests run
(:class:`~circuitgraph.attribution.dataset.DatasetAttributionConfig.baseline` does this for feature
nodes). :meth:`AcdcConfig.plain` gives plain ACDC (every candidate tested on its own; no-op
candidates still removed as one verified group, as the benchmark does on both sides).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.ablation import Ablator
from circuitgraph.attribution.dataset import NodeScores, by_offset
from circuitgraph.attribution.nodeset import AblatedNodes, DatasetNode, KeptNodes
from circuitgraph.replacement.model import site_depth
from dictionaries.distributed import sum_across_ranks

log = logging.getLogger(__name__)

State = TypeVar("State")


@dataclass
class AcdcConfig:
    """ACDC settings (CLI: ``--tau``, ``--acdc-skip-fraction``, ``--acdc-keep-factor``, ``--acdc-group-size``)."""

    tau: float = 0.002
    """Threshold as a fraction of ``|m(full) - m(empty)|``: a removal must move the metric by less."""
    skip_fraction: float = 0.1
    """Candidates scored below ``skip_fraction * tau * |m(full) - m(empty)|`` form the low group
    (removed together when one verifying evaluation passes); 0: no low group."""
    keep_factor: float = 4.0
    """Candidates scored at or above ``keep_factor`` times the threshold are kept untested; ``inf``: none."""
    group_size: int = 8
    """First group size of adaptive group testing; 1 tests candidates one by one throughout."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a positive finite number, got {self.tau}")
        if not (math.isfinite(self.skip_fraction) and self.skip_fraction >= 0):
            raise ValueError(f"skip_fraction must be a finite number >= 0, got {self.skip_fraction}")
        if math.isnan(self.keep_factor) or self.keep_factor <= 0:
            raise ValueError(f"keep_factor must be > 0 (inf: test every candidate), got {self.keep_factor}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {self.group_size}")

    @classmethod
    def plain(cls, tau: float = 0.002) -> AcdcConfig:
        """Plain ACDC: no low group, nothing kept untested, every candidate tested alone."""
        return cls(tau, 0.0, math.inf, 1)


class Candidate(NamedTuple):
    """One thing ACDC may remove."""

    group: Hashable
    """Candidates are grouped only with others of the same key (a site, a receiver)."""
    order: float
    """Forward order; the search walks from the largest (nearest the metric) down."""
    score: float
    """``|estimated effect|`` of removing it."""
    item: Hashable
    """What :func:`acdc_search`'s ``extend`` callback ablates."""
    no_op: bool = False
    """Its ablation changes nothing on these prompts (clean value equals the ablated one)."""


class AcdcSearch(NamedTuple):
    """What :func:`acdc_search` returns."""

    state: object
    """The final ablation state (everything removed)."""
    kept: list[Hashable]
    """Items kept (tested and failed, or kept untested)."""
    n_candidates: int
    n_no_op: int
    """Candidates in the no-op group."""
    n_low: int
    """Candidates in the low-score group."""
    n_rescued: int
    """No-op / low-group candidates the verification kept (untested removal would have lost them)."""
    n_tested: int
    """Candidates tested by group testing (neither no-op, low nor kept untested)."""
    n_kept_untested: int
    evaluations: int
    """Metric evaluations (each one forward pass per batch), the two baselines excluded."""


def acdc_search(candidates: list[Candidate], initial: State, extend: Callable[[State, list[Hashable]], State],
                metric: Callable[[State], float], threshold: float, cfg: AcdcConfig,
                progress: bool = False) -> AcdcSearch:
    """The search of the module docstring. ``extend(state, items)`` returns a new state with
    ``items`` also ablated; ``metric(state)`` evaluates it; ``threshold`` is ``tau * |m(full) - m(empty)|``."""
    skip_below = cfg.skip_fraction * threshold
    keep_above = cfg.keep_factor * threshold
    walk = sorted(candidates, key=lambda c: (-c.order, c.score))
    no_op = [c for c in walk if c.no_op]
    low = [c for c in walk if not c.no_op and c.score < skip_below]
    kept_untested = [c for c in walk if not c.no_op and c.score >= skip_below and c.score >= keep_above]
    rest = [c for c in walk if not c.no_op and skip_below <= c.score < keep_above]
    st = {"state": initial, "current": metric(initial), "evals": 0}
    kept: list[Hashable] = [c.item for c in kept_untested]
    bar = tqdm(total=len(walk), desc="acdc", disable=not progress, leave=False)
    bar.update(len(kept_untested))

    def try_group(group: list[Candidate]) -> bool:
        if not group:
            return True
        trial = extend(st["state"], [c.item for c in group])
        m = metric(trial)
        st["evals"] += 1
        if abs(m - st["current"]) < threshold:
            st["state"], st["current"] = trial, m
            bar.update(len(group))
            return True
        if len(group) == 1:
            kept.append(group[0].item)
            bar.update(1)
            return False
        half = len(group) // 2
        try_group(group[:half])
        try_group(group[half:])
        return False

    before = len(kept)
    try_group(no_op)
    try_group(low)
    rescued = len(kept) - before
    size, i = cfg.group_size, 0
    while i < len(rest):
        group = rest[i : i + size]
        group = [c for c in group if c.group == group[0].group]  # a group never spans two sites
        ok = try_group(group)
        i += len(group)
        if cfg.group_size > 1:  # group_size 1: one by one throughout (plain ACDC)
            size = min(size * 2, 256) if ok else max(1, size // 4)
    bar.close()
    return AcdcSearch(st["state"], kept, len(walk), len(no_op), len(low), rescued, len(rest), len(kept_untested),
                      st["evals"])


class AcdcResult(NamedTuple):
    """What :func:`acdc_nodes` returns."""

    circuit: KeptNodes
    """Nodes kept (not ablated)."""
    search: AcdcSearch
    forward_passes: int
    """Batched forward passes ACDC made (baselines included)."""
    suspicious: int
    """0 when the result looks sound; bit 1: the circuit is empty; bit 2: the full-vs-empty metric
    gap is tiny (every test passes trivially). Each set bit is also logged as a warning."""


def changed_nodes(scores: NodeScores) -> AblatedNodes:
    """The nodes whose clean value differs from the ablation baseline at some counted position
    (ablating any other node is a no-op on these prompts)."""
    runs, n_off = scores.runs, scores.n_offsets
    feats = {s: torch.zeros(v.numel()) for s, v in scores.features.items()}
    errs = {s: torch.zeros(n_off) for s in scores.errors}
    for b in runs.batches:
        base_lat, base_err = runs.baseline(scores.baseline, b)
        m = b.mask.unsqueeze(-1)
        for s in feats:
            feats[s] += by_offset(((b.clean_latents[s] != base_lat[s]).float() * m), b.offset, n_off).float()
            diff_e = (b.clean_errors[s] != base_err[s]).any(-1, keepdim=True).float()
            errs[s] += by_offset(diff_e * m, b.offset, n_off).float()
    return AblatedNodes({s: sum_across_ranks(t) > 0 for s, t in feats.items()},
                        {s: sum_across_ranks(t) > 0 for s, t in errs.items()}, scores.resolved)


def tiny_gap(full: float, empty: float) -> bool:
    """Whether ablating everything moves the metric by under 0.1% of its size (every test passes)."""
    return abs(full - empty) < 1e-3 * max(abs(full), abs(empty))


def acdc_nodes(ablator: Ablator, scores: NodeScores, cfg: AcdcConfig | None = None,
               progress: bool = True) -> AcdcResult:
    """Node-level ACDC over every feature and error node (see the module docstring)."""
    cfg = cfg or AcdcConfig()
    rm = ablator.rm
    passes0 = rm.forward_passes
    full, empty = ablator.full(), ablator.empty()
    threshold = cfg.tau * abs(full - empty)
    changed = changed_nodes(scores)
    d_dicts = scores.d_dicts()
    candidates: list[Candidate] = []
    for s in rm.sites:
        depth = site_depth(s)
        for i, sc in enumerate(scores.features[s].abs().tolist()):
            candidates.append(Candidate(s, depth, sc, DatasetNode.from_flat(s, i, d_dicts[s]),
                                        not bool(changed.features[s][i])))
        for o, sc in enumerate(scores.errors[s].abs().tolist()):
            candidates.append(Candidate(s, depth, sc, DatasetNode(s, None, o), not bool(changed.errors[s][o])))
    initial = AblatedNodes.none(d_dicts, scores.n_offsets, scores.resolved)
    search = acdc_search(candidates, initial, lambda st, items: st.with_nodes(items), ablator.metric, threshold,
                         cfg, progress)
    circuit = search.state.kept()
    suspicious = 0
    if circuit.n_nodes() == 0:
        suspicious |= 1
        log.warning("ACDC kept no node: every ablation stayed below tau = %g of the metric gap; the circuit is empty",
                    cfg.tau)
    if tiny_gap(full, empty):
        suspicious |= 2
        log.warning("the metric barely changes when every node is ablated (%.3g vs %.3g): ACDC's tests are trivial",
                    full, empty)
    return AcdcResult(circuit, search, rm.forward_passes - passes0, suspicious)
