"""Direct linear attribution of one prompt (circuit-tracer's algorithm, generalised to every site kind).

1. Run the replacement model once, recording latents, error terms, attention patterns,
   normalisation scales and MLP gates.
2. Make the token embeddings, every site's latents and every site's error terms leaves, and
   re-run with the recorded patterns / scales / gates frozen. Every site's input is now an affine
   function of the leaves, so a node's *direct* effect on a target is exact and linear:
       edge(s -> t) = value(s) * d target(t) / d value(s)       (vector-valued sources: a dot product)
   where target(t) is the feature's affine pre-activation (what the latent equals when active), a
   mean-centred logit, or a custom metric.
3. Targets are visited in batches (one batched backward per batch, ``is_grads_batched``): first the
   output targets, then features in order of their influence on the outputs through the edges
   found so far, until ``max_feature_nodes`` features have been visited.
4. One more frozen run with every leaf at zero gives each target's *bias* (the part no node
   explains), so incoming edges + bias = activation exactly.

Works for residual, MLP-output, attention-``z``, neuron and transcoder dictionaries, mixed freely
(one dictionary per output hook), and for causal and bidirectional attention (a causal model's
target at position t has no gradient after t, which bounds the work; a bidirectional one's reads
every position).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.prompt.assemble import assemble_graph, zero_run
from circuitgraph.attribution.prompt.backward import FrozenBackward
from circuitgraph.attribution.prompt.layout import SourceLayout
from circuitgraph.attribution.prompt.outputs import OutputTargets, token_strings
from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.masking import is_causal
from circuitgraph.replacement.model import ReplacementModel

log = logging.getLogger(__name__)


@dataclass
class LinearAttributionConfig:
    """Options of :func:`attribute_prompt`."""

    max_feature_nodes: int = 1000
    """Budget: features whose incoming edges are computed (visited in order of influence)."""
    batch_size: int = 64
    """Targets per batched backward pass."""
    max_logits: int = 10
    """Most logit targets (the likeliest next tokens)."""
    logit_probability: float = 0.95
    """Logit targets are added until their probabilities sum to this."""
    update_interval: int = 4
    """Batches between recomputations of the influence ranking that orders feature targets."""
    min_edge: float = 0.0
    """Edges with ``|weight| <= min_edge`` are not stored."""
    progress: bool = True
    """Show a tqdm bar."""

    def __post_init__(self) -> None:
        if self.max_feature_nodes < 0 or self.batch_size < 1 or self.max_logits < 0:
            raise ValueError("max_feature_nodes >= 0, batch_size >= 1 and max_logits >= 0 are required")
        if not 0 < self.logit_probability <= 1:
            raise ValueError(f"logit_probability must lie in (0, 1], got {self.logit_probability}")


def attribute_prompt(rm: ReplacementModel, tokens: torch.Tensor, config: LinearAttributionConfig | None = None,
                     metric: MetricTarget | None = None) -> Graph:
    """The direct-effect attribution graph of one prompt ``tokens`` (``[P]`` or ``[1, P]``).

    ``metric``: a linear target over one position's logits to explain besides the likeliest logits
    (it then carries all the output weight). Phases: record the clean run, lay out the source nodes,
    select the outputs, visit targets through the frozen backward, assemble the graph."""
    cfg = config or LinearAttributionConfig()
    start = time.perf_counter()
    tokens = _check_prompt(rm, tokens)
    model = rm.model
    with torch.no_grad():
        clean = rm.run(tokens, record_frozen=True)
    tok_str = token_strings(model, tokens[0])
    layout = SourceLayout(clean, rm.sites, tok_str)
    outputs = OutputTargets.select(model, clean.logits[0], cfg.max_logits, cfg.logit_probability, metric)
    log.info("prompt of %d tokens: %d active features, %d outputs", layout.n_pos, layout.n_features, len(outputs))
    budget = min(cfg.max_feature_nodes, layout.n_features)
    backward = FrozenBackward(rm, tokens, clean, layout, outputs, is_causal(model), cfg.min_edge)
    with tqdm(total=len(outputs) + budget, desc="attribution", disable=not cfg.progress, leave=False) as bar:
        edges = backward.visit(budget, cfg.batch_size, cfg.update_interval, bar.update)
    n_visited = sum(k < layout.n_sources for k in edges.visited)
    metadata = {
        "method": "linear",
        "prompt_tokens": tokens[0].tolist(),
        "prompt": "".join(tok_str[1:]) if tok_str else "",
        "sites": [s.id for s in rm.sites],
        "n_active_features": layout.n_features,
        "n_visited_features": n_visited,
        "max_feature_nodes": cfg.max_feature_nodes,
        "metric": metric.name if metric is not None else None,
    }
    graph = assemble_graph(layout, outputs, edges, zero_run(rm, tokens, clean), backward.embed.dtype, metadata)
    graph.metadata["seconds"] = time.perf_counter() - start
    log.info("attributed %d targets, %d edges in %.2f s", len(edges.visited), graph.n_edges, graph.metadata["seconds"])
    return graph


def _check_prompt(rm: ReplacementModel, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` as ``[1, P]``, refusing batches, one-token prompts and ids the model lacks."""
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise CircuitGraphError(f"attribute_prompt takes one prompt, got a batch of {tokens.shape[0]}; use dataset attribution")
    if tokens.shape[1] < 2:
        raise CircuitGraphError("the prompt must have at least 2 tokens (BOS and one more)")
    rm.check_tokens(tokens)
    return tokens
