"""Steering the model with a feature found in a graph.

    .venv/bin/python examples/steering.py

The attribution graph of an indirect-object prompt names the feature that pushes hardest toward
the answer " Mary" over " John". Scaling that feature up or down in the replacement model (its
error term kept, so nothing else changes) moves the model's preference, and ``cg.generate`` shows
the continuation with the feature scaled at every position.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

import circuitgraph as cg

log = logging.getLogger("steering")

PROMPT = "When Mary and John went to the park, John gave a book to"


class SteeringResult(NamedTuple):
    """The steered feature and the logit difference logit(" Mary") - logit(" John") per scale."""

    node: str
    """The feature node the graph chose (largest positive edge into the difference)."""
    logit_diff: dict[float, float]
    """Scale applied to the feature at its position -> resulting logit difference (1.0: unedited)."""
    continuation: dict[float, str]
    """Scale -> greedy continuation of the prompt (a few tokens)."""


def main(scales: tuple[float, ...] = (0.0, 1.0, 3.0), new_tokens: int = 4) -> SteeringResult:
    model = cg.load_model("default")
    rm = cg.replacement_model(model, cg.load_dictionaries("default", model=model))
    graph = cg.trace(rm, None, PROMPT, answer=" Mary", contrast=" John", progress=False)
    metric = next(n.id for n in graph.nodes if n.kind == "metric")
    top = max((r for r in graph.upstream(metric, top_k=100) if graph.node(r.node).kind == "feature"),
              key=lambda r: r.weight)
    node = graph.node(top.node)
    log.info("steering %s (edge %+.3f into %s)", top.node, top.weight, metric)
    tokens = model.to_tokens(PROMPT)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    diffs, texts = {}, {}
    for scale in scales:
        edit = cg.FeatureEdit(cg.Site.parse(node.site), node.index, "scale", scale, positions=(node.pos,))
        logits = cg.intervene(rm, tokens, [edit]).edited_logits
        diffs[scale] = float(logits[0, -1, mary] - logits[0, -1, john])
        out = cg.generate(rm, tokens, [edit], max_new_tokens=new_tokens)
        texts[scale] = model.to_string(out[0, tokens.shape[1]:])
        log.info("  x%-4g logit(Mary) - logit(John) = %+.3f   continuation: %r", scale, diffs[scale], texts[scale])
    return SteeringResult(top.node, diffs, texts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    main()
