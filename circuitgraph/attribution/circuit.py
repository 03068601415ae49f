"""From node scores to a dataset circuit graph: select nodes, score edges, evaluate on held-out prompts.

Feature nodes and error nodes are both nodes: they compete for one node budget by ``|score|``
(``max_nodes``), with ``max_feature_nodes`` as an optional extra cap on features. A circuit is
selected on one prompt set and, when an evaluation set is given, evaluated on it (prompts not
used to select it); both evaluations are kept, the held-out one is the headline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.ablation import AblationKind, Ablator, CircuitEvaluation, evaluate_circuit
from circuitgraph.attribution.acdc import AcdcConfig, acdc_nodes
from circuitgraph.attribution.dataset import (
    DatasetAttributionConfig,
    NodeScores,
    Positions,
    by_offset,
    score_edges,
    score_nodes,
)
from circuitgraph.attribution.nodeset import DatasetNode, KeptNodes
from circuitgraph.attribution.runs import ABLATIONS, DatasetRuns
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement.model import ReplacementModel, site_depth
from circuitgraph.tasks.dataset import Metric, TaskDataset
from dictionaries.distributed import sum_across_ranks, world

log = logging.getLogger(__name__)

TraceMethod = Literal["attribution", "ig", "acdc"]
TargetKind = Literal["faithfulness", "faithfulness_features_only"]


@dataclass
class CircuitConfig:
    """Options of :func:`trace_dataset`."""

    FLAT_PREFIX: ClassVar[dict[str, str]] = {"acdc": "acdc_"}
    """Flat setting / CLI flag names of the nested ACDC settings: ``acdc_tau``, ``--acdc-tau``, ..."""

    method: TraceMethod = "attribution"
    """``attribution`` (attribution patching), ``ig`` (integrated gradients) or ``acdc``."""
    max_nodes: int = 200
    """Most nodes in the circuit, feature and error nodes counted alike (highest ``|score|`` first)."""
    max_feature_nodes: int | None = None
    """An extra cap on feature nodes alone (``None``: only ``max_nodes`` applies)."""
    ablation: AblationKind = "patch"
    """How nodes outside the circuit are ablated (and what node scores are computed against)."""
    ig_steps: int = 8
    """Interpolation steps for ``ig``."""
    batch_size: int = 32
    """Prompts per forward pass."""
    progress: bool = True
    """Show tqdm bars."""
    target_faithfulness: float = 0.0
    """If > 0 (attribution, ig): the circuit is the smallest top-score set reaching this value of
    ``target_kind`` on the selection prompts (searched up to ``max_nodes``)."""
    target_kind: TargetKind = "faithfulness"
    """Which faithfulness ``target_faithfulness`` refers to (``faithfulness_features_only``: error
    nodes ablated)."""
    positions: Positions = "aggregate"
    """``aggregate``: a feature is one node at every position; ``from_end``: a feature at each
    position counted back from the answer position is its own node (ids ``...#f@-1`` for the
    answer position, ``@-2`` before it, ...), ablated only there."""
    acdc: AcdcConfig = field(default_factory=AcdcConfig)
    """ACDC settings (``method="acdc"``)."""

    def __post_init__(self) -> None:
        if self.method not in ("attribution", "ig", "acdc"):
            raise ValueError(f"method must be attribution, ig or acdc, got {self.method!r}")
        if self.target_faithfulness and self.method == "acdc":
            raise ValueError("target_faithfulness applies to attribution and ig; ACDC sets its size with tau")
        if not 0 <= self.target_faithfulness <= 1:  # NaN fails this too
            raise ValueError(f"target_faithfulness is a fraction of the full model's metric: use a value in (0, 1] "
                             f"(0: no target, the top max_nodes nodes), got {self.target_faithfulness}")
        if self.target_kind not in ("faithfulness", "faithfulness_features_only"):
            raise ValueError(f"target_kind must be faithfulness or faithfulness_features_only, got {self.target_kind!r}")
        if self.positions not in ("aggregate", "from_end"):
            raise ValueError(f"positions must be 'aggregate' or 'from_end', got {self.positions!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.max_nodes < 1:
            raise ValueError("max_nodes must be at least 1")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise ValueError("max_feature_nodes must be >= 0 (or None for no extra cap)")
        if self.ig_steps < 1 or self.batch_size < 1:
            raise ValueError("ig_steps and batch_size must be at least 1")


class TraceResult(NamedTuple):
    """What :func:`trace_dataset` returns."""

    graph: Graph
    evaluation: CircuitEvaluation
    """On the held-out prompts when an evaluation set was given, else on the selection prompts."""
    selection: CircuitEvaluation
    """On the prompts the circuit was selected on."""
    held_out: bool
    forward_passes: int
    seconds: float


def select_top(scores: NodeScores, max_nodes: int, max_feature_nodes: int | None = None) -> KeptNodes:
    """The ``max_nodes`` nodes with the largest non-zero ``|score|``, feature and error nodes
    competing alike, at most ``max_feature_nodes`` of them features. Ties: features before errors,
    sites in forward order, lower index first."""
    sites = list(scores.features)
    vals = torch.cat([scores.features[s].abs() for s in sites] + [scores.errors[s].abs() for s in sites])
    n_feat = sum(scores.features[s].numel() for s in sites)
    is_feat = torch.arange(vals.numel()) < n_feat
    order = torch.sort(-vals, stable=True).indices
    order = order[vals[order] > 0]
    if max_feature_nodes is not None:
        feat_rank = torch.cumsum(is_feat[order].long(), 0)
        order = order[~is_feat[order] | (feat_rank <= max_feature_nodes)]
    chosen = torch.zeros(vals.numel(), dtype=torch.bool)
    chosen[order[:max_nodes]] = True
    out = KeptNodes({}, {}, scores.resolved)
    start = 0
    for s in sites:
        n = scores.features[s].numel()
        out.features[s] = chosen[start : start + n].clone()
        start += n
    for s in sites:
        n = scores.errors[s].numel()
        out.errors[s] = chosen[start : start + n].clone()
        start += n
    return out


class SmallestCircuit(NamedTuple):
    """What :func:`smallest_circuit` returns."""

    circuit: KeptNodes
    """The smallest top-score circuit found that reaches the target (the largest tried if none does)."""
    value: float
    """Its value of the target quantity."""
    reached: bool
    tried: dict[int, float]
    """The target quantity at every node budget evaluated."""


def smallest_circuit(ablator: Ablator, scores: NodeScores, target: float = 0.8, max_nodes: int = 4096,
                     kind: TargetKind = "faithfulness", max_feature_nodes: int | None = None,
                     progress: bool = False) -> SmallestCircuit:
    """The fewest top-``|score|`` nodes (errors counted, as in :func:`select_top`) whose circuit
    reaches ``target`` (``kind``: faithfulness, or faithfulness with every error node ablated):
    budgets double from 1 until one reaches it, then bisection to ~3% of the budget.

    Each evaluation is one ablation run over the ablator's prompts; faithfulness need not be
    monotone in the budget, so the answer is the smallest budget this search found, not a
    guaranteed minimum."""
    from circuitgraph.attribution.ablation import faithfulness_ratio

    full, empty = ablator.full(), ablator.empty()
    n_scored = int(sum(int((v != 0).sum()) for v in (*scores.features.values(), *scores.errors.values())))
    cap = max(1, min(max_nodes, n_scored))
    tried: dict[int, float] = {}
    bar = tqdm(desc="smallest circuit", disable=not progress)

    def value(n: int) -> float:
        if n not in tried:
            c = select_top(scores, n, max_feature_nodes)
            tried[n] = faithfulness_ratio(ablator.metric(c.without_errors() if kind != "faithfulness" else c),
                                          full, empty)
            bar.update(1)
        return tried[n]

    lo, hi = 0, 1
    while value(hi) < target and hi < cap:
        lo, hi = hi, min(2 * hi, cap)
    if value(hi) >= target:
        while hi - lo > max(1, lo // 32):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if value(mid) >= target else (mid, hi)
    bar.close()
    return SmallestCircuit(select_top(scores, hi, max_feature_nodes), tried[hi], tried[hi] >= target,
                           dict(sorted(tried.items())))


def build_graph(rm: ReplacementModel, circuit: KeptNodes, scores: NodeScores, cfg: DatasetAttributionConfig,
                metric_name: str) -> Graph:
    """The circuit as a :class:`Graph`: its nodes, their edges among each other and into the metric."""
    refs = _forward_order(circuit.nodes())
    edges, metric_edges = score_edges(rm, refs, scores, cfg)
    nodes: list[Node] = []
    act, node_scores = [], []
    mean_act = _mean_activations(rm, scores)
    d_dicts = scores.d_dicts()
    for r in refs:
        pos = -(r.offset + 1) if scores.resolved else None  # -1: the answer position
        nodes.append(Node("error" if r.is_error else "feature", site_depth(r.site), r.site.id, r.feature, pos))
        if r.is_error:
            node_scores.append(float(scores.errors[r.site][r.offset]))
            act.append(0.0)
        else:
            node_scores.append(float(scores.features[r.site][r.flat(d_dicts[r.site])]))
            act.append(float(mean_act[r.site][r.flat(d_dicts[r.site])]))
    nodes.append(Node("metric", float(rm.model.cfg.n_layers), name=metric_name))
    node_scores.append(scores.metric_clean - scores.metric_corrupt)
    act.append(scores.metric_clean)
    n = len(refs)
    tgt, src = edges.nonzero(as_tuple=True)
    m_src = metric_edges.nonzero().squeeze(1)
    sources = torch.cat([src, m_src])
    targets = torch.cat([tgt, torch.full((m_src.numel(),), n)])
    weights = torch.cat([edges[tgt, src], metric_edges[m_src]]).float()
    tw = torch.zeros(n + 1)
    tw[n] = 1.0
    return Graph(nodes=nodes, activation=torch.tensor(act), sources=sources, targets=targets, weights=weights,
                 target_weights=tw, labels=[""] * n + [metric_name], node_scores=torch.tensor(node_scores))


def _forward_order(nodes: list[DatasetNode]) -> list[DatasetNode]:
    """Per site in forward order: features (by flat index), then the error node(s)."""
    return sorted(nodes, key=lambda r: (site_depth(r.site), r.is_error, r.offset, r.feature or 0))


def _mean_activations(rm: ReplacementModel, scores: NodeScores) -> dict:
    """Mean clean activation of every feature node over the counted positions (per offset)."""
    n_off = scores.n_offsets
    total = {s: torch.zeros(n_off * rm.dicts[s].cfg.d_dict) for s in rm.sites}
    count = torch.zeros(n_off)
    for v in scores.runs.batches:
        m = v.mask.unsqueeze(-1)
        count += by_offset(m, v.offset, n_off)
        for s in rm.sites:
            total[s] += by_offset(v.clean_latents[s] * m, v.offset, n_off)
    count = sum_across_ranks(count).clamp(min=1.0)
    return {s: (sum_across_ranks(t).view(n_off, -1) / count.unsqueeze(1)).reshape(-1) for s, t in total.items()}


def _shard(ds: TaskDataset) -> TaskDataset:
    rank, size = world()
    return ds.subset(torch.arange(rank, len(ds), size)) if size > 1 else ds


def trace_dataset(rm: ReplacementModel, ds: TaskDataset, cfg: CircuitConfig | None = None,
                  eval_ds: TaskDataset | None = None, metric: Metric | None = None) -> TraceResult:
    """Score nodes on ``ds``, choose the circuit (top scores, smallest faithful, or ACDC), score its
    edges, and evaluate it on ``eval_ds`` (held out; prompts disjoint from ``ds``) and on ``ds``.
    ``metric``: a metric name or a callable ``fn(logits [n, seq, vocab], batch) -> [n]`` used instead
    of the datasets' own (:mod:`circuitgraph.tasks.metrics`)."""
    cfg = cfg or CircuitConfig()
    start = time.perf_counter()
    if metric is not None:
        ds = ds.with_metric(metric)
        eval_ds = None if eval_ds is None else eval_ds.with_metric(metric)
    full_ds = ds
    ds = _shard(ds)  # under torchrun: every rank takes prompts rank, rank + world, ...; sums are reduced
    if eval_ds is not None:
        overlap = set(full_ds.prompts) & set(eval_ds.prompts)
        if overlap:
            raise CircuitGraphError(f"{len(overlap)} evaluation prompts also select the circuit (e.g. "
                                    f"{next(iter(overlap))!r}); held-out prompts must be disjoint")
    passes0 = rm.forward_passes
    acfg = DatasetAttributionConfig("ig" if cfg.method == "ig" else "attribution", cfg.ig_steps, cfg.batch_size,
                                    positions=cfg.positions, progress=cfg.progress, baseline=cfg.ablation)
    runs = DatasetRuns(rm, ds, cfg.batch_size)
    scores = score_nodes(rm, runs, acfg)
    ablator = Ablator(rm, runs, cfg.ablation)
    extra: dict = {}
    if cfg.method == "acdc":
        res = acdc_nodes(ablator, scores, cfg.acdc, progress=cfg.progress)
        circuit = res.circuit
        s = res.search
        extra = {"acdc_tau": cfg.acdc.tau, "acdc_candidates": s.n_candidates, "acdc_no_op": s.n_no_op,
                 "acdc_low_group": s.n_low, "acdc_rescued": s.n_rescued, "acdc_tested": s.n_tested,
                 "acdc_kept_untested": s.n_kept_untested, "acdc_evaluations": s.evaluations,
                 "acdc_forward_passes": res.forward_passes, "acdc_suspicious": res.suspicious,
                 "acdc_nodes_found": circuit.n_nodes()}
        if circuit.n_nodes() > cfg.max_nodes or (cfg.max_feature_nodes is not None
                                                 and circuit.n_features() > cfg.max_feature_nodes):
            log.warning("ACDC kept %d nodes, more than the budget; the top %d by |score| are returned and "
                        "evaluated (that set was not tested by ACDC)", circuit.n_nodes(), cfg.max_nodes)
            circuit = _cap(scores, circuit, cfg.max_nodes, cfg.max_feature_nodes)
            extra["acdc_capped"] = True
    elif cfg.target_faithfulness > 0:
        found = smallest_circuit(ablator, scores, cfg.target_faithfulness, cfg.max_nodes, cfg.target_kind,
                                 cfg.max_feature_nodes, cfg.progress)
        circuit = found.circuit
        extra = {"target_faithfulness": cfg.target_faithfulness, "target_kind": cfg.target_kind,
                 "target_reached": found.reached, "budgets_tried": {str(k): v for k, v in found.tried.items()}}
    else:
        circuit = select_top(scores, cfg.max_nodes, cfg.max_feature_nodes)
    selection = evaluate_circuit(ablator, circuit)
    held_out = eval_ds is not None
    evaluation = evaluate_circuit(Ablator(rm, DatasetRuns(rm, _shard(eval_ds), cfg.batch_size), cfg.ablation),
                                  circuit) if held_out else selection
    graph = build_graph(rm, circuit, scores, acfg, ds.metric_name)
    seconds = time.perf_counter() - start
    passes = rm.forward_passes - passes0
    graph.metadata.update({
        "method": cfg.method, "task": ds.name, "metric": ds.metric_name, "n_prompts": len(full_ds),
        "prompts": full_ds.prompts[:16],
        "world_size": world()[1], "sites": [s.id for s in rm.sites], "ablation": cfg.ablation,
        "max_nodes": cfg.max_nodes, "max_feature_nodes": cfg.max_feature_nodes, "positions": cfg.positions,
        **circuit_summary(evaluation, selection, held_out),
        "eval_prompts": eval_ds.prompts[:16] if held_out else [],
        "forward_passes": passes, "seconds": seconds, **extra,
    })
    return TraceResult(graph, evaluation, selection, held_out, passes, seconds)


def circuit_summary(evaluation: CircuitEvaluation, selection: CircuitEvaluation, held_out: bool) -> dict:
    """The honest numbers of a circuit as flat keys: the headline evaluation (held out when
    ``held_out``), then the same numbers on the selection prompts under ``selection_*``."""
    out = {"held_out": held_out, **evaluation.to_dict(), "eval_n_prompts": evaluation.n_prompts}
    del out["n_prompts"]  # the metadata's n_prompts is the selection set's size
    out.update({f"selection_{k}": v for k, v in selection.to_dict().items()
                if k not in ("n_feature_nodes", "n_error_nodes", "n_nodes", "ablation", "n_prompts")})
    return out


def _cap(scores: NodeScores, circuit: KeptNodes, max_nodes: int, max_feature_nodes: int | None) -> KeptNodes:
    """The top-score nodes of ``circuit`` within the budget."""
    masked = NodeScores({s: v * circuit.features[s] for s, v in scores.features.items()},
                        {s: v * circuit.errors[s] for s, v in scores.errors.items()}, scores.grads, scores.runs,
                        scores.metric_clean, scores.metric_corrupt, scores.n_offsets, scores.baseline)
    return select_top(masked, max_nodes, max_feature_nodes)
