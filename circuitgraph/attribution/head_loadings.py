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

from circuitgraph.attribution.prompt.bos import clean_run
from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec
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


def head_loadings(rm: ReplacementModel, tokens: torch.Tensor, site: Site, feature: int, pos: int,
                  bos: str = "keep") -> HeadLoadings:
    """Every incoming edge of feature ``feature`` of the ``attn_z`` site ``site`` at ``pos`` on the
    prompt ``tokens`` (``[1, P]``), split by head, with patterns, scales and gates frozen as a prompt
    graph freezes them (edge = source value x gradient along it). ``bos``: the prompt graph's BOS
    convention (``keep`` credits the sites' BOS outputs to ``tok@0``; ``detach`` holds them fixed)."""
    return head_loadings_batch(rm, tokens, site, [(feature, pos)], bos)[0]


def head_loadings_batch(rm: ReplacementModel, tokens: torch.Tensor, site: Site, targets: list[tuple[int, int]],
                        bos: str = "keep", chunk: int = 64, sources: set[str] | None = None,
                        clean: tuple[RunResult, dict[Site, torch.Tensor]] | None = None) -> list[HeadLoadings]:
    """:func:`head_loadings` of several ``(feature, pos)`` targets of one ``attn_z`` site: one frozen
    forward pass, and batched backward passes of ``chunk`` rows (``n_heads`` rows a target).
    ``sources``: compute only these source ids' columns (e.g. a pruned graph's nodes); ``clean``:
    the prompt's :func:`~circuitgraph.attribution.prompt.bos.clean_run`, when the caller has it."""
    if site.kind != "attn_z" or site not in rm.dicts:
        raise CircuitGraphError(f"head loadings split edges into attention-z features; {site.id} is not a spliced attn_z site")
    if bos not in ("keep", "detach"):
        raise CircuitGraphError(f"bos must be keep or detach, got {bos!r}")
    tokens = tokens.reshape(1, -1)
    model, n_pos, n_heads = rm.model, tokens.shape[1], rm.model.cfg.n_heads
    for _, pos in targets:
        if not 1 <= pos < n_pos:
            raise CircuitGraphError(f"position {pos}: attention features are spliced at positions 1..{n_pos - 1}")
    sites = [s for s in rm.sites if s.layer <= site.layer]
    with torch.no_grad():
        clean, held = clean if clean is not None else clean_run(rm, tokens)
        if bos == "keep":
            held = {}  # the BOS outputs stay live: computed from tok@0 through the frozen model
        embed = model.embed(tokens)  # [1, P, d_model]
    dec = {s: rm.dicts[s].decoder_directions().detach() for s in sites}
    embed_leaf = embed.clone().requires_grad_(True)
    offsets = {s: torch.zeros(1, n_pos, dec[s].shape[1], dtype=embed.dtype, requires_grad=True) for s in sites}
    spec = SpliceSpec(latents={s: r.latents for s, r in clean.sites.items()},
                      errors={s: r.errors for s, r in clean.sites.items()},
                      embed=embed_leaf, frozen=clean.frozen, offsets=offsets,
                      unspliced={s: held[s] for s in sites if s in held})
    directions = rm.dicts[site].active_directions().detach()  # [d_in, d_dict]
    rows = torch.cat([head_seeds(directions[:, f], n_heads) for f, _ in targets])  # [T * H, d_in]
    rm.forward_passes += 1
    leaves = [embed_leaf, *offsets.values()]
    grads: list[list[torch.Tensor]] = [[] for _ in leaves]
    with torch.enable_grad(), rm.spliced(spec) as record:
        model(tokens, stop_at_layer=site.layer + 1)
        z_in = record[site].inputs  # [1, P, H * d_head]
        for lo in range(0, rows.shape[0], chunk):
            hi = min(lo + chunk, rows.shape[0])
            seeds = z_in.new_zeros(hi - lo, *z_in.shape)
            for r in range(lo, hi):
                seeds[r - lo, 0, targets[r // n_heads][1]] = rows[r]
            g = torch.autograd.grad([z_in], leaves, grad_outputs=[seeds], allow_unused=True, is_grads_batched=True,
                                    retain_graph=hi < rows.shape[0])
            for i, (gi, x) in enumerate(zip(g, leaves, strict=True)):
                grads[i].append(torch.zeros(hi - lo, *x.shape, dtype=x.dtype) if gi is None else gi.detach())
    full = [torch.cat(g) for g in grads]  # [T * H, 1, P, width] per leaf
    def wanted(ids: list[str]) -> torch.Tensor:
        return torch.tensor([sources is None or i in sources for i in ids], dtype=torch.bool)

    tok_names = [f"tok@{p}" for p in range(n_pos)]
    keep = wanted(tok_names)
    names = [n for n, k in zip(tok_names, keep.tolist(), strict=True) if k]
    cols = [(full[0][:, 0, keep] * embed[0, keep]).sum(-1)]  # [T * H, P]
    for i, s in enumerate(sites):
        g = full[1 + i][:, 0]  # [T * H, P, d_out]
        lat = clean.sites[s].latents[0].clone()
        lat[0] = 0  # BOS keeps its activation: no feature nodes there
        p_idx, f_idx = lat.nonzero(as_tuple=True)
        ids = [f"{s.id}#{f}@{p}" for p, f in zip(p_idx.tolist(), f_idx.tolist(), strict=True)]
        keep = wanted(ids)
        p_idx, f_idx = p_idx[keep], f_idx[keep]
        writes = lat[p_idx, f_idx, None] * dec[s][f_idx]  # [A, d_out]
        cols.append(torch.einsum("rad,ad->ra", g[:, p_idx], writes))
        names += [n for n, k in zip(ids, keep.tolist(), strict=True) if k]
        err_ids = [f"{s.id}#err@{p}" for p in range(1, n_pos)]
        keep = wanted(err_ids)
        err = clean.sites[s].errors[0, 1:][keep]  # [E, d_err] (a CLT error is its own layer's: the first slice)
        cols.append(torch.einsum("red,ed->re", g[:, 1:][:, keep, : err.shape[-1]], err))
        names += [n for n, k in zip(err_ids, keep.tolist(), strict=True) if k]
    values = torch.cat(cols, dim=1).detach().reshape(len(targets), n_heads, -1)
    return [HeadLoadings(f"{site.id}#{f}@{p}", names, values[t]) for t, (f, p) in enumerate(targets)]
