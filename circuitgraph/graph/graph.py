"""The graph container: a node table, a sparse edge list and metadata.

Edges are stored as three flat tensors (``sources``, ``targets``, ``weights``; never a dense N x N
matrix). ``weights[e]`` is the contribution of ``sources[e]`` to ``targets[e]``: for a prompt graph,
the source's direct effect on the target's pre-activation under frozen attention and normalisation;
for a dataset graph, the attribution score of the edge. On disk a graph is a folder with
``graph.json`` (nodes, labels, metadata) and ``graph.safetensors`` (the tensors).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.nodes import Node, parse_node_id
from circuitgraph.graph.storage import resolve_version, save_versioned, verify_manifest

FORMAT_VERSION = 1


@dataclass
class Graph:
    """Nodes, edges and metadata of one attribution graph or circuit."""

    nodes: list[Node]
    """The node table; a node's index is its position here."""
    activation: torch.Tensor
    """``[N]`` node values (feature latent, mean-centred logit, metric value; 0 where undefined)."""
    sources: torch.Tensor
    """``[E]`` int32 source node index of each edge (other integer types are converted)."""
    targets: torch.Tensor
    """``[E]`` int32 target node index of each edge."""
    weights: torch.Tensor
    """``[E]`` float edge weights."""
    target_weights: torch.Tensor
    """``[N]`` how much each node counts as an output when computing influence (logit probabilities,
    1 for a metric node, 0 elsewhere)."""
    labels: list[str] = field(default_factory=list)
    """Human-readable label per node (token text, feature description); may be empty strings."""
    bias: torch.Tensor | None = None
    """``[N]`` for prompt graphs: the part of each target's value that comes from no node (biases),
    so incoming edges + bias = activation. ``nan`` where not a target."""
    node_scores: torch.Tensor | None = None
    """``[N]`` for dataset graphs: each node's attribution score (total effect on the metric)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-able: prompts, model, dictionaries, method, thresholds, scores."""
    features: dict[str, Any] = field(default_factory=dict)
    """Feature cards keyed ``<site>#<feature>`` (see :mod:`circuitgraph.features.descriptions`);
    saved as ``features.json``."""

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if not self.labels:
            self.labels = [""] * n
        if len(self.labels) != n or self.activation.shape != (n,) or self.target_weights.shape != (n,):
            raise CircuitGraphError("graph tables disagree in length; the graph is corrupt")
        if not (self.sources.shape == self.targets.shape == self.weights.shape):
            raise CircuitGraphError("graph edge tensors disagree in length; the graph is corrupt")
        if self.sources.is_floating_point() or self.targets.is_floating_point():
            raise CircuitGraphError("graph edge indices are not integers; the graph is corrupt")
        self.sources, self.targets = self.sources.to(torch.int32), self.targets.to(torch.int32)  # 4 bytes an index
        if self.sources.numel() and (int(self.sources.max()) >= n or int(self.targets.max()) >= n):
            raise CircuitGraphError("graph edges point past the node table; the graph is corrupt")
        self._index = {node.id: i for i, node in enumerate(self.nodes)}

    # --- lookup --------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(self.sources.numel())

    def index(self, node_id: str) -> int:
        """The index of ``node_id``, or a clear error saying what ids exist."""
        if not isinstance(node_id, str):
            raise CircuitGraphError(f"node ids are strings like 'L2.transcoder#123@5' or 'tok@3', got {node_id!r}")
        if node_id in self._index:
            return self._index[node_id]
        parse_node_id(node_id)  # a malformed id gets the parse error
        near = [i for i in self._index if i.split("@")[0] == node_id.split("@")[0]][:5]
        hint = f"; ids with that prefix: {', '.join(near)}" if near else ""
        raise CircuitGraphError(f"node {node_id!r} is not in this graph ({self.n_nodes} nodes){hint}")

    def node(self, node_id: str) -> Node:
        return self.nodes[self.index(node_id)]

    def adjacency(self) -> torch.Tensor:
        """``[N, N]`` sparse CSR with ``A[target, source] = weight`` (rows are targets)."""
        n = self.n_nodes
        coo = torch.sparse_coo_tensor(torch.stack([self.targets, self.sources]).long(), self.weights, (n, n))
        return coo.coalesce().to_sparse_csr()

    # --- queries (see circuitgraph.graph.query) ---------------------------------------------
    def upstream(self, node: str, depth: int = 1, top_k: int = 10, **where: Any) -> list:
        """Nodes driving ``node``; ``where`` filters by ``layer``, ``site``, ``pos``, ``kind``."""
        from circuitgraph.graph.query import NodeFilter, upstream

        return upstream(self, node, depth, top_k, NodeFilter(**where))

    def downstream(self, node: str, depth: int = 1, top_k: int = 10, **where: Any) -> list:
        """Nodes ``node`` drives; ``where`` filters as in :meth:`upstream`."""
        from circuitgraph.graph.query import NodeFilter, downstream

        return downstream(self, node, depth, top_k, NodeFilter(**where))

    def paths(self, src: str, dst: str, k: int = 5) -> list:
        """The ``k`` strongest paths from ``src`` to ``dst``."""
        from circuitgraph.graph.query import paths

        return paths(self, src, dst, k)

    def top_features(self, target: str, k: int = 10, **where: Any) -> list:
        """Features with the largest total influence on ``target``."""
        from circuitgraph.graph.query import NodeFilter, top_features

        return top_features(self, target, k, NodeFilter(**where))

    def head_loadings(self, src: str, dst: str) -> dict[str, float]:
        """``{"L<layer>.H<head>": part}``: the edge ``src -> dst`` into an attention feature split by the
        head carrying each part (the parts sum to the edge); stored by ``trace --qk``."""
        from circuitgraph.attribution.prompt.qk_attach import stored_loadings

        return stored_loadings(self, src, dst)

    def why_attends(self, layer: int, head: int, query_pos: int, key_pos: int) -> dict | None:
        """The stored QK split (``score``, ``sum_of_terms``, ``top_pairs``) of that head's score from
        ``query_pos`` to ``key_pos``, if ``trace --qk`` attached it; else ``None``."""
        for pair in (self.metadata.get("qk") or {}).get("pairs", []):
            if (pair["layer"], pair["head"], pair["query"], pair["key"]) == (layer, head, query_pos, key_pos):
                return pair
        return None

    # --- derived graphs ------------------------------------------------------------------
    def subgraph(self, keep_nodes: torch.Tensor, keep_edges: torch.Tensor | None = None) -> Graph:
        """The graph restricted to nodes where ``keep_nodes`` (``[N]`` bool) and, optionally, edges
        where ``keep_edges`` (``[E]`` bool); edges touching a dropped node are dropped."""
        keep_nodes = keep_nodes.bool()
        new_index = torch.full((self.n_nodes,), -1, dtype=torch.long)
        new_index[keep_nodes] = torch.arange(int(keep_nodes.sum()))
        e = keep_nodes[self.sources] & keep_nodes[self.targets]
        if keep_edges is not None:
            e &= keep_edges.bool()
        idx = keep_nodes.nonzero().squeeze(1).tolist()
        return Graph(
            nodes=[self.nodes[i] for i in idx],
            activation=self.activation[keep_nodes],
            sources=new_index[self.sources[e]],
            targets=new_index[self.targets[e]],
            weights=self.weights[e],
            target_weights=self.target_weights[keep_nodes],
            labels=[self.labels[i] for i in idx],
            bias=None if self.bias is None else self.bias[keep_nodes],
            node_scores=None if self.node_scores is None else self.node_scores[keep_nodes],
            metadata=dict(self.metadata),
            features=self.features,
        )

    # --- persistence ---------------------------------------------------------------------
    def save(self, folder: str | Path, children: dict[str, Graph] | None = None) -> Path:
        """Write ``graph.json`` + ``graph.safetensors`` (+ ``features.json``, + each child graph in a
        sub-folder, e.g. a prompt trace's unpruned ``full/``) as one new version of ``folder``,
        switched in atomically (:mod:`circuitgraph.graph.storage`)."""
        return save_versioned(folder, lambda tmp: self._write(tmp, children or {}))

    def _write(self, folder: Path, children: dict[str, Graph]) -> None:
        self._check_finite()
        tensors = {
            "activation": self.activation.float().contiguous(),
            "sources": self.sources.contiguous(),  # int32; files of older releases hold int64 (read alike)
            "targets": self.targets.contiguous(),
            "weights": self.weights.float().contiguous(),
            "target_weights": self.target_weights.float().contiguous(),
        }
        if self.bias is not None:
            tensors["bias"] = self.bias.float().contiguous()
        if self.node_scores is not None:
            tensors["node_scores"] = self.node_scores.float().contiguous()
        save_file(tensors, str(folder / "graph.safetensors"))
        doc = {"format_version": FORMAT_VERSION, "nodes": [n.to_dict() for n in self.nodes],
               "labels": self.labels, "metadata": self.metadata}
        (folder / "graph.json").write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False))
        if self.features:
            (folder / "features.json").write_text(json.dumps(json_safe(self.features), allow_nan=False))
        for name, child in children.items():
            (folder / name).mkdir()
            child._write(folder / name, {})

    def _check_finite(self) -> None:
        """Refuse to save NaN or infinite values (``bias`` is NaN by design where a node is no target)."""
        for name in ("activation", "weights", "target_weights", "node_scores", "bias"):
            t = getattr(self, name)
            if t is None:
                continue
            values = t[~torch.isnan(t)] if name == "bias" else t
            if not bool(torch.isfinite(values).all()):
                raise CircuitGraphError(f"the graph holds NaN or infinite values in '{name}'; nothing was saved and "
                                        "the previous graph in that folder is unchanged")

    @classmethod
    def load(cls, folder: str | Path) -> Graph:
        """Read a folder written by :meth:`save`; corrupt or missing files give a clear error. The
        folder's current version is resolved once, so a concurrent save cannot mix two versions."""
        folder = resolve_version(Path(folder))
        if folder.is_dir():
            verify_manifest(folder)
        jpath, tpath = folder / "graph.json", folder / "graph.safetensors"
        for p in (jpath, tpath):
            if not p.is_file():
                raise CircuitGraphError(f"{p} is missing; is {folder} a graph folder written by `circuitgraph trace`?")
        try:
            doc = json.loads(jpath.read_text())
            nodes = [Node.from_dict(d) for d in doc["nodes"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CircuitGraphError(f"{jpath} is corrupt ({err}); re-run the trace that wrote it") from err
        if doc.get("format_version") != FORMAT_VERSION:
            raise CircuitGraphError(f"{jpath} has format version {doc.get('format_version')}, expected {FORMAT_VERSION}")
        try:
            t = load_file(str(tpath))
        except (SafetensorError, OSError) as err:
            raise CircuitGraphError(f"{tpath} is corrupt or truncated ({err}); re-run the trace that wrote it") from err
        features = {}
        if (folder / "features.json").is_file():
            try:
                features = json.loads((folder / "features.json").read_text())
            except json.JSONDecodeError as err:
                raise CircuitGraphError(f"{folder / 'features.json'} is corrupt ({err}); re-run the trace") from err
        for name, tensor in t.items():  # bias is NaN by design where a node is not a target
            values = tensor[~torch.isnan(tensor)] if name == "bias" else tensor
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise CircuitGraphError(f"{tpath} holds NaN or infinite values in '{name}'; the graph is corrupt, "
                                        "re-run the trace that wrote it")
        try:
            return cls(nodes=nodes, activation=t["activation"], sources=t["sources"], targets=t["targets"],
                       weights=t["weights"], target_weights=t["target_weights"], labels=doc.get("labels", []),
                       bias=t.get("bias"), node_scores=t.get("node_scores"), metadata=doc.get("metadata", {}),
                       features=features)
        except KeyError as err:
            raise CircuitGraphError(f"{tpath} lacks tensor {err}; the graph is corrupt") from err

    def to_networkx(self):
        """A ``networkx.DiGraph``: nodes keyed by id with their fields, edges source -> target with ``weight``."""
        import networkx as nx

        g = nx.DiGraph(**{k: v for k, v in self.metadata.items() if isinstance(v, (str, int, float))})
        for i, node in enumerate(self.nodes):
            g.add_node(node.id, **node.to_dict(), activation=float(self.activation[i]), label=self.labels[i])
        ids = [n.id for n in self.nodes]
        for s, t, w in zip(self.sources.tolist(), self.targets.tolist(), self.weights.tolist(), strict=True):
            g.add_edge(ids[s], ids[t], weight=w)
        return g


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
