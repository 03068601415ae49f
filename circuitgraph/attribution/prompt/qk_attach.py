"""Why a prompt graph's attention edges exist: head loadings and QK pairs attached to it (``trace --qk``).

Two things are attached, under ``graph.metadata["qk"]`` (JSON, so the pruned graph, its unpruned
``full/`` child, the viewer and ``query`` all read them):

* **head loadings** of every edge of the (pruned) graph that ends in an attention feature
  (``attn_z``): the edge split into the parts carried by each head of the feature's layer
  (:mod:`circuitgraph.attribution.head_loadings`); the parts sum to the edge. Where attention is not
  spliced (transcoder-only dictionaries) a cross-position edge can cross several heads of several
  layers, and no loading is defined: such graphs get QK pairs of no edge and an empty table.
* **QK pairs** of the ``edges`` strongest cross-position edges among them: the head carrying most
  of the edge, and that head's pre-softmax score from the target's position (query) to the
  source's position (key) split into (query source, key source) terms
  (:mod:`circuitgraph.attribution.qk`): *why* the head read that position.

Loadings are computed for the pruned graph's edges only (the graph one reads): one frozen forward
per attention layer and ``n_heads`` backward rows per attention-feature target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from circuitgraph.attribution.head_loadings import head_loadings_batch
from circuitgraph.attribution.prompt.bos import clean_run
from circuitgraph.attribution.qk import QKContext
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.model import ReplacementModel
from dictionaries.site import Site

log = logging.getLogger(__name__)


@dataclass
class QKAttachConfig:
    """What ``trace --qk`` attaches (flags ``--qk-edges``, ``--qk-top-k``)."""

    edges: int = 10
    """Strongest cross-position edges into attention features whose carrying head's score is split
    into QK pairs."""
    top_k: int = 10
    """QK pairs kept per explained edge (the largest by absolute value)."""

    def __post_init__(self) -> None:
        if self.edges < 0 or self.top_k < 1:
            raise ValueError(f"qk edges must be >= 0 and qk top_k >= 1, got {self.edges} and {self.top_k}")


def require_attention_sites(rm: ReplacementModel) -> None:
    """A clear error when no ``attn_z`` site is spliced: there is no edge a loading could split."""
    if not any(s.kind == "attn_z" for s in rm.sites):
        raise CircuitGraphError("head loadings and QK pairs explain edges into attention features, and no attn_z "
                                f"site is spliced (sites: {', '.join(s.id for s in rm.sites)}); splice attention-z "
                                "dictionaries (e.g. --sites attn_z,transcoder), or use `circuitgraph qk` for any head")


def attach_qk(graph: Graph, rm: ReplacementModel, tokens: torch.Tensor, cfg: QKAttachConfig | None = None,
              also: Graph | None = None) -> dict:
    """Compute head loadings of ``graph``'s edges into attention features and QK pairs of the
    strongest cross-position ones; store them as ``metadata["qk"]`` of ``graph`` (and of ``also``,
    e.g. the unpruned graph it was pruned from) and return them. ``tokens``: the prompt (``[1, P]``)."""
    cfg = cfg or QKAttachConfig()
    require_attention_sites(rm)
    bos = graph.metadata.get("bos", "keep")
    tokens = tokens.reshape(1, -1)
    n_heads = rm.model.cfg.n_heads
    targets: dict[Site, list[int]] = {}  # attn_z site -> node indices of its feature targets
    into: dict[int, list[int]] = {}  # target node -> edge indices
    for e, t in enumerate(graph.targets.tolist()):
        into.setdefault(t, []).append(e)
    for t in into:
        node = graph.nodes[t]
        if node.kind == "feature" and node.site is not None and Site.parse(node.site).kind == "attn_z":
            targets.setdefault(Site.parse(node.site), []).append(t)
    loadings: dict[str, list[float]] = {}
    worst = 0.0
    clean = clean_run(rm, tokens) if targets else None
    for site, nodes in sorted(targets.items(), key=lambda kv: kv[0].layer):
        sources = {graph.nodes[int(graph.sources[e])].id for t in nodes for e in into[t]}
        found = head_loadings_batch(rm, tokens, site, [(graph.nodes[t].index, graph.nodes[t].pos) for t in nodes], bos,
                                    sources=sources, clean=clean)
        for t, hl in zip(nodes, found, strict=True):
            column = {name: i for i, name in enumerate(hl.sources)}
            for e in into[t]:
                src = graph.nodes[int(graph.sources[e])].id
                if src not in column:
                    continue
                values = hl.values[:, column[src]]
                weight = float(graph.weights[e])
                worst = max(worst, abs(float(values.sum()) - weight) / max(abs(weight), 1e-6))
                loadings[f"{src}->{graph.nodes[t].id}"] = [float(v) for v in values]
    if worst > 1e-3:
        log.warning("head loadings sum to their edges only to %.2g relative; the graph was built under other "
                    "settings than the loadings", worst)
    pairs = _pairs(graph, rm, tokens, loadings, cfg) if cfg.edges else []
    info = {"n_heads": n_heads, "bos": bos, "loadings": loadings, "pairs": pairs,
            "loadings_sum_max_rel_diff": worst, "edges": cfg.edges, "top_k": cfg.top_k}
    for g in (graph, also):
        if g is not None:
            g.metadata["qk"] = info
    return info


def _pairs(graph: Graph, rm: ReplacementModel, tokens: torch.Tensor, loadings: dict[str, list[float]],
           cfg: QKAttachConfig) -> list[dict]:
    """QK pairs of the strongest cross-position edges with loadings, through their main head."""
    weights = {f"{graph.nodes[int(s)].id}->{graph.nodes[int(t)].id}": float(w)
               for s, t, w in zip(graph.sources.tolist(), graph.targets.tolist(), graph.weights.tolist(), strict=True)}
    cross = []
    for key in loadings:
        src, dst = key.split("->")
        sp, dp = graph.node(src).pos, graph.node(dst).pos
        if sp is not None and dp is not None and sp != dp:
            cross.append(key)
    cross.sort(key=lambda k: -abs(weights[k]))
    ctx = QKContext(rm, tokens) if cross else None
    out = []
    for key in cross[: cfg.edges]:
        src, dst = key.split("->")
        values = torch.tensor(loadings[key])
        head = int(values.abs().argmax())
        layer = graph.node(dst).layer
        attribution = ctx.attribute(layer, head, graph.node(dst).pos, graph.node(src).pos)
        out.append({"source": src, "target": dst, "edge": weights[key], "head_loading": float(values[head]),
                    **attribution.to_dict(cfg.top_k)})
    return out


def stored_loadings(graph: Graph, src: str, dst: str) -> dict[str, float]:
    """``{"L<layer>.H<head>": part}`` of the edge ``src -> dst`` from ``metadata["qk"]``; a clear error
    when the graph has none or the edge has none."""
    info = graph.metadata.get("qk")
    if not info:
        raise CircuitGraphError("this graph has no head loadings; trace the prompt with --qk (cg.trace(..., qk=True))")
    graph.index(src), graph.index(dst)  # unknown ids get the graph's own error
    key = f"{src}->{dst}"
    if key not in info["loadings"]:
        raise CircuitGraphError(f"no head loadings for {key}: loadings exist for the edges of the pruned graph that "
                                f"end in an attention (attn_z) feature ({len(info['loadings'])} edges)")
    layer = graph.node(dst).layer
    return {f"L{layer}.H{h}": v for h, v in enumerate(info["loadings"][key])}
