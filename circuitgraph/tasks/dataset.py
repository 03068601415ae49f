"""A prompt dataset: clean and corrupted tokens, padding, answer positions, answers and the metric.

Prompts may differ in length. Rows are padded (right by default, or left) and ``attention_mask``
marks the real tokens, so padding is never attended to (the runners pass the mask to the model;
see :mod:`circuitgraph.replacement.masking`). A row asks for one or several *targets*: a position
of its prompt and the answer token(s) predicted after it (with optional wrong tokens to contrast).
``answer_pos`` is each row's last target position (the *answer position*). Clean and corrupted
prompts have the same length, so patching is position-aligned.

The metric is a value the dataset carries (``metric_kind``): one of :data:`METRIC_KINDS` or a
Python callable ``fn(logits [n, seq, vocab], batch: TaskDataset) -> [n]`` (see
:mod:`circuitgraph.tasks.metrics`); ``with_metric`` gives a copy with another one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import TaskError
from circuitgraph.toylang.templates import TaskInstance

MetricKind = Literal["logit_diff", "logprob", "prob_diff", "kl"]
METRIC_KINDS: tuple[str, ...] = get_args(MetricKind)
MetricFn = Callable[[torch.Tensor, "TaskDataset"], torch.Tensor]
"""A user metric: ``fn(logits [n, seq, vocab], batch) -> [n]`` one value per prompt, differentiable
in ``logits``; ``batch`` is the :class:`TaskDataset` of those prompts (targets, mask, reference)."""
Metric = MetricKind | MetricFn
PaddingSide = Literal["right", "left"]


class Targets(NamedTuple):
    """Every target of every row, padded: row ``i``'s ``t``-th target reads the logits at
    ``pos[i, t]`` (-1: no target). Id sets are padded with -1."""

    pos: torch.Tensor
    """``[n, T]`` int64 positions (in padded coordinates), ascending within a row, -1 padding."""
    answer_ids: torch.Tensor
    """``[n, T, A]`` int64 correct next tokens of each target."""
    wrong_ids: torch.Tensor
    """``[n, T, W]`` int64 tokens each target contrasts with."""

    def subset(self, idx: torch.Tensor) -> Targets:
        return Targets(self.pos[idx], self.answer_ids[idx], self.wrong_ids[idx])


@dataclass
class TaskDataset:
    """Tokenised prompts with everything a metric, an ablation or a patching run needs."""

    name: str
    """Task name (``ioi``, ``agreement``, ``induction``, ``greater_than``, a file's stem, ...)."""
    prompts: list[str]
    """Clean prompt texts (for token-id rows: the ids written out)."""
    corrupted_prompts: list[str]
    """Corrupted counterparts (same token length), used for patching baselines."""
    clean_tokens: torch.Tensor
    """``[n, seq]`` int64, padded (see ``attention_mask``)."""
    corrupted_tokens: torch.Tensor
    """``[n, seq]`` int64, aligned with ``clean_tokens`` (same padding)."""
    answer_pos: torch.Tensor
    """``[n]`` int64 position of each row's last target (the answer position): ``--positions
    from_end`` counts back from it; in causal models nodes are counted up to it."""
    answer_ids: torch.Tensor
    """``[n, A]`` int64 correct next tokens at ``answer_pos`` (the last target), padded with -1."""
    wrong_ids: torch.Tensor
    """``[n, W]`` int64 incorrect tokens the last target contrasts with, padded with -1."""
    metric_kind: Metric
    """``logit_diff`` (mean answer logit minus mean wrong logit), ``logprob`` (log-probability of the
    answers), ``prob_diff`` (probability on answers minus on wrongs), ``kl`` (KL divergence from the
    clean output distribution), or a :data:`MetricFn`. Per row: the mean over its targets."""
    attention_mask: torch.Tensor | None = None
    """``[n, seq]`` int64, 1 on real tokens, 0 on padding; ``None``: every position is real."""
    targets: Targets | None = None
    """Every target when some row has several; ``None``: one target per row, at ``answer_pos``."""
    reference_logprobs: torch.Tensor | None = None
    """``[n, T, vocab]`` the clean model's log-probabilities at each target position; set on each
    batch by the runners when the metric needs it (``kl``, callables)."""

    def __post_init__(self) -> None:
        if not callable(self.metric_kind) and self.metric_kind not in METRIC_KINDS:
            raise TaskError(f"unknown metric {self.metric_kind!r}; choose one of {', '.join(METRIC_KINDS)} or pass "
                            "a function fn(logits [n, seq, vocab], batch) -> [n]")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def metric_name(self) -> str:
        """The metric's name (node id ``metric:<name>``, the ``metric`` key of reports)."""
        if isinstance(self.metric_kind, str):
            return self.metric_kind
        name = re.sub(r"[^\w.-]", "", getattr(self.metric_kind, "__name__", ""))
        return name if name and name != "lambda" else "custom"

    def with_metric(self, metric: Metric) -> TaskDataset:
        """A copy whose metric is ``metric`` (a name of :data:`METRIC_KINDS` or a :data:`MetricFn`)."""
        return dataclasses.replace(self, metric_kind=metric)

    def target_table(self) -> Targets:
        """Every target as a :class:`Targets` table (one column when rows have one target)."""
        if self.targets is not None:
            return self.targets
        return Targets(self.answer_pos.unsqueeze(1), self.answer_ids.unsqueeze(1), self.wrong_ids.unsqueeze(1))

    def real_mask(self) -> torch.Tensor:
        """``[n, seq]`` bool: real tokens (not padding)."""
        if self.attention_mask is None:
            return torch.ones(self.clean_tokens.shape, dtype=torch.bool)
        return self.attention_mask.bool()

    def first_pos(self) -> torch.Tensor:
        """``[n]`` int64 position of each row's first real token (BOS, where dictionaries do not splice)."""
        return self.real_mask().long().argmax(1)

    def subset(self, index: slice | torch.Tensor) -> TaskDataset:
        """The prompts selected by ``index`` (a slice or an index tensor)."""
        idx = torch.arange(len(self))[index]
        rows = idx.tolist()

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return TaskDataset(
            self.name, [self.prompts[i] for i in rows], [self.corrupted_prompts[i] for i in rows],
            self.clean_tokens[idx], self.corrupted_tokens[idx], self.answer_pos[idx], self.answer_ids[idx],
            self.wrong_ids[idx], self.metric_kind, pick(self.attention_mask),
            None if self.targets is None else self.targets.subset(idx), pick(self.reference_logprobs),
        )


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: PaddingSide = "right",
             width: int | None = None) -> torch.Tensor:
    """``[len(rows), width]`` int64 rows padded with ``value`` on ``side`` (width: the longest row)."""
    width = max(len(r) for r in rows) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            start = 0 if side == "right" else width - len(r)
            out[i, start : start + len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out

def single_token_id(model: HookedTransformer, text: str) -> int:
    """The id of ``text`` if it is exactly one token, else a :class:`TaskError` naming it."""
    if model.tokenizer is None:
        raise TaskError(f"answer {text!r} needs a tokenizer; this model has none")
    piece = model.tokenizer.convert_tokens_to_ids(text) if text.startswith("\u2581") else None
    if isinstance(piece, int) and piece != getattr(model.tokenizer, "unk_token_id", None):
        return piece  # a SentencePiece piece written as itself ("▁Lily")
    ids = torch.tensor(encode(model, text, f"answer {text!r}", prepend_bos=False))
    if ids.numel() >= 2 and text.startswith(" ") and _is_space_marker(model, int(ids[0])):
        # a SentencePiece-style tokenizer marks a word's leading space itself ("▁Mary"): " Mary" is
        # then "▁" + "Mary", while the token that follows a word in a prompt is "Mary" encoded alone
        alone = torch.tensor(encode(model, text[1:], f"answer {text!r}", prepend_bos=False))
        if alone.numel() and model.tokenizer.convert_ids_to_tokens([int(alone[0])])[0].startswith("\u2581"):
            ids = alone  # one token, or the pieces the next word really has (named below)
    if ids.numel() != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids.tolist())
        raise TaskError(
            f"answer {text!r} is {ids.numel()} tokens {pieces}, not one; answers must be single tokens "
            "(include the leading space, e.g. ' Mary')"
        )
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and int(ids[0]) == unk and text.strip() != getattr(model.tokenizer, "unk_token", None):
        raise TaskError(f"answer {text!r} is not in the model's vocabulary (it would become the unknown token "
                        f"{model.tokenizer.unk_token!r})")
    return int(ids[0])


def _is_space_marker(model: HookedTransformer, token_id: int) -> bool:
    """Whether ``token_id`` is SentencePiece's lone word-boundary marker ``▁``."""
    return model.tokenizer.convert_ids_to_tokens([token_id])[0] == "\u2581"


def encode(model: HookedTransformer, text: str, what: str, prepend_bos: bool = True) -> list[int]:
    """``text``'s token ids (BOS first when ``prepend_bos``); a tokenizer that raises (a word-level
    vocabulary without an unknown token, a character it cannot encode) gives a :class:`TaskError`
    naming ``what`` instead of its own traceback."""
    try:
        return model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0].tolist()
    except Exception as err:  # tokenizers raise their own exception types
        raise TaskError(f"the tokenizer could not encode {what} ({type(err).__name__}: {err}); it may not cover "
                        "these words or characters: rephrase, or give token ids (prompt_ids / answer_ids rows)") from err


def _unknown_spans(model: HookedTransformer, text: str, unk: int) -> list[str]:
    """The pieces of ``text`` a fast tokenizer maps to ``unk`` (by its offsets); [] when it cannot say."""
    try:
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if i == unk]
    except Exception:  # slow tokenizers have no offsets
        return []


def check_in_vocabulary(model: HookedTransformer, text: str, what: str, ids: Sequence[int] | None = None) -> None:
    """A :class:`TaskError` naming the words of ``text`` the tokenizer maps to its unknown token
    (they would be silently replaced); tokenizers without an unknown token pass everything.
    ``ids``: ``text``'s tokens when the caller has them already (saves a tokenisation)."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None) if tok is not None else None
    if ids is None and unk is not None:
        ids = encode(model, text, what, prepend_bos=False)
    if unk is None or unk not in ids:
        return
    words = [w for w in dict.fromkeys(text.split()) if w != tok.unk_token
             and unk in encode(model, " " + w, what, prepend_bos=False)]
    if not words:  # the unknown piece is not a whole word: whitespace, a character inside a word
        words = list(dict.fromkeys(_unknown_spans(model, text, unk)))
    shown = ", ".join(repr(w) for w in words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
    raise TaskError(f"{what} has text outside the model's vocabulary: {shown or 'a piece it cannot name'}; it would "
                    f"become {tok.unk_token!r}. Rephrase with known words or use a model whose tokenizer covers them")


class RowTarget(NamedTuple):
    """One target of a row: the answer(s) predicted after prompt position ``pos``."""

    pos: int
    """Index into the row's prompt tokens (BOS, when there is one, is 0); negative counts from the end."""
    answers: tuple[int, ...]
    """Correct next-token ids (at least one)."""
    wrongs: tuple[int, ...] = ()
    """Token ids the metric contrasts with."""


class TokenRow(NamedTuple):
    """One tokenised row, before padding."""

    where: str
    """Names the row in errors (``my.jsonl row 3``, ``task 'ioi': prompt 2``)."""
    prompt: str
    corrupted_prompt: str
    clean: list[int]
    corrupted: list[int]
    targets: list[RowTarget]


def check_token_ids(ids: Sequence[int], d_vocab: int, what: str) -> None:
    """A :class:`TaskError` naming the ids that are not integers in ``0..d_vocab - 1``."""
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < d_vocab]
    if bad:
        raise TaskError(f"{what} has token ids outside the model's vocabulary 0..{d_vocab - 1}: "
                        f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")


def _checked_targets(row: TokenRow, d_vocab: int) -> list[RowTarget]:
    """The row's targets with positions resolved (negative from the end), checked and sorted."""
    if not row.targets:
        raise TaskError(f"{row.where}: no target; give an answer (or a 'targets' list)")
    out = []
    for t in row.targets:
        pos = t.pos + len(row.clean) if t.pos < 0 else t.pos
        if not 0 <= pos < len(row.clean):
            raise TaskError(f"{row.where}: target position {t.pos} is outside the prompt's {len(row.clean)} tokens "
                            f"(0..{len(row.clean) - 1}, or -1 for the last)")
        if not t.answers:
            raise TaskError(f"{row.where}: the target at position {t.pos} has no answer")
        check_token_ids(t.answers, d_vocab, f"{row.where}: the answer at position {t.pos}")
        check_token_ids(t.wrongs, d_vocab, f"{row.where}: the wrong tokens at position {t.pos}")
        out.append(RowTarget(pos, tuple(t.answers), tuple(t.wrongs)))
    positions = [t.pos for t in out]
    if len(set(positions)) != len(positions):
        raise TaskError(f"{row.where}: two targets at the same position ({sorted(positions)}); merge their answers "
                        "into one target")
    return sorted(out)


def _pad3(rows: Sequence[Sequence[Sequence[int]]], n_t: int) -> torch.Tensor:
    """``[n, n_t, K]`` id sets padded with -1."""
    width = max(1, max((len(s) for r in rows for s in r), default=1))
    out = torch.full((len(rows), n_t, width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        for j, s in enumerate(r):
            out[i, j, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def build_from_rows(name: str, rows: Sequence[TokenRow], model: HookedTransformer, metric: Metric = "logit_diff",
                    padding_side: PaddingSide = "right") -> TaskDataset:
    """Pad tokenised rows into a :class:`TaskDataset`: ids, lengths, alignment and target positions
    checked (errors name the row); ``padding_side``: where shorter prompts are padded."""
    if not rows:
        raise TaskError(f"task {name!r}: the prompt list is empty; ask for at least one prompt (--n 1 or more)")
    if padding_side not in ("right", "left"):
        raise TaskError(f"padding side must be 'right' or 'left', got {padding_side!r}")
    n_ctx, d_vocab = model.cfg.n_ctx, model.cfg.d_vocab
    targets = []
    for row in rows:
        if not row.clean:
            raise TaskError(f"{row.where} is empty; every prompt needs at least one token")
        if len(row.clean) > n_ctx:
            raise TaskError(f"{row.where} is {len(row.clean)} tokens but the model's context is {n_ctx}; "
                            "shorten the prompt or use a model with a longer context")
        if len(row.corrupted) != len(row.clean):
            raise TaskError(f"{row.where} has {len(row.clean)} tokens but its corrupted version {len(row.corrupted)}; "
                            "clean and corrupted prompts must align token by token")
        check_token_ids(row.clean, d_vocab, row.where)
        check_token_ids(row.corrupted, d_vocab, f"{row.where} (corrupted)")
        targets.append(_checked_targets(row, d_vocab))
    width = max(len(r.clean) for r in rows)
    shift = [width - len(r.clean) if padding_side == "left" else 0 for r in rows]
    pad = 0
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        pad = int(model.tokenizer.pad_token_id)
    lengths = torch.tensor([len(r.clean) for r in rows])
    mask = None
    if bool((lengths < width).any()):
        mask = pad_rows([[1] * len(r.clean) for r in rows], 0, padding_side, width)
    last = [ts[-1] for ts in targets]
    table = None
    n_t = max(len(ts) for ts in targets)
    if n_t > 1:
        table = Targets(pad_rows([[t.pos + s for t in ts] for ts, s in zip(targets, shift, strict=True)], -1),
                        _pad3([[t.answers for t in ts] for ts in targets], n_t),
                        _pad3([[t.wrongs for t in ts] for ts in targets], n_t))
    return TaskDataset(
        name=name,
        prompts=[r.prompt for r in rows],
        corrupted_prompts=[r.corrupted_prompt for r in rows],
        clean_tokens=pad_rows([r.clean for r in rows], pad, padding_side),
        corrupted_tokens=pad_rows([r.corrupted for r in rows], pad, padding_side),
        answer_pos=torch.tensor([t.pos + s for t, s in zip(last, shift, strict=True)], dtype=torch.long),
        answer_ids=pad_rows([t.answers for t in last], -1),
        wrong_ids=pad_rows([t.wrongs for t in last], -1, width=max(1, max(len(t.wrongs) for t in last))),
        metric_kind=metric,
        attention_mask=mask,
        targets=table,
    )


def build_dataset(name: str, instances: Sequence[TaskInstance], model: HookedTransformer, metric_kind: Metric,
                  padding_side: PaddingSide = "right") -> TaskDataset:
    """Tokenise text task instances for ``model`` (one target per prompt: its last token); checks
    lengths, alignment, vocabulary and single-token answers."""
    if not instances:
        raise TaskError(f"task {name!r}: the prompt list is empty; ask for at least one prompt (--n 1 or more)")
    if model.tokenizer is None:
        raise TaskError(f"task {name!r}: text prompts need a tokenizer and this model has none; give token ids "
                        "(prompt_ids, answer_ids: docs/datasets.md)")
    token_cache: dict[str, int] = {}

    def tid(text: str) -> int:
        if text not in token_cache:
            token_cache[text] = single_token_id(model, text)
        return token_cache[text]

    rows = []
    for i, inst in enumerate(instances):
        where = f"task {name!r}: prompt {i}"
        if not inst.prompt.strip():
            raise TaskError(f"{where} is empty; every prompt needs at least one token")
        clean = encode(model, inst.prompt, where)
        corrupt = encode(model, inst.corrupted_prompt, f"task {name!r}: corrupted prompt {i}")
        check_in_vocabulary(model, inst.prompt, where, clean)
        check_in_vocabulary(model, inst.corrupted_prompt, f"task {name!r}: corrupted prompt {i}", corrupt)
        target = RowTarget(-1, tuple(tid(a) for a in inst.answers), tuple(tid(w) for w in inst.wrongs))
        rows.append(TokenRow(where, inst.prompt, inst.corrupted_prompt, clean, corrupt, [target]))
    return build_from_rows(name, rows, model, metric_kind, padding_side)
