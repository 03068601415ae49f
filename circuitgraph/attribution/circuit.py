"""From node scores to a dataset circuit graph: select nodes, score edges, measure by ablation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.ablation import AblationKind, Ablator, CircuitScores, NodeSet, circuit_scores
from circuitgraph.attribution.acdc import acdc_nodes
from circuitgraph.attribution.dataset import (
    DatasetAttributionConfig,
    NodeRef,
    NodeScores,
    Positions,
    by_offset,
    score_edges,
    score_nodes,
)
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement.model import ReplacementModel, site_depth
from circuitgraph.tasks.dataset import TaskDataset
from dictionaries.distributed import sum_across_ranks, world

TraceMethod = Literal["attribution", "ig", "acdc"]


@dataclass
class CircuitConfig:
    """Options of :func:`trace_dataset`."""

    method: TraceMethod = "attribution"
    """``attribution`` (attribution patching), ``ig`` (integrated gradients) or ``acdc``."""
    max_feature_nodes: int = 200
    """Most feature nodes in the circuit (highest ``|score|`` first)."""
    ablation: AblationKind = "patch"
    """How nodes outside the circuit are ablated when measuring it (and tested in ACDC)."""
    ig_steps: int = 8
    """Interpolation steps for ``ig``."""
    tau: float = 0.002
    """ACDC threshold, as a fraction of ``|m(full) - m(empty)|``."""
    batch_size: int = 32
    """Prompts per forward pass."""
    progress: bool = True
    """Show tqdm bars."""
    target_faithfulness: float = 0.0
    """If > 0 (attribution, ig): the circuit is the smallest top-score set reaching this
    faithfulness (searched up to ``max_feature_nodes``) instead of exactly ``max_feature_nodes``."""
    positions: Positions = "aggregate"
    """``aggregate``: a feature is one node at every position; ``from_end``: a feature at each
    position counted back from the answer position is its own node (ids ``...#f@-1`` for the
    answer position, ``@-2`` before it, ...), ablated only there."""

    def __post_init__(self) -> None:
        if self.target_faithfulness and self.method == "acdc":
            raise ValueError("target_faithfulness applies to attribution and ig; ACDC sets its size with tau")
        if self.positions not in ("aggregate", "from_end"):
            raise ValueError(f"positions must be 'aggregate' or 'from_end', got {self.positions!r}")
        if self.method not in ("attribution", "ig", "acdc"):
            raise ValueError(f"method must be attribution, ig or acdc, got {self.method!r}")
        if self.max_feature_nodes < 1:
            raise ValueError("max_feature_nodes must be at least 1")


class TraceResult(NamedTuple):
    """What :func:`trace_dataset` returns."""

    graph: Graph
    scores: CircuitScores
    forward_passes: int
    seconds: float


def select_top(scores: NodeScores, max_features: int) -> NodeSet:
    """The ``max_features`` features with the largest ``|score|`` (non-zero), and every error node
    scoring at least as high as the last feature chosen."""
    flat = torch.cat([v.abs() for v in scores.features.values()])
    k = min(max_features, int((flat > 0).sum()))
    thr = float(flat.topk(k).values[-1]) if k else float("inf")
    feats = {s: (v.abs() >= thr) & (v != 0) for s, v in scores.features.items()}
    errs = {s: v.abs() >= thr for s, v in scores.errors.items()}
    return NodeSet(feats, errs)


class SmallestCircuit(NamedTuple):
    """What :func:`smallest_circuit` returns."""

    circuit: NodeSet
    """The smallest top-score circuit found that reaches the target (the largest tried if none does)."""
    faithfulness: float
    reached: bool
    """Whether ``faithfulness >= target``."""
    tried: dict[int, float]
    """Faithfulness of every feature budget evaluated."""


def smallest_circuit(ablator: Ablator, scores: NodeScores, target: float = 0.8, max_features: int = 4096,
                     progress: bool = False) -> SmallestCircuit:
    """The fewest top-``|score|`` features (errors included as in :func:`select_top`) whose circuit
    has faithfulness >= ``target``: budgets double from 1 until one reaches it, then bisection.

    Each evaluation is one ablation run over the dataset; faithfulness need not be monotone in the
    budget, so the answer is the smallest budget found by this search, not a guaranteed minimum."""
    full, empty = ablator.metric(NodeSet.empty(ablator.rm)), ablator.metric(NodeSet.full(ablator.rm))
    if abs(full - empty) < 1e-9:
        raise CircuitGraphError("the metric does not change when every node is ablated; faithfulness is undefined")
    n_scored = int(sum(int((v != 0).sum()) for v in scores.features.values()))
    cap = max(1, min(max_features, n_scored))
    tried: dict[int, float] = {}
    bar = tqdm(desc="smallest circuit", disable=not progress)

    def faith(n: int) -> float:
        if n not in tried:
            tried[n] = (ablator.metric(select_top(scores, n).complement(ablator.rm)) - empty) / (full - empty)
            bar.update(1)
        return tried[n]

    lo, hi = 0, 1
    while faith(hi) < target and hi < cap:
        lo, hi = hi, min(2 * hi, cap)
    if faith(hi) >= target:
        while hi - lo > max(1, lo // 32):  # bisect to ~3% of the budget
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if faith(mid) >= target else (mid, hi)
    bar.close()
    return SmallestCircuit(select_top(scores, hi), tried[hi], tried[hi] >= target, dict(sorted(tried.items())))


def node_refs(rm: ReplacementModel, circuit: NodeSet) -> list[NodeRef]:
    """Circuit nodes in forward order (per site: features, then the error)."""
    refs: list[NodeRef] = []
    for s in rm.sites:
        refs += [NodeRef(s, int(i)) for i in circuit.features[s].nonzero().squeeze(1).tolist()]
        refs += [NodeRef(s, None, int(o)) for o in circuit.errors[s].nonzero().squeeze(1).tolist()]
    return refs


def build_graph(rm: ReplacementModel, ds: TaskDataset, circuit: NodeSet, scores: NodeScores,
                cfg: DatasetAttributionConfig, metric_name: str) -> Graph:
    """The circuit as a :class:`Graph`: its nodes, their edges among each other and into the metric."""
    refs = node_refs(rm, circuit)
    edges, metric_edges = score_edges(rm, ds, refs, scores, cfg)
    nodes: list[Node] = []
    act, node_scores = [], []
    mean_act = _mean_activations(rm, scores)
    for r in refs:
        offset, feature = divmod(r.index, rm.dicts[r.site].cfg.d_dict) if r.index is not None else (r.error_offset, None)
        pos = -(offset + 1) if scores.n_offsets > 1 else None  # -1: the answer position
        nodes.append(Node("error" if r.index is None else "feature", site_depth(r.site), r.site.id, feature, pos))
        node_scores.append(float(scores.errors[r.site][r.error_offset] if r.index is None else scores.features[r.site][r.index]))
        act.append(float(mean_act[r.site][r.index]) if r.index is not None else 0.0)
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


def _mean_activations(rm: ReplacementModel, scores: NodeScores) -> dict:
    """Mean clean activation of every feature node over the counted positions (per offset)."""
    n_off = scores.n_offsets
    total = {s: torch.zeros(n_off * rm.dicts[s].cfg.d_dict) for s in rm.sites}
    count = torch.zeros(n_off)
    for v in scores.values:
        m = v.mask.unsqueeze(-1)
        count += by_offset(m, v.offset, n_off)
        for s in rm.sites:
            total[s] += by_offset(v.clean_latents[s] * m, v.offset, n_off)
    count = sum_across_ranks(count).clamp(min=1.0)
    return {s: (sum_across_ranks(t).view(n_off, -1) / count.unsqueeze(1)).reshape(-1) for s, t in total.items()}


def trace_dataset(rm: ReplacementModel, ds: TaskDataset, cfg: CircuitConfig | None = None) -> TraceResult:
    """Score nodes, choose the circuit (top scores, or ACDC), score its edges, measure it by ablation."""
    cfg = cfg or CircuitConfig()
    start = time.perf_counter()
    rank, size = world()
    full_ds = ds
    if size > 1:  # under torchrun: every rank takes prompts rank, rank + world, ...; sums are reduced
        ds = ds.subset(torch.arange(rank, len(ds), size))
    passes0 = rm.forward_passes
    acfg = DatasetAttributionConfig("ig" if cfg.method == "ig" else "attribution", cfg.ig_steps, cfg.batch_size,
                                    positions=cfg.positions, progress=cfg.progress)
    scores = score_nodes(rm, ds, acfg)
    ablator = Ablator(rm, ds, cfg.ablation, cfg.batch_size)
    extra: dict = {}
    if cfg.method == "acdc":
        res = acdc_nodes(ablator, scores, cfg.tau, cfg.max_feature_nodes, progress=cfg.progress)
        circuit = res.circuit
        extra = {"acdc_tested": res.tested, "acdc_skipped": res.skipped, "acdc_kept_untested": res.kept_untested,
                 "plain_acdc_forward_passes": res.plain_forward_passes, "acdc_forward_passes": res.forward_passes}
    elif cfg.target_faithfulness > 0:
        found = smallest_circuit(ablator, scores, cfg.target_faithfulness, cfg.max_feature_nodes, cfg.progress)
        circuit = found.circuit
        extra = {"target_faithfulness": cfg.target_faithfulness, "budgets_tried": {str(k): v for k, v in found.tried.items()}}
    else:
        circuit = select_top(scores, cfg.max_feature_nodes)
    cs = circuit_scores(ablator, circuit)
    graph = build_graph(rm, ds, circuit, scores, acfg, ds.metric_kind)
    seconds = time.perf_counter() - start
    passes = rm.forward_passes - passes0
    graph.metadata.update({
        "method": cfg.method, "task": ds.name, "n_prompts": len(full_ds), "prompts": full_ds.prompts[:16],
        "world_size": size,
        "sites": [s.id for s in rm.sites], "ablation": cfg.ablation, "max_feature_nodes": cfg.max_feature_nodes,
        "positions": cfg.positions,
        "n_feature_nodes": circuit.n_features(), "n_error_nodes": circuit.n_errors(),
        "faithfulness": cs.faithfulness, "completeness": cs.completeness, "metric_full": cs.metric_full,
        "metric_empty": cs.metric_empty, "metric_circuit": cs.metric_circuit,
        "metric_without_circuit": cs.metric_without_circuit, "forward_passes": passes, "seconds": seconds, **extra,
    })
    return TraceResult(graph, cs, passes, seconds)
