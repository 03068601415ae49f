"""The graph: node ids (``nodes``), the sparse container (``graph``), influence and pruning as pure
tensor functions (``influence``, ``pruning``), graph sparsity measures (``sparsity``), queries
(``query``) and atomic, versioned graph folders (``storage``)."""

from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node
from circuitgraph.graph.pruning import prune_graph, scores_of
from circuitgraph.graph.query import PathRow, QueryRow

__all__ = ["Graph", "Node", "PathRow", "QueryRow", "prune_graph", "scores_of"]
