"""Graph nodes and their stable string ids (used in JSON, HTML, queries and the CLI).

=========== ============================== ==========================================
kind        id                             meaning
=========== ============================== ==========================================
token       ``tok@3``                      the token embedding at position 3
feature     ``L2.transcoder#123@5``        latent 123 of the L2 transcoder at position 5
error       ``L2.transcoder#err@5``        that dictionary's error term at position 5
logit       ``logit#1234@9``               the (mean-centred) logit of token 1234 at position 9
metric      ``metric:logit_diff``          a custom linear target (e.g. answer - wrong logit)
component   ``L1.head2@5`` / ``L1.mlp@5``  an attention head's or MLP's output (component graphs)
supernode   ``super:name``                 a group of features collapsed into one node
=========== ============================== ==========================================

Dataset graphs aggregate over positions by default; their ids drop the ``@pos`` suffix
(``L2.transcoder#123``). Position-resolved dataset graphs count positions back from the answer
position: ``L2.transcoder#123@-1`` is that feature at the answer position of every prompt.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from circuitgraph.errors import CircuitGraphError

NodeKind = Literal["token", "feature", "error", "logit", "metric", "component", "supernode"]
NODE_KINDS: tuple[str, ...] = get_args(NodeKind)

_PATTERNS = [
    ("token", re.compile(r"^tok(?:@(?P<pos>-?\d+))?$")),
    ("error", re.compile(r"^(?P<site>L\d+\.[a-z_]+)#err(?:@(?P<pos>-?\d+))?$")),
    ("feature", re.compile(r"^(?P<site>L\d+\.[a-z_]+)#(?P<index>\d+)(?:@(?P<pos>-?\d+))?$")),
    ("logit", re.compile(r"^logit#(?P<index>\d+)(?:@(?P<pos>-?\d+))?$")),
    ("metric", re.compile(r"^metric:(?P<name>[\w.-]+)$")),
    ("supernode", re.compile(r"^super:(?P<name>[\w.-]+)$")),
    ("component", re.compile(r"^(?P<site>L\d+\.(?:head\d+|mlp|attn))(?:@(?P<pos>-?\d+))?$")),
]


@dataclass(frozen=True)
class Node:
    """One graph node. ``depth`` orders nodes by where they are computed (tokens -1, logits n_layers)."""

    kind: NodeKind
    """What the node is (see the module table)."""
    depth: float
    """Forward-pass order: token -1, site ``layer + offset``, logit/metric ``n_layers``."""
    site: str | None = None
    """Site id (``L2.transcoder``) for features and errors; component name (``L1.head2``) for components."""
    index: int | None = None
    """Feature index, or the token id of a logit node."""
    pos: int | None = None
    """Position, or ``None`` for nodes aggregated over positions."""
    name: str | None = None
    """Metric name (metric nodes)."""

    @property
    def id(self) -> str:
        """The stable string id."""
        at = "" if self.pos is None else f"@{self.pos}"
        if self.kind == "token":
            return f"tok{at}"
        if self.kind == "feature":
            return f"{self.site}#{self.index}{at}"
        if self.kind == "error":
            return f"{self.site}#err{at}"
        if self.kind == "logit":
            return f"logit#{self.index}{at}"
        if self.kind == "metric":
            return f"metric:{self.name}"
        if self.kind == "supernode":
            return f"super:{self.name}"
        return f"{self.site}{at}"

    @property
    def layer(self) -> int | None:
        """Block index for site and component nodes, else ``None``."""
        if self.site is None:
            return None
        return int(self.site[1:].split(".")[0])

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Node:
        return cls(**data)


def parse_node_id(text: str) -> dict:
    """Split a node id into its fields (``kind``, ``site``, ``index``, ``pos``, ``name``); a clear
    error for ids that match no node kind."""
    for kind, pattern in _PATTERNS:
        m = pattern.match(text.strip())
        if m:
            fields = {k: v for k, v in m.groupdict().items() if v is not None}
            for key in ("pos", "index"):
                if key in fields:
                    fields[key] = int(fields[key])
            return {"kind": kind, **fields}
    raise CircuitGraphError(
        f"cannot parse node id {text!r}; ids look like tok@3, L2.transcoder#123@5, L2.transcoder#err@5, "
        "logit#1234@9, metric:logit_diff or L1.head2@5"
    )
