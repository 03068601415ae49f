"""Batched backward passes through the frozen replacement model of one prompt, and the visit loop.

**Frozen prefix graphs.** A frozen forward pass (batch 1) makes the embeddings, a zero offset on
every site output and, for ``bos="keep"`` in a causal model, a zero leaf on every BOS output the
leaves of an autograd graph (:class:`Prefix`). In a causal model a target at position ``t`` reads
nothing after ``t``, so graphs are built for a few prompt prefixes (at most :data:`N_PREFIXES`)
and each batch runs through the shortest one covering its targets; a target at layer ``l`` only
back-propagates through the layers below ``l``, so batches are formed from targets sorted by
(prefix, depth, position). A bidirectional model has one graph over the whole prompt.

**One batch** = one vectorised backward (``is_grads_batched``: row ``i`` of the seeds carries
target ``i``), seeded at the site inputs (a feature target's gradient there is its encoder
direction) and at the unembedding input (outputs). From the leaves' gradients ``g``:

    token   tok@p:       g_embed[p] . embed[p]                   (+ the BOS term, see bos.py)
    feature (s, p, f):   g_offset_s[p] . (value * decoder row f)  only the active features' rows,
                                                                  one batched product per position
    error   (s, p):      g_offset_s[p] . error_s[p]

**The visit loop**: output targets first, then every active feature when the budget covers them
(circuit-tracer's rule), else windows of ``rank_interval`` features in order of their influence on
the outputs through the edges found so far, re-ranked after each window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from circuitgraph.attribution.prompt.bos import BosMode
from circuitgraph.attribution.prompt.edges import EdgeStore
from circuitgraph.attribution.prompt.layout import SourceLayout
from circuitgraph.attribution.prompt.outputs import OutputTargets
from circuitgraph.graph.influence import influence_of_edge_chunks
from circuitgraph.replacement.frozen import FrozenState
from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec
from dictionaries.site import Site

log = logging.getLogger(__name__)

N_PREFIXES = 8
"""Most frozen prefix graphs of a causal prompt (their lengths split the prompt evenly)."""


class Prefix(NamedTuple):
    """The frozen autograd graph of the first ``n_pos`` positions."""

    n_pos: int
    inputs: dict[Site, torch.Tensor]
    """``[1, T, d_in]`` each site's input (where feature targets are seeded)."""
    unembed_in: torch.Tensor
    """``[1, T, d_model]`` the final normalised residual (where outputs are seeded)."""
    leaves: list[torch.Tensor]
    """The embeddings ``[1, T, d_model]``, one offset per site ``[1, T, d_out]``, then one BOS leaf per
    site ``[1, 1, d_out]`` when the BOS outputs are leaves."""


class FrozenBackward:
    """The frozen model of one prompt: the incoming edges of batches of targets, and the visit loop.

    ``bos_outputs``: each site's recorded output at BOS; held fixed there (``bos="detach"``, and
    ``keep`` in a causal model, where ``bos_deltas`` then gives ``tok@0``'s share, see bos.py).
    ``bos_deltas`` ``None`` with ``keep``: the BOS outputs stay live (bidirectional models)."""

    def __init__(self, rm: ReplacementModel, tokens: torch.Tensor, clean: RunResult, layout: SourceLayout,
                 outputs: OutputTargets, *, causal: bool, bos: BosMode, bos_outputs: dict[Site, torch.Tensor],
                 bos_deltas: dict[Site, torch.Tensor] | None, min_edge: float) -> None:
        self.rm, self.tokens, self.clean, self.layout, self.outputs = rm, tokens, clean, layout, outputs
        self.causal, self.min_edge, self.sites = causal, min_edge, layout.sites
        self.device = tokens.device
        self.embed = rm.model.embed(tokens).detach()  # [1, P, d_model]
        self.bos_outputs = bos_outputs if bos == "detach" or bos_deltas is not None else {}
        self.bos_deltas = bos_deltas
        self.dec_pad: dict[Site, torch.Tensor] = {}
        """``[P, K, d_out]`` per site: value x decoder row of the features active at each position (0-padded)."""
        self.enc_rows: dict[Site, torch.Tensor] = {}
        """``[A, d_in]`` per site: each active feature's encoder direction (its target seed)."""
        self.slot_keys: dict[Site, torch.Tensor] = {}
        """``[P, K]`` per site: the key of each slot of ``dec_pad`` (-1: padding)."""
        for site, block in zip(self.sites, layout.blocks, strict=True):
            self.dec_pad[site], self.enc_rows[site], self.slot_keys[site] = self._feature_tables(site, block)
        self.key_pos = torch.cat([layout.positions(), torch.tensor(outputs.positions, dtype=torch.long)])
        """``[n_sources + n_outputs]`` position of every key."""
        self.key_depth = torch.cat([torch.full((layout.n_pos,), -1.0), layout.feature_depths(),
                                    torch.full((layout.n_sources - layout.error_start,), 0.0),
                                    torch.full((len(outputs),), float(rm.model.cfg.n_layers) + 1)])
        """``[n_sources + n_outputs]`` forward-order depth of every key (orders batches)."""
        step = -(-layout.n_pos // N_PREFIXES)
        self.prefix_ends = sorted({min(layout.n_pos, step * (i + 1)) for i in range(N_PREFIXES)}) if causal \
            else [layout.n_pos]
        """Lengths of the prefix graphs."""
        self._prefixes: dict[int, Prefix] = {}

    def _feature_tables(self, site: Site, block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dec_pad``, ``enc_rows`` and ``slot_keys`` of one site (see ``__init__``): active rows only."""
        d, dev = self.rm.dicts[site], self.device
        rows = d.decoder_directions().detach()[block.feat.to(dev)] * block.values.to(dev)[:, None]  # [A, d_out]
        valid = block.slots >= 0
        pad = rows.new_zeros(*block.slots.shape, rows.shape[1])
        pad[valid.to(dev)] = rows[block.slots[valid].to(dev)]
        enc = d.active_directions().detach()[:, block.feat.to(dev)].T.contiguous()
        return pad, enc, torch.where(valid, block.slots + block.start, -1)

    # --- frozen graphs -------------------------------------------------------------------------
    def prefix_of(self, keys: torch.Tensor) -> torch.Tensor:
        """``[n]`` length of the shortest prefix graph covering each target key."""
        ends = torch.tensor(self.prefix_ends)
        return ends[torch.searchsorted(ends, self.key_pos[keys] + 1)]

    def prefix(self, n_pos: int) -> Prefix:
        """The frozen graph of the first ``n_pos`` positions (built once)."""
        if n_pos not in self._prefixes:
            self._prefixes[n_pos] = self._build(n_pos)
        return self._prefixes[n_pos]

    def _build(self, t: int) -> Prefix:
        rm, clean, model = self.rm, self.clean, self.rm.model
        frozen = clean.frozen
        if t < self.layout.n_pos:  # causal: the first t positions never read later ones
            frozen = FrozenState({k: v[..., :t, :t] for k, v in frozen.patterns.items()},
                                 {k: v[:, :t] for k, v in frozen.scales.items()},
                                 {k: v[:, :t] for k, v in frozen.gates.items()})
        embed = self.embed[:, :t].clone().requires_grad_(True)
        offsets = {s: self.embed.new_zeros(1, t, self.dec_pad[s].shape[-1], requires_grad=True) for s in self.sites}
        bos_leaves = {s: torch.zeros_like(self.bos_outputs[s], requires_grad=True) for s in self.sites} \
            if self.bos_deltas is not None else {}
        unspliced = {s: v + bos_leaves[s] if s in bos_leaves else v for s, v in self.bos_outputs.items()}
        spec = SpliceSpec(latents={s: clean.sites[s].latents[:, :t] for s in self.sites},
                          errors={s: clean.sites[s].errors[:, :t] for s in self.sites},
                          embed=embed, frozen=frozen, offsets=offsets, unspliced=unspliced)
        rm.forward_passes += 1
        with torch.enable_grad(), rm.spliced(spec) as record:
            # stop before the unembedding (no full-vocabulary product): outputs are seeded on
            # the final normalised residual instead
            resid = model(self.tokens[:, :t], stop_at_layer=model.cfg.n_layers)
            unembed_in = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        inputs = {s: record[s].inputs for s in self.sites}
        return Prefix(t, inputs, unembed_in, [embed, *offsets.values(), *bos_leaves.values()])

    # --- one batch -----------------------------------------------------------------------------
    def _seeds(self, keys: torch.Tensor, g: Prefix) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors to differentiate and their ``[n, 1, ...]`` batched seeds."""
        lay, n = self.layout, keys.numel()
        rows = torch.arange(n)
        outs, seeds = [], []
        for site, b in zip(self.sites, lay.blocks, strict=True):
            mine = (keys >= b.start) & (keys < b.stop)
            if bool(mine.any()):
                j = keys[mine] - b.start
                seed = g.inputs[site].new_zeros(n, *g.inputs[site].shape[1:])  # [n, T, d_in]
                seed[rows[mine].to(self.device), b.pos[j].to(self.device)] = self.enc_rows[site][j.to(self.device)]
                outs.append(g.inputs[site])
                seeds.append(seed)
        is_out = keys >= lay.n_sources
        if bool(is_out.any()):
            o = keys[is_out] - lay.n_sources
            seed = g.unembed_in.new_zeros(n, *g.unembed_in.shape[1:])
            seed[rows[is_out].to(self.device), self.key_pos[keys[is_out]].to(self.device)] = \
                self.outputs.directions[o.to(self.device)].to(seed.dtype)
            outs.append(g.unembed_in)
            seeds.append(seed)
        return outs, [s.unsqueeze(1) for s in seeds]

    def edges_into(self, keys: torch.Tensor, store: EdgeStore) -> None:
        """The incoming edges of the targets ``keys`` (one batched backward) into ``store``."""
        g = self.prefix(int(self.prefix_of(keys).max()))
        outs, seeds = self._seeds(keys, g)
        with torch.enable_grad():
            grads = torch.autograd.grad(outs, g.leaves, grad_outputs=seeds, allow_unused=True, retain_graph=True,
                                        is_grads_batched=True)
        grads = [None if x is None else x.squeeze(1) for x in grads]
        weights, columns = self._edge_columns(grads, g.n_pos, keys.numel())
        weights = torch.cat(weights, 1)  # [n, M]
        columns = torch.cat(columns)  # [M] source key of each column
        t_idx, c_idx = (weights.abs() > self.min_edge).nonzero(as_tuple=True)
        store.add(columns[c_idx], keys.to(self.device)[t_idx], weights[t_idx, c_idx])

    def _edge_columns(self, grads: list, t: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``[n, m]`` edge weights and their ``[m]`` source keys, one pair per source kind and site."""
        lay, n_sites = self.layout, len(self.sites)
        g_embed = grads[0]  # [n, T, d_model], None when every path from the tokens is replaced
        tok = self.embed.new_zeros(n, t) if g_embed is None else (g_embed * self.embed[0, :t]).sum(-1)  # [n, T]
        if self.bos_deltas is not None:
            for site, g_bos in zip(self.sites, grads[1 + n_sites :], strict=True):
                if g_bos is not None:
                    tok[:, 0] += (g_bos.flatten(1) * self.bos_deltas[site].flatten()).sum(-1)
        weights, columns = [tok], [torch.arange(t, device=self.device)]
        for i, site in enumerate(self.sites):
            g_out = grads[1 + i]  # [n, T, d_out], None when no target reads this site
            if g_out is None:
                continue
            slots = self.slot_keys[site][:t].to(self.device)  # [T, K]
            feat = torch.bmm(g_out.transpose(0, 1), self.dec_pad[site][:t].transpose(1, 2))  # [T, n, K]
            valid = (slots >= 0).flatten()
            weights.append(feat.permute(1, 0, 2).reshape(feat.shape[1], -1)[:, valid])
            columns.append(slots.flatten()[valid])
            err = self.clean.sites[site].errors[0, 1:t]  # [T-1, d]; a cross-layer site's error is its own layer's
            weights.append((g_out[:, 1:, : err.shape[-1]] * err).sum(-1))
            columns.append(torch.arange(t - 1, device=self.device) + lay.error_key(i))
        return weights, columns

    # --- the visit loop --------------------------------------------------------------------------
    def run(self, keys: torch.Tensor, batch_size: int, store: EdgeStore, progress: Callable[[int], object]) -> None:
        """Visit ``keys`` in batches of at most ``batch_size`` targets sorted by (prefix, depth, position)."""
        order = torch.argsort(self.key_pos[keys], stable=True)
        keys = keys[order]
        order = torch.argsort(self.key_depth[keys], stable=True)
        keys = keys[order]
        keys = keys[torch.argsort(self.prefix_of(keys), stable=True)]
        for lo in range(0, keys.numel(), batch_size):
            batch = keys[lo : lo + batch_size]
            self.edges_into(batch, store)
            progress(batch.numel())

    def visit(self, budget: int, batch_size: int, rank_interval: int, store: EdgeStore,
              progress: Callable[[int], object]) -> torch.Tensor:
        """Outputs first, then up to ``budget`` features (see the module docstring); returns the
        visited target keys."""
        lay = self.layout
        out_keys = torch.arange(lay.n_sources, lay.n_sources + len(self.outputs))
        self.run(out_keys, batch_size, store, progress)
        features = torch.arange(lay.n_pos, lay.error_start)
        if budget >= lay.n_features:
            self.run(features, batch_size, store, progress)
            return torch.cat([out_keys, features])
        out_weight = torch.zeros(lay.n_sources + len(self.outputs), dtype=torch.float64)
        out_weight[lay.n_sources :] = torch.tensor(self.outputs.weights, dtype=torch.float64)
        done = torch.zeros(lay.n_sources, dtype=torch.bool)
        visited = [out_keys]
        n_visited = 0
        while n_visited < budget:
            inf = influence_of_edge_chunks(store.chunks, out_weight)[features]
            ranked = features[torch.argsort(inf, descending=True, stable=True)]
            ranked = ranked[(inf[ranked - lay.n_pos] > 0) & ~done[ranked]]
            window = ranked[: min(rank_interval, budget - n_visited)]
            if window.numel() == 0:
                break
            self.run(window, batch_size, store, progress)
            done[window] = True
            visited.append(window)
            n_visited += window.numel()
        return torch.cat(visited)


def row_bytes(layout: SourceLayout, rm: ReplacementModel, itemsize: int) -> int:
    """Rough working memory of one target row of a batch: the leaves' gradients, the seeds and the
    edge columns (the memory budget divided by this sizes the batches)."""
    d_model = rm.model.cfg.d_model
    widths = sum(rm.dicts[s].cfg.out_width + rm.dicts[s].cfg.d_in for s in layout.sites)
    grads = layout.n_pos * (4 * d_model + widths) * itemsize
    columns = layout.n_sources * (2 * itemsize + 16)  # weights (and a copy), int64 indices of the kept ones
    return grads + columns
