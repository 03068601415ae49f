"""Scoped deterministic execution: the same seed gives bit-identical weights on CPU.

Some CPU kernels accumulate in a thread-dependent order (for example the backward of an
embedding lookup, ``index_put_`` with ``accumulate=True``), so two identical training runs can
differ in the last bits and then drift apart. Training runs inside :func:`deterministic`, which
switches PyTorch to its deterministic implementations and restores the previous setting after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Run the block with ``torch.use_deterministic_algorithms(True)`` (warn-only for ops without one)."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
