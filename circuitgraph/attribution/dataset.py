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

Node scores (the estimated effect of the node on the metric when it goes from corrupted to clean):

    attribution patching:   score(u) = sum_prompts sum_pos (u_clean - u_corr) . dm/du |clean
    integrated gradients:   score(u) = sum_prompts sum_pos (u_clean - u_corr) . mean_alpha dm/du |u = u_corr + alpha (u_clean - u_corr)

(IG interpolates one site at a time, everything downstream recomputed, as Marks et al. do.)

Edge scores between kept nodes u -> d (d downstream of u):

    edge(u, d) = sum_prompts sum_pos_d sum_pos_u  dm/dd . (d d / d u)_direct . (u_clean - u_corr)

where the direct Jacobian holds every other node fixed (all sites are leaves), and dm/dd is the
gradient used for d's node score (averaged over the IG path for ``ig``). The metric node's incoming
edges are the nodes' direct effects on the metric.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from circuitgraph.tasks.dataset import TaskDataset
from circuitgraph.tasks.metrics import gather_answer_logits, task_metric
from dictionaries.distributed import sum_across_ranks, sum_float
from dictionaries.site import Site

log = logging.getLogger(__name__)

Method = Literal["attribution", "ig"]
Positions = Literal["aggregate", "from_end"]


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

    def __post_init__(self) -> None:
        if self.method not in ("attribution", "ig"):
            raise ValueError(f"method must be 'attribution' or 'ig', got {self.method!r}")
        if self.positions not in ("aggregate", "from_end"):
            raise ValueError(f"positions must be 'aggregate' or 'from_end', got {self.positions!r}")
        if self.ig_steps < 1 or self.batch_size < 1:
            raise ValueError("ig_steps and batch_size must be at least 1")


class SiteValues(NamedTuple):
    """Clean and corrupted latents and errors of one batch, ``[B, P, width]`` each, per site."""

    clean_latents: dict[Site, torch.Tensor]
    corr_latents: dict[Site, torch.Tensor]
    clean_errors: dict[Site, torch.Tensor]
    corr_errors: dict[Site, torch.Tensor]
    mask: torch.Tensor
    """``[B, P]`` float: 1 at positions 1..answer_pos (where nodes are counted)."""
    offset: torch.Tensor
    """``[B, P]`` int64: positions counted back from the answer position (0 there; clamped at 0
    after it, where nothing reaches the metric)."""


class NodeScores(NamedTuple):
    """What :func:`score_nodes` returns."""

    features: dict[Site, torch.Tensor]
    """``[n_offsets * d_dict]`` score of every feature node at every site (``n_offsets`` is 1 when
    positions are aggregated)."""
    errors: dict[Site, torch.Tensor]
    """``[n_offsets]`` score of every site's error node(s)."""
    grads: list[tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]]
    """Per batch: ``dm/d latents`` and ``dm/d errors`` (``[B, P, width]``) used for the scores."""
    values: list[SiteValues]
    """Per batch: the clean / corrupted values."""
    metric_clean: float
    metric_corrupt: float
    n_offsets: int = 1
    """Positions per feature: 1 (aggregated) or the padded prompt length (``from_end``)."""


def position_mask(ds: TaskDataset, n_pos: int) -> torch.Tensor:
    """``[n, P]`` 1 at positions 1..answer_pos of each prompt."""
    pos = torch.arange(n_pos)
    return ((pos >= 1) & (pos.unsqueeze(0) <= ds.answer_pos.unsqueeze(1))).float()


def metric_of(logits: torch.Tensor, ds: TaskDataset) -> torch.Tensor:
    """``[B]`` the task metric of each prompt."""
    return task_metric(gather_answer_logits(logits, ds.answer_pos), ds)


def batches(ds: TaskDataset, size: int) -> list[TaskDataset]:
    """``ds`` split into consecutive batches."""
    return [ds.subset(slice(i, i + size)) for i in range(0, len(ds), size)]


def site_values(rm: ReplacementModel, b: TaskDataset) -> SiteValues:
    """Clean and corrupted latents / errors of one batch (two forward passes)."""
    with torch.no_grad():
        clean = rm.run(b.clean_tokens)
        corr = rm.run(b.corrupted_tokens)
    return SiteValues(
        {s: r.latents for s, r in clean.sites.items()}, {s: r.latents for s, r in corr.sites.items()},
        {s: r.errors for s, r in clean.sites.items()}, {s: r.errors for s, r in corr.sites.items()},
        position_mask(b, b.clean_tokens.shape[1]),
        position_offsets(b, b.clean_tokens.shape[1]),
    )


def position_offsets(ds: TaskDataset, n_pos: int) -> torch.Tensor:
    """``[n, P]`` each position counted back from the prompt's answer position (clamped at 0)."""
    return (ds.answer_pos.unsqueeze(1) - torch.arange(n_pos)).clamp(min=0)


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


def _grads_at(rm: ReplacementModel, b: TaskDataset, v: SiteValues, sites: list[Site],
              latents: dict[Site, torch.Tensor] | None = None, errors: dict[Site, torch.Tensor] | None = None):
    """``dm/d latents`` and ``dm/d errors`` at ``sites`` (downstream sites re-encode)."""
    lat_d = {s: torch.zeros_like(v.clean_latents[s], requires_grad=True) for s in sites}
    err_d = {s: torch.zeros_like(v.clean_errors[s], requires_grad=True) for s in sites}
    errs = dict(v.clean_errors)
    errs.update(errors or {})
    spec = SpliceSpec(latents=latents or {}, errors=errs, edit_latents=_edit_adding(lat_d), edit_errors=_edit_adding(err_d))
    with torch.enable_grad():
        m = metric_of(rm.run(b.clean_tokens, spec).logits, b).sum()
        g = torch.autograd.grad(m, [*lat_d.values(), *err_d.values()], allow_unused=True)
    g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, [*lat_d.values(), *err_d.values()], strict=True)]
    return dict(zip(sites, g[: len(sites)], strict=True)), dict(zip(sites, g[len(sites) :], strict=True))


def score_nodes(rm: ReplacementModel, ds: TaskDataset, cfg: DatasetAttributionConfig | None = None) -> NodeScores:
    """Node scores of every feature and error node (see the module docstring)."""
    cfg = cfg or DatasetAttributionConfig()
    if len(ds) == 0:
        raise CircuitGraphError("the prompt dataset is empty")
    sites = rm.sites
    n_off = ds.clean_tokens.shape[1] if cfg.positions == "from_end" else 1
    feat = {s: torch.zeros(n_off * rm.dicts[s].cfg.d_dict, dtype=torch.float64) for s in sites}
    errs = {s: torch.zeros(n_off, dtype=torch.float64) for s in sites}
    grads, values = [], []
    m_clean = m_corr = 0.0
    parts = batches(ds, cfg.batch_size)
    for b in tqdm(parts, desc=f"node scores ({cfg.method})", disable=not cfg.progress, leave=False):
        v = site_values(rm, b)
        with torch.no_grad():
            m_clean += float(metric_of(rm.run(b.clean_tokens).logits, b).sum())
            m_corr += float(metric_of(rm.run(b.corrupted_tokens).logits, b).sum())
        mask = v.mask.unsqueeze(-1)
        if cfg.method == "attribution":
            g_lat, g_err = _grads_at(rm, b, v, sites)
        else:
            g_lat = {s: torch.zeros_like(v.clean_latents[s]) for s in sites}
            g_err = {s: torch.zeros_like(v.clean_errors[s]) for s in sites}
            for s in sites:
                for step in range(cfg.ig_steps):
                    alpha = (step + 0.5) / cfg.ig_steps
                    lat = v.corr_latents[s] + alpha * (v.clean_latents[s] - v.corr_latents[s])
                    err = v.corr_errors[s] + alpha * (v.clean_errors[s] - v.corr_errors[s])
                    gl, ge = _grads_at(rm, b, v, [s], latents={s: lat}, errors={s: err})
                    g_lat[s] += gl[s] / cfg.ig_steps
                    g_err[s] += ge[s] / cfg.ig_steps
        for s in sites:
            d_lat = (v.clean_latents[s] - v.corr_latents[s]) * mask
            d_err = (v.clean_errors[s] - v.corr_errors[s]) * mask
            feat[s] += by_offset(d_lat * g_lat[s], v.offset, n_off).double()
            errs[s] += by_offset((d_err * g_err[s]).sum(-1, keepdim=True), v.offset, n_off).double()
        grads.append((g_lat, g_err))
        values.append(v)
    # under torchrun each rank scored its shard of the prompts: sum over ranks
    n_total = sum_float(float(len(ds)))
    feat = {s: sum_across_ranks(t) for s, t in feat.items()}
    errs = {s: sum_across_ranks(t) for s, t in errs.items()}
    m_clean, m_corr = sum_float(m_clean), sum_float(m_corr)
    div = n_total if cfg.reduce == "mean" else 1
    return NodeScores({s: t / div for s, t in feat.items()}, {s: t / div for s, t in errs.items()}, grads, values,
                      m_clean / n_total, m_corr / n_total, n_off)


class NodeRef(NamedTuple):
    """A dataset node: ``index`` is the feature's flat index (``offset * d_dict + feature``; the
    feature itself when positions are aggregated), or ``None`` for an error node, whose offset from
    the answer position is ``error_offset`` (0 when positions are aggregated)."""

    site: Site
    index: int | None
    error_offset: int = 0


def score_edges(rm: ReplacementModel, ds: TaskDataset, nodes: list[NodeRef], scores: NodeScores,
                cfg: DatasetAttributionConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge scores among ``nodes`` and into the metric.

    Returns ``(edges [T, U], metric_edges [U])``: ``edges[d, u]`` for downstream feature nodes ``d``
    (rows, in ``nodes`` order; error rows are zero, errors have no inputs) and every node ``u``;
    ``metric_edges[u]`` the direct effect of ``u`` on the metric."""
    cfg = cfg or DatasetAttributionConfig()
    sites = rm.sites
    n = len(nodes)
    edges = torch.zeros(n, n, dtype=torch.float64)
    metric_edges = torch.zeros(n, dtype=torch.float64)
    targets = [i for i, r in enumerate(nodes) if r.index is not None]
    parts = batches(ds, cfg.batch_size)
    for bi, b in enumerate(tqdm(parts, desc="edge scores", disable=not cfg.progress, leave=False)):
        v = scores.values[bi]
        g_lat, _ = scores.grads[bi]
        lat_leaf = {s: v.clean_latents[s].clone().requires_grad_(True) for s in sites}
        err_leaf = {s: v.clean_errors[s].clone().requires_grad_(True) for s in sites}
        with torch.enable_grad():
            run = rm.run(b.clean_tokens, SpliceSpec(latents=lat_leaf, errors=err_leaf, record_active_values=True))
            m = metric_of(run.logits, b).sum()
            outs = [m]
            for i in targets:
                r = nodes[i]
                off, f = divmod(r.index, rm.dicts[r.site].cfg.d_dict)
                active = (v.clean_latents[r.site][..., f] > 0).float() * v.mask
                if scores.n_offsets > 1:
                    active = active * (v.offset == off)
                outs.append((run.sites[r.site].active_value[..., f] * active * g_lat[r.site][..., f]).sum())
            leaves = [*lat_leaf.values(), *err_leaf.values()]
            rows = []
            for out in outs:  # one ordinary backward per target: faster than a vmap'd batched backward here
                g = torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True)
                g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, leaves, strict=True)]
                rows.append(_per_node([gi.unsqueeze(0) for gi in g], nodes, sites, v, scores.n_offsets))
        block = torch.cat(rows)  # [1 + len(targets), n]
        metric_edges += block[0]
        edges[targets] += block[1:]
    edges, metric_edges = sum_across_ranks(edges), sum_across_ranks(metric_edges)
    div = sum_float(float(len(ds))) if cfg.reduce == "mean" else 1
    return edges / div, metric_edges / div


def _per_node(g: list[torch.Tensor], nodes: list[NodeRef], sites: list[Site], v: SiteValues,
              n_offsets: int = 1) -> torch.Tensor:
    """``[R, n]``: gradient rows times (clean - corrupted) values, summed over prompts and positions
    (one product per site, not one per node: this runs once per edge target)."""
    k = len(sites)
    out = torch.zeros(g[0].shape[0], len(nodes), dtype=torch.float64)
    mask = v.mask.unsqueeze(-1)
    for i, site in enumerate(sites):
        cols = [j for j, r in enumerate(nodes) if r.site == site and r.index is not None]
        if cols:
            d_dict = v.clean_latents[site].shape[-1]
            flat = torch.tensor([nodes[j].index for j in cols])
            feats = flat % d_dict
            delta = (v.clean_latents[site][..., feats] - v.corr_latents[site][..., feats]) * mask  # [B, P, F]
            if n_offsets > 1:  # each node counts only at its own offset from the answer
                delta = delta * (v.offset.unsqueeze(-1) == torch.div(flat, d_dict, rounding_mode="floor"))
            out[:, cols] = (g[i][..., feats] * delta).sum((1, 2)).double()
        err_cols = [j for j, r in enumerate(nodes) if r.site == site and r.index is None]
        if err_cols:
            delta = (v.clean_errors[site] - v.corr_errors[site]) * mask
            per_pos = (g[k + i] * delta).sum(-1)  # [R, B, P]
            if n_offsets > 1:  # each error node counts only at its own offset
                offs = torch.tensor([nodes[j].error_offset for j in err_cols])
                out[:, err_cols] = (per_pos.unsqueeze(-1) * (v.offset.unsqueeze(-1) == offs)).sum((1, 2)).double()
            else:
                out[:, err_cols] = per_pos.sum((1, 2)).double().unsqueeze(1)
    return out
