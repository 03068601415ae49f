"""``PromptDataset``: the user-facing prompt dataset of the Python API (``cg.PromptDataset``).

It wraps the tokenised :class:`~circuitgraph.tasks.dataset.TaskDataset` every tracing method
consumes and remembers whether the rows carry corrupted prompts (without them circuits use mean
ablation). Three ways in, one way to hold out rows:

    data = cg.PromptDataset.from_records([{"prompt": "...", "answer": " Mary", "wrong": " John"}], model)
    data = cg.PromptDataset.from_file("my.jsonl", model)        # .jsonl / .json / .csv
    data = cg.PromptDataset.from_task("ioi", model, n=64)        # a built-in task
    select, held_out = data.split(n_eval=16, seed=1)

Rows have the fields documented in :mod:`circuitgraph.tasks.files` (and docs/datasets.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from transformer_lens import HookedTransformer

from circuitgraph.errors import TaskError
from circuitgraph.tasks.dataset import TaskDataset


class Split(NamedTuple):
    """What :meth:`PromptDataset.split` returns."""

    select: PromptDataset
    """The rows that choose the circuit."""
    held_out: PromptDataset | None
    """The rows it is evaluated on (``None`` when ``n_eval`` is 0)."""


@dataclass
class PromptDataset:
    """Tokenised prompts with their answers, ready for :func:`circuitgraph.trace`."""

    data: TaskDataset
    """The tokens, answer positions and answer ids the tracing methods read."""
    has_corrupted: bool
    """Whether every row has a corrupted prompt (patch ablation possible); else mean ablation."""

    def __len__(self) -> int:
        return len(self.data)

    @property
    def default_ablation(self) -> str:
        """``patch`` (with the corrupted prompts) when every row has one, else ``mean``."""
        return "patch" if self.has_corrupted else "mean"

    @property
    def prompts(self) -> list[str]:
        """The clean prompt texts."""
        return self.data.prompts

    @classmethod
    def from_records(cls, records: Sequence[dict], model: HookedTransformer, name: str = "records",
                     padding_side: str = "right") -> PromptDataset:
        """Rows given in Python: dicts with ``prompt``, ``answer`` and optionally ``wrong`` and
        ``corrupted_prompt`` (the fields of a prompt file); ``padding_side``: ``right`` or ``left``."""
        from circuitgraph.tasks.files import dataset_from_rows

        ds, has_corrupted = dataset_from_rows(list(records), model, name, padding_side=padding_side)
        return cls(ds, has_corrupted)

    @classmethod
    def from_file(cls, path: str | Path, model: HookedTransformer, padding_side: str = "right") -> PromptDataset:
        """The rows of a ``.jsonl``, ``.json`` or ``.csv`` prompt file; ``padding_side``: ``right`` or ``left``."""
        from circuitgraph.tasks.files import dataset_from_file

        ds, has_corrupted = dataset_from_file(path, model, padding_side=padding_side)
        return cls(ds, has_corrupted)

    @classmethod
    def from_task(cls, task: str, model: HookedTransformer, n: int = 64, seed: int = 0,
                  padding_side: str = "right") -> PromptDataset:
        """``n`` prompts of a built-in task (``ioi``, ``agreement``, ``induction``, ``greater_than``,
        ``story_names``), held-out words, deterministic in ``seed``; corrupted prompts included."""
        from circuitgraph.tasks.registry import make_dataset

        return cls(make_dataset(task, model, n=n, seed=seed, padding_side=padding_side), True)

    def split(self, n_eval: int, seed: int = 1) -> Split:
        """Rows shuffled with ``seed``; the last ``n_eval`` held out for evaluation, the rest select
        (selection rows repeating a held-out prompt are dropped: :func:`~circuitgraph.tasks.files.split_held_out`)."""
        from circuitgraph.tasks.files import split_held_out

        if n_eval < 0:
            raise TaskError(f"n_eval must be >= 0, got {n_eval}")
        select, held = split_held_out(self.data, n_eval, seed)
        return Split(PromptDataset(select, self.has_corrupted),
                     None if held is None else PromptDataset(held, self.has_corrupted))
