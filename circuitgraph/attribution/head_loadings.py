"""Head loadings: an attention feature's incoming edges split by the head that carries them.

An ``attn_z`` feature of layer ``L`` reads the concatenated per-head outputs ``z = [z_0 .. z_H-1]``
at its position, and ``z_h`` at position ``q`` is ``sum_k pattern_h[q, k] v_h(k)``: everything
that reaches the feature from another position (and from its own) passes through exactly one
head of layer ``L``. Seeding the frozen backward pass with the feature's encoder direction
*restricted to head h's slice* (:func:`head_seeds`) gives the part of every incoming edge that
flows through head ``h``; the ``H`` parts sum to the edge (the seeds sum to the full direction).
Zeroing head ``h``'s frozen pattern row at ``q`` removes exactly that part (the test).

For the prompt-graph engine: add the ``H`` rows of :func:`head_seeds` instead of the one row of an
``attn_z`` target in its batched backward, and store the per-head edges. :func:`head_loadings` is a
standalone reference (one frozen forward, one batched backward of ``H`` rows) returning, for one
target, every source's per-head edge under the graph's node ids.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from dictionaries.site import Site


def head_seeds(direction: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[n_heads, n_heads * d_head]``: row ``h`` is ``direction`` (``[n_heads * d_head]``, an
    ``attn_z`` feature's encoder direction) with every slice but head ``h``'s zeroed. The rows sum
    to ``direction``."""
    d_head = direction.shape[-1] // n_heads
    mask = torch.block_diag(*[torch.ones(1, d_head, dtype=direction.dtype, device=direction.device)] * n_heads)
    return mask * direction  # [H, H * d_head]


class HeadLoadings(NamedTuple):
    """Per-head incoming edges of one ``attn_z`` feature."""

    target: str
    """The feature's node id (``L2.attn_z#123@9``)."""
    sources: list[str]
    """Source node ids: ``tok@p``, active features ``Ll.site#f@p`` and errors ``Ll.site#err@p`` (p >= 1)."""
    values: torch.Tensor
    """``[n_heads, n_sources]``: the part of each source's edge carried by each head; columns sum to the edges."""

    def of(self, source: str) -> torch.Tensor:
        """``[n_heads]`` loadings of one source's edge."""
        return self.values[:, self.sources.index(source)]

    def edges(self) -> torch.Tensor:
        """``[n_sources]`` the full edges (the sum over heads)."""
        return self.values.sum(0)


def head_loadings(rm: ReplacementModel, tokens: torch.Tensor, site: Site, feature: int, pos: int) -> HeadLoadings:
    """Every incoming edge of feature ``feature`` of the ``attn_z`` site ``site`` at ``pos`` on the
    prompt ``tokens`` (``[1, P]``), split by head, with patterns, scales and gates frozen as a prompt
    graph freezes them (edge = source value x gradient along it)."""
    if site.kind != "attn_z" or site not in rm.dicts:
        raise CircuitGraphError(f"head loadings split edges into attention-z features; {site.id} is not a spliced attn_z site")
    tokens = tokens.reshape(1, -1)
    model, n_pos = rm.model, tokens.shape[1]
    if not 1 <= pos < n_pos:
        raise CircuitGraphError(f"position {pos}: attention features are spliced at positions 1..{n_pos - 1}")
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
        embed = model.embed(tokens)  # [1, P, d_model]
    sites = [s for s in rm.sites if s.layer <= site.layer]
    dec = {s: rm.dicts[s].decoder_directions().detach() for s in sites}
    embed_leaf = embed.clone().requires_grad_(True)
    offsets = {s: torch.zeros(1, n_pos, dec[s].shape[1], dtype=embed.dtype, requires_grad=True) for s in sites}
    spec = SpliceSpec(latents={s: r.latents for s, r in clean.sites.items()},
                      errors={s: r.errors for s, r in clean.sites.items()},
                      embed=embed_leaf, frozen=clean.frozen, offsets=offsets)
    rm.forward_passes += 1
    with torch.enable_grad(), rm.spliced(spec) as record:
        model(tokens, stop_at_layer=site.layer + 1)
        z_in = record[site].inputs  # [1, P, H * d_head]
        rows = head_seeds(rm.dicts[site].active_directions()[:, feature].detach(), model.cfg.n_heads)
        seeds = z_in.new_zeros(rows.shape[0], *z_in.shape)
        seeds[:, 0, pos] = rows
        leaves = [embed_leaf, *offsets.values()]
        grads = torch.autograd.grad([z_in], leaves, grad_outputs=[seeds], allow_unused=True, is_grads_batched=True)
    grads = [torch.zeros(rows.shape[0], *x.shape, dtype=x.dtype) if g is None else g for g, x in zip(grads, leaves, strict=True)]
    names = [f"tok@{p}" for p in range(n_pos)]
    cols = [(grads[0][:, 0] * embed[0]).sum(-1)]  # [H, P]
    for i, s in enumerate(sites):
        g = grads[1 + i][:, 0]  # [H, P, d_out]
        lat = clean.sites[s].latents[0].clone()
        lat[0] = 0  # BOS keeps its activation: no feature nodes there
        p_idx, f_idx = lat.nonzero(as_tuple=True)
        writes = lat[p_idx, f_idx, None] * dec[s][f_idx]  # [A, d_out]
        cols.append((g[:, p_idx] * writes).sum(-1))
        names += [f"{s.id}#{f}@{p}" for p, f in zip(p_idx.tolist(), f_idx.tolist(), strict=True)]
        err = clean.sites[s].errors[0, 1:]  # [P - 1, d_err] (a CLT error is its own layer's: the first slice)
        cols.append((g[:, 1:, : err.shape[-1]] * err).sum(-1))
        names += [f"{s.id}#err@{p}" for p in range(1, n_pos)]
    return HeadLoadings(f"{site.id}#{feature}@{pos}", names, torch.cat(cols, dim=1).detach())
