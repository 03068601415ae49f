"""Graph assembly of a prompt graph: biases from an all-leaves-zero run, node table, edge remap.

The graph's nodes are, in order: the tokens, the *visited* features (those whose incoming edges
were computed), every error node, then the outputs. Edges out of features that were not visited
are dropped (they are not nodes). A target's *bias* is its value with every leaf (embeddings,
latents, errors) at zero under the same frozen patterns / scales / gates, so incoming edges + bias
= value exactly; ``nan`` for nodes that are no target.
"""

from __future__ import annotations

import torch

from circuitgraph.attribution.prompt.edges import EdgeStore
from circuitgraph.attribution.prompt.layout import SourceLayout
from circuitgraph.attribution.prompt.outputs import OutputTargets
from circuitgraph.graph.graph import Graph
from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec
from dictionaries.site import Site


def zero_run(rm: ReplacementModel, tokens: torch.Tensor, clean: RunResult,
             unspliced: dict[Site, torch.Tensor]) -> RunResult:
    """The frozen run with every leaf at zero, recording each latent's affine value (the biases);
    ``unspliced``: the BOS outputs held at their recorded values (``bos="detach"``), or empty."""
    sites = rm.sites
    with torch.no_grad():
        zero = SpliceSpec(latents={s: torch.zeros_like(clean.sites[s].latents) for s in sites},
                          errors={s: torch.zeros_like(clean.sites[s].errors) for s in sites},
                          embed=torch.zeros_like(rm.model.embed(tokens)), frozen=clean.frozen,
                          unspliced=unspliced, record_active_values=True)
        return rm.run(tokens, zero)


def assemble_graph(layout: SourceLayout, outputs: OutputTargets, store: EdgeStore, visited: torch.Tensor,
                   zrun: RunResult, dtype: torch.dtype, metadata: dict) -> Graph:
    """The :class:`Graph` of the targets ``visited`` (layout keys; see the module docstring)."""
    n_src, n_out = layout.n_sources, len(outputs)
    keep = torch.zeros(n_src, dtype=torch.bool)
    keep[: layout.n_pos] = True
    keep[layout.error_start :] = True
    keep[visited[visited < n_src]] = True
    kept = keep.nonzero().squeeze(1)
    new_index = torch.full((n_src + n_out,), -1, dtype=torch.long)
    new_index[kept] = torch.arange(kept.numel())
    new_index[n_src:] = torch.arange(kept.numel(), kept.numel() + n_out)
    every = bool(keep.all())  # every source is a node: keys are node indices already
    edges = store.finish(None if every else new_index, None if every else keep)
    bias = torch.full((kept.numel() + n_out,), float("nan"), dtype=dtype)
    for block in layout.blocks:  # visited features: their affine value with every leaf at zero
        j = visited[(visited >= block.start) & (visited < block.stop)] - block.start
        zero = zrun.sites[block.site].active_value[0].cpu()[block.pos[j], block.feat[j]]
        bias[new_index[j + block.start]] = zero.to(dtype)
    zero_out = torch.tensor(outputs.zero_values(zrun.logits[0].cpu()), dtype=dtype)
    out_keys = visited[visited >= n_src]
    bias[new_index[out_keys]] = zero_out[out_keys - n_src]
    kept_list = kept.tolist()
    return Graph(
        nodes=[layout.node(i) for i in kept_list] + outputs.nodes,
        activation=torch.cat([layout.values()[kept].to(dtype), torch.tensor(outputs.values, dtype=dtype)]),
        sources=edges.sources,
        targets=edges.targets,
        weights=edges.weights,
        target_weights=torch.tensor([0.0] * kept.numel() + outputs.weights, dtype=torch.float32),
        labels=[layout.label(i) for i in kept_list] + outputs.labels,
        bias=bias,
        metadata=metadata,
    )
