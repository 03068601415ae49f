"""circuitgraph: find which internal features of a transformer cause a behaviour.

Stages, one sub-package each: ``toylang`` (the embedded model's training language), ``models``
(loading and saving models), ``tasks`` (prompt datasets and metrics), ``cli`` (the command line).
Sparse dictionaries live in the sibling package ``dictionaries``.
"""

__version__ = "0.1.0"
