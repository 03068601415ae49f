"""Component granularity: attention heads and MLPs as nodes, edges between them (the ACDC papers').

Senders write into the residual stream: ``tok`` (token + positional embedding), every head
(``L1.head2``, its ``W_O``-projected output) and every MLP (``L1.mlp``). Receivers read from it:
every head (its q, k and v inputs together), every MLP, and the metric (the final residual).
An edge u -> d exists when u is computed before d.

* ``attribution`` (EAP): ``edge(u, d) = sum (out_u(clean) - out_u(corr)) . dm/d in_d``
* ``ig`` (EAP-IG): the same with ``dm/d in_d`` averaged along embeddings interpolated from the
  corrupted to the clean prompt
* ``acdc``: exact edge ablation: receiver d reads ``in_d + sum_{u -> d removed} (out_u(ablated) - out_u(current))``,
  edges tried from the metric backwards, weakest EAP score first; kept when the metric moves by
  at least ``tau * |m(full) - m(empty)|``.

Needs TransformerLens's split q/k/v inputs, per-head results and the MLP-input hook; they are
switched on inside :func:`component_hooks_enabled` and restored afterwards. Padded batches run with
their attention mask; sums and mean-ablation means cover the counted positions (real tokens, BOS
included, up to the answer in a causal model). With a metric flat at the clean run (``kl``) EAP
takes its gradient at the midpoint embedding (EAP-IG with one step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from transformer_lens import HookedTransformer

from circuitgraph.attribution.ablation import faithfulness_ratio
from circuitgraph.attribution.acdc import AcdcConfig, Candidate, acdc_search, tiny_gap
from circuitgraph.attribution.runs import AblationKind, batches, metric_of, position_mask
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement.masking import is_causal, run_model
from circuitgraph.tasks.dataset import Metric, TaskDataset
from circuitgraph.tasks.metrics import flat_at_clean, needs_reference, with_reference
from dictionaries.site import ModelHooks

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Component:
    """A sender or receiver: ``kind`` tok / head / mlp / metric, with layer and head."""

    kind: str
    layer: int = -1
    head: int = -1

    @property
    def name(self) -> str:
        if self.kind == "tok":
            return "tok"
        if self.kind == "metric":
            return "metric"
        return f"L{self.layer}.head{self.head}" if self.kind == "head" else f"L{self.layer}.mlp"

    @property
    def order(self) -> float:
        return {"tok": -1.0, "metric": 1e9}.get(self.kind, self.layer + (0.5 if self.kind == "mlp" else 0.0))


def senders(model: HookedTransformer) -> list[Component]:
    out = [Component("tok")]
    for layer in range(model.cfg.n_layers):
        out += [Component("head", layer, h) for h in range(model.cfg.n_heads)]
        if not model.cfg.attn_only:
            out.append(Component("mlp", layer))
    return out


def receivers(model: HookedTransformer) -> list[Component]:
    return [c for c in senders(model) if c.kind != "tok"] + [Component("metric")]


@contextmanager
def component_hooks_enabled(model: HookedTransformer) -> Iterator[None]:
    """Switch on split q/k/v inputs, per-head results and the MLP-input hook; restore afterwards."""
    if model.cfg.n_key_value_heads not in (None, model.cfg.n_heads):
        raise CircuitGraphError("component graphs need one key/value head per query head; this model uses "
                                "grouped-query attention (use dictionary features instead)")
    old = (model.cfg.use_split_qkv_input, model.cfg.use_attn_result, model.cfg.use_hook_mlp_in)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    if not model.cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(old[0])
        model.set_use_attn_result(old[1])
        if not model.cfg.attn_only:
            model.set_use_hook_mlp_in(old[2])


def _sender_outputs(model: HookedTransformer, tokens: torch.Tensor,
                    mask: torch.Tensor | None) -> dict[Component, torch.Tensor]:
    """``[B, P, d_model]`` output of every sender on ``tokens`` (one forward pass)."""
    out: dict[Component, torch.Tensor] = {}
    with torch.no_grad():
        run_model(model, tokens, mask, _sender_capture_hooks(model, out, detach=True))
    return out


def _with_reference(model: HookedTransformer, b: TaskDataset) -> TaskDataset:
    """``b`` carrying the clean distribution when its metric needs it."""
    if not needs_reference(b):
        return b
    with torch.no_grad():
        return with_reference(b, run_model(model, b.clean_tokens, b.attention_mask))


def _sender_capture_hooks(model: HookedTransformer, out: dict, detach: bool) -> list:
    def cap(comp: Component | None, layer: int = -1):
        def fn(act, hook):
            a = act.detach() if detach else act
            if comp is None:
                for h in range(model.cfg.n_heads):
                    out[Component("head", layer, h)] = a[:, :, h]
            else:
                out[comp] = a
        return fn

    hooks = [(ModelHooks.resid_pre(0), cap(Component("tok")))]
    for layer in range(model.cfg.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_result", cap(None, layer)))
        if not model.cfg.attn_only:
            hooks.append((ModelHooks.mlp_out(layer), cap(Component("mlp", layer))))
    return hooks


def _receiver_hook_names(model: HookedTransformer, r: Component) -> list[tuple[str, int | None]]:
    if r.kind == "head":
        return [(ModelHooks.qkv_input(r.layer, w), r.head) for w in ("q", "k", "v")]
    if r.kind == "mlp":
        return [(ModelHooks.mlp_in(r.layer), None)]
    return [(ModelHooks.resid_post(model.cfg.n_layers - 1), None)]


class ComponentScores(NamedTuple):
    """EAP edge scores: ``scores[r, s]`` for receiver ``receivers[r]`` and sender ``senders[s]`` (0 where s is not upstream)."""

    senders: list[Component]
    receivers: list[Component]
    scores: torch.Tensor
    metric_clean: float
    metric_corrupt: float


def edge_scores(model: HookedTransformer, ds: TaskDataset, method: str = "attribution", ig_steps: int = 8,
                batch_size: int = 32, baselines: list[dict] | None = None) -> ComponentScores:
    """EAP / EAP-IG scores of every sender -> receiver edge, averaged over prompts. ``baselines``:
    per batch (of ``batch_size``), the senders' ablated outputs when they are not the corrupted
    prompt's (mean / zero ablation; ``EdgeAblator.parts``): edges are scored against them, with
    the gradient at the clean run (EAP-IG and metrics flat at the clean run interpolate embeddings
    from the corrupted prompt, so they need one)."""
    if baselines is not None and method == "ig":
        raise CircuitGraphError("EAP-IG interpolates the embeddings from the corrupted prompt; with mean / zero "
                                "ablation (no corrupted prompts) use --method attribution or acdc")
    snd, rcv = senders(model), receivers(model)
    scores = torch.zeros(len(rcv), len(snd), dtype=torch.float64)
    m_clean = m_corr = 0.0
    causal = is_causal(model)
    with component_hooks_enabled(model):
        for bi, b in enumerate(batches(ds, batch_size)):
            b = _with_reference(model, b)
            clean = _sender_outputs(model, b.clean_tokens, b.attention_mask)
            corr = _sender_outputs(model, b.corrupted_tokens, b.attention_mask) if baselines is None else baselines[bi]
            if baselines is not None and flat_at_clean(b):
                raise CircuitGraphError(f"metric {b.metric_name!r} is flat at the clean run, and mean / zero ablation "
                                        "leaves no corrupted prompt to take its gradient towards; use --method acdc")
            # component outputs at BOS count too
            mask = position_mask(b, b.clean_tokens.shape[1], causal, include_first=True).unsqueeze(-1)
            with torch.no_grad():
                m_clean += float(metric_of(run_model(model, b.clean_tokens, b.attention_mask), b).sum())
                m_corr += float(metric_of(run_model(model, b.corrupted_tokens, b.attention_mask), b).sum())
            if method == "ig":
                steps = [(i + 0.5) / ig_steps for i in range(ig_steps)]
            else:  # a metric flat at the clean run: the midpoint's gradient
                steps = [0.5] if flat_at_clean(b) else [1.0]
            grads = {r: 0.0 for r in rcv}
            e_clean = model.embed(b.clean_tokens)
            e_corr = model.embed(b.corrupted_tokens)
            for alpha in steps:
                g = _receiver_grads(model, b, rcv, e_corr + alpha * (e_clean - e_corr))
                for r in rcv:
                    grads[r] = grads[r] + g[r] / len(steps)
            for i, r in enumerate(rcv):
                for j, s in enumerate(snd):
                    if s.order < r.order:
                        scores[i, j] += float(((clean[s] - corr[s]) * mask * grads[r]).sum())
    return ComponentScores(snd, rcv, scores / len(ds), m_clean / len(ds), m_corr / len(ds))


def _receiver_grads(model: HookedTransformer, b: TaskDataset, rcv: list[Component], embed: torch.Tensor) -> dict:
    saved: dict[tuple[str, int | None], torch.Tensor] = {}

    def keep(name: str):
        def fn(act, hook):
            act.retain_grad()
            saved[name] = act
        return fn

    names = {n for r in rcv for n, _ in _receiver_hook_names(model, r)}
    hooks = [(n, keep(n)) for n in names] + [(ModelHooks.embed, lambda act, hook: embed.detach())]
    with torch.enable_grad():
        m = metric_of(run_model(model, b.clean_tokens, b.attention_mask, hooks), b).sum()
        m.backward()
    out = {}
    for r in rcv:
        total = 0.0
        for n, h in _receiver_hook_names(model, r):
            g = saved[n].grad
            total = total + (g[:, :, h] if h is not None else g)
        out[r] = total.detach()
    model.zero_grad(set_to_none=True)
    return out


class EdgeAblator:
    """Runs the model with a set of sender -> receiver edges ablated (exactly, via split inputs)."""

    def __init__(self, model: HookedTransformer, ds: TaskDataset, kind: AblationKind = "patch", batch_size: int = 64) -> None:
        self.model, self.kind = model, kind
        self.snd, self.rcv = senders(model), receivers(model)
        self.parts = []
        self.forward_passes = 0
        causal = is_causal(model)
        with component_hooks_enabled(model):
            outs = []
            for b in batches(ds, batch_size):
                b = _with_reference(model, b)
                outs.append((b, _sender_outputs(model, b.clean_tokens, b.attention_mask),
                             _sender_outputs(model, b.corrupted_tokens, b.attention_mask)))
        means = {}
        if kind == "mean":  # over the counted positions (BOS included), never padding
            counted = [position_mask(b, b.clean_tokens.shape[1], causal, include_first=True).unsqueeze(-1)
                       for b, _, _ in outs]
            n = sum(float(c.sum()) for c in counted)
            means = {s: sum((o[1][s] * c).sum((0, 1)) for o, c in zip(outs, counted, strict=True)) / n
                     for s in self.snd}
        for b, clean, corr in outs:
            if kind == "patch":
                abl = corr
            elif kind == "mean":
                abl = {s: means[s].expand_as(clean[s]) for s in self.snd}
            else:
                abl = {s: torch.zeros_like(clean[s]) for s in self.snd}
            self.parts.append((b, abl))
        self.n_prompts = len(ds)

    @torch.no_grad()
    def metric(self, removed: torch.Tensor) -> float:
        """Mean metric with edges ``removed[r, s]`` (``[n_receivers, n_senders]`` bool) ablated."""
        total = 0.0
        with component_hooks_enabled(self.model):
            for b, abl in self.parts:
                cur: dict[Component, torch.Tensor] = {}
                hooks = _sender_capture_hooks(self.model, cur, detach=False)
                for i, r in enumerate(self.rcv):
                    idx = removed[i].nonzero().squeeze(1).tolist()
                    if not idx:
                        continue
                    for name, head in _receiver_hook_names(self.model, r):
                        hooks.append((name, self._patch(idx, head, cur, abl)))
                logits = run_model(self.model, b.clean_tokens, b.attention_mask, hooks)
                self.forward_passes += 1
                total += float(metric_of(logits, b).sum())
        return total / self.n_prompts

    def _patch(self, idx: list[int], head: int | None, cur: dict, abl: dict):
        def fn(act, hook):
            delta = sum(abl[self.snd[j]] - cur[self.snd[j]] for j in idx)
            act = act.clone()
            if head is None:
                act += delta
            else:
                act[:, :, head] += delta
            return act
        return fn


@dataclass
class ComponentCircuitConfig:
    """Options of :func:`trace_components`."""

    FLAT_PREFIX: ClassVar[dict[str, str]] = {"acdc": "acdc_"}
    """Flat setting / CLI flag names of the nested ACDC settings: ``acdc_tau``, ``--acdc-tau``, ..."""

    method: str = "attribution"
    """``attribution`` (EAP), ``ig`` (EAP-IG) or ``acdc``."""
    max_edges: int = 100
    """For attribution / ig: keep the top edges by ``|score|``."""
    acdc: AcdcConfig = field(default_factory=AcdcConfig)
    """ACDC settings (the same search as for feature nodes; candidates are edges, grouped by receiver)."""
    ablation: AblationKind = "patch"
    """How ablated edges' senders are replaced (patch / mean / zero)."""
    ig_steps: int = 8
    """Interpolation steps for ``ig``."""
    batch_size: int = 32
    """Prompts per forward pass."""
    progress: bool = True
    """Show tqdm bars."""

    def __post_init__(self) -> None:
        if self.method not in ("attribution", "ig", "acdc"):
            raise ValueError(f"method must be attribution, ig or acdc, got {self.method!r}")
        if self.max_edges < 1 or self.ig_steps < 1 or self.batch_size < 1:
            raise ValueError("max_edges, ig_steps and batch_size must be at least 1")


def _edge_scores(ablator: EdgeAblator, valid: torch.Tensor, keep: torch.Tensor, prefix: str = "") -> dict:
    """Faithfulness and completeness of the kept edges on the ablator's prompts."""
    full, empty = ablator.metric(torch.zeros_like(valid)), ablator.metric(valid)
    m_c, m_wo = ablator.metric(valid & ~keep), ablator.metric(keep)
    out = {"faithfulness": faithfulness_ratio(m_c, full, empty, "edge"),
           "completeness": (full - m_wo) / (full - empty), "metric_full": full, "metric_empty": empty,
           "metric_circuit": m_c, "metric_without_circuit": m_wo, "n_prompts": ablator.n_prompts}
    return {f"{prefix}{k}": v for k, v in out.items()}


def trace_components(model: HookedTransformer, ds: TaskDataset, cfg: ComponentCircuitConfig | None = None,
                     eval_ds: TaskDataset | None = None, metric: Metric | None = None) -> tuple[Graph, dict]:
    """A component circuit selected on ``ds`` and its metadata (faithfulness, completeness, forward
    passes), evaluated on the held-out ``eval_ds`` when given (``selection_*``: on ``ds``).
    ``metric``: a metric name or callable used instead of the datasets' own."""
    cfg = cfg or ComponentCircuitConfig()
    if metric is not None:
        ds = ds.with_metric(metric)
        eval_ds = None if eval_ds is None else eval_ds.with_metric(metric)
    start = time.perf_counter()
    ablator = EdgeAblator(model, ds, cfg.ablation, cfg.batch_size)
    baselines = None if cfg.ablation == "patch" else [abl for _, abl in ablator.parts]  # scored as ablated
    sc = edge_scores(model, ds, "ig" if cfg.method == "ig" else "attribution", cfg.ig_steps, cfg.batch_size, baselines)
    valid = torch.tensor([[s.order < r.order for s in sc.senders] for r in sc.receivers])
    full = ablator.metric(torch.zeros_like(valid))
    empty = ablator.metric(valid)
    faithfulness_ratio(full, full, empty, "edge")  # a clear error when ablating every edge changes nothing
    extra = {}
    if cfg.method == "acdc":
        cands = [Candidate(r, sc.receivers[r].order, abs(float(sc.scores[r, s])), (r, s))
                 for r in range(len(sc.receivers)) for s in range(len(sc.senders)) if valid[r, s]]

        def extend(removed: torch.Tensor, items: list) -> torch.Tensor:
            out = removed.clone()
            for r, s in items:
                out[r, s] = True
            return out

        search = acdc_search(cands, torch.zeros_like(valid), extend, ablator.metric, cfg.acdc.tau * abs(full - empty),
                             cfg.acdc, cfg.progress)
        keep = valid & ~search.state
        extra = {"acdc_tau": cfg.acdc.tau, "acdc_candidates": search.n_candidates, "acdc_low_group": search.n_low,
                 "acdc_rescued": search.n_rescued, "acdc_tested": search.n_tested,
                 "acdc_kept_untested": search.n_kept_untested, "acdc_evaluations": search.evaluations,
                 "acdc_suspicious": int(keep.sum() == 0) | (2 if tiny_gap(full, empty) else 0)}
        if not keep.any():
            log.warning("ACDC kept no edge: every ablation stayed below tau = %g of the metric gap", cfg.acdc.tau)
    else:
        flat = (sc.scores.abs() * valid).flatten()
        k = min(cfg.max_edges, int((flat > 0).sum()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(k).indices] = True
        keep = keep.view_as(valid)
    selection = _edge_scores(ablator, valid, keep)
    held_ablator = EdgeAblator(model, eval_ds, cfg.ablation, cfg.batch_size) if eval_ds is not None else None
    held = _edge_scores(held_ablator, valid, keep) if held_ablator is not None else selection
    graph = _component_graph(sc, keep, ds.metric_name)
    meta = {"method": cfg.method, "granularity": "components", "task": ds.name, "metric": ds.metric_name,
            "ablation": cfg.ablation,
            "held_out": eval_ds is not None, **{k: v for k, v in held.items() if k != "n_prompts"},
            "eval_n_prompts": held["n_prompts"], **{f"selection_{k}": v for k, v in selection.items()},
            "n_prompts": len(ds), "n_circuit_edges": int(keep.sum()),
            "forward_passes": ablator.forward_passes + (held_ablator.forward_passes if held_ablator else 0),
            "seconds": time.perf_counter() - start, **extra}
    graph.metadata.update(meta)
    return graph, meta


def _component_graph(sc: ComponentScores, keep: torch.Tensor, metric_name: str) -> Graph:
    comps = list(dict.fromkeys([*sc.senders, *sc.receivers]))
    used = set()
    r_idx, s_idx = keep.nonzero(as_tuple=True)
    for r, s in zip(r_idx.tolist(), s_idx.tolist(), strict=True):
        used.add(sc.receivers[r])
        used.add(sc.senders[s])
    comps = [c for c in comps if c in used or c.kind == "metric"]
    index = {c: i for i, c in enumerate(comps)}
    nodes = []
    for c in comps:
        if c.kind == "tok":
            nodes.append(Node("token", -1.0))
        elif c.kind == "metric":
            nodes.append(Node("metric", 1e3, name=metric_name))
        else:
            nodes.append(Node("component", c.order, c.name))
    src = torch.tensor([index[sc.senders[s]] for s in s_idx.tolist()], dtype=torch.long)
    tgt = torch.tensor([index[sc.receivers[r]] for r in r_idx.tolist()], dtype=torch.long)
    w = sc.scores[r_idx, s_idx].float()
    tw = torch.tensor([1.0 if c.kind == "metric" else 0.0 for c in comps])
    return Graph(nodes=nodes, activation=torch.zeros(len(comps)), sources=src, targets=tgt, weights=w,
                 target_weights=tw, labels=[c.name for c in comps])
