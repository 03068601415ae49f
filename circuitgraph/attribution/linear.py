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
(one dictionary per output hook), and for causal and bidirectional attention (a causal model's
target at position t has no gradient after t, which bounds the work; a bidirectional one's reads
every position).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.influence import influence_of_edges
from circuitgraph.graph.nodes import Node
from circuitgraph.replacement.masking import is_causal
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
    update_interval: int = 4
    """Batches between recomputations of the influence ranking that orders feature targets."""
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
    causal = is_causal(model)
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

    # --- frozen forward passes ----------------------------------------------------------------------
    # One frozen forward pass of the prompt is kept; every batch of targets is one vectorised
    # backward pass through it (``is_grads_batched``: row i of the seeds carries target i),
    # seeded on the unembedding input (logit and metric targets) and on the site inputs (a
    # feature target's gradient there is its active direction). Leaves: the embeddings and a zero
    # offset on every site output; a feature's edge is its activation times (output gradient .
    # decoder row). (Running the prompt as a batch of copies instead repeats the forward work for
    # every copy: ~1.3x slower end to end.)
    dec = {s: rm.dicts[s].decoder_directions().detach() for s in sites}  # [d_dict, d_out]
    enc = {s: rm.dicts[s].active_directions().detach() for s in sites}  # [d_in, d_dict]
    w_u = model.W_U.detach()  # [d_model, vocab]
    w_u_centred = w_u - w_u.mean(1, keepdim=True)

    def frozen_graph():
        embed_leaf = embed.clone().requires_grad_(True)
        offsets = {s: torch.zeros(1, n_pos, dec[s].shape[1], dtype=embed.dtype, requires_grad=True) for s in sites}
        spec = SpliceSpec(latents={s: clean.sites[s].latents for s in sites},
                          errors={s: clean.sites[s].errors for s in sites},
                          embed=embed_leaf, frozen=clean.frozen, offsets=offsets)
        rm.forward_passes += 1
        with torch.enable_grad(), rm.spliced(spec) as record:
            # stop before the unembedding (a full-vocabulary product is not needed):
            # targets on outputs are seeded on the final normalised residual instead
            resid = model(tokens, stop_at_layer=model.cfg.n_layers)
            unembed_in = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        return dict(record), unembed_in, [embed_leaf, *offsets.values()]

    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (sources, target keys, weights)
    visited: list[int] = []  # target keys: source index, or n_sources + output index

    starts = [lo for lo, _ in slices]
    pos_list = [p.tolist() for p in site_pos]
    feat_list = [f.tolist() for f in site_feat]

    def site_of_key(key: int) -> int:
        return bisect.bisect_right(starts, key) - 1

    def key_pos(key: int) -> int:
        node = out_nodes[key - n_sources] if key >= n_sources else nodes[key]
        return n_pos - 1 if node.pos is None else node.pos

    def visit(batch_keys: list[int], graph) -> None:
        record, unembed_in, leaves = graph
        batch_keys = sorted(batch_keys, key=key_pos)  # rows by position: causality bounds the work below
        # the last position each row's gradient can reach: its own (causal) or the prompt's end
        row_pos = torch.tensor([key_pos(k) if causal else n_pos - 1 for k in batch_keys])
        n = len(batch_keys)
        seeds: dict = {}
        seed_out = None
        feat_rows: dict[int, list[tuple[int, int, int]]] = {}  # site index -> (row, pos, feature)
        for i, key in enumerate(batch_keys):
            if key >= n_sources:
                node = out_nodes[key - n_sources]
                if seed_out is None:
                    seed_out = unembed_in.new_zeros(n, *unembed_in.shape[1:])
                if node.kind == "logit":
                    seed_out[i, node.pos] = w_u_centred[:, node.index]
                else:
                    seed_out[i, metric.pos % n_pos] = w_u @ metric.coefficients.to(w_u.dtype)
            else:
                si = site_of_key(key)
                j = key - slices[si][0]
                feat_rows.setdefault(si, []).append((i, pos_list[si][j], feat_list[si][j]))
        for si, entries in feat_rows.items():
            site = sites[si]
            r, p_, f_ = (torch.tensor(x) for x in zip(*entries, strict=True))
            seeds[site] = record[site].inputs.new_zeros(n, *record[site].inputs.shape[1:])
            seeds[site][r, p_] = enc[site][:, f_].T
        outs = [record[s].inputs for s in seeds] + ([unembed_in] if seed_out is not None else [])
        grad_outs = list(seeds.values()) + ([seed_out] if seed_out is not None else [])
        with torch.enable_grad():
            grad_outs = [g.unsqueeze(1) for g in grad_outs]
            grads = torch.autograd.grad(outs, leaves, grad_outputs=grad_outs, allow_unused=True, retain_graph=True,
                                        is_grads_batched=True)
        grads = [x.new_zeros(n, *x.shape[1:]) if g is None else g.squeeze(1) for g, x in zip(grads, leaves, strict=True)]
        row = torch.zeros(n, n_sources, dtype=embed.dtype)
        row[:, :n_pos] = (grads[0] * embed[0]).sum(-1)
        for i, site in enumerate(sites):
            g_out = grads[1 + i]  # [n, P, d_out]
            lo, hi = slices[i]
            p, f = site_pos[i], site_feat[i]
            row[:, lo:hi] = _feature_edges(g_out, dec[site], p, f, clean.sites[site].latents[0, p, f], row_pos)
            e_lo = err_start + i * (n_pos - 1)
            err = clean.sites[site].errors[0, 1:]  # a cross-layer site's error is its own layer's: the first slice
            row[:, e_lo : e_lo + n_pos - 1] = (g_out[:, 1:, : err.shape[-1]] * err).sum(-1)
        t_idx, s_idx = (row.abs() > cfg.min_edge).nonzero(as_tuple=True)
        keys = torch.tensor(batch_keys, dtype=torch.long)
        chunks.append((s_idx, keys[t_idx], row[t_idx, s_idx].detach()))
        visited.extend(batch_keys)

    n_all = n_sources + len(out_nodes)
    out_weight_t = torch.zeros(n_all, dtype=torch.float64)
    out_weight_t[n_sources:] = torch.tensor(out_weights, dtype=torch.float64)
    budget = min(cfg.max_feature_nodes, n_feat_end - n_pos)
    bar = tqdm(total=len(out_nodes) + budget, desc="attribution", disable=not cfg.progress, leave=False)
    out_keys = list(range(n_sources, n_all))  # output targets are visited first
    frozen = frozen_graph()
    for b in range(0, len(out_keys), cfg.batch_size):
        visit(out_keys[b : b + cfg.batch_size], frozen)
        bar.update(len(out_keys[b : b + cfg.batch_size]))
    n_visited_feat = 0
    if budget > 0:
        per_batch = min(cfg.batch_size, budget)
        queue: list[int] = []
        since_update = cfg.update_interval
        done = set(visited)
        while n_visited_feat < budget:
            if since_update >= cfg.update_interval or not queue:
                src, tgt, w = (torch.cat(x) for x in zip(*chunks, strict=True))
                inf = influence_of_edges(src, tgt, w, out_weight_t)[n_pos:n_feat_end]
                order = torch.argsort(inf, descending=True)
                queue = [k for k in (order[inf[order] > 0] + n_pos).tolist() if k not in done]
                since_update = 0
            keys, queue = queue[: min(per_batch, budget - n_visited_feat)], queue[min(per_batch, budget - n_visited_feat) :]
            if not keys:
                break
            visit(keys, frozen)
            done.update(keys)
            n_visited_feat += len(keys)
            since_update += 1
            bar.update(len(keys))
    bar.close()

    # --- biases: every leaf at zero --------------------------------------------------------------
    with torch.no_grad():
        zero = SpliceSpec(latents={s: torch.zeros_like(clean.sites[s].latents) for s in sites},
                          errors={s: torch.zeros_like(clean.sites[s].errors) for s in sites},
                          embed=torch.zeros_like(embed), frozen=clean.frozen, record_active_values=True)
        zrun = rm.run(tokens, zero)
        zlog = zrun.logits[0] - zrun.logits[0].mean(-1, keepdim=True)

    def output_zero_value(node: Node) -> float:
        if node.kind == "logit":
            return float(zlog[node.pos, node.index])
        return float((zrun.logits[0, metric.pos % n_pos] * metric.coefficients.to(zrun.logits.dtype)).sum())

    # --- assemble: tokens, visited features, errors, outputs ---------------------------------------
    keep = torch.zeros(n_sources, dtype=torch.bool)
    keep[:n_pos] = True
    keep[err_start:] = True
    feat_keys = torch.tensor([k for k in visited if k < n_sources], dtype=torch.long)
    keep[feat_keys] = True
    new_index = torch.full((n_all,), -1, dtype=torch.long)
    kept = keep.nonzero().squeeze(1)
    new_index[kept] = torch.arange(kept.numel())
    new_index[n_sources:] = torch.arange(kept.numel(), kept.numel() + len(out_nodes))
    src, tgt, w = (torch.cat(x) for x in zip(*chunks, strict=True))
    ok = keep[src]
    n_total = kept.numel() + len(out_nodes)
    bias = torch.full((n_total,), float("nan"), dtype=embed.dtype)
    visited_t = torch.tensor(visited, dtype=torch.long)
    for si, site in enumerate(sites):  # visited features: their affine value with every leaf at zero
        lo, hi = slices[si]
        keys = visited_t[(visited_t >= lo) & (visited_t < hi)]
        active_zero = zrun.sites[site].active_value[0, site_pos[si][keys - lo], site_feat[si][keys - lo]]
        bias[new_index[keys]] = active_zero.to(bias.dtype)
    for k in visited_t[visited_t >= n_sources].tolist():
        bias[new_index[k]] = output_zero_value(out_nodes[k - n_sources])
    graph = Graph(
        nodes=[nodes[i] for i in kept.tolist()] + out_nodes,
        activation=torch.tensor([values[i] for i in kept.tolist()] + out_values, dtype=embed.dtype),
        sources=new_index[src[ok]],
        targets=new_index[tgt[ok]],
        weights=w[ok],
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
    log.info("attributed %d targets, %d edges in %.2f s", len(visited), graph.n_edges, graph.metadata["seconds"])
    return graph


def _feature_edges(g_out: torch.Tensor, dec: torch.Tensor, p: torch.Tensor, f: torch.Tensor, values: torch.Tensor,
                   row_pos: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    """``[n, A]`` edges from the ``A`` active features ``(p, f)`` of one site into ``n`` targets:
    ``values * (g_out[:, p] . dec[f])``. ``row_pos``: the last position each row's gradient can
    reach (in a causal model its target's position), so each chunk of rows only multiplies the
    positions up to its largest, and rows with no gradient at this site are skipped."""
    n = g_out.shape[0]
    out = torch.zeros(n, p.numel(), dtype=g_out.dtype)
    live = g_out.flatten(1).abs().amax(1) > 0  # [n]
    step = max(1, -(-n // chunks))
    for lo in range(0, n, step):
        rows = torch.arange(lo, min(n, lo + step))[live[lo : lo + step]]
        if rows.numel() == 0:
            continue
        last = int(row_pos[rows].max()) + 1
        cols = (p < last).nonzero().squeeze(1)
        prod = g_out[rows, :last] @ dec.T  # [r, last, d_dict]
        out[rows.unsqueeze(1), cols.unsqueeze(0)] = prod[:, p[cols], f[cols]]
    return out * values
