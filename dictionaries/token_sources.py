"""Where training tokens come from. A token source serves ``[n, seq_len]`` sequences by index,
so that a resumed run reads exactly the sequences an uninterrupted run would have read.

Sources here: a tokenised tensor file (safetensors, key ``tokens``), a local text file (tokenised
with the model's tokenizer and cut into BOS-prefixed sequences), a Hugging Face dataset (needs
internet), or any object with the same two members (the embedded toy-language corpus is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


@runtime_checkable
class TokenSource(Protocol):
    """Anything that serves token sequences by index."""

    seq_len: int
    """Tokens per sequence."""

    def sequences(self, start: int, n: int) -> torch.Tensor:
        """``[n, seq_len]`` int64 sequences ``start .. start+n-1`` (wrapping around if finite)."""
        ...


class TensorTokens:
    """Sequences from an in-memory ``[S, seq_len]`` tensor, cycling when exhausted."""

    def __init__(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError(f"token tensor must be [n_sequences, seq_len] and non-empty, got {tuple(tokens.shape)}")
        self.tokens = tokens.long()
        self.seq_len = tokens.shape[1]

    def sequences(self, start: int, n: int) -> torch.Tensor:
        idx = torch.arange(start, start + n) % self.tokens.shape[0]
        return self.tokens[idx]


def tensor_file_tokens(path: str | Path) -> TensorTokens:
    """A safetensors file holding ``tokens: [n_sequences, seq_len]``."""
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"token file {path} is missing, corrupt or truncated ({err})") from err
    if "tokens" not in data:
        raise ValueError(f"token file {path} has no 'tokens' tensor (found {sorted(data)})")
    tokens = data["tokens"]
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"token file {path}: 'tokens' is {tokens.dtype}; token ids must be integers (save them as int64)")
    return TensorTokens(tokens)


NO_TOKENIZER = ("the model has no tokenizer, so text cannot be turned into token ids; put the model's tokenizer.json "
                "in its folder, or give token ids instead: a safetensors file holding a 'tokens' tensor "
                "[n_seq, seq_len] (--tokens-file)")
"""Why text inputs are refused for a model without a tokenizer, and the two fixes."""


def text_file_tokens(path: str | Path, model, seq_len: int = 128) -> TensorTokens:
    """A UTF-8 text file tokenised with ``model``'s tokenizer, one BOS per ``seq_len`` sequence."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text file {path} not found")
    if model.tokenizer is None:
        raise ValueError(NO_TOKENIZER)
    ids = model.to_tokens(path.read_text(encoding="utf-8"), prepend_bos=False, truncate=False)[0]
    body = seq_len - 1
    n = ids.numel() // body
    if n == 0:
        raise ValueError(f"{path} has {ids.numel()} tokens, fewer than one sequence of {seq_len}; give more text")
    bos = model.tokenizer.bos_token_id
    seqs = torch.cat([torch.full((n, 1), bos, dtype=torch.long), ids[: n * body].view(n, body)], dim=1)
    return TensorTokens(seqs)


def hf_dataset_tokens(name: str, model, seq_len: int = 128, n_sequences: int = 20_000,
                      split: str = "train", column: str = "text") -> TensorTokens:
    """Tokenise the start of a Hugging Face dataset, streamed: a hub name (needs internet) or a
    local folder of data files (json / jsonl / csv / parquet / text). Examples are tokenised one
    by one and concatenated; each sequence is BOS + ``seq_len - 1`` tokens of that stream."""
    import datasets

    if model.tokenizer is None:
        raise ValueError(NO_TOKENIZER)
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        first = next(iter(stream), None)
    except (OSError, ValueError) as err:  # not found, offline, no data files
        raise ValueError(f"could not open the Hugging Face dataset {name!r} (split {split!r}): "
                         f"{str(err).splitlines()[0]}. Give a hub name (online) or a local folder of data files") from err
    if first is None:
        raise ValueError(f"the Hugging Face dataset {name!r} (split {split!r}) is empty")
    if column not in first:
        raise ValueError(f"the Hugging Face dataset {name!r} has no column {column!r}; its columns are "
                         f"{', '.join(first)} (choose one with --hf-column)")
    bos = model.tokenizer.bos_token_id
    body, rows, buf = seq_len - 1, [], []
    for example in stream:
        buf.extend(model.to_tokens(example[column], prepend_bos=False, truncate=False)[0].tolist())
        while len(buf) >= body and len(rows) < n_sequences:
            rows.append([bos] + buf[:body])
            buf = buf[body:]
        if len(rows) >= n_sequences:
            break
    if not rows:
        raise ValueError(f"the Hugging Face dataset {name!r} holds fewer tokens than one sequence of {seq_len}")
    return TensorTokens(torch.tensor(rows, dtype=torch.long))


class ModelSampledTokens:
    """Text sampled from the model itself (for models that come without a corpus).

    Sequences are generated in chunks of ``chunk``; chunk ``c`` uses its own seeded generator, so
    sequence ``i`` is the same whichever range asks for it (resume-safe and deterministic on CPU).
    Each sequence is BOS followed by ``seq_len - 1`` tokens sampled at ``temperature``."""

    def __init__(self, model, seq_len: int = 128, seed: int = 0, temperature: float = 1.0, chunk: int = 64) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len {seq_len} is too short to sample; use at least 2")
        self.model, self.seq_len, self.seed, self.temperature, self.chunk = model, seq_len, seed, temperature, chunk
        tok = model.tokenizer
        self.bos = int(tok.bos_token_id) if tok is not None and tok.bos_token_id is not None else 0
        self._cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def _chunk(self, c: int) -> torch.Tensor:
        if c not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
            out = torch.full((self.chunk, 1), self.bos, dtype=torch.long)
            for _ in range(self.seq_len - 1):
                logits = self.model(out)[:, -1].float() / max(self.temperature, 1e-6)
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                out = torch.cat([out, nxt], 1)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[c] = out
        return self._cache[c]

    def sequences(self, start: int, n: int) -> torch.Tensor:
        rows = [self._chunk(i // self.chunk)[i % self.chunk] for i in range(start, start + n)]
        return torch.stack(rows)
