"""Deterministic generator of the toy-language training corpus.

A document is a run of sentences drawn from a fixed mixture: indirect-object sentences,
subject-verb agreement across relative clauses, greater-than year ranges, and filler sentences
and short stories; some documents also hold a random span of words repeated later (induction).
Task sentences use only the *training* word pools in the tested roles (see
:mod:`circuitgraph.toylang.lexicon`), so held-out evaluation measures generalisation.

The same ``seed`` always yields the same text and the same token sequences.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from circuitgraph.toylang import templates as tp
from circuitgraph.toylang.tokenizer import BOS, build_tokenizer


@dataclass(frozen=True)
class CorpusConfig:
    """Mixture and length of the generated corpus."""

    seed: int = 0
    """Seed of the generator; the same seed gives the same documents."""
    seq_len: int = 128
    """Tokens per training sequence, BOS included."""
    p_ioi: float = 0.22
    """Probability that a sentence is an indirect-object-identification sentence."""
    p_agreement: float = 0.2
    """Probability that a sentence is a subject-verb agreement sentence."""
    p_greater_than: float = 0.16
    """Probability that a sentence is a greater-than year-range sentence."""
    p_induction_doc: float = 0.5
    """Probability that a document contains a repeated random span."""
    p_repeat_doc: float = 0.15
    """Probability that a document is nothing but one random span repeated (pure induction)."""
    induction_span: tuple[int, int] = (4, 20)
    """Inclusive range of the repeated span's length in words."""

    def __post_init__(self) -> None:
        total = self.p_ioi + self.p_agreement + self.p_greater_than
        if not 0 <= total <= 1:
            raise ValueError(f"sentence probabilities sum to {total}; they must sum to at most 1")
        if self.seq_len < 16:
            raise ValueError(f"seq_len={self.seq_len} is too short; use at least 16")
        lo, hi = self.induction_span
        if not 2 <= lo <= hi:
            raise ValueError(f"induction_span={self.induction_span} must satisfy 2 <= lo <= hi")


TASK_RICH = CorpusConfig(seed=1, p_ioi=0.34, p_agreement=0.33, p_greater_than=0.33, p_induction_doc=0.8)
"""A training mix of task sentences only (no filler sentences) and more repeated spans: the
"task-rich token mix" lever of the ceiling study (``--corpus-mix task-rich``)."""


class ToyCorpus:
    """Generates toy-language documents and packs them into token sequences."""

    def __init__(self, cfg: CorpusConfig | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = cfg or CorpusConfig()
        self.tokenizer = tokenizer or build_tokenizer()
        self.bos_id = self.tokenizer.token_to_id(BOS)

    def sentence(self, rng: random.Random) -> str:
        """One sentence (or short story) from the mixture."""
        c = self.cfg
        u = rng.random()
        if u < c.p_ioi:
            inst = tp.ioi(rng, tp.TRAIN_POOLS)
        elif u < c.p_ioi + c.p_agreement:
            inst = tp.agreement(rng, tp.TRAIN_POOLS)
        elif u < c.p_ioi + c.p_agreement + c.p_greater_than:
            inst = tp.greater_than(rng, tp.TRAIN_POOLS)
        else:
            return tp.filler(rng)
        return inst.prompt + inst.completion

    def document(self, rng: random.Random) -> str:
        """Enough text to fill one sequence (about ``seq_len`` words, usually more).

        An induction document holds one random span of words two or three times, at random
        sentence boundaries, the first occurrence early in the sequence.
        """
        if rng.random() < self.cfg.p_repeat_doc:
            lo, hi = self.cfg.induction_span
            span = "".join(tp.random_span(rng, rng.randint(max(lo, 6), hi + 10)))
            return span * (self.cfg.seq_len // span.count(" ") + 2)
        parts: list[str] = []
        n_words = 0
        while n_words < self.cfg.seq_len:
            text = self.sentence(rng)
            parts.append(" " + text)
            n_words += text.count(" ") + 2
        if rng.random() < self.cfg.p_induction_doc:
            lo, hi = self.cfg.induction_span
            span = "".join(tp.random_span(rng, rng.randint(lo, hi)))
            n_slots = min(len(parts), 8)
            n_copies = rng.randint(2, 3)
            slots = sorted(rng.sample(range(n_slots), min(n_copies, n_slots)))
            for k, slot in enumerate(slots):
                parts.insert(slot + k, span)
            return "".join(parts)
        return "".join(parts)[1:]  # a plain document starts without a space, like the task prompts

    def texts(self, n: int, offset: int = 0) -> list[str]:
        """Documents ``offset .. offset+n-1``; document ``i`` depends only on the seed and ``i``."""
        return [self.document(random.Random(f"{self.cfg.seed}:{offset + i}")) for i in range(n)]

    def tokens(self, n: int, offset: int = 0) -> torch.Tensor:
        """``[n, seq_len]`` int64 token sequences, each BOS followed by one truncated document."""
        encodings = self.tokenizer.encode_batch(self.texts(n, offset))
        out = torch.full((n, self.cfg.seq_len), self.bos_id, dtype=torch.long)
        for row, enc in enumerate(encodings):
            ids = enc.ids[: self.cfg.seq_len - 1]
            if len(ids) < self.cfg.seq_len - 1:
                raise RuntimeError(f"document {offset + row} is too short to fill a sequence")
            out[row, 1:] = torch.tensor(ids, dtype=torch.long)
        return out

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (the :class:`dictionaries.token_sources.TokenSource` protocol)."""
        return self.cfg.seq_len

    def sequences(self, start: int, n: int) -> torch.Tensor:
        """``[n, seq_len]`` sequences ``start .. start+n-1`` (the ``TokenSource`` protocol)."""
        return self.tokens(n, offset=start)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
        """An endless stream of ``[batch_size, seq_len]`` batches starting at document ``start``."""
        offset = start
        while True:
            yield self.tokens(batch_size, offset)
            offset += batch_size
