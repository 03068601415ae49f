"""Prompt datasets from the user's own files: ``.jsonl``, ``.json`` or ``.csv``.

Each row has ``prompt`` (text up to the predicted token), ``answer`` (one token, or a list of
tokens; in CSV several separated by ``|``), optionally ``wrong`` (the same form: tokens the metric
contrasts with) and ``corrupted_prompt`` (a prompt of the same token length whose answer differs,
for patch ablation). The metric is the mean answer logit minus the mean wrong logit (the answer
logit alone where a row has no ``wrong``). Without corrupted prompts nothing can be patched, so
circuits use mean ablation. Every error names the file and the row (counted from 1).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import TaskError
from circuitgraph.tasks.dataset import TaskDataset, build_dataset
from circuitgraph.toylang.templates import TaskInstance

FIELDS = ("prompt", "answer", "wrong", "corrupted_prompt")


class PromptFile(NamedTuple):
    """What :func:`read_prompt_file` returns."""

    instances: list[TaskInstance]
    """One per row; ``corrupted_prompt`` is the prompt itself when the file has none."""
    has_corrupted: bool
    """Whether the rows carry corrupted prompts (patch ablation possible)."""


def _rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read prompt file {path}: {err}") from err
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) if line.strip() else None for line in text.splitlines()]
            return [r for r in rows if r is not None]  # blank lines skipped, row numbers count the others
        if suffix == ".json":
            data = json.loads(text)
            return data["rows"] if isinstance(data, dict) and "rows" in data else data
        if suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); one JSON object per line for "
                        ".jsonl, a list of objects for .json") from err
    raise TaskError(f"{path}: unknown prompt file type {suffix!r}; use .jsonl, .json or .csv")


def _tokens(value, path: Path, row: int, field: str, required: bool) -> tuple[str, ...]:
    if value is None or value == "" or value == []:
        if required:
            raise TaskError(f"{path} row {row}: no {field!r}; every row needs the token(s) to explain")
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("|")) if "|" in value else (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TaskError(f"{path} row {row}: {field!r} must be a string or a list of strings, got {value!r}")


def read_prompt_file(path: str | Path) -> PromptFile:
    """The rows of ``path`` as task instances (see the module docstring for the fields)."""
    path = Path(path)
    return instances_from_rows(_rows(path), path)


def instances_from_rows(rows: list[dict], path: str | Path = "records") -> PromptFile:
    """Rows (dicts with the fields of the module docstring) as task instances; ``path`` names the
    source in errors (a file, or ``records`` for rows given in Python)."""
    if not isinstance(rows, list) or not rows:
        raise TaskError(f"{path} holds no rows; give one object per prompt with 'prompt' and 'answer'")
    out, corrupted = [], []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise TaskError(f"{path} row {i}: expected an object with 'prompt' and 'answer', got {row!r}")
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise TaskError(f"{path} row {i}: unknown field(s) {unknown}; the fields are {', '.join(FIELDS)}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskError(f"{path} row {i}: 'prompt' must be non-empty text")
        answers = _tokens(row.get("answer"), path, i, "answer", True)
        wrongs = _tokens(row.get("wrong"), path, i, "wrong", False)
        corrupt = row.get("corrupted_prompt") or None
        corrupted.append(corrupt is not None)
        out.append(TaskInstance(prompt, answers, wrongs, corrupt or prompt, answers[0]))
    if any(corrupted) and not all(corrupted):
        missing = [i for i, c in enumerate(corrupted, 1) if not c][:5]
        raise TaskError(f"{path}: rows {missing} have no 'corrupted_prompt' but others do; give it for every row "
                        "or for none (then circuits use mean ablation)")
    return PromptFile(out, all(corrupted))


def dataset_from_file(path: str | Path, model: HookedTransformer) -> tuple[TaskDataset, bool]:
    """The file as a :class:`TaskDataset` (metric: logit difference) and whether it has corrupted prompts."""
    return _build(read_prompt_file(path), model, Path(path).stem, path)


def dataset_from_rows(rows: list[dict], model: HookedTransformer, name: str = "records") -> tuple[TaskDataset, bool]:
    """Rows given in Python (dicts with the file fields) as a :class:`TaskDataset` and whether they
    have corrupted prompts; errors name the row (counted from 1)."""
    return _build(instances_from_rows(rows, name), model, name, name)


def _build(pf: PromptFile, model: HookedTransformer, name: str, source: str | Path) -> tuple[TaskDataset, bool]:
    try:
        ds = build_dataset(name, pf.instances, model, "logit_diff")
    except TaskError as err:  # build_dataset counts prompts from 0; rows count from 1
        raise TaskError(f"{source}: {err} (prompt i is row i + 1)") from err
    return ds, pf.has_corrupted


def split_held_out(ds: TaskDataset, n_eval: int, seed: int) -> tuple[TaskDataset, TaskDataset | None]:
    """Rows shuffled with ``seed``; the last ``n_eval`` held out for evaluation, the rest select."""
    if n_eval == 0:
        return ds, None
    if len(ds) < 2 or n_eval >= len(ds):
        raise TaskError(f"the prompt file has {len(ds)} rows; holding out {n_eval} leaves none to select the circuit "
                        f"with. Pass --eval-n {max(0, len(ds) // 2)} (or 0 to evaluate on the selection rows)")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[: len(ds) - n_eval]), ds.subset(perm[len(ds) - n_eval:])
