"""Dataset circuit nodes: one identity type, and the *kept* and *ablated* node sets built from it.

A dataset node is a dictionary feature or a site's error term, either aggregated over positions
or at one offset counted back from the answer position (``0`` is the answer position). This
module alone owns the flat layout of the per-site score and mask vectors:

    feature f at offset r   ->  index  r * d_dict + f   of the site's ``[n_offsets * d_dict]`` vector
    error term at offset r  ->  index  r                of the site's ``[n_offsets]`` vector

Aggregated node sets have ``n_offsets == 1`` and ``resolved == False``: a node then stands for
the feature (error) at every position.

Two set types keep "which nodes form the circuit" and "which nodes are ablated" apart:
:class:`KeptNodes` (a circuit) and :class:`AblatedNodes` (what an ablation run replaces).
``kept.ablated()`` and ``ablated.kept()`` convert between them; the ablator accepts either and
treats nodes the set does not cover (offsets past its length, for prompts longer than those it
was selected on) as *not kept* / *not ablated* respectively.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from dictionaries.site import Site


class DatasetNode(NamedTuple):
    """A feature (``feature`` its latent index) or an error term (``feature is None``) of ``site``,
    at ``offset`` positions before the answer position (0 when positions are aggregated)."""

    site: Site
    feature: int | None
    offset: int = 0

    @property
    def is_error(self) -> bool:
        return self.feature is None

    def flat(self, d_dict: int) -> int:
        """Index in the site's feature vector (features) or error vector (errors)."""
        return self.offset if self.feature is None else self.offset * d_dict + self.feature

    @classmethod
    def from_flat(cls, site: Site, flat: int, d_dict: int) -> DatasetNode:
        """The feature node at flat index ``flat`` of ``site``'s feature vector."""
        offset, feature = divmod(int(flat), d_dict)
        return cls(site, feature, offset)

    def node_id(self, resolved: bool) -> str:
        """The graph id (``L2.transcoder#123``, ``L2.transcoder#err@-1``, ...)."""
        at = f"@{-(self.offset + 1)}" if resolved else ""
        return f"{self.site.id}#{'err' if self.feature is None else self.feature}{at}"


def split_flat(flat: torch.Tensor, d_dict: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, features)`` of flat feature indices."""
    return torch.div(flat, d_dict, rounding_mode="floor"), flat % d_dict


S = TypeVar("S", bound="_NodeMasks")


@dataclass
class _NodeMasks:
    features: dict[Site, torch.Tensor]
    """``[n_offsets * d_dict]`` bool per site."""
    errors: dict[Site, torch.Tensor]
    """``[n_offsets]`` bool per site: the site's error node(s)."""
    resolved: bool = False
    """One node per offset from the answer position (else one node for every position)."""

    @classmethod
    def none(cls: type[S], d_dicts: Mapping[Site, int], n_offsets: int = 1, resolved: bool | None = None) -> S:
        """The set with no node in it (``d_dicts``: each site's dictionary width)."""
        return cls({s: torch.zeros(n_offsets * d, dtype=torch.bool) for s, d in d_dicts.items()},
                   {s: torch.zeros(n_offsets, dtype=torch.bool) for s in d_dicts},
                   n_offsets > 1 if resolved is None else resolved)

    @classmethod
    def every(cls: type[S], d_dicts: Mapping[Site, int], n_offsets: int = 1, resolved: bool | None = None) -> S:
        """The set of every node."""
        out = cls.none(d_dicts, n_offsets, resolved)
        for m in (*out.features.values(), *out.errors.values()):
            m.fill_(True)
        return out

    @classmethod
    def whole_sites(cls: type[S], d_dicts: Mapping[Site, int], sites: Iterable[Site]) -> S:
        """Every feature and the error node of ``sites`` (aggregated over positions)."""
        out = cls.none(d_dicts)
        for s in sites:
            out.features[s].fill_(True)
            out.errors[s].fill_(True)
        return out

    @property
    def n_offsets(self) -> int:
        return int(next(iter(self.errors.values())).numel()) if self.errors else 1

    def n_features(self) -> int:
        return int(sum(int(m.sum()) for m in self.features.values()))

    def n_errors(self) -> int:
        return int(sum(int(m.sum()) for m in self.errors.values()))

    def n_nodes(self) -> int:
        return self.n_features() + self.n_errors()

    def copy(self: S) -> S:
        return type(self)({s: m.clone() for s, m in self.features.items()},
                          {s: m.clone() for s, m in self.errors.items()}, self.resolved)

    def with_nodes(self: S, nodes: Iterable[DatasetNode]) -> S:
        """A copy with ``nodes`` added."""
        out = self.copy()
        for n in nodes:
            target = out.errors if n.feature is None else out.features
            d_dict = 1 if n.feature is None else self.features[n.site].numel() // self.n_offsets
            target[n.site][n.flat(d_dict)] = True
        return out

    def without_errors(self: S) -> S:
        """A copy with every error node removed."""
        out = self.copy()
        for m in out.errors.values():
            m.fill_(False)
        return out

    def nodes(self) -> list[DatasetNode]:
        """The nodes in the set, site by site (in the masks' site order): features, then errors."""
        out: list[DatasetNode] = []
        for s, m in self.features.items():
            d_dict = m.numel() // self.n_offsets
            out += [DatasetNode.from_flat(s, i, d_dict) for i in m.nonzero().squeeze(1).tolist()]
            out += [DatasetNode(s, None, o) for o in self.errors[s].nonzero().squeeze(1).tolist()]
        return out

    def _complement_masks(self) -> tuple[dict, dict]:
        return {s: ~m for s, m in self.features.items()}, {s: ~m for s, m in self.errors.items()}


class KeptNodes(_NodeMasks):
    """A circuit: the nodes kept; every other node is ablated when the circuit is evaluated."""

    def ablated(self) -> AblatedNodes:
        """The nodes ablated when only this circuit is kept."""
        return AblatedNodes(*self._complement_masks(), self.resolved)


class AblatedNodes(_NodeMasks):
    """The nodes an ablation run replaces; every other node keeps its clean (re-encoded) value."""

    def kept(self) -> KeptNodes:
        """The nodes this ablation leaves in place."""
        return KeptNodes(*self._complement_masks(), self.resolved)
