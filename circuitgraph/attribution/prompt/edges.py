"""Edges of a prompt graph as they are produced: in memory up to a budget, then on disk.

Each batch of targets adds one chunk ``(sources, targets, weights)``: int32 keys (12 bytes an edge
in float32, 16 in float64). Chunks stay in memory until they hold ``max_bytes``; then every chunk
so far and every later one is appended to three files in a private temporary folder, and the
final edge tensors are memory-mapped from there (the files are unlinked once mapped, so nothing is
left behind; pages are read from disk when touched and count as reclaimable page cache).

:meth:`EdgeStore.finish` turns the keys into the graph's node indices (``new_index``), dropping
edges whose source is no node, chunk by chunk: the peak is the final tensors plus one chunk.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

_FILES = ("sources", "targets", "weights")


class Edges(NamedTuple):
    """Flat edge tensors: ``[E]`` int32 sources and targets, ``[E]`` float weights."""

    sources: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


class EdgeStore:
    """Edge chunks in memory up to ``max_bytes``, beyond that in files under ``spill_dir``."""

    def __init__(self, max_bytes: int, weight_dtype: torch.dtype = torch.float32, spill_dir: str | None = None) -> None:
        self.max_bytes, self.weight_dtype, self.spill_dir = max_bytes, weight_dtype, spill_dir
        self._chunks: list[Edges] = []
        self._folder: Path | None = None
        self.n_edges = 0
        self.bytes_in_memory = 0

    @property
    def spilled(self) -> bool:
        """Whether edges are being written to disk."""
        return self._folder is not None

    def add(self, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
        """Append one chunk (any device; kept on the CPU)."""
        chunk = Edges(sources.to("cpu", torch.int32), targets.to("cpu", torch.int32),
                      weights.detach().to("cpu", self.weight_dtype))
        self.n_edges += chunk.sources.numel()
        if self._folder is None and self.bytes_in_memory + _nbytes(chunk) > self.max_bytes:
            self._spill()
        if self._folder is not None:
            self._append(self._folder, chunk)
        else:
            self._chunks.append(chunk)
            self.bytes_in_memory += _nbytes(chunk)

    def _spill(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="circuitgraph-edges-", dir=self.spill_dir))
        log.info("edges exceed the memory budget (%.0f MB): writing them to %s", self.max_bytes / 2**20, self._folder)
        for chunk in self._chunks:
            self._append(self._folder, chunk)
        self._chunks, self.bytes_in_memory = [], 0

    @staticmethod
    def _append(folder: Path, chunk: Edges) -> None:
        for name, t in zip(_FILES, chunk, strict=True):
            with open(folder / name, "ab") as f:
                f.write(t.numpy().tobytes())

    def chunks(self, rows: int = 1 << 22) -> Iterator[Edges]:
        """Every edge so far, in chunks (at most ``rows`` edges each when read back from disk, by
        plain reads: nothing stays resident)."""
        if self._folder is None:
            yield from self._chunks
            return
        for lo in range(0, self.n_edges, rows):
            n = min(rows, self.n_edges - lo)
            yield Edges(*(torch.from_numpy(np.fromfile(self._folder / name, dtype=dt, count=n, offset=lo * dt.itemsize))
                          for name, dt in zip(_FILES, self._np_dtypes(), strict=True)))

    def _np_dtypes(self) -> tuple[np.dtype, np.dtype, np.dtype]:
        w = np.float64 if self.weight_dtype == torch.float64 else np.float32
        return np.dtype(np.int32), np.dtype(np.int32), np.dtype(w)

    def finish(self, new_index: torch.Tensor | None, keep_source: torch.Tensor | None) -> Edges:
        """The final edges with keys mapped through ``new_index`` (``None``: keys are the node
        indices already) and only edges whose source key is in ``keep_source`` (``None``: all).
        Spilled edges come back memory-mapped from a new file."""
        if new_index is None and keep_source is None and self._folder is None and len(self._chunks) <= 1:
            chunks, self._chunks, self.bytes_in_memory = self._chunks, [], 0
            return chunks[0] if chunks else _cat([], self.weight_dtype)
        out_folder = None
        if self._folder is not None:
            out_folder = Path(tempfile.mkdtemp(prefix="circuitgraph-graph-", dir=self.spill_dir))
        else:
            n_kept = self.n_edges if keep_source is None else sum(int(keep_source[c.sources.long()].sum())
                                                                 for c in self._chunks)
            out = Edges(torch.empty(n_kept, dtype=torch.int32), torch.empty(n_kept, dtype=torch.int32),
                        torch.empty(n_kept, dtype=self.weight_dtype))
        at = 0
        for chunk in self._drain():
            if keep_source is not None:
                ok = keep_source[chunk.sources.long()]
                chunk = Edges(chunk.sources[ok], chunk.targets[ok], chunk.weights[ok])
            if new_index is not None:
                chunk = Edges(new_index[chunk.sources.long()].to(torch.int32),
                              new_index[chunk.targets.long()].to(torch.int32), chunk.weights)
            if out_folder is not None:
                self._append(out_folder, chunk)
            else:
                n = chunk.sources.numel()
                for dst, src in zip(out, chunk, strict=True):
                    dst[at : at + n] = src
                at += n
        self.close()
        if out_folder is None:
            return out
        mapped = self._mapped(out_folder)
        shutil.rmtree(out_folder, ignore_errors=True)  # the mappings stay valid after the unlink
        return mapped

    def _mapped(self, folder: Path) -> Edges:
        """The three files of ``folder`` memory-mapped (copy-on-write: writable, the files untouched)."""
        arrays = []
        for name, dt in zip(_FILES, self._np_dtypes(), strict=True):
            path = folder / name
            empty = not path.exists() or path.stat().st_size == 0
            arrays.append(torch.from_numpy(np.zeros(0, dtype=dt) if empty else np.memmap(path, dtype=dt, mode="c")))
        return Edges(*arrays)

    def _drain(self) -> Iterator[Edges]:
        """:meth:`chunks`, releasing in-memory chunks as they are consumed."""
        if self._folder is not None:
            yield from self.chunks()
            return
        while self._chunks:
            chunk = self._chunks.pop(0)
            self.bytes_in_memory -= _nbytes(chunk)
            yield chunk

    def close(self) -> None:
        """Remove the spill folder (tensors mapped from it stay readable)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _nbytes(chunk: Edges) -> int:
    return sum(t.numel() * t.element_size() for t in chunk)


def _cat(chunks: list[Edges], weight_dtype: torch.dtype) -> Edges:
    if not chunks:
        return Edges(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=weight_dtype))
    return Edges(*(torch.cat(x) for x in zip(*chunks, strict=True)))
