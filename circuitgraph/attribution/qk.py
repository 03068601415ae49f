"""Why attention attends: the pre-softmax score of one head split into (query source, key source) terms.

Attribution graphs freeze attention patterns: they show that information moved from a key position
to a query position, not why the head looked there. The score itself is bilinear in the residual
stream once the normalisation scales are frozen at their recorded values:

    x_p     = sum_i v_i                                  # the stream at p: sources at p (residual_writes)
    n_p(v)  = ((v - mean v) / scale_p) * w               # ln1, affine part per source, scale frozen
    q       = R_q( sum_i n_q(v_i) W_Q + (b_ln W_Q + b_Q) )   # R_p: the rotary rotation at p (or none)
    k       = R_k( sum_j n_k(v_j) W_K + (b_ln W_K + b_K) )
    score   = q . k / attn_scale = sum_ij  R_q(n_q(v_i) W_Q) . R_k(n_k(v_j) W_K) / attn_scale  (+ bias rows)

so every term pairs one source at the query position with one at the key position: features, error
terms, token and position embeddings, skip terms, unreplaced components and biases (ids in
:mod:`circuitgraph.attribution.residual_writes`), plus ``bias:L<L>.q@<q>`` / ``bias:L<L>.k@<k>``
for the query / key projection biases of the attended layer. With the replacement model's error
terms the terms sum to the model's own score (the rotation is linear, so it rides inside each
factor; grouped-query attention reads the key head its query head shares).

Building blocks, for callers that attribute many pairs of one prompt (the prompt-graph engine):
:func:`side_factors` (per-source query or key vectors at one position, a pure function of the
source vectors) and :func:`qk_terms` (their products); :class:`QKContext` caches both per prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from transformer_lens import HookedTransformer

from circuitgraph.attribution.residual_writes import ResidualWriter, SourceVectors, WriteRecord, record_writes
from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.masking import is_causal
from circuitgraph.replacement.model import ReplacementModel

log = logging.getLogger(__name__)

Side = Literal["query", "key"]


class QKTerm(NamedTuple):
    """One term of a score: a query-side source times a key-side source."""

    query: str
    """Source id at the query position."""
    key: str
    """Source id at the key position."""
    value: float
    """Its contribution to the pre-softmax score."""


class QKFactors(NamedTuple):
    """Per-source query (or key) vectors of one head at one position: the rows of a bilinear form."""

    ids: list[str]
    """Source ids; the last is the projection bias (``bias:L<layer>.q@<pos>`` / ``.k@``)."""
    vectors: torch.Tensor
    """``[n_sources, d_head]`` float64, rotated to the position; they sum to the head's q (or k)."""


@dataclass
class QKAttribution:
    """The score of head ``head`` of block ``layer`` from ``query_pos`` to ``key_pos``, in terms."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    """The model's own pre-softmax score (``hook_attn_scores``) in the recorded run."""
    pattern: float
    """The attention probability of this key (the pattern entry)."""
    query_ids: list[str]
    """Query-side source ids (rows of ``values``)."""
    key_ids: list[str]
    """Key-side source ids (columns of ``values``)."""
    values: torch.Tensor
    """``[n_query_sources, n_key_sources]`` float64 terms."""

    def total(self) -> float:
        """The sum of every term (equals :attr:`score` up to rounding)."""
        return float(self.values.sum())

    def top(self, k: int | None = None) -> list[QKTerm]:
        """The ``k`` largest terms by absolute value (every nonzero term when ``k`` is ``None``)."""
        flat = self.values.flatten()
        order = torch.argsort(flat.abs(), descending=True)
        order = order[flat[order] != 0][: k if k is not None else None]
        n_key = len(self.key_ids)
        return [QKTerm(self.query_ids[i // n_key], self.key_ids[i % n_key], float(flat[i])) for i in order.tolist()]

    @property
    def terms(self) -> list[QKTerm]:
        """Every nonzero term, sorted by decreasing absolute value."""
        return self.top(None)

    def query_totals(self) -> dict[str, float]:
        """Each query-side source's share of the score (its row summed over the key sources)."""
        return dict(zip(self.query_ids, self.values.sum(1).tolist(), strict=True))

    def key_totals(self) -> dict[str, float]:
        """Each key-side source's share of the score (its column summed over the query sources)."""
        return dict(zip(self.key_ids, self.values.sum(0).tolist(), strict=True))

    def to_dict(self, top_k: int = 20) -> dict:
        """JSON-able summary: ``layer``, ``head``, ``query``, ``key``, ``score``, ``sum_of_terms``,
        ``pattern``, ``n_terms`` and the ``top_k`` strongest ``top_pairs`` (``query``, ``key``, ``value``)."""
        return {"layer": self.layer, "head": self.head, "query": self.query_pos, "key": self.key_pos,
                "score": self.score, "sum_of_terms": self.total(), "pattern": self.pattern,
                "n_terms": int((self.values != 0).sum()),
                "top_pairs": [{"query": t.query, "key": t.key, "value": t.value} for t in self.top(top_k)]}


def side_factors(model: HookedTransformer, layer: int, head: int, sources: SourceVectors, pos: int,
                 scale: torch.Tensor | float | None, side: Side) -> QKFactors:
    """Query (``side="query"``) or key vectors of head ``head`` of block ``layer`` for each source
    written at position ``pos``: ``R_pos(norm(v) W)`` with ``ln1``'s scale frozen at ``scale`` (the
    recorded one at ``pos``; ``None`` without normalisation), plus one bias row (``b_ln W + b``).
    Pure in ``sources``; float64."""
    cfg = model.cfg
    block = model.blocks[layer]
    attn = block.attn
    x = sources.vectors.double()  # [n, d_model]
    if cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if cfg.normalization_type is not None:
        x = x / torch.as_tensor(scale, dtype=torch.float64)
    ln_w, ln_b = getattr(block.ln1, "w", None), getattr(block.ln1, "b", None)
    if ln_w is not None:
        x = x * ln_w.detach().double()
    w = (attn.W_Q if side == "query" else attn.W_K)[head].detach().double()  # [d_model, d_head]
    b = (attn.b_Q if side == "query" else attn.b_K)[head].detach().double()  # [d_head]
    if ln_b is not None:
        b = b + ln_b.detach().double() @ w
    rows = torch.cat([x @ w, b[None]])  # [n + 1, d_head]
    if cfg.positional_embedding_type == "rotary":
        rows = attn.apply_rotary(rows[:, None, None, :], past_kv_pos_offset=pos)[:, 0, 0].double()
    bias_id = f"bias:L{layer}.{'q' if side == 'query' else 'k'}@{pos}"
    return QKFactors([*sources.ids, bias_id], rows)


def qk_terms(query: QKFactors, key: QKFactors, attn_scale: float) -> torch.Tensor:
    """``[n_query_sources, n_key_sources]``: every query vector dotted with every key vector, over
    the layer's ``attn_scale``. Sums to the score."""
    return query.vectors @ key.vectors.T / attn_scale


class QKContext:
    """One recorded prompt, for attributing any number of (layer, head, query, key) scores; source
    vectors and factors are computed once per position."""

    def __init__(self, rm: ReplacementModel, tokens: torch.Tensor | None = None, record: WriteRecord | None = None,
                 fold_skips: bool = True) -> None:
        """``tokens`` (``[P]`` or ``[1, P]``) or a run already recorded by ``record_writes``;
        ``fold_skips``: see :mod:`circuitgraph.attribution.residual_writes`."""
        if (tokens is None) == (record is None):
            raise CircuitGraphError("give the prompt's tokens or a recorded run (record_writes), not both")
        if not isinstance(rm, ReplacementModel):
            raise CircuitGraphError(f"QK attribution needs a ReplacementModel (cg.replacement_model(model, dicts)), "
                                    f"got {type(rm).__name__}")
        if tokens is not None:
            if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
                raise CircuitGraphError("tokens must be an integer tensor of token ids ([P] or [1, P]); for text use "
                                        "cg.api.prompt_tokens(model, text)")
            if tokens.numel() == 0 or tokens.reshape(-1).shape[0] != tokens.shape[-1]:
                raise CircuitGraphError(f"tokens must be one non-empty prompt ([P] or [1, P]), got shape "
                                        f"{tuple(tokens.shape)}")
        self.rm = rm
        self.record = record if record is not None else record_writes(rm, tokens)  # type: ignore[arg-type]
        self.writer = ResidualWriter(rm, self.record, fold_skips)
        self.n_pos = int(self.record.tokens.numel())
        self._factors: dict[tuple[int, int, int, Side], QKFactors] = {}

    def _check(self, layer: int, head: int) -> None:
        cfg = self.rm.model.cfg
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (layer, head)):
            raise CircuitGraphError(f"layer and head must be integers, got {layer!r} and {head!r}")
        if not 0 <= layer < cfg.n_layers:
            raise CircuitGraphError(f"layer {layer} is out of range; the model has layers 0..{cfg.n_layers - 1}")
        if not 0 <= head < cfg.n_heads:
            raise CircuitGraphError(f"head {head} is out of range; layer {layer} has heads 0..{cfg.n_heads - 1}")

    def position(self, pos: int, what: str) -> int:
        """``pos`` resolved against the prompt (negative counts from the end), checked."""
        if not isinstance(pos, int) or isinstance(pos, bool):
            raise CircuitGraphError(f"{what} position must be an integer, got {pos!r}")
        if not -self.n_pos <= pos < self.n_pos:
            raise CircuitGraphError(f"{what} position {pos} is out of range; the prompt has positions "
                                    f"0..{self.n_pos - 1} (or -{self.n_pos}..-1 from the end)")
        return pos % self.n_pos

    def factors(self, layer: int, head: int, pos: int, side: Side) -> QKFactors:
        """Cached :func:`side_factors` at ``pos``."""
        key = (layer, head, pos, side)
        if key not in self._factors:
            scale = self.record.ln1_scale[layer]
            self._factors[key] = side_factors(self.rm.model, layer, head, self.writer.sources(layer, pos), pos,
                                              None if scale is None else scale[pos], side)
        return self._factors[key]

    def attribute(self, layer: int, head: int, query_pos: int, key_pos: int) -> QKAttribution:
        """The score of ``head`` of block ``layer`` from ``query_pos`` to ``key_pos`` in terms."""
        self._check(layer, head)
        q, k = self.position(query_pos, "query"), self.position(key_pos, "key")
        if k > q and is_causal(self.rm.model):
            raise CircuitGraphError(f"key position {k} is after query position {q}: a causal head cannot attend "
                                    "there; choose a key at or before the query")
        qf, kf = self.factors(layer, head, q, "query"), self.factors(layer, head, k, "key")
        values = qk_terms(qf, kf, float(self.rm.model.blocks[layer].attn.attn_scale))
        score = float(self.record.scores[layer][head, q, k])
        total = float(values.sum())
        if abs(total - score) > 1e-4 * max(1.0, abs(score)):
            log.warning("L%d.head%d %d->%d: the terms sum to %.6g but the model's score is %.6g; this architecture "
                        "computes scores in a way QK attribution does not cover", layer, head, q, k, total, score)
        return QKAttribution(layer, head, q, k, score, float(self.record.patterns[layer][head, q, k]),
                             qf.ids, kf.ids, values)

    def attribute_keys(self, layer: int, head: int, query_pos: int,
                       key_positions: list[int] | None = None) -> list[QKAttribution]:
        """:meth:`attribute` for several keys (default: every key the query can attend: the
        pattern's logits)."""
        q = self.position(query_pos, "query")
        if key_positions is None:
            key_positions = self.key_positions(q)
        return [self.attribute(layer, head, q, k) for k in key_positions]

    def key_positions(self, query_pos: int) -> list[int]:
        """The keys a query at ``query_pos`` can attend to (itself and earlier ones in a causal model)."""
        q = self.position(query_pos, "query")
        return list(range(q + 1 if is_causal(self.rm.model) else self.n_pos))

    def top_key(self, layer: int, head: int, query_pos: int) -> int:
        """The key the head attends to most from ``query_pos`` in the recorded run."""
        self._check(layer, head)
        return int(torch.argmax(self.record.patterns[layer][head, self.position(query_pos, "query")]))


def attribute_qk(rm: ReplacementModel, tokens: torch.Tensor, layer: int, head: int, query_pos: int,
                 key_pos: int) -> QKAttribution:
    """The pre-softmax score of head ``head`` of block ``layer`` from ``query_pos`` to ``key_pos``
    (negative positions count from the end) on the prompt ``tokens`` (``[P]`` or ``[1, P]``), split
    into (query source, key source) terms that sum to it. One forward pass."""
    return QKContext(rm, tokens).attribute(layer, head, query_pos, key_pos)


def attribute_qk_keys(rm: ReplacementModel, tokens: torch.Tensor, layer: int, head: int, query_pos: int,
                      key_positions: list[int] | None = None) -> list[QKAttribution]:
    """:func:`attribute_qk` for every key the query attends to (or ``key_positions``); one forward pass."""
    return QKContext(rm, tokens).attribute_keys(layer, head, query_pos, key_positions)
