"""Direct linear attribution of one prompt (circuit-tracer's algorithm, generalised to every site kind).

1. Run the replacement model once, recording latents, error terms, attention patterns,
   normalisation scales and MLP gates.
2. Make the token embeddings, every site's latents and every site's error terms leaves, and
   re-run with the recorded patterns / scales / gates frozen. Every site's input is now an affine
   function of the leaves, so a node's *direct* effect on a target is exact and linear:
       edge(s -> t) = value(s) * d target(t) / d value(s)       (vector-valued sources: a dot product)
   where target(t) is the feature's affine pre-activation (what the latent equals when active), a
   mean-centred logit, or a custom metric.
3. Targets are visited in batches (one batched backward per batch, ``is_grads_batched``): first the
   output targets, then features in order of their influence on the outputs through the edges
   found so far, until ``max_feature_nodes`` features have been visited.
4. One more frozen run with every leaf at zero gives each target's *bias* (the part no node
   explains), so incoming edges + bias = activation exactly.

Works for residual, MLP-output, attention-``z``, neuron and transcoder dictionaries, mixed freely
(one dictionary per output hook).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import influence, normalised_adjacency
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec, site_depth

log = logging.getLogger(__name__)


@dataclass
class LinearAttributionConfig:
    """Options of :func:`attribute_prompt`."""

    max_feature_nodes: int = 1000
    """Budget: features whose incoming edges are computed (visited in order of influence)."""
    batch_size: int = 64
    """Targets per batched backward pass."""
    max_logits: int = 10
    """Most logit targets (the likeliest next tokens)."""
    logit_probability: float = 0.95
    """Logit targets are added until their probabilities sum to this."""
    min_edge: float = 0.0
    """Edges with ``|weight| <= min_edge`` are not stored."""
    progress: bool = True
    """Show a tqdm bar."""

    def __post_init__(self) -> None:
        if self.max_feature_nodes < 0 or self.batch_size < 1 or self.max_logits < 0:
            raise ValueError("max_feature_nodes >= 0, batch_size >= 1 and max_logits >= 0 are required")
        if not 0 < self.logit_probability <= 1:
            raise ValueError(f"logit_probability must lie in (0, 1], got {self.logit_probability}")


@dataclass
class _Sources:
    """Leaf tensors and the flat source-node layout: tokens, active features, errors."""

    nodes: list[Node]
    values: torch.Tensor  # [S] node activation
    site_slices: list[tuple[int, int]]  # feature block per site
    site_pos: list[torch.Tensor]
    site_feat: list[torch.Tensor]


def _token_strings(model, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(t) for t in tokens.tolist()]
    return [model.tokenizer.decode([t]) for t in tokens.tolist()]


def attribute_prompt(rm: ReplacementModel, tokens: torch.Tensor, config: LinearAttributionConfig | None = None,
                     metric: MetricTarget | None = None) -> Graph:
    """The direct-effect attribution graph of one prompt ``tokens`` (``[P]`` or ``[1, P]``)."""
    cfg = config or LinearAttributionConfig()
    start = time.perf_counter()
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise CircuitGraphError(f"attribute_prompt takes one prompt, got a batch of {tokens.shape[0]}; use dataset attribution")
    if tokens.shape[1] < 2:
        raise CircuitGraphError("the prompt must have at least 2 tokens (BOS and one more)")
    rm.check_tokens(tokens)
    model, sites = rm.model, rm.sites
    n_pos = tokens.shape[1]
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
        embed = model.embed(tokens)  # [1, P, d_model]

    # --- source layout -----------------------------------------------------------------------
    tok_str = _token_strings(model, tokens[0])
    nodes = [Node("token", -1.0, pos=p) for p in range(n_pos)]
    labels = list(tok_str)
    values = [0.0] * n_pos
    site_pos, site_feat, slices = [], [], []
    for site in sites:
        lat = clean.sites[site].latents[0]  # [P, d_dict]
        lat_active = lat.clone()
        lat_active[0] = 0
        p_idx, f_idx = lat_active.nonzero(as_tuple=True)
        slices.append((len(nodes), len(nodes) + p_idx.numel()))
        site_pos.append(p_idx)
        site_feat.append(f_idx)
        depth = site_depth(site)
        nodes += [Node("feature", depth, site.id, int(f), int(p)) for p, f in zip(p_idx.tolist(), f_idx.tolist(), strict=True)]
        labels += [""] * p_idx.numel()
        values += lat[p_idx, f_idx].tolist()
    n_feat_end = len(nodes)
    err_start = n_feat_end
    for site in sites:
        err = clean.sites[site].errors[0]
        nodes += [Node("error", site_depth(site), site.id, pos=p) for p in range(1, n_pos)]
        labels += ["error"] * (n_pos - 1)
        values += err[1:].norm(dim=-1).tolist()
    n_sources = len(nodes)

    # --- output targets ----------------------------------------------------------------------
    last = clean.logits[0, -1]
    probs = torch.softmax(last.double(), -1)
    order = torch.argsort(probs, descending=True)
    n_logit = int((torch.cumsum(probs[order], 0) < cfg.logit_probability).sum()) + 1
    logit_ids = order[: min(n_logit, cfg.max_logits)].tolist()
    out_nodes = [Node("logit", float(model.cfg.n_layers), index=t, pos=n_pos - 1) for t in logit_ids]
    out_labels = _token_strings(model, torch.tensor(logit_ids))
    centred = last - last.mean()
    out_values = [float(centred[t]) for t in logit_ids]
    out_weights = [float(probs[t]) for t in logit_ids]
    if metric is not None:
        if metric.coefficients.shape != (model.cfg.d_vocab,):
            raise CircuitGraphError(f"metric {metric.name!r} has {metric.coefficients.numel()} coefficients; the model has d_vocab {model.cfg.d_vocab}")
        mpos = metric.pos % n_pos
        out_nodes.append(Node("metric", float(model.cfg.n_layers), pos=None, name=metric.name))
        out_labels.append(metric.name)
        out_values.append(float((clean.logits[0, mpos] * metric.coefficients.to(last.dtype)).sum()))
        out_weights.append(1.0)
        out_weights = [w if n.kind == "metric" else 0.0 for n, w in zip(out_nodes, out_weights, strict=True)]

    # --- leaves and the frozen forward ----------------------------------------------------------
    # Each batch of targets runs the prompt as a batch of copies, copy i carrying target i: one
    # ordinary backward of the sum gives every target's gradient (faster than vmap'd backward).
    site_ids = [s.id for s in sites]

    def rows_for(batch: list[Node]) -> torch.Tensor:
        """``[len(batch), n_sources]`` direct edge weights into each target of ``batch``."""
        n = len(batch)
        embed_leaf = embed.expand(n, -1, -1).clone().requires_grad_(True)
        lat_leaf = {s: clean.sites[s].latents.expand(n, -1, -1).clone().requires_grad_(True) for s in sites}
        err_leaf = {s: clean.sites[s].errors.expand(n, -1, -1).clone().requires_grad_(True) for s in sites}
        spec = SpliceSpec(latents=lat_leaf, errors=err_leaf, embed=embed_leaf, frozen=clean.frozen)
        with torch.enable_grad():
            run = rm.run(tokens.expand(n, -1), spec)
            outs = []
            for i, node in enumerate(batch):
                if node.kind == "logit":
                    row = run.logits[i, node.pos]
                    outs.append(row[node.index] - row.mean())
                elif node.kind == "metric":
                    outs.append((run.logits[i, metric.pos % n_pos] * metric.coefficients.to(run.logits.dtype)).sum())
                else:
                    site = sites[site_ids.index(node.site)]
                    outs.append(run.sites[site].active_value[i, node.pos, node.index])
            leaves = [embed_leaf, *lat_leaf.values(), *err_leaf.values()]
            grads = torch.autograd.grad(torch.stack(outs).sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
        g_embed, g_lat, g_err = grads[0], grads[1 : 1 + len(sites)], grads[1 + len(sites) :]
        row = torch.zeros(n, n_sources, dtype=torch.float32)
        row[:, :n_pos] = (g_embed * embed[0]).sum(-1)
        for i, site in enumerate(sites):
            lo, hi = slices[i]
            p, f = site_pos[i], site_feat[i]
            row[:, lo:hi] = g_lat[i][:, p, f] * clean.sites[site].latents[0, p, f]
            e_lo = err_start + i * (n_pos - 1)
            row[:, e_lo : e_lo + n_pos - 1] = (g_err[i][:, 1:] * clean.sites[site].errors[0, 1:]).sum(-1)
        return row.detach()

    # --- visit targets --------------------------------------------------------------------------
    visited_rows: dict[int, torch.Tensor] = {}  # target key -> row; keys: feature index or n_sources + output index
    out_keys = list(range(n_sources, n_sources + len(out_nodes)))
    out_weight_t = torch.zeros(n_sources + len(out_nodes), dtype=torch.float64)
    out_weight_t[n_sources:] = torch.tensor(out_weights, dtype=torch.float64)
    bar = tqdm(total=len(out_nodes) + min(cfg.max_feature_nodes, n_feat_end - n_pos), desc="attribution",
               disable=not cfg.progress, leave=False)
    for b in range(0, len(out_nodes), cfg.batch_size):
        batch = out_nodes[b : b + cfg.batch_size]
        for k, r in zip(out_keys[b : b + cfg.batch_size], rows_for(batch), strict=True):
            visited_rows[k] = r
        bar.update(len(batch))
    n_visited_feat = 0
    while n_visited_feat < cfg.max_feature_nodes and n_feat_end > n_pos:
        inf = _partial_influence(visited_rows, n_sources + len(out_nodes), out_weight_t)[n_pos:n_feat_end]
        visited_mask = torch.zeros(n_feat_end - n_pos, dtype=torch.bool)
        for k in visited_rows:
            if n_pos <= k < n_feat_end:
                visited_mask[k - n_pos] = True
        inf[visited_mask] = -1
        take = min(cfg.batch_size, cfg.max_feature_nodes - n_visited_feat)
        cand = torch.argsort(inf, descending=True)[:take]
        cand = cand[inf[cand] > 0]
        if cand.numel() == 0:
            break
        keys = (cand + n_pos).tolist()
        for k, r in zip(keys, rows_for([nodes[k] for k in keys]), strict=True):
            visited_rows[k] = r
        n_visited_feat += len(keys)
        bar.update(len(keys))
    bar.close()

    # --- biases: every leaf at zero --------------------------------------------------------------
    visited_keys = sorted(visited_rows)
    with torch.no_grad():
        zero = SpliceSpec(latents={s: torch.zeros_like(clean.sites[s].latents) for s in sites},
                          errors={s: torch.zeros_like(clean.sites[s].errors) for s in sites},
                          embed=torch.zeros_like(embed), frozen=clean.frozen)
        zrun = rm.run(tokens, zero)
        zlog = zrun.logits[0] - zrun.logits[0].mean(-1, keepdim=True)

    def zero_value(key: int) -> float:
        if key >= n_sources:
            node = out_nodes[key - n_sources]
            if node.kind == "logit":
                return float(zlog[node.pos, node.index])
            return float((zrun.logits[0, metric.pos % n_pos] * metric.coefficients).sum())
        node = nodes[key]
        site = sites[site_ids.index(node.site)]
        return float(zrun.sites[site].active_value[0, node.pos, node.index])

    # --- assemble: tokens, visited features, errors, outputs ---------------------------------------
    keep = torch.zeros(n_sources, dtype=torch.bool)
    keep[:n_pos] = True
    keep[err_start:] = True
    for k in visited_keys:
        if k < n_sources:
            keep[k] = True
    new_index = torch.full((n_sources + len(out_nodes),), -1, dtype=torch.long)
    kept = keep.nonzero().squeeze(1)
    new_index[kept] = torch.arange(kept.numel())
    new_index[n_sources:] = torch.arange(kept.numel(), kept.numel() + len(out_nodes))
    src_l, tgt_l, w_l = [], [], []
    for k in visited_keys:
        row = visited_rows[k]
        nz = ((row.abs() > cfg.min_edge) & keep & (row != 0)).nonzero().squeeze(1)
        src_l.append(new_index[nz])
        tgt_l.append(torch.full((nz.numel(),), int(new_index[k])))
        w_l.append(row[nz])
    n_total = kept.numel() + len(out_nodes)
    bias = torch.full((n_total,), float("nan"))
    for k in visited_keys:
        bias[new_index[k]] = zero_value(k)
    all_nodes = [nodes[i] for i in kept.tolist()] + out_nodes
    graph = Graph(
        nodes=all_nodes,
        activation=torch.tensor([values[i] for i in kept.tolist()] + out_values, dtype=torch.float32),
        sources=torch.cat(src_l) if src_l else torch.zeros(0, dtype=torch.long),
        targets=torch.cat(tgt_l) if tgt_l else torch.zeros(0, dtype=torch.long),
        weights=torch.cat(w_l) if w_l else torch.zeros(0),
        target_weights=torch.tensor([0.0] * kept.numel() + out_weights, dtype=torch.float32),
        labels=[labels[i] for i in kept.tolist()] + out_labels,
        bias=bias,
        metadata={
            "method": "linear",
            "prompt_tokens": tokens[0].tolist(),
            "prompt": "".join(tok_str[1:]) if tok_str else "",
            "sites": [s.id for s in sites],
            "n_active_features": n_feat_end - n_pos,
            "n_visited_features": n_visited_feat,
            "max_feature_nodes": cfg.max_feature_nodes,
            "metric": metric.name if metric is not None else None,
            "seconds": time.perf_counter() - start,
        },
    )
    log.info("attributed %d targets, %d edges in %.2f s", len(visited_keys), graph.n_edges, graph.metadata["seconds"])
    return graph


def _partial_influence(rows: dict[int, torch.Tensor], n: int, out_weights: torch.Tensor) -> torch.Tensor:
    """Influence on the outputs through the rows computed so far."""
    src, tgt, w = [], [], []
    for k, r in rows.items():
        nz = (r != 0).nonzero().squeeze(1)
        src.append(nz)
        tgt.append(torch.full((nz.numel(),), k))
        w.append(r[nz])
    sources, targets = torch.cat(src), torch.cat(tgt)
    a = normalised_adjacency(sources, targets, torch.cat(w), n)
    return influence(a, out_weights)
