"""A prompt dataset for one task: clean and corrupted tokens, answer positions and answer sets.

Prompts may differ in length; tokens are right-padded and ``answer_pos`` gives the position of
each prompt's last token, where the answer is predicted (causal attention means padding never
affects it). Clean and corrupted prompts have the same length, so patching is position-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import TaskError
from circuitgraph.toylang.templates import TaskInstance

MetricKind = Literal["logit_diff", "prob_diff"]


@dataclass
class TaskDataset:
    """Tokenised prompts of one task with everything a metric or a patching run needs."""

    name: str
    """Task name (``ioi``, ``agreement``, ``induction``, ``greater_than`` or a custom one)."""
    prompts: list[str]
    """Clean prompt texts."""
    corrupted_prompts: list[str]
    """Corrupted counterparts (same token length), used for patching baselines."""
    clean_tokens: torch.Tensor
    """``[n, seq]`` int64, BOS first, right-padded."""
    corrupted_tokens: torch.Tensor
    """``[n, seq]`` int64, aligned with ``clean_tokens``."""
    answer_pos: torch.Tensor
    """``[n]`` int64 position of the last prompt token (where the answer is predicted)."""
    answer_ids: torch.Tensor
    """``[n, A]`` int64 correct next tokens, padded with -1."""
    wrong_ids: torch.Tensor
    """``[n, W]`` int64 incorrect next tokens the metric contrasts with, padded with -1."""
    metric_kind: MetricKind
    """``logit_diff``: mean correct logit minus mean wrong logit; ``prob_diff``: probability mass
    on correct minus on wrong tokens."""

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: slice | torch.Tensor) -> TaskDataset:
        """The prompts selected by ``index`` (a slice or an index tensor)."""
        idx = torch.arange(len(self))[index]
        return TaskDataset(
            self.name,
            [self.prompts[i] for i in idx.tolist()],
            [self.corrupted_prompts[i] for i in idx.tolist()],
            self.clean_tokens[idx],
            self.corrupted_tokens[idx],
            self.answer_pos[idx],
            self.answer_ids[idx],
            self.wrong_ids[idx],
            self.metric_kind,
        )


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def single_token_id(model: HookedTransformer, text: str) -> int:
    """The id of ``text`` if it is exactly one token, else a :class:`TaskError` naming it."""
    if model.tokenizer is None:
        raise TaskError(f"answer {text!r} needs a tokenizer; this model has none")
    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    if ids.numel() != 1:
        pieces = [model.tokenizer.decode([int(i)]) for i in ids]
        raise TaskError(
            f"answer {text!r} is {ids.numel()} tokens {pieces}, not one; answers must be single tokens "
            "(include the leading space, e.g. ' Mary')"
        )
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and int(ids[0]) == unk and text.strip() != getattr(model.tokenizer, "unk_token", None):
        raise TaskError(f"answer {text!r} is not in the model's vocabulary (it would become the unknown token "
                        f"{model.tokenizer.unk_token!r})")
    return int(ids[0])


def check_in_vocabulary(model: HookedTransformer, text: str, what: str, ids: Sequence[int] | None = None) -> None:
    """A :class:`TaskError` naming the words of ``text`` the tokenizer maps to its unknown token
    (they would be silently replaced); tokenizers without an unknown token pass everything.
    ``ids``: ``text``'s tokens when the caller has them already (saves a tokenisation)."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None) if tok is not None else None
    if ids is None and unk is not None:
        ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()
    if unk is None or unk not in ids:
        return
    words = [w for w in dict.fromkeys(text.split()) if w != tok.unk_token
             and unk in model.to_tokens(" " + w, prepend_bos=False, truncate=False)[0].tolist()]
    shown = ", ".join(repr(w) for w in words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
    raise TaskError(f"{what} has words outside the model's vocabulary: {shown or repr(text)}; they would become "
                    f"{tok.unk_token!r}. Rephrase with known words or use a model whose tokenizer covers them")


def build_dataset(
    name: str, instances: Sequence[TaskInstance], model: HookedTransformer, metric_kind: MetricKind
) -> TaskDataset:
    """Tokenise task instances for ``model``; checks lengths, alignment and single-token answers."""
    if not instances:
        raise TaskError(f"task {name!r}: the prompt list is empty; ask for at least one prompt (--n 1 or more)")
    n_ctx = model.cfg.n_ctx
    clean_rows, corrupt_rows, pos = [], [], []
    token_cache: dict[str, int] = {}

    def tid(text: str) -> int:
        if text not in token_cache:
            token_cache[text] = single_token_id(model, text)
        return token_cache[text]

    for i, inst in enumerate(instances):
        if not inst.prompt.strip():
            raise TaskError(f"task {name!r}: prompt {i} is empty; every prompt needs at least one token")
        clean = model.to_tokens(inst.prompt, truncate=False)[0].tolist()
        corrupt = model.to_tokens(inst.corrupted_prompt, truncate=False)[0].tolist()
        check_in_vocabulary(model, inst.prompt, f"task {name!r}: prompt {i}", clean)
        check_in_vocabulary(model, inst.corrupted_prompt, f"task {name!r}: corrupted prompt {i}", corrupt)
        if len(clean) > n_ctx:
            raise TaskError(
                f"task {name!r}: prompt {i} is {len(clean)} tokens but the model's context is {n_ctx}; "
                "shorten the prompt or use a model with a longer context"
            )
        if len(corrupt) != len(clean):
            raise TaskError(
                f"task {name!r}: prompt {i} has {len(clean)} tokens but its corrupted version "
                f"{len(corrupt)}; clean and corrupted prompts must align token by token"
            )
        clean_rows.append(clean)
        corrupt_rows.append(corrupt)
        pos.append(len(clean) - 1)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    return TaskDataset(
        name=name,
        prompts=[inst.prompt for inst in instances],
        corrupted_prompts=[inst.corrupted_prompt for inst in instances],
        clean_tokens=_pad(clean_rows, pad),
        corrupted_tokens=_pad(corrupt_rows, pad),
        answer_pos=torch.tensor(pos, dtype=torch.long),
        answer_ids=_pad([[tid(a) for a in inst.answers] for inst in instances], -1),
        wrong_ids=_pad([[tid(w) for w in inst.wrongs] for inst in instances], -1),
        metric_kind=metric_kind,
    )
