"""Prompt datasets from the user's own rows: ``.jsonl``, ``.json`` or ``.csv`` files, or dicts in Python.

A row gives its prompt as text (``prompt``) or as token ids (``prompt_ids``, used exactly as given:
include the BOS id yourself if the model expects one), and what to explain: ``answer`` (one token,
or a list of alternatives; in CSV separated by ``|``) or ``answer_ids``, optionally ``wrong`` /
``wrong_ids`` (tokens the metric contrasts with), read at the prompt's last token; or ``targets``,
a list of ``{"position": p, "answer": ..., "wrong": ...}`` (ids allowed as above) for answers at
several positions (``p`` indexes the prompt's tokens, BOS included, negative from the end; the
answer is the token predicted after position ``p``). ``corrupted_prompt`` /
``corrupted_prompt_ids`` (same token length) enables patch ablation; without them circuits use mean
ablation. In CSV, list cells are JSON (``[3, 7]``) or ids separated by spaces, commas or ``|``, and
``targets`` is a JSON list. Every error names the source and the row (counted from 1).
docs/datasets.md documents the fields with examples.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import NamedTuple

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import TaskError
from circuitgraph.tasks.dataset import (
    Metric,
    PaddingSide,
    RowTarget,
    TaskDataset,
    TokenRow,
    build_from_rows,
    check_in_vocabulary,
    check_token_ids,
    encode,
    single_token_id,
)

log = logging.getLogger(__name__)

FIELDS = ("prompt", "prompt_ids", "answer", "answer_ids", "wrong", "wrong_ids", "corrupted_prompt",
          "corrupted_prompt_ids", "targets")
TARGET_FIELDS = ("position", "answer", "answer_ids", "wrong", "wrong_ids")


class FileDataset(NamedTuple):
    """What :func:`dataset_from_file` and :func:`dataset_from_rows` return."""

    dataset: TaskDataset
    has_corrupted: bool
    """Whether the rows carry corrupted prompts (patch ablation possible)."""


class TokenRows(NamedTuple):
    """What :func:`token_rows` returns."""

    rows: list[TokenRow]
    """One per row; the corrupted prompt is the prompt itself when the rows have none."""
    has_corrupted: bool


def _rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"cannot read prompt file {path}: {err}") from err
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue  # blank lines skipped, row numbers count the others
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                                    "one JSON object per line") from err
            return rows
        if suffix == ".json":
            data = json.loads(text)
            rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
            if not isinstance(rows, list):
                raise TaskError(f"{path}: a .json prompt file holds a list of row objects (or {{\"rows\": [...]}}), "
                                f"got {type(rows).__name__}")
            return rows
        if suffix == ".csv":
            return [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(text.splitlines())]
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); one JSON object per line for "
                        ".jsonl, a list of objects for .json") from err
    raise TaskError(f"{path}: unknown prompt file type {suffix!r}; use .jsonl, .json or .csv")


def _empty(value) -> bool:
    return value is None or value == "" or value == []


def _texts(value, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split("|")) if "|" in value else (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TaskError(f"{where}: {field!r} must be a string or a list of strings, got {value!r}")


def _ids(value, where: str, field: str) -> tuple[int, ...]:
    """Token ids: an int, a list of ints, or (CSV) a JSON list / ids separated by spaces, commas or ``|``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [int(v) for v in re.split(r"[\s,|]+", text) if v]
        except (ValueError, json.JSONDecodeError) as err:
            raise TaskError(f"{where}: {field!r} must hold integer token ids, got {text!r}") from err
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise TaskError(f"{where}: {field!r} must be a token id or a list of token ids (integers), got {value!r}")


def _token_set(spec: dict, name: str, where: str, model: HookedTransformer, required: bool) -> tuple[int, ...]:
    """The ids of ``name`` (text, one token each) or ``name_ids``; at most one of the two."""
    text, ids = spec.get(name), spec.get(f"{name}_ids")
    if not _empty(text) and not _empty(ids):
        raise TaskError(f"{where}: give {name!r} (text) or {name + '_ids'!r} (token ids), not both")
    if not _empty(ids):
        return _ids(ids, where, f"{name}_ids")
    if _empty(text):
        if required:
            raise TaskError(f"{where}: no {name!r}; every row needs the token(s) to explain ({name!r} or "
                            f"{name + '_ids'!r})")
        return ()
    if model.tokenizer is None:
        raise TaskError(f"{where}: {name!r} is text, but this model has no tokenizer; give {name + '_ids'!r} "
                        "(token ids) instead")
    out = []
    for t in _texts(text, where, name):
        try:
            out.append(single_token_id(model, t))
        except TaskError as err:
            raise TaskError(f"{where}: {err}") from err
    return tuple(out)


def _prompt(row: dict, name: str, where: str, model: HookedTransformer) -> tuple[str, list[int]] | None:
    """``(text, ids)`` of ``name`` (text, tokenised with the model's BOS) or ``name_ids`` (as given)."""
    text, ids = row.get(name), row.get(f"{name}_ids")
    if not _empty(text) and not _empty(ids):
        raise TaskError(f"{where}: give {name!r} (text) or {name + '_ids'!r} (token ids), not both")
    if not _empty(ids):
        tokens = list(_ids(ids, where, f"{name}_ids"))
        check_token_ids(tokens, model.cfg.d_vocab, where if name == "prompt" else f"{where} (corrupted)")
        shown = model.tokenizer.decode(tokens) if model.tokenizer is not None else " ".join(map(str, tokens))
        return f"ids: {shown}", tokens
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{where}: {name!r} must be non-empty text")
    if model.tokenizer is None:
        raise TaskError(f"{where}: {name!r} is text, but this model has no tokenizer; give {name + '_ids'!r} "
                        "(token ids) instead")
    tokens = encode(model, text, f"{where}: {name!r}")
    check_in_vocabulary(model, text, f"{where}: {name!r}", tokens)
    return text, tokens


def _targets(row: dict, where: str, model: HookedTransformer) -> list[RowTarget]:
    if "targets" not in row:
        return [_target(-1, row, where, model)]
    both = [f for f in ("answer", "answer_ids", "wrong", "wrong_ids") if f in row]
    if both:
        raise TaskError(f"{where}: give 'targets' or {both[0]!r}, not both; put each answer in its target")
    spec = row["targets"]
    if isinstance(spec, str):  # a CSV cell holds the list as JSON text
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            pass  # refused below, with what was given
    if not isinstance(spec, list) or not spec or not all(isinstance(t, dict) for t in spec):
        given = row["targets"]
        shown = f"the text {given!r}" if isinstance(given, str) else f"{type(given).__name__} {given!r}"
        raise TaskError(f"{where}: 'targets' must be a non-empty list of objects like "
                        '[{"position": 5, "answer": " x", "wrong": " y"}]; got ' + shown[:120]
                        + " (in a CSV cell, write that list as JSON)")
    out = []
    for k, t in enumerate(spec, 1):
        at = f"{where} target {k}"
        unknown = sorted(set(t) - set(TARGET_FIELDS))
        if unknown:
            raise TaskError(f"{at}: unknown field(s) {unknown}; a target has {', '.join(TARGET_FIELDS)}")
        pos = t.get("position")
        if isinstance(pos, bool) or not isinstance(pos, int):
            raise TaskError(f"{at}: 'position' must be an integer token index (0 is the first token, -1 the last), "
                            f"got {pos!r}")
        out.append(_target(pos, t, at, model))
    return out


def _target(pos: int, spec: dict, where: str, model: HookedTransformer) -> RowTarget:
    """One target (its answers and wrong answers)."""
    return RowTarget(pos, _token_set(spec, "answer", where, model, True), _token_set(spec, "wrong", where, model, False))


def check_contrasts(rows: list[TokenRow], metric: Metric, model: HookedTransformer) -> None:
    """For a metric that contrasts answers with wrong answers (``logit_diff``, ``prob_diff``): refuse a
    target whose answers are exactly its wrong answers (the difference is always 0), naming the row."""
    if metric not in ("logit_diff", "prob_diff"):
        return
    for row in rows:
        for k, t in enumerate(row.targets, 1):
            if t.wrongs and set(t.answers) == set(t.wrongs):
                at = row.where if len(row.targets) == 1 else f"{row.where} target {k}"
                shown = ", ".join(repr(model.tokenizer.decode([i])) if model.tokenizer is not None else str(i)
                                  for i in t.answers)
                raise TaskError(f"{at}: the answers and the wrong answers are the same tokens ({shown}); their "
                                f"{metric} is always 0. Give the tokens the answer competes with as 'wrong'")


def token_rows(records: list[dict], source: str | Path, model: HookedTransformer) -> TokenRows:
    """Rows (dicts with the fields of the module docstring) tokenised for ``model``; ``source``
    names them in errors (a file, or ``records`` for rows given in Python)."""
    if not isinstance(records, list) or not records:
        raise TaskError(f"{source} holds no rows; give one object per prompt with 'prompt' and 'answer'")
    out, corrupted = [], []
    for i, row in enumerate(records, 1):
        where = f"{source} row {i}"
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected an object with 'prompt' and 'answer', got {row!r}")
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {unknown}; the fields are {', '.join(FIELDS)}")
        prompt = _prompt(row, "prompt", where, model)
        if prompt is None:
            raise TaskError(f"{where}: no 'prompt'; give the prompt as text ('prompt') or token ids ('prompt_ids')")
        corrupt = _prompt(row, "corrupted_prompt", where, model)
        corrupted.append(corrupt is not None)
        corrupt = corrupt or prompt
        out.append(TokenRow(where, prompt[0], corrupt[0], prompt[1], corrupt[1], _targets(row, where, model)))
    if any(corrupted) and not all(corrupted):
        missing = [i for i, c in enumerate(corrupted, 1) if not c][:5]
        raise TaskError(f"{source}: rows {missing} have no 'corrupted_prompt' but others do; give it for every row "
                        "or for none (then circuits use mean ablation)")
    return TokenRows(out, all(corrupted))


def dataset_from_rows(rows: list[dict], model: HookedTransformer, name: str = "records", metric: Metric = "logit_diff",
                      padding_side: PaddingSide = "right") -> FileDataset:
    """Rows given in Python (dicts with the file fields) as a :class:`TaskDataset` (``metric``: a
    name or a callable, see :mod:`circuitgraph.tasks.metrics`) and whether they have corrupted
    prompts; errors name the row (counted from 1)."""
    read = token_rows(rows, name, model)
    check_contrasts(read.rows, metric, model)
    return FileDataset(build_from_rows(name, read.rows, model, metric, padding_side), read.has_corrupted)


def dataset_from_file(path: str | Path, model: HookedTransformer, metric: Metric = "logit_diff",
                      padding_side: PaddingSide = "right") -> FileDataset:
    """The rows of a ``.jsonl`` / ``.json`` / ``.csv`` file as a :class:`TaskDataset` and whether
    they have corrupted prompts."""
    path = Path(path)
    read = token_rows(_rows(path), path, model)
    check_contrasts(read.rows, metric, model)
    return FileDataset(build_from_rows(path.stem, read.rows, model, metric, padding_side), read.has_corrupted)


def split_held_out(ds: TaskDataset, n_eval: int, seed: int) -> tuple[TaskDataset, TaskDataset | None]:
    """Rows shuffled with ``seed``; the last ``n_eval`` held out for evaluation, the rest select.
    A prompt may occur in several rows: selection rows repeating a held-out prompt are dropped
    (held-out prompts never select the circuit)."""
    if n_eval == 0:
        return ds, None
    if len(ds) < 2 or n_eval >= len(ds):
        raise TaskError(f"the prompt file has {len(ds)} rows; holding out {n_eval} leaves none to select the circuit "
                        f"with. Pass --eval-n {max(0, len(ds) // 2)} (or 0 to evaluate on the selection rows)")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    select, held = ds.subset(perm[: len(ds) - n_eval]), ds.subset(perm[len(ds) - n_eval:])
    seen = set(held.prompts)
    keep = torch.tensor([p not in seen for p in select.prompts])
    if not bool(keep.all()):
        if not bool(keep.any()):
            raise TaskError("every selection row repeats a held-out prompt; the rows repeat their prompts, give more "
                            "distinct rows")
        log.info("%d selection rows repeat a held-out prompt and are dropped", int((~keep).sum()))
        select = select.subset(keep.nonzero().squeeze(1))
    return select, held
