"""Which on-disk dictionary format a path holds, and the loader for it.

``load_dictionaries`` (``--dicts``) accepts our own folders and other libraries' files. Each
foreign format registers one :class:`Format` here: a cheap ``detect(path)`` that looks only at
file names (never loads weights) and a ``load(path, device)`` returning ``{Site: dictionary}``.
The first format whose ``detect`` matches wins, so put the more specific formats first. A folder
none of them claims is read as our own layout (one ``L{layer}.{kind}/`` sub-folder per site).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from dictionaries.architectures.base import SparseDictionary
from dictionaries.site import Site


class Format(NamedTuple):
    """One foreign on-disk format of a dictionary set."""

    name: str
    """Shown in messages, e.g. ``circuit-tracer CLT``."""
    detect: Callable[[Path], bool]
    """Whether the path (file or folder) holds this format; file names only, no weights read."""
    load: Callable[[Path, str], dict[Site, SparseDictionary]]
    """``(path, device) -> {Site: dictionary}``; raises :class:`~dictionaries.errors.DictionaryError`."""


def _circuit_tracer_clt() -> Format:
    from dictionaries.circuit_tracer_format import is_circuit_tracer_clt, load_clt_circuit_tracer

    return Format("circuit-tracer cross-layer transcoder", is_circuit_tracer_clt,
                  lambda p, device: {s: d.to(device) for s, d in load_clt_circuit_tracer(p).items()})


def _circuit_tracer_transcoders() -> Format:
    from dictionaries.circuit_tracer_transcoders import (
        is_circuit_tracer_transcoder_set,
        load_transcoders_circuit_tracer,
    )

    return Format("circuit-tracer per-layer transcoder set", is_circuit_tracer_transcoder_set,
                  load_transcoders_circuit_tracer)


def _sparsify() -> Format:
    from dictionaries.sparsify_format import is_sparsify_coder, load_sparsify

    return Format("EleutherAI sparsify sparse coder", is_sparsify_coder, load_sparsify)


def _saelens() -> Format:
    from dictionaries.saelens_format import is_saelens_folder, load_saelens_sites

    return Format("SAELens SAE or transcoder", is_saelens_folder, load_saelens_sites)


def _gemma_scope() -> Format:
    from dictionaries.gemma_scope_format import is_gemma_scope, load_gemma_scope

    return Format("Gemma Scope params.npz", is_gemma_scope, lambda p, device: load_gemma_scope(p, device=device))


FORMATS: tuple[Callable[[], Format], ...] = (
    _circuit_tracer_clt,
    _circuit_tracer_transcoders,
    _sparsify,
    _saelens,
    _gemma_scope,
)
"""Foreign formats, most specific first (factories, so a format's module is imported only when used)."""


def detect_format(path: str | Path) -> Format | None:
    """The first registered format that claims ``path``, or ``None`` (our own layout, or nothing)."""
    path = Path(path)
    for factory in FORMATS:
        fmt = factory()
        if fmt.detect(path):
            return fmt
    return None
