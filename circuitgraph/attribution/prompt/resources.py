"""Where and in how much memory a prompt graph is built: the device and the memory budget.

The budget covers what the build adds to the model: the edges kept in memory (three quarters of
it; beyond, edges go to disk, :mod:`~circuitgraph.attribution.prompt.edges`) and the working set
of one batched backward (the other quarter, which sizes the batches). Without a budget, half the
memory available when the build starts (``MemAvailable``; on a GPU the batches are sized by half
its free memory as well).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel

log = logging.getLogger(__name__)

MAX_BATCH = {"cpu": 64, "cuda": 1024}
"""Largest automatic batch: on a CPU, larger batches measured slower (the batch sweep in
docs/benchmarks.md)."""


def resolve_device(name: str, rm: ReplacementModel) -> torch.device:
    """``auto``: ``cuda`` when available, else where the model is; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else rm.model.W_E.device
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CircuitGraphError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise CircuitGraphError(f"device {name!r}: prompt graphs are built on cpu or cuda; use --device cpu, cuda or "
                                "auto")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CircuitGraphError(f"device {name!r} asked for, but this torch sees no CUDA GPU "
                                    f"(torch {torch.__version__}); use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise CircuitGraphError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                    f"cuda:{count - 1}")
    return device


def check_spill_dir(spill_dir: str) -> None:
    """A clear error, before the build, when ``spill_dir`` (``""``: the system's temporary folder)
    is not a writable folder (it is created when missing)."""
    if not spill_dir:
        return
    path = Path(spill_dir)
    if path.exists() and not path.is_dir():
        raise CircuitGraphError(f"spill folder {spill_dir} is a file, not a folder; choose a folder (--spill-dir)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".circuitgraph-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CircuitGraphError(f"cannot write to the spill folder {spill_dir} ({err.strerror}); choose another "
                                "(--spill-dir)") from err


@contextmanager
def on_device(rm: ReplacementModel, device: torch.device) -> Iterator[None]:
    """The model and its dictionaries on ``device`` for the block, moved back afterwards."""
    home = rm.model.W_E.device
    if home == device or (device.type == home.type and device.index is None):
        yield
        return
    log.info("moving the model and dictionaries to %s for the build", device)
    rm.model.to(device, print_details=False)
    for d in rm.dicts.values():
        d.to(device)
    try:
        yield
    finally:
        rm.model.to(home, print_details=False)
        for d in rm.dicts.values():
            d.to(home)


def available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (8 GiB where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def budget_bytes(memory_mb: float) -> int:
    """The build's memory budget in bytes (``memory_mb`` 0: half of :func:`available_bytes`)."""
    return int(memory_mb * 2**20) if memory_mb > 0 else available_bytes() // 2


def auto_batch(budget: int, row_bytes: int, device: torch.device) -> int:
    """Targets per backward: a quarter of the budget (on a GPU, at most half its free memory)
    divided by one row's working memory, between 1 and :data:`MAX_BATCH`."""
    working = budget // 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        working = min(working, free // 2)
    return max(1, min(MAX_BATCH.get(device.type, MAX_BATCH["cpu"]), working // max(row_bytes, 1)))
