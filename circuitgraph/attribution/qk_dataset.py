"""QK attribution over a task dataset: which (query source, key source) pairs drive a head's score
on average, with positions counted from the answer.

For every prompt, the query is the position ``query_offset`` from the answer (``-1``: the answer
position itself, where the next token is predicted; ``-2`` the token before, ...), and the key is
either the key the head attends to most there (``key="top"``) or a fixed offset from the answer.
Each term's source ids have their positions rewritten as offsets from the answer
(``L0.attn_z#12@-11``: that feature ten tokens before the answer position, the convention of
``--positions from_end`` dataset graphs), and terms are averaged over prompts (a pair absent from a
prompt counts as 0 there). Prompts run alone, unpadded, one forward pass each, shared by every head.

Terms are also summed by *source group* (:func:`source_group`: token, position, biases, errors,
each site's features, ``attn_z`` features split by the head they encode) and compared with the
same groups' mean over every other key the query could attend to (``contrast``): what raises the
chosen key's score above the rest, which is what the softmax sees.

Which heads: given explicitly, or the heads a circuit depends on (:func:`circuit_heads`: component
nodes ``L1.head2``, or the heads whose output an ``attn_z`` feature reads, weighted by node score).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.qk import QKAttribution, QKContext, QKTerm
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.model import ReplacementModel
from circuitgraph.tasks.dataset import TaskDataset

log = logging.getLogger(__name__)

_AT = re.compile(r"@(\d+)$")
_HEAD = re.compile(r"^L(\d+)\.head(\d+)$")
_FEATURE = re.compile(r"^(L\d+\.[a-z_]+)#(\d+)@")


def feature_heads(rm: ReplacementModel) -> dict[str, torch.Tensor]:
    """For each ``attn_z`` site id: ``[d_dict]`` the head each feature encodes (the head whose slice
    of its decoder row is largest)."""
    d_head = rm.model.cfg.d_head
    return {s.id: d.decoder_directions().detach().reshape(d.cfg.d_dict, -1, d_head).norm(dim=-1).argmax(1)
            for s, d in rm.dicts.items() if s.kind == "attn_z"}


def source_group(source_id: str, heads: Mapping[str, torch.Tensor]) -> str:
    """The group of a source id: ``token``, ``position``, ``bias``, ``error``, ``skip``, a site's
    features (``L0.transcoder``; ``L0.attn_z h2`` for attention features, by the head they encode,
    from :func:`feature_heads`), or an unreplaced component (``L1.attn``)."""
    if source_id.startswith("tok@"):
        return "token"
    if source_id.startswith("pos@"):
        return "position"
    if source_id.startswith("bias:"):
        return "bias"
    if "#err@" in source_id:
        return "error"
    if "#skip@" in source_id:
        return "skip"
    m = _FEATURE.match(source_id)
    if m is None:
        return source_id.split("@")[0]
    site = m.group(1)
    return f"{site} h{int(heads[site][int(m.group(2))])}" if site in heads else site


def group_terms(attr: QKAttribution, heads: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    """``attr``'s terms summed by (query group, key group) (:func:`source_group`)."""
    gq = [source_group(i, heads) for i in attr.query_ids]
    gk = [source_group(i, heads) for i in attr.key_ids]
    uq, uk = sorted(set(gq)), sorted(set(gk))
    rows = torch.tensor([uq.index(g) for g in gq])
    cols = torch.tensor([uk.index(g) for g in gk])
    by_row = torch.zeros(len(uq), len(gk), dtype=attr.values.dtype).index_add_(0, rows, attr.values)
    grouped = torch.zeros(len(uq), len(uk), dtype=attr.values.dtype).index_add_(1, cols, by_row)
    return {(a, b): float(grouped[i, j]) for i, a in enumerate(uq) for j, b in enumerate(uk)}


def offset_id(source_id: str, answer_pos: int) -> str:
    """``source_id`` with its ``@pos`` rewritten as an offset from the answer position (``@-1`` at
    the answer position, ``@-2`` the token before, ...)."""
    return _AT.sub(lambda m: f"@{int(m.group(1)) - answer_pos - 1}", source_id)


@dataclass
class DatasetQK:
    """Mean QK terms of one head over a dataset."""

    layer: int
    head: int
    query_offset: int
    """Query position counted from the answer (-1: the answer position)."""
    key: str
    """``top`` (each prompt's most-attended key) or the key's offset from the answer."""
    n_prompts: int
    mean_score: float
    """Mean of the model's own scores at the chosen (query, key) positions."""
    mean_pattern: float
    """Mean attention probability of the chosen key."""
    key_offsets: dict[int, int]
    """How many prompts used each key offset (one entry for a fixed key)."""
    query_ids: list[str]
    """Query-side source ids (positions as offsets), rows of ``values``."""
    key_ids: list[str]
    """Key-side source ids (positions as offsets), columns of ``values``."""
    values: torch.Tensor
    """Sparse COO ``[n_query_ids, n_key_ids]`` float64: each pair's mean term over the prompts."""
    groups: dict[tuple[str, str], float]
    """Mean terms by (query group, key group) at the chosen key (:func:`group_terms`)."""
    groups_other_keys: dict[tuple[str, str], float] | None
    """The same at every other key the query could attend to (mean over those keys, then over
    prompts); ``None`` without ``contrast``."""

    def total(self) -> float:
        """Sum of the mean terms (equals :attr:`mean_score` up to rounding)."""
        return float(self.values._values().sum())

    def top(self, k: int | None = 20) -> list[QKTerm]:
        """The strongest mean terms by absolute value."""
        idx, val = self.values._indices(), self.values._values()
        order = torch.argsort(val.abs(), descending=True)[: k if k is not None else None]
        return [QKTerm(self.query_ids[int(idx[0, i])], self.key_ids[int(idx[1, i])], float(val[i])) for i in order]

    def side_totals(self, side: str, k: int | None = 20) -> list[tuple[str, float]]:
        """The sources of one side (``query`` or ``key``) by their mean total share of the score."""
        dim, ids = (0, self.query_ids) if side == "query" else (1, self.key_ids)
        sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, self.values._indices()[dim], self.values._values())
        order = torch.argsort(sums.abs(), descending=True)[: k if k is not None else None]
        return [(ids[i], float(sums[i])) for i in order.tolist()]

    def group_pairs(self, k: int | None = 20) -> list[dict]:
        """Group pairs by how much they raise the chosen key above the others (``value - other_keys``;
        by ``value`` alone without ``contrast``)."""
        other = self.groups_other_keys or {}
        pairs = set(self.groups) | set(other)
        rows = [{"query": a, "key": b, "value": self.groups.get((a, b), 0.0),
                 "other_keys": other.get((a, b), 0.0) if self.groups_other_keys is not None else None}
                for a, b in pairs]
        rows.sort(key=lambda r: -abs(r["value"] - (r["other_keys"] or 0.0)))
        return rows[: k if k is not None else None]

    def to_dict(self, top_k: int = 20) -> dict:
        """JSON-able summary: the head, positions, means, ``top_pairs``, each side's ``top_query_sources``
        / ``top_key_sources`` (id, mean share) and ``group_pairs`` (query and key group, ``value`` at the
        chosen key, ``other_keys``: mean at the other keys)."""
        return {"layer": self.layer, "head": self.head, "query_offset": self.query_offset, "key": self.key,
                "n_prompts": self.n_prompts, "mean_score": self.mean_score, "mean_sum_of_terms": self.total(),
                "mean_pattern": self.mean_pattern, "key_offsets": {str(k): v for k, v in sorted(self.key_offsets.items())},
                "top_pairs": [{"query": t.query, "key": t.key, "value": t.value} for t in self.top(top_k)],
                "top_query_sources": [{"id": i, "value": v} for i, v in self.side_totals("query", top_k)],
                "top_key_sources": [{"id": i, "value": v} for i, v in self.side_totals("key", top_k)],
                "group_pairs": self.group_pairs(top_k)}


class _Sum:
    """Running sums of terms keyed by (query id, key id)."""

    def __init__(self) -> None:
        self.q_index: dict[str, int] = {}
        self.k_index: dict[str, int] = {}
        self.rows: list[torch.Tensor] = []
        self.cols: list[torch.Tensor] = []
        self.vals: list[torch.Tensor] = []
        self.score = self.pattern = 0.0
        self.key_offsets: dict[int, int] = {}
        self.groups: dict[tuple[str, str], float] = {}
        self.groups_other: dict[tuple[str, str], float] = {}

    @staticmethod
    def add_groups(into: dict[tuple[str, str], float], groups: dict[tuple[str, str], float], weight: float) -> None:
        for key, value in groups.items():
            into[key] = into.get(key, 0.0) + weight * value

    @staticmethod
    def _ids(index: dict[str, int], ids: list[str]) -> torch.Tensor:
        return torch.tensor([index.setdefault(i, len(index)) for i in ids], dtype=torch.long)

    def add(self, q_ids: list[str], k_ids: list[str], values: torch.Tensor) -> None:
        r, c = self._ids(self.q_index, q_ids), self._ids(self.k_index, k_ids)
        nz = values.nonzero(as_tuple=True)
        self.rows.append(r[nz[0]])
        self.cols.append(c[nz[1]])
        self.vals.append(values[nz])

    def mean(self, n: int) -> torch.Tensor:
        idx = torch.stack([torch.cat(self.rows), torch.cat(self.cols)]) if self.rows else torch.zeros(2, 0, dtype=torch.long)
        val = torch.cat(self.vals) / n if self.vals else torch.zeros(0, dtype=torch.float64)
        return torch.sparse_coo_tensor(idx, val, (len(self.q_index), len(self.k_index)), check_invariants=True).coalesce()


def prompt_rows(dataset: TaskDataset) -> list[tuple[torch.Tensor, int]]:
    """Each row's real tokens (padding dropped) and its answer position in them."""
    out = []
    for i in range(dataset.clean_tokens.shape[0]):
        tokens = dataset.clean_tokens[i]
        if dataset.attention_mask is not None:
            real = dataset.attention_mask[i].bool()
            first = int(real.nonzero()[0])
            out.append((tokens[real], int(dataset.answer_pos[i]) - first))
        else:
            out.append((tokens, int(dataset.answer_pos[i])))
    return out


def aggregate_qk(rm: ReplacementModel, dataset: TaskDataset, heads: Sequence[tuple[int, int]], query_offset: int = -1,
                 key: str | int = "top", contrast: bool = True, progress: bool = False) -> list[DatasetQK]:
    """Mean QK terms of each ``(layer, head)`` over the prompts of ``dataset`` (see the module
    docstring). ``key``: ``"top"`` or an offset from the answer (``-11``: ten tokens before the answer
    position); ``contrast``: also attribute every other key, for :attr:`DatasetQK.groups_other_keys`."""
    if not heads:
        raise CircuitGraphError("no heads given; name them (e.g. 1.2,2.0) or take them from a circuit")
    if query_offset >= 0:
        raise CircuitGraphError(f"query offset {query_offset}: offsets count back from the answer (-1 is the answer "
                                "position, -2 the token before)")
    if key != "top" and (not isinstance(key, int) or key >= 0):
        raise CircuitGraphError(f"key {key!r}: use 'top' or a negative offset from the answer (-1: the answer position)")
    sums = {h: _Sum() for h in heads}
    feat_heads = feature_heads(rm)
    rows = prompt_rows(dataset)
    for tokens, ans in tqdm(rows, desc="qk", disable=not progress, leave=False):
        q = ans + 1 + query_offset
        if q < 0:
            raise CircuitGraphError(f"query offset {query_offset} lies before the start of a prompt ({ans + 1} tokens "
                                    "up to its answer); use an offset nearer the answer")
        ctx = QKContext(rm, tokens)
        for layer, head in heads:
            if key == "top":
                k = ctx.top_key(layer, head, q)
            else:
                k = ans + 1 + int(key)
                if k not in ctx.key_positions(q):
                    raise CircuitGraphError(f"key offset {key} is not a key the query (offset {query_offset}) can "
                                            "attend to in every prompt")
            a = ctx.attribute(layer, head, q, k)
            s = sums[layer, head]
            s.add([offset_id(i, ans) for i in a.query_ids], [offset_id(i, ans) for i in a.key_ids], a.values)
            s.score += a.score
            s.pattern += a.pattern
            s.key_offsets[k - ans - 1] = s.key_offsets.get(k - ans - 1, 0) + 1
            s.add_groups(s.groups, group_terms(a, feat_heads), 1.0)
            others = [o for o in ctx.key_positions(q) if o != k] if contrast else []
            for o in others:
                s.add_groups(s.groups_other, group_terms(ctx.attribute(layer, head, q, o), feat_heads), 1 / len(others))
    n = len(rows)
    out = []
    for (layer, head), s in sums.items():
        out.append(DatasetQK(layer, head, query_offset, str(key), n, s.score / n, s.pattern / n, s.key_offsets,
                             list(s.q_index), list(s.k_index), s.mean(n), {g: v / n for g, v in s.groups.items()},
                             {g: v / n for g, v in s.groups_other.items()} if contrast else None))
        log.info("L%d.head%d: mean score %.4g over %d prompts", layer, head, s.score / n, n)
    return out


def circuit_heads(graph: Graph, rm: ReplacementModel, top_k: int = 3) -> list[tuple[int, int]]:
    """The ``top_k`` attention heads a circuit depends on, strongest first: component nodes
    ``L<l>.head<h>``, and for ``attn_z`` feature nodes the head whose slice of the feature's decoder
    row is largest. Each node counts with its absolute score (``node_scores``; 1 when the graph has
    none)."""
    weight: dict[tuple[int, int], float] = {}
    heads = feature_heads(rm)
    for i, node in enumerate(graph.nodes):
        w = abs(float(graph.node_scores[i])) if graph.node_scores is not None else 1.0
        if node.kind == "component" and node.site and _HEAD.match(node.site):
            m = _HEAD.match(node.site)
            key = (int(m.group(1)), int(m.group(2)))  # type: ignore[union-attr]
        elif node.kind == "feature" and node.site and node.site.endswith(".attn_z") and node.index is not None:
            if node.site not in heads:
                continue
            key = (int(node.site[1:].split(".")[0]), int(heads[node.site][node.index]))
        else:
            continue
        weight[key] = weight.get(key, 0.0) + w
    if not weight:
        raise CircuitGraphError("the circuit has no head nodes and no attention-z features; name the heads instead")
    return sorted(weight, key=lambda h: -weight[h])[:top_k]
