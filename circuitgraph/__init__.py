"""circuitgraph: find which internal features of a transformer cause a behaviour.

The Python API is one call per step (see :mod:`circuitgraph.api`)::

    import circuitgraph as cg
    model = cg.load_model("default")
    dicts = cg.load_dictionaries("default", model=model)
    data = cg.PromptDataset.from_file("my.jsonl", model)
    graph = cg.trace(model, dicts, data)
    graph.upstream("metric:logit_diff")
    cg.view(graph, "circuit.html")

Stages, one sub-package each: ``toylang`` (the embedded model's training language), ``models``
(loading and saving models), ``tasks`` (prompt datasets and metrics), ``replacement`` (dictionaries
spliced in with error terms), ``attribution`` (edges, node scores, circuits), ``graph`` (the graph,
pruning, queries), ``features`` (descriptions, steering), ``viewer`` (HTML and exports), ``cli``.
Sparse dictionaries live in the sibling package ``dictionaries``.

Names are imported on first use, so ``import circuitgraph`` stays cheap (and the command line can
set thread settings before torch loads).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "circuitgraph.api",
    "load_dictionaries": "circuitgraph.api",
    "replacement_model": "circuitgraph.api",
    "trace": "circuitgraph.api",
    "prune": "circuitgraph.api",
    "view": "circuitgraph.api",
    "export": "circuitgraph.api",
    "PromptDataset": "circuitgraph.tasks.prompts",
    "Graph": "circuitgraph.graph.graph",
    "ReplacementModel": "circuitgraph.replacement.model",
    "FeatureEdit": "circuitgraph.features.interventions",
    "intervene": "circuitgraph.features.interventions",
    "generate": "circuitgraph.features.interventions",
    "describe_features": "circuitgraph.features.descriptions",
    "Site": "dictionaries.site",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'circuitgraph' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
