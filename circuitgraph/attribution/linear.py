"""Direct linear attribution of one prompt (circuit-tracer's algorithm, generalised to every site kind).

1. Run the replacement model once, recording latents, error terms, attention patterns,
   normalisation scales, MLP gates and each site's output at BOS.
2. Make the token embeddings, every site's latents and every site's error terms leaves, and
   re-run with the recorded patterns / scales / gates frozen. Every site's input is now an affine
   function of the leaves, so a node's *direct* effect on a target is exact and linear:
       edge(s -> t) = value(s) * d target(t) / d value(s)       (vector-valued sources: a dot product)
   where target(t) is the feature's affine pre-activation (what the latent equals when active), a
   mean-centred logit, or a custom metric.
3. Targets are visited in batches, one vectorised backward per batch through the shortest frozen
   prefix of the prompt that covers them (``prompt/backward.py``): first the output targets, then
   every active feature when ``max_feature_nodes`` covers them all, else features in order of their
   influence on the outputs through the edges found so far.
4. One more frozen run with every leaf at zero gives each target's *bias* (the part no node
   explains), so incoming edges + bias = activation exactly.

The BOS position is never spliced; ``bos`` says who is credited with what the sites output there
(``prompt/bos.py``). Edges are int32-indexed and stay in memory up to ``memory_mb`` (then on disk,
``prompt/edges.py``). Works for residual, MLP-output, attention-``z``, neuron and transcoder
dictionaries, mixed freely (one dictionary per output hook), and for causal and bidirectional
attention (a bidirectional model's targets read every position).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import get_args

import torch
from tqdm.auto import tqdm

from circuitgraph.attribution.prompt.assemble import assemble_graph, zero_run
from circuitgraph.attribution.prompt.backward import FrozenBackward, row_bytes
from circuitgraph.attribution.prompt.bos import BosMode, bos_deltas, clean_run
from circuitgraph.attribution.prompt.edges import EdgeStore
from circuitgraph.attribution.prompt.layout import SourceLayout
from circuitgraph.attribution.prompt.outputs import OutputTargets, token_strings
from circuitgraph.attribution.prompt.resources import (
    auto_batch,
    budget_bytes,
    check_spill_dir,
    on_device,
    resolve_device,
)
from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.masking import is_causal
from circuitgraph.replacement.model import ReplacementModel

log = logging.getLogger(__name__)


PROMPT_RENAME = {"max_feature_nodes": "prompt_max_feature_nodes", "batch_size": "prompt_batch_size"}
"""Prompt-graph settings whose names dataset circuits use too: their CLI flags (and accepted
``cg.trace`` aliases) get a ``prompt_`` prefix."""


@dataclass
class LinearAttributionConfig:
    """Options of :func:`attribute_prompt`."""

    max_feature_nodes: int = 1000
    """Feature budget: features whose incoming edges are computed. Every active feature when it
    covers them all, else the most influential ones; a graph reports ``n_visited_features`` of
    ``n_active_features`` and a warning says when the budget left features out."""
    batch_size: int = 0
    """Targets per batched backward pass; 0 sizes batches from ``memory_mb``."""
    max_logits: int = 10
    """Most logit targets (the likeliest next tokens)."""
    logit_probability: float = 0.95
    """Logit targets are added until their probabilities sum to this."""
    rank_interval: int = 256
    """Features visited between recomputations of the influence ranking (when the budget leaves
    features out; circuit-tracer's update_interval is 4 batches of its batch size)."""
    min_edge: float = 0.0
    """Edges with ``|weight| <= min_edge`` are not stored."""
    bos: BosMode = "keep"
    """What the sites output at the first position (BOS, never spliced): ``keep`` credits it to
    ``tok@0`` (computed from it through the frozen model); ``detach`` holds it at its recorded
    value, part of every bias (circuit-tracer's convention: graphs compare edge for edge)."""
    memory_mb: float = 0
    """Memory budget of the build beyond the model: edges in memory (beyond, they are written to
    ``spill_dir`` and memory-mapped back) and the batches' working set; 0: half the available memory."""
    spill_dir: str = ""
    """Folder for edges beyond the memory budget (removed when the graph is built); "": the system's
    temporary folder."""
    device: str = "auto"
    """Where the build runs: ``auto`` (``cuda`` when available, else the model's device), ``cpu``,
    ``cuda``, ``cuda:1``. The model and dictionaries are moved there for the build and back."""
    progress: bool = True
    """Show a tqdm bar."""

    def __post_init__(self) -> None:
        if self.max_feature_nodes < 0 or self.batch_size < 0 or self.max_logits < 0 or self.rank_interval < 1:
            raise ValueError("max_feature_nodes >= 0, batch_size >= 0 (0: automatic), max_logits >= 0 and "
                             "rank_interval >= 1 are required")
        if not 0 < self.logit_probability <= 1:
            raise ValueError(f"logit_probability must lie in (0, 1], got {self.logit_probability}")
        if self.bos not in get_args(BosMode):
            raise ValueError(f"bos must be keep or detach, got {self.bos!r}")
        if not 0 <= self.memory_mb < float("inf"):  # NaN fails this too
            raise ValueError(f"memory_mb must be a finite number >= 0 (0: half the available memory), got {self.memory_mb}")


def attribute_prompt(rm: ReplacementModel, tokens: torch.Tensor, config: LinearAttributionConfig | None = None,
                     metric: MetricTarget | None = None) -> Graph:
    """The direct-effect attribution graph of one prompt ``tokens`` (``[P]`` or ``[1, P]``).

    ``metric``: a linear target over one position's logits to explain besides the likeliest logits
    (it then carries all the output weight). Phases (module docstring): the clean run, the source
    layout, the outputs, the visit through the frozen backward, the biases and the graph."""
    cfg = config or LinearAttributionConfig()
    start = time.perf_counter()
    if metric is None and cfg.max_logits == 0:
        raise CircuitGraphError("max_logits is 0 and no answer was given: the graph would explain nothing; use "
                                "--max-logits 1 or more, or --answer TOKEN")
    tokens = _check_prompt(rm, tokens)
    device = resolve_device(cfg.device, rm)
    check_spill_dir(cfg.spill_dir)
    with on_device(rm, device):
        graph = _build(rm, tokens.to(device), cfg, metric, device)
    graph.metadata["seconds"] = time.perf_counter() - start
    log.info("attributed %d features of %d active, %d edges in %.2f s", graph.metadata["n_visited_features"],
             graph.metadata["n_active_features"], graph.n_edges, graph.metadata["seconds"])
    return graph


def _build(rm: ReplacementModel, tokens: torch.Tensor, cfg: LinearAttributionConfig, metric: MetricTarget | None,
           device: torch.device) -> Graph:
    model = rm.model
    causal = is_causal(model)
    clean, bos_out = clean_run(rm, tokens)
    tok_str = token_strings(model, tokens[0])
    layout = SourceLayout(clean, rm.sites, tok_str)
    outputs = OutputTargets.select(model, clean.logits[0], cfg.max_logits, cfg.logit_probability, metric)
    budget = min(cfg.max_feature_nodes, layout.n_features)
    if budget < layout.n_features:
        log.warning("visiting %d of %d active features (max_feature_nodes=%d); the others are no graph nodes",
                    budget, layout.n_features, cfg.max_feature_nodes)
    deltas = bos_deltas(rm, tokens, clean, bos_out) if cfg.bos == "keep" and causal else None
    backward = FrozenBackward(rm, tokens, clean, layout, outputs, causal=causal, bos=cfg.bos, bos_outputs=bos_out,
                              bos_deltas=deltas, min_edge=cfg.min_edge)
    memory = budget_bytes(cfg.memory_mb)
    itemsize = backward.embed.element_size()
    batch = cfg.batch_size or auto_batch(memory, row_bytes(layout, rm, itemsize), device)
    store = EdgeStore(memory * 3 // 4, torch.float64 if backward.embed.dtype == torch.float64 else torch.float32,
                      cfg.spill_dir or None)
    log.info("prompt of %d tokens: %d active features, %d outputs; batches of %d on %s", layout.n_pos,
             layout.n_features, len(outputs), batch, device)
    with tqdm(total=len(outputs) + budget, desc="attribution", disable=not cfg.progress, leave=False) as bar:
        visited = backward.visit(budget, batch, cfg.rank_interval, store, bar.update)
    zrun = zero_run(rm, tokens, clean, bos_out if cfg.bos == "detach" else {})
    metadata = {
        "method": "linear", "prompt_tokens": tokens[0].tolist(), "prompt": "".join(tok_str[1:]) if tok_str else "",
        "sites": [s.id for s in rm.sites], "n_active_features": layout.n_features,
        "n_visited_features": int((visited < layout.n_sources).sum()), "max_feature_nodes": cfg.max_feature_nodes,
        "metric": metric.name if metric is not None else None, "bos": cfg.bos, "batch_size": batch,
        "device": str(device), "edges_spilled": store.spilled, "prefix_graphs": len(backward.prefix_ends),
    }
    return assemble_graph(layout, outputs, store, visited, zrun, backward.embed.dtype, metadata)


def _check_prompt(rm: ReplacementModel, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` as ``[1, P]``, refusing batches, one-token prompts and ids the model lacks."""
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise CircuitGraphError(f"attribute_prompt takes one prompt, got a batch of {tokens.shape[0]}; use dataset attribution")
    if tokens.shape[1] < 2:
        raise CircuitGraphError("the prompt must have at least 2 tokens (BOS and one more)")
    rm.check_tokens(tokens)
    return tokens
