"""Batched backward passes through the frozen replacement model of one prompt, and the visit loop.

One frozen forward pass of the prompt is kept; every batch of targets is one vectorised backward
pass through it (``is_grads_batched``: row i of the seeds carries target i), seeded on the
unembedding input (logit and metric targets) and on the site inputs (a feature target's gradient
there is its active direction). Leaves: the embeddings and a zero offset on every site output; a
feature's edge is its activation times (output gradient . decoder row).

Targets are visited output targets first, then features in order of their influence on the
outputs through the edges found so far (recomputed every ``update_interval`` batches), until the
feature budget is spent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from circuitgraph.attribution.prompt.layout import SourceLayout
from circuitgraph.attribution.prompt.outputs import OutputTargets
from circuitgraph.graph.influence import influence_of_edges
from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec

log = logging.getLogger(__name__)


@dataclass
class EdgeList:
    """Edges found so far, in chunks of ``(sources, targets, weights)`` keyed by layout keys."""

    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    visited: list[int] = field(default_factory=list)
    """Target keys visited, in visit order."""

    def add(self, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
        self.chunks.append((sources, targets, weights))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sources, targets, weights)`` of every edge."""
        src, tgt, w = (torch.cat(x) for x in zip(*self.chunks, strict=True))
        return src, tgt, w


class FrozenBackward:
    """The frozen model of one prompt: computes the incoming edges of batches of targets."""

    def __init__(self, rm: ReplacementModel, tokens: torch.Tensor, clean: RunResult, layout: SourceLayout,
                 outputs: OutputTargets, causal: bool, min_edge: float) -> None:
        self.rm, self.tokens, self.clean, self.layout, self.outputs = rm, tokens, clean, layout, outputs
        self.causal, self.min_edge = causal, min_edge
        self.sites = layout.sites
        self.embed = rm.model.embed(tokens).detach()  # [1, P, d_model]
        self.dec = {s: rm.dicts[s].decoder_directions().detach() for s in self.sites}  # [d_dict, d_out]
        self.enc = {s: rm.dicts[s].active_directions().detach() for s in self.sites}  # [d_in, d_dict]
        self._record, self._unembed_in, self._leaves = self._frozen_graph()

    def _frozen_graph(self):
        """One frozen forward pass with the embeddings and zero site-output offsets as leaves."""
        rm, clean, n_pos = self.rm, self.clean, self.layout.n_pos
        embed_leaf = self.embed.clone().requires_grad_(True)
        offsets = {s: torch.zeros(1, n_pos, self.dec[s].shape[1], dtype=self.embed.dtype, requires_grad=True)
                   for s in self.sites}
        spec = SpliceSpec(latents={s: clean.sites[s].latents for s in self.sites},
                          errors={s: clean.sites[s].errors for s in self.sites},
                          embed=embed_leaf, frozen=clean.frozen, offsets=offsets)
        rm.forward_passes += 1
        model = rm.model
        with torch.enable_grad(), rm.spliced(spec) as record:
            # stop before the unembedding (a full-vocabulary product is not needed):
            # targets on outputs are seeded on the final normalised residual instead
            resid = model(self.tokens, stop_at_layer=model.cfg.n_layers)
            unembed_in = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        return dict(record), unembed_in, [embed_leaf, *offsets.values()]

    def _key_pos(self, key: int) -> int:
        if key >= self.layout.n_sources:
            return self.outputs.positions[key - self.layout.n_sources]
        return self.layout.position(key)

    def _seeds(self, keys: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors to differentiate and their ``[n, 1, ...]`` batched gradient seeds."""
        n, lay = len(keys), self.layout
        seed_out = None
        feat_rows: dict[int, list[tuple[int, int, int]]] = {}  # block index -> (row, pos, feature)
        for i, key in enumerate(keys):
            if key >= lay.n_sources:
                o = key - lay.n_sources
                if seed_out is None:
                    seed_out = self._unembed_in.new_zeros(n, *self._unembed_in.shape[1:])
                seed_out[i, self.outputs.positions[o]] = self.outputs.directions[o].to(seed_out.dtype)
            else:
                bi = lay.block_of(key)
                b = lay.blocks[bi]
                j = key - b.start
                feat_rows.setdefault(bi, []).append((i, int(b.pos[j]), int(b.feat[j])))
        outs, seeds = [], []
        for bi, entries in feat_rows.items():
            site = self.sites[bi]
            r, p_, f_ = (torch.tensor(x) for x in zip(*entries, strict=True))
            inputs = self._record[site].inputs
            seed = inputs.new_zeros(n, *inputs.shape[1:])
            seed[r, p_] = self.enc[site][:, f_].T
            outs.append(inputs)
            seeds.append(seed)
        if seed_out is not None:
            outs.append(self._unembed_in)
            seeds.append(seed_out)
        return outs, [s.unsqueeze(1) for s in seeds]

    def edges_into(self, keys: list[int], edges: EdgeList) -> None:
        """Compute the incoming edges of the targets ``keys`` (one batched backward) into ``edges``."""
        lay = self.layout
        keys = sorted(keys, key=self._key_pos)  # rows by position: causality bounds the work below
        # the last position each row's gradient can reach: its own (causal) or the prompt's end
        row_pos = torch.tensor([self._key_pos(k) if self.causal else lay.n_pos - 1 for k in keys])
        n = len(keys)
        outs, seeds = self._seeds(keys)
        with torch.enable_grad():
            grads = torch.autograd.grad(outs, self._leaves, grad_outputs=seeds, allow_unused=True, retain_graph=True,
                                        is_grads_batched=True)
        grads = [x.new_zeros(n, *x.shape[1:]) if g is None else g.squeeze(1)
                 for g, x in zip(grads, self._leaves, strict=True)]
        row = torch.zeros(n, lay.n_sources, dtype=self.embed.dtype)
        row[:, : lay.n_pos] = (grads[0] * self.embed[0]).sum(-1)
        for i, (site, b) in enumerate(zip(self.sites, lay.blocks, strict=True)):
            g_out = grads[1 + i]  # [n, P, d_out]
            row[:, b.start : b.stop] = _feature_edges(g_out, self.dec[site], b.pos, b.feat, b.values, row_pos)
            e_lo = lay.error_key(i)
            err = self.clean.sites[site].errors[0, 1:]  # a cross-layer site's error is its own layer's: the first slice
            row[:, e_lo : e_lo + lay.n_pos - 1] = (g_out[:, 1:, : err.shape[-1]] * err).sum(-1)
        t_idx, s_idx = (row.abs() > self.min_edge).nonzero(as_tuple=True)
        key_t = torch.tensor(keys, dtype=torch.long)
        edges.add(s_idx, key_t[t_idx], row[t_idx, s_idx].detach())
        edges.visited.extend(keys)

    def visit(self, budget: int, batch_size: int, update_interval: int, progress) -> EdgeList:
        """The visit loop: output targets first, then up to ``budget`` features by influence.
        ``progress(n)`` is called after each batch with the number of targets visited."""
        lay, edges = self.layout, EdgeList()
        out_keys = list(range(lay.n_sources, lay.n_sources + len(self.outputs)))
        for b in range(0, len(out_keys), batch_size):
            self.edges_into(out_keys[b : b + batch_size], edges)
            progress(len(out_keys[b : b + batch_size]))
        out_weight = torch.zeros(lay.n_sources + len(self.outputs), dtype=torch.float64)
        out_weight[lay.n_sources :] = torch.tensor(self.outputs.weights, dtype=torch.float64)
        n_visited, queue, since_update = 0, [], update_interval
        done = set(edges.visited)
        per_batch = min(batch_size, budget) if budget > 0 else 0
        while n_visited < budget:
            if since_update >= update_interval or not queue:
                inf = influence_of_edges(*edges.tensors(), out_weight)[lay.n_pos : lay.error_start]
                order = torch.argsort(inf, descending=True)
                queue = [k for k in (order[inf[order] > 0] + lay.n_pos).tolist() if k not in done]
                since_update = 0
            take = min(per_batch, budget - n_visited)
            keys, queue = queue[:take], queue[take:]
            if not keys:
                break
            self.edges_into(keys, edges)
            done.update(keys)
            n_visited += len(keys)
            since_update += 1
            progress(len(keys))
        return edges


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
