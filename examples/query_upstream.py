"""Which features drive the answer, and which drive those: querying a graph from Python.

    .venv/bin/python examples/query_upstream.py

Builds the attribution graph of one prompt explaining logit(" Mary") - logit(" John"), lists the
strongest direct inputs of that difference, walks one step further up from the top feature, and
checks the top features against the model itself: zeroing each one in the real (unfrozen) model
and measuring how the logit difference moves.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

import circuitgraph as cg

log = logging.getLogger("query_upstream")

PROMPT = "When Mary and John went to the park, John gave a book to"


class Driver(NamedTuple):
    """One upstream feature of the metric and what zeroing it does in the real model."""

    node: str
    """Node id ``L{layer}.{kind}#{feature}@{position}``."""
    edge: float
    """Its direct edge into the logit difference (frozen attention and normalisation)."""
    ablation_change: float
    """Logit difference with the feature zeroed at that position minus the clean one (real model)."""


def logit_diff(logits: torch.Tensor, model, answer: str = " Mary", wrong: str = " John") -> float:
    """logit(answer) - logit(wrong) at the last position."""
    a, w = (model.to_single_token(t) for t in (answer, wrong))
    return float(logits[0, -1, a] - logits[0, -1, w])


def main(top_k: int = 5) -> list[Driver]:
    model = cg.load_model("default")
    rm = cg.replacement_model(model, cg.load_dictionaries("default", model=model))
    graph = cg.trace(rm, None, PROMPT, answer=" Mary", contrast=" John", progress=False)
    metric = next(n.id for n in graph.nodes if n.kind == "metric")
    rows = [r for r in graph.upstream(metric, top_k=50) if graph.node(r.node).kind == "feature"][:top_k]
    log.info("strongest feature inputs of %s:", metric)
    for r in rows:
        log.info("  %-26s edge %+.3f  activation %.2f", r.node, r.weight, r.activation)
    for r in graph.upstream(rows[0].node, top_k=5):
        log.info("    <- %-22s edge %+.3f", r.node, r.weight)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        clean = logit_diff(model(tokens), model)
    drivers = []
    for r in rows:
        node = graph.node(r.node)
        edit = cg.FeatureEdit(cg.Site.parse(node.site), node.index, "ablate", positions=(node.pos,))
        changed = logit_diff(cg.intervene(rm, tokens, [edit]).edited_logits, model)
        drivers.append(Driver(r.node, r.weight, changed - clean))
        log.info("  zeroing %-26s moves the logit difference by %+.3f (edge %+.3f)", r.node, changed - clean, r.weight)
    return drivers


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    main()
