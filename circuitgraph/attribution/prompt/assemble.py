"""Graph assembly of a prompt graph: biases from an all-leaves-zero run, node table, edge remap.

The graph's nodes are, in order: the tokens, the *visited* features (those whose incoming edges
were computed), every error node, then the outputs. Edges out of features that were not visited
are dropped (they are not nodes). A target's *bias* is its value with every leaf (embeddings,
latents, errors) at zero under the same frozen patterns / scales / gates, so incoming edges + bias
= value exactly; ``nan`` for nodes that are no target.
"""

from __future__ import annotations

import torch

from circuitgraph.attribution.prompt.backward import EdgeList
from circuitgraph.attribution.prompt.layout import SourceLayout
from circuitgraph.attribution.prompt.outputs import OutputTargets
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec


def zero_run(rm: ReplacementModel, tokens: torch.Tensor, clean: RunResult) -> RunResult:
    """The frozen run with every leaf at zero, recording each latent's affine value (the biases)."""
    sites = rm.sites
    with torch.no_grad():
        zero = SpliceSpec(latents={s: torch.zeros_like(clean.sites[s].latents) for s in sites},
                          errors={s: torch.zeros_like(clean.sites[s].errors) for s in sites},
                          embed=torch.zeros_like(rm.model.embed(tokens)), frozen=clean.frozen,
                          record_active_values=True)
        return rm.run(tokens, zero)


def assemble_graph(layout: SourceLayout, outputs: OutputTargets, edges: EdgeList, zrun: RunResult,
                   dtype: torch.dtype, metadata: dict) -> Graph:
    """The :class:`Graph` of the visited targets (see the module docstring)."""
    n_src, n_out = layout.n_sources, len(outputs)
    keep = torch.zeros(n_src, dtype=torch.bool)
    keep[: layout.n_pos] = True
    keep[layout.error_start :] = True
    visited = torch.tensor(edges.visited, dtype=torch.long)
    keep[visited[visited < n_src]] = True
    kept = keep.nonzero().squeeze(1)
    new_index = torch.full((n_src + n_out,), -1, dtype=torch.long)
    new_index[kept] = torch.arange(kept.numel())
    new_index[n_src:] = torch.arange(kept.numel(), kept.numel() + n_out)
    src, tgt, w = edges.tensors()
    ok = keep[src]
    bias = torch.full((kept.numel() + n_out,), float("nan"), dtype=dtype)
    for block in layout.blocks:  # visited features: their affine value with every leaf at zero
        keys = visited[(visited >= block.start) & (visited < block.stop)]
        zero = zrun.sites[block.site].active_value[0, block.pos[keys - block.start], block.feat[keys - block.start]]
        bias[new_index[keys]] = zero.to(dtype)
    zero_out = outputs.zero_values(zrun.logits[0])
    for k in visited[visited >= n_src].tolist():
        bias[new_index[k]] = zero_out[k - n_src]
    kept_list = kept.tolist()
    values = layout.values()
    return Graph(
        nodes=[layout.node(i) for i in kept_list] + outputs.nodes,
        activation=torch.cat([values[kept].to(dtype), torch.tensor(outputs.values, dtype=dtype)]),
        sources=new_index[src[ok]],
        targets=new_index[tgt[ok]],
        weights=w[ok],
        target_weights=torch.tensor([0.0] * kept.numel() + outputs.weights, dtype=torch.float32),
        labels=[layout.label(i) for i in kept_list] + outputs.labels,
        bias=bias,
        metadata=metadata,
    )
