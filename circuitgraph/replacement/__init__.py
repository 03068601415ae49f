"""The replacement model: dictionaries spliced into a HookedTransformer with error terms."""

from circuitgraph.replacement.frozen import FrozenState, freeze_hooks, record_frozen_hooks
from circuitgraph.replacement.model import ReplacementModel, SiteRecord, SpliceSpec

__all__ = ["FrozenState", "ReplacementModel", "SiteRecord", "SpliceSpec", "freeze_hooks", "record_frozen_hooks"]
