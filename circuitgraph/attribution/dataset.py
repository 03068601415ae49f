"""Dataset attribution between clean and corrupted prompts ("Sparse Feature Circuits", Marks et al.).

Nodes are dictionary features and error terms. With ``positions="aggregate"`` (the default) a
feature is one node for the whole dataset, summed over positions; with ``positions="from_end"`` a
feature at each position counted back from the answer position is its own node (``@-1`` is the
answer position, ``@-2`` the token before it, ...), which aligns prompts of different lengths at
their end, as templated tasks are. Feature ``f`` at offset ``r`` (0 = the answer position) has the
flat index ``r * d_dict + f`` in the per-site score and mask vectors; a site's error term is one
node (aggregated) or one node per offset, index ``r`` of its ``[n_offsets]`` score and mask
vectors. Error terms are treated as nodes with given values (their clean values unless ablated),
so gradients flow through the downstream dictionaries' encoders.

Node scores (the estimated effect on the metric of restoring the node from its ablated value
``u_base`` to its clean value; ``u_base`` follows the ablation the circuit is evaluated with:
the corrupted value for ``patch``, the dataset mean for ``mean``, zero for ``zero``, so scores
estimate exactly what the ablation runs measure):

    attribution patching:   score(u) = sum_prompts sum_pos (u_clean - u_base) . dm/du |clean
    integrated gradients:   score(u) = sum_prompts sum_pos (u_clean - u_base) . mean_alpha dm/du |u = u_base + alpha (u_clean - u_base)

(IG interpolates one site at a time, everything downstream recomputed, as Marks et al. do.)

Edge scores between kept nodes u -> d (d downstream of u):

    edge(u, d) = sum_prompts sum_pos_d sum_pos_u  dm/dd . (d d / d u)_direct . (u_clean - u_base)

where the direct Jacobian holds every other node fixed (all sites are leaves), and dm/dd is the
gradient used for d's node score (averaged over the IG path for ``ig``). The metric node's incoming
edges are the nodes' direct effects on the metric. Positions are the counted ones
(:func:`~circuitgraph.attribution.runs.position_mask`: every real token that can influence the
answer, so in a bidirectional model also the tokens after it).

A metric whose gradient vanishes at the clean run (``kl``: the clean run is its minimum) would give
every attribution-patching score and every direct edge into the metric as 0. For ``kl``,
``attribution`` therefore takes each site's gradient halfway between its baseline and clean
values (IG with one midpoint step, exact for a quadratic metric), and the metric's incoming edges
take the gradient with every leaf halfway between its baseline and clean values (for a quadratic
metric they then add up to m(clean) - m(every leaf at its baseline)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.nodeset import DatasetNode
from circuitgraph.attribution.runs import (
    ABLATIONS,
    AblationKind,
    BatchRun,
    DatasetRuns,
    batches,
    metric_of,
    position_mask,
    position_offsets,
    run_batch,
)
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from circuitgraph.tasks.dataset import TaskDataset
from circuitgraph.tasks.metrics import flat_at_clean
from dictionaries.distributed import sum_across_ranks
from dictionaries.site import Site

log = logging.getLogger(__name__)

Method = Literal["attribution", "ig"]
Positions = Literal["aggregate", "from_end"]
__all__ = ["DatasetAttributionConfig", "NodeScores", "score_nodes", "score_edges", "by_offset", "metric_of",
           "batches", "position_mask", "position_offsets"]


@dataclass
class DatasetAttributionConfig:
    """Options of :func:`score_nodes` and :func:`score_edges`."""

    method: Method = "attribution"
    """``attribution`` (activation x gradient) or ``ig`` (integrated gradients)."""
    ig_steps: int = 8
    """Interpolation steps for ``ig`` (midpoint rule)."""
    batch_size: int = 32
    """Prompts per forward pass."""
    reduce: Literal["sum", "mean"] = "mean"
    """How scores combine over prompts."""
    positions: Positions = "aggregate"
    """``aggregate``: one node per feature (summed over positions); ``from_end``: one node per feature
    and position counted back from the answer position (see the module docstring)."""
    progress: bool = True
    """Show tqdm bars."""
    baseline: AblationKind = "patch"
    """The value a node is scored against (and ablated to): ``patch`` (corrupted prompt), ``mean``
    (dataset mean over counted positions) or ``zero``. Use the ablation the circuit is evaluated with."""

    def __post_init__(self) -> None:
        if self.method not in ("attribution", "ig"):
            raise ValueError(f"method must be 'attribution' or 'ig', got {self.method!r}")
        if self.positions not in ("aggregate", "from_end"):
            raise ValueError(f"positions must be 'aggregate' or 'from_end', got {self.positions!r}")
        if self.baseline not in ABLATIONS:
            raise ValueError(f"baseline must be one of {', '.join(ABLATIONS)}, got {self.baseline!r}")
        if self.ig_steps < 1 or self.batch_size < 1:
            raise ValueError("ig_steps and batch_size must be at least 1")


class NodeScores(NamedTuple):
    """What :func:`score_nodes` returns."""

    features: dict[Site, torch.Tensor]
    """``[n_offsets * d_dict]`` score of every feature node at every site (``n_offsets`` is 1 when
    positions are aggregated; layout in :mod:`circuitgraph.attribution.nodeset`)."""
    errors: dict[Site, torch.Tensor]
    """``[n_offsets]`` score of every site's error node(s)."""
    grads: list[tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]]
    """Per batch: ``dm/d latents`` and ``dm/d errors`` (``[B, P, width]``) used for the scores."""
    runs: DatasetRuns
    """The cached clean / corrupted runs the scores were computed from."""
    metric_clean: float
    metric_corrupt: float
    n_offsets: int = 1
    """Positions per feature: 1 (aggregated) or the padded prompt length (``from_end``)."""
    baseline: AblationKind = "patch"
    """The baseline the scores were computed against."""

    @property
    def resolved(self) -> bool:
        return self.n_offsets > 1

    def d_dicts(self) -> dict[Site, int]:
        """Each site's dictionary width."""
        return {s: v.numel() // self.n_offsets for s, v in self.features.items()}


def by_offset(x: torch.Tensor, offset: torch.Tensor, n_offsets: int) -> torch.Tensor:
    """``[B, P, d]`` summed into ``[n_offsets * d]`` by each position's offset (``n_offsets == 1``:
    summed over every position)."""
    if n_offsets == 1:
        return x.sum((0, 1))
    out = x.new_zeros(n_offsets, x.shape[-1]).index_add_(0, offset.reshape(-1), x.reshape(-1, x.shape[-1]))
    return out.reshape(-1)


def _edit_adding(deltas: dict[Site, torch.Tensor]):
    def edit(site: Site, x: torch.Tensor) -> torch.Tensor:
        return x + deltas[site] if site in deltas else x
    return edit


def _grads_at(rm: ReplacementModel, v: BatchRun, sites: list[Site],
              latents: dict[Site, torch.Tensor] | None = None, errors: dict[Site, torch.Tensor] | None = None):
    """``dm/d latents`` and ``dm/d errors`` at ``sites`` (downstream sites re-encode)."""
    lat_d = {s: torch.zeros_like(v.clean_latents[s], requires_grad=True) for s in sites}
    err_d = {s: torch.zeros_like(v.clean_errors[s], requires_grad=True) for s in sites}
    errs = dict(v.clean_errors)
    errs.update(errors or {})
    spec = SpliceSpec(latents=latents or {}, errors=errs, edit_latents=_edit_adding(lat_d), edit_errors=_edit_adding(err_d))
    with torch.enable_grad():
        m = metric_of(run_batch(rm, v.ds, spec).logits, v.ds).sum()
        g = torch.autograd.grad(m, [*lat_d.values(), *err_d.values()], allow_unused=True)
    g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, [*lat_d.values(), *err_d.values()], strict=True)]
    return dict(zip(sites, g[: len(sites)], strict=True)), dict(zip(sites, g[len(sites) :], strict=True))


def _runs_for(rm: ReplacementModel, data: TaskDataset | DatasetRuns, batch_size: int) -> DatasetRuns:
    return data if isinstance(data, DatasetRuns) else DatasetRuns(rm, data, batch_size)


def score_nodes(rm: ReplacementModel, data: TaskDataset | DatasetRuns,
                cfg: DatasetAttributionConfig | None = None) -> NodeScores:
    """Node scores of every feature and error node (see the module docstring). ``data``: a dataset,
    or its cached runs (:class:`DatasetRuns`, shared with the ablator)."""
    cfg = cfg or DatasetAttributionConfig()
    runs = _runs_for(rm, data, cfg.batch_size)
    if cfg.positions == "from_end":
        runs.check_from_end()
    sites = rm.sites
    n_off = runs.n_positions if cfg.positions == "from_end" else 1
    # attribution at a metric flat at the clean run: one IG step at the midpoint instead
    steps = cfg.ig_steps if cfg.method == "ig" else (1 if flat_at_clean(runs.ds) else 0)
    if cfg.method == "attribution" and steps:
        log.info("metric %s is flat at the clean run: attribution takes each site's gradient halfway between its "
                 "baseline and clean values", runs.ds.metric_name)
    feat = {s: torch.zeros(n_off * rm.dicts[s].cfg.d_dict, dtype=torch.float64) for s in sites}
    errs = {s: torch.zeros(n_off, dtype=torch.float64) for s in sites}
    grads = []
    for v in tqdm(runs.batches, desc=f"node scores ({cfg.method})", disable=not cfg.progress, leave=False):
        base_lat, base_err = runs.baseline(cfg.baseline, v)
        mask = v.mask.unsqueeze(-1)
        if not steps:
            g_lat, g_err = _grads_at(rm, v, sites)
        else:
            g_lat = {s: torch.zeros_like(v.clean_latents[s]) for s in sites}
            g_err = {s: torch.zeros_like(v.clean_errors[s]) for s in sites}
            for s in sites:
                for step in range(steps):
                    alpha = (step + 0.5) / steps
                    lat = base_lat[s] + alpha * (v.clean_latents[s] - base_lat[s])
                    err = base_err[s] + alpha * (v.clean_errors[s] - base_err[s])
                    gl, ge = _grads_at(rm, v, [s], latents={s: lat}, errors={s: err})
                    g_lat[s] += gl[s] / steps
                    g_err[s] += ge[s] / steps
        for s in sites:
            d_lat = (v.clean_latents[s] - base_lat[s]) * mask
            d_err = (v.clean_errors[s] - base_err[s]) * mask
            feat[s] += by_offset(d_lat * g_lat[s], v.offset, n_off).double()
            errs[s] += by_offset((d_err * g_err[s]).sum(-1, keepdim=True), v.offset, n_off).double()
        grads.append((g_lat, g_err))
    # under torchrun each rank scored its shard of the prompts: sum over ranks
    feat = {s: sum_across_ranks(t) for s, t in feat.items()}
    errs = {s: sum_across_ranks(t) for s, t in errs.items()}
    div = runs.n_prompts if cfg.reduce == "mean" else 1
    return NodeScores({s: t / div for s, t in feat.items()}, {s: t / div for s, t in errs.items()}, grads, runs,
                      runs.metric_clean, runs.metric_corrupt, n_off, cfg.baseline)


def score_edges(rm: ReplacementModel, nodes: list[DatasetNode], scores: NodeScores,
                cfg: DatasetAttributionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge scores among ``nodes`` and into the metric, on the runs ``scores`` were computed from.

    Returns ``(edges [T, U], metric_edges [U])``: ``edges[d, u]`` for downstream feature nodes ``d``
    (rows, in ``nodes`` order; error rows are zero, errors have no inputs) and every node ``u``;
    ``metric_edges[u]`` the direct effect of ``u`` on the metric."""
    cfg = cfg or DatasetAttributionConfig()
    runs = scores.runs
    sites = rm.sites
    n = len(nodes)
    edges = torch.zeros(n, n, dtype=torch.float64)
    metric_edges = torch.zeros(n, dtype=torch.float64)
    targets = [i for i, r in enumerate(nodes) if r.feature is not None]
    for bi, v in enumerate(tqdm(runs.batches, desc="edge scores", disable=not cfg.progress, leave=False)):
        g_lat, _ = scores.grads[bi]
        base_lat, base_err = runs.baseline(scores.baseline, v)
        lat_leaf = {s: v.clean_latents[s].clone().requires_grad_(True) for s in sites}
        err_leaf = {s: v.clean_errors[s].clone().requires_grad_(True) for s in sites}
        with torch.enable_grad():
            run = run_batch(rm, v.ds, SpliceSpec(latents=lat_leaf, errors=err_leaf, record_active_values=True))
            metric_row = _midpoint_metric_row(rm, nodes, v, base_lat, base_err, scores.resolved) \
                if flat_at_clean(v.ds) else None
            outs = [] if metric_row is not None else [metric_of(run.logits, v.ds).sum()]
            for i in targets:
                r = nodes[i]
                active = (v.clean_latents[r.site][..., r.feature] > 0).float() * v.mask
                if scores.resolved:
                    active = active * (v.offset == r.offset)
                outs.append((run.sites[r.site].active_value[..., r.feature] * active * g_lat[r.site][..., r.feature]).sum())
            leaves = [*lat_leaf.values(), *err_leaf.values()]
            rows = []
            for out in outs:  # one ordinary backward per target: faster than a vmap'd batched backward here
                g = torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True)
                g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, leaves, strict=True)]
                rows.append(_per_node([gi.unsqueeze(0) for gi in g], nodes, sites, v, base_lat, base_err,
                                      scores.resolved))
        if metric_row is not None:
            rows.insert(0, metric_row)
        block = torch.cat(rows)  # [1 + len(targets), n]
        metric_edges += block[0]
        edges[targets] += block[1:]
    edges, metric_edges = sum_across_ranks(edges), sum_across_ranks(metric_edges)
    div = runs.n_prompts if cfg.reduce == "mean" else 1
    return edges / div, metric_edges / div


def _midpoint_metric_row(rm: ReplacementModel, nodes: list[DatasetNode], v: BatchRun, base_lat: dict[Site, torch.Tensor],
                         base_err: dict[Site, torch.Tensor], resolved: bool) -> torch.Tensor:
    """``[1, n]`` the nodes' direct edges into a metric flat at the clean run: its gradient with every
    leaf halfway between its baseline and clean values, times (clean - baseline)."""
    sites = rm.sites
    mid = [((v.clean_latents[s] + base_lat[s]) / 2).requires_grad_(True) for s in sites]
    mid += [((v.clean_errors[s] + base_err[s]) / 2).requires_grad_(True) for s in sites]
    spec = SpliceSpec(latents=dict(zip(sites, mid[: len(sites)], strict=True)),
                      errors=dict(zip(sites, mid[len(sites):], strict=True)))
    with torch.enable_grad():
        m = metric_of(run_batch(rm, v.ds, spec).logits, v.ds).sum()
        g = torch.autograd.grad(m, mid, allow_unused=True)
    g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, mid, strict=True)]
    return _per_node([gi.unsqueeze(0) for gi in g], nodes, sites, v, base_lat, base_err, resolved)


def _per_node(g: list[torch.Tensor], nodes: list[DatasetNode], sites: list[Site], v: BatchRun,
              base_lat: dict[Site, torch.Tensor], base_err: dict[Site, torch.Tensor], resolved: bool) -> torch.Tensor:
    """``[R, n]``: gradient rows times (clean - baseline) values, summed over prompts and positions
    (one product per site, not one per node: this runs once per edge target)."""
    k = len(sites)
    out = torch.zeros(g[0].shape[0], len(nodes), dtype=torch.float64)
    mask = v.mask.unsqueeze(-1)
    for i, site in enumerate(sites):
        cols = [j for j, r in enumerate(nodes) if r.site == site and r.feature is not None]
        if cols:
            feats = torch.tensor([nodes[j].feature for j in cols])
            delta = (v.clean_latents[site][..., feats] - base_lat[site][..., feats]) * mask  # [B, P, F]
            if resolved:  # each node counts only at its own offset from the answer
                delta = delta * (v.offset.unsqueeze(-1) == torch.tensor([nodes[j].offset for j in cols]))
            out[:, cols] = (g[i][..., feats] * delta).sum((1, 2)).double()
        err_cols = [j for j, r in enumerate(nodes) if r.site == site and r.feature is None]
        if err_cols:
            delta = (v.clean_errors[site] - base_err[site]) * mask
            per_pos = (g[k + i] * delta).sum(-1)  # [R, B, P]
            if resolved:  # each error node counts only at its own offset
                offs = torch.tensor([nodes[j].offset for j in err_cols])
                out[:, err_cols] = (per_pos.unsqueeze(-1) * (v.offset.unsqueeze(-1) == offs)).sum((1, 2)).double()
            else:
                out[:, err_cols] = per_pos.sum((1, 2)).double().unsqueeze(1)
    return out
