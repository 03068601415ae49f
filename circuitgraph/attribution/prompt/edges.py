"""Edges of a prompt graph as they are produced: in memory up to a budget, then on disk.

Each batch of targets adds one chunk ``(sources, targets, weights)``: int32 keys (12 bytes an edge
in float32, 16 in float64). In memory, chunks are copied into *slabs* of :data:`SLAB_EDGES` edges
(each tensor 64 MB or more: the C allocator maps such blocks on their own and gives them back when
freed, so a drained slab really leaves the process; pages are only resident once written). Once the
edges hold ``max_bytes``, every edge so far and every later one is appended to three files in a
private temporary folder, and the final edge tensors are memory-mapped from there (the files are
unlinked once mapped, so nothing is left behind; their pages are read when touched and count as
reclaimable page cache).

:meth:`EdgeStore.finish` turns the keys into the graph's node indices (``new_index``), dropping
edges whose source is no node, slab by slab: the peak is the final tensors plus one slab (none
when one slab holds every edge and nothing is remapped: the graph then views it).
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
SLAB_EDGES = 1 << 24
"""Edges per in-memory slab (16M: 64 MB an int32 tensor)."""


class Edges(NamedTuple):
    """Flat edge tensors: ``[E]`` int32 sources and targets, ``[E]`` float weights."""

    sources: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor

    def __getitem__(self, index):  # a slice of every tensor; an int picks a field, as for any tuple
        if isinstance(index, slice):
            return Edges(*(t[index] for t in self))
        return tuple.__getitem__(self, index)


class EdgeStore:
    """Edges in memory up to ``max_bytes``, beyond that in files under ``spill_dir``."""

    def __init__(self, max_bytes: int, weight_dtype: torch.dtype = torch.float32, spill_dir: str | None = None,
                 slab_edges: int = SLAB_EDGES) -> None:
        self.max_bytes, self.weight_dtype, self.spill_dir = max_bytes, weight_dtype, spill_dir
        self.slab_edges = slab_edges
        self.edge_bytes = 8 + torch.tensor([], dtype=weight_dtype).element_size()
        self._slabs: list[Edges] = []
        self._fill = 0  # edges in the last slab
        self._folder: Path | None = None
        self.n_edges = 0

    @property
    def spilled(self) -> bool:
        """Whether edges are being written to disk."""
        return self._folder is not None

    @property
    def bytes_in_memory(self) -> int:
        """Bytes of the edges held in memory."""
        return 0 if self._folder is not None else self.n_edges * self.edge_bytes

    def add(self, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
        """Append one chunk (any device; kept on the CPU)."""
        chunk = Edges(sources.to("cpu", torch.int32), targets.to("cpu", torch.int32),
                      weights.detach().to("cpu", self.weight_dtype))
        n = chunk.sources.numel()
        if self._folder is None and (self.n_edges + n) * self.edge_bytes > self.max_bytes:
            self._spill()
        self.n_edges += n
        if self._folder is not None:
            self._append(self._folder, chunk)
            return
        at = 0
        while at < n:
            if not self._slabs or self._fill == self.slab_edges:
                self._slabs.append(Edges(torch.empty(self.slab_edges, dtype=torch.int32),
                                         torch.empty(self.slab_edges, dtype=torch.int32),
                                         torch.empty(self.slab_edges, dtype=self.weight_dtype)))
                self._fill = 0
            take = min(n - at, self.slab_edges - self._fill)
            for dst, src in zip(self._slabs[-1], chunk, strict=True):
                dst[self._fill : self._fill + take] = src[at : at + take]
            self._fill += take
            at += take

    def _spill(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="circuitgraph-edges-", dir=self.spill_dir))
        log.info("edges exceed the memory budget (%.0f MB): writing them to %s", self.max_bytes / 2**20, self._folder)
        for chunk in self._drain_slabs():
            self._append(self._folder, chunk)

    @staticmethod
    def _append(folder: Path, chunk: Edges) -> None:
        for name, t in zip(_FILES, chunk, strict=True):
            with open(folder / name, "ab") as f:
                f.write(t.numpy().tobytes())

    def _filled(self, i: int) -> Edges:
        return self._slabs[i][: self._fill if i == len(self._slabs) - 1 else self.slab_edges]

    def chunks(self, rows: int = 1 << 22) -> Iterator[Edges]:
        """Every edge so far, in chunks (slabs in memory; at most ``rows`` edges each from disk, by
        plain reads: nothing stays resident)."""
        if self._folder is None:
            for i in range(len(self._slabs)):
                yield self._filled(i)
            return
        for lo in range(0, self.n_edges, rows):
            n = min(rows, self.n_edges - lo)
            yield Edges(*(torch.from_numpy(np.fromfile(self._folder / name, dtype=dt, count=n, offset=lo * dt.itemsize))
                          for name, dt in zip(_FILES, self._np_dtypes(), strict=True)))

    def _drain_slabs(self) -> Iterator[Edges]:
        """The in-memory slabs, each released once consumed."""
        while self._slabs:
            chunk = self._filled(0)
            self._slabs.pop(0)
            yield chunk
        self._fill = 0

    def _np_dtypes(self) -> tuple[np.dtype, np.dtype, np.dtype]:
        w = np.float64 if self.weight_dtype == torch.float64 else np.float32
        return np.dtype(np.int32), np.dtype(np.int32), np.dtype(w)

    def finish(self, new_index: torch.Tensor | None, keep_source: torch.Tensor | None) -> Edges:
        """The final edges with keys mapped through ``new_index`` (``None``: keys are the node
        indices already) and only edges whose source key is in ``keep_source`` (``None``: all).
        Spilled edges come back memory-mapped from a new file."""
        if new_index is None and keep_source is None and self._folder is None and len(self._slabs) <= 1:
            out = self._filled(0) if self._slabs else _empty(self.weight_dtype)
            self._slabs, self._fill = [], 0
            return out
        out_folder = None
        if self._folder is not None:
            out_folder = Path(tempfile.mkdtemp(prefix="circuitgraph-graph-", dir=self.spill_dir))
            source = self.chunks()
        else:
            n_kept = self.n_edges if keep_source is None else sum(int(keep_source[c.sources.long()].sum())
                                                                 for c in self.chunks())
            out = Edges(torch.empty(n_kept, dtype=torch.int32), torch.empty(n_kept, dtype=torch.int32),
                        torch.empty(n_kept, dtype=self.weight_dtype))
            source = self._drain_slabs()
        at = 0
        for chunk in source:
            if keep_source is not None:
                ok = keep_source[chunk.sources.long()]
                chunk = Edges(chunk.sources[ok], chunk.targets[ok], chunk.weights[ok])
            if new_index is not None:
                chunk = Edges(new_index[chunk.sources.long()].to(torch.int32),
                              new_index[chunk.targets.long()].to(torch.int32), chunk.weights)
            if out_folder is not None:
                self._append(out_folder, chunk)
                continue
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

    def close(self) -> None:
        """Remove the spill folder (tensors mapped from it stay readable)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _empty(weight_dtype: torch.dtype) -> Edges:
    return Edges(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=weight_dtype))
