"""The source-node layout of a prompt graph: one flat index ("key") per node that can be a source.

Keys run, in this order:

* ``[0, P)`` the token embeddings ``tok@p``;
* one block per site (in forward order) holding that site's active features ``(pos, feature)``
  at every position but the first (BOS, never spliced), in ``nonzero`` order (by position, then
  feature);
* one block per site holding that site's error nodes at positions ``1 .. P-1``.

Output targets (logits, a metric) are no sources; they take keys ``n_sources + i``. This one class
owns that arithmetic (key -> kind, site, position, value); everything else asks it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from circuitgraph.graph.nodes import Node
from circuitgraph.replacement.model import RunResult, site_depth
from dictionaries.site import Site


@dataclass(frozen=True)
class FeatureBlock:
    """The active features of one site: keys ``start .. start + len(pos)``."""

    site: Site
    start: int
    """Key of the block's first feature."""
    pos: torch.Tensor
    """``[A]`` int64 position of each active feature."""
    feat: torch.Tensor
    """``[A]`` int64 latent index of each active feature."""
    values: torch.Tensor
    """``[A]`` latent value of each active feature."""
    slots: torch.Tensor
    """``[P, K]`` int64: the features active at each position as block offsets (``key - start``),
    padded with -1 to the most active at one position (``K``): a dense per-position layout, so
    products with the features' decoder rows are batched matrix products."""

    @property
    def stop(self) -> int:
        return self.start + self.pos.numel()


def _slots(pos: torch.Tensor, n_pos: int) -> torch.Tensor:
    """``[P, K]`` block offsets of the features at each position (``pos`` sorted), -1 padded."""
    counts = torch.bincount(pos, minlength=n_pos)  # [P]
    k = int(counts.max()) if pos.numel() else 0
    first = torch.cumsum(counts, 0) - counts  # [P] offset of each position's first feature
    slots = torch.full((n_pos, k), -1, dtype=torch.long)
    offsets = torch.arange(pos.numel())
    slots[pos, offsets - first[pos]] = offsets
    return slots


class SourceLayout:
    """Keys of the source nodes of one prompt (see the module docstring), with their values."""

    def __init__(self, clean: RunResult, sites: list[Site], token_labels: list[str]) -> None:
        self.sites = sites
        self.n_pos = len(token_labels)
        self.token_labels = token_labels
        self.blocks: list[FeatureBlock] = []
        start = self.n_pos
        for site in sites:
            lat = clean.sites[site].latents[0]  # [P, d_dict], on the model's device
            active = lat.clone()
            active[0] = 0  # BOS is never spliced: its latents are no nodes
            p_idx, f_idx = active.nonzero(as_tuple=True)
            values = lat[p_idx, f_idx].cpu()
            p_idx, f_idx = p_idx.cpu(), f_idx.cpu()  # the layout lives on the CPU
            self.blocks.append(FeatureBlock(site, start, p_idx, f_idx, values, _slots(p_idx, self.n_pos)))
            start += p_idx.numel()
        self._starts = [b.start for b in self.blocks]
        self.error_start = start
        """Key of the first error node (site ``i``'s errors: ``error_start + i * (P - 1) + pos - 1``)."""
        self.n_sources = start + len(sites) * (self.n_pos - 1)
        self.error_norms = [clean.sites[s].errors[0, 1:].norm(dim=-1).cpu() for s in sites]  # [P-1] per site

    # --- sizes -------------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        """Active features over all sites (every position but BOS)."""
        return self.error_start - self.n_pos

    def error_key(self, site_index: int) -> int:
        """Key of site ``site_index``'s error node at position 1."""
        return self.error_start + site_index * (self.n_pos - 1)

    # --- key lookups ---------------------------------------------------------------------------
    def block_of(self, key: int) -> int:
        """Index of the site block holding feature ``key``."""
        if not self.n_pos <= key < self.error_start:
            raise IndexError(f"key {key} is no feature key")
        return bisect.bisect_right(self._starts, key) - 1

    def positions(self) -> torch.Tensor:
        """``[n_sources]`` int64 position of every source key."""
        err = torch.arange(1, self.n_pos).repeat(len(self.sites))
        return torch.cat([torch.arange(self.n_pos), *(b.pos for b in self.blocks), err])

    def feature_depths(self) -> torch.Tensor:
        """``[n_features]`` forward-order depth (:func:`site_depth`) of every feature key."""
        return torch.cat([torch.full((b.pos.numel(),), site_depth(b.site)) for b in self.blocks] or [torch.zeros(0)])

    def position(self, key: int) -> int:
        """Position of source ``key``."""
        if key < self.n_pos:
            return key
        if key < self.error_start:
            b = self.blocks[self.block_of(key)]
            return int(b.pos[key - b.start])
        return (key - self.error_start) % (self.n_pos - 1) + 1

    def node(self, key: int) -> Node:
        """The graph node of source ``key``."""
        if key < self.n_pos:
            return Node("token", -1.0, pos=key)
        if key < self.error_start:
            b = self.blocks[self.block_of(key)]
            j = key - b.start
            return Node("feature", site_depth(b.site), b.site.id, int(b.feat[j]), int(b.pos[j]))
        site_index, offset = divmod(key - self.error_start, self.n_pos - 1)
        site = self.sites[site_index]
        return Node("error", site_depth(site), site.id, pos=offset + 1)

    def label(self, key: int) -> str:
        if key < self.n_pos:
            return self.token_labels[key]
        return "" if key < self.error_start else "error"

    def values(self) -> torch.Tensor:
        """``[n_sources]`` node values: 0 for tokens, latents for features, error norms for errors."""
        parts = [torch.zeros(self.n_pos, dtype=self.blocks[0].values.dtype if self.blocks else torch.float32)]
        parts += [b.values for b in self.blocks] + list(self.error_norms)
        dtype = parts[1].dtype if len(parts) > 1 else parts[0].dtype
        return torch.cat([p.to(dtype) for p in parts])
