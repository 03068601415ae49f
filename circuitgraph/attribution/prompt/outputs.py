"""Output targets of a prompt graph: the likeliest next-token logits and an optional metric.

Each output is a linear function of the *unembedding input* (the final normalised residual) at
one position, so its gradient seed there is a vector ``direction [d_model]`` at ``position``:

* ``logit#t@P-1``: the mean-centred logit of token ``t``; direction ``W_U[:, t] - mean_t W_U``;
* ``metric:<name>``: ``sum(coefficients * logits[pos])``; direction ``W_U @ coefficients``.

Logits are added in order of probability until their probabilities sum to ``logit_probability``
(at most ``max_logits``); they weigh by probability in influence, unless a metric is given, which
then carries all the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuitgraph.attribution.targets import MetricTarget
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph.nodes import Node


def token_strings(model: HookedTransformer, tokens: torch.Tensor) -> list[str]:
    """One label per token id (the decoded text, or the id for tokenizer-less models)."""
    if model.tokenizer is None:
        return [str(t) for t in tokens.tolist()]
    return [model.tokenizer.decode([t]) for t in tokens.tolist()]


@dataclass
class OutputTargets:
    """The output nodes of one prompt graph and their gradient seeds."""

    nodes: list[Node]
    labels: list[str]
    values: list[float]
    """Clean value of each output (mean-centred logit, metric value)."""
    weights: list[float]
    """Influence weight of each output (logit probability, or 1 on the metric and 0 on logits)."""
    positions: list[int]
    """Position whose unembedding input each output reads."""
    directions: torch.Tensor
    """``[n_outputs, d_model]`` gradient seed of each output at the unembedding input."""
    metric: MetricTarget | None

    def __len__(self) -> int:
        return len(self.nodes)

    @classmethod
    def select(cls, model: HookedTransformer, logits: torch.Tensor, max_logits: int, logit_probability: float,
               metric: MetricTarget | None) -> OutputTargets:
        """The outputs of a prompt with clean ``logits`` ``[P, d_vocab]`` (see the module docstring)."""
        n_pos = logits.shape[0]
        last = logits[-1]
        probs = torch.softmax(last.double(), -1)
        order = torch.argsort(probs, descending=True)
        n_logit = int((torch.cumsum(probs[order], 0) < logit_probability).sum()) + 1
        ids = order[: min(n_logit, max_logits)].tolist()
        w_u = model.W_U.detach()  # [d_model, d_vocab]
        centred = last - last.mean()
        nodes = [Node("logit", float(model.cfg.n_layers), index=t, pos=n_pos - 1) for t in ids]
        labels = token_strings(model, torch.tensor(ids, dtype=torch.long))
        values = [float(centred[t]) for t in ids]
        weights = [float(probs[t]) for t in ids]
        positions = [n_pos - 1] * len(ids)
        directions = [w_u[:, t] - w_u.mean(1) for t in ids]
        if metric is not None:
            if metric.coefficients.shape != (model.cfg.d_vocab,):
                raise CircuitGraphError(f"metric {metric.name!r} has {metric.coefficients.numel()} coefficients; "
                                        f"the model has d_vocab {model.cfg.d_vocab}")
            coef = metric.coefficients.to(w_u.device, w_u.dtype)
            mpos = metric.pos % n_pos
            nodes.append(Node("metric", float(model.cfg.n_layers), pos=None, name=metric.name))
            labels.append(metric.name)
            values.append(float((logits[mpos] * coef.to(logits.dtype)).sum()))
            weights = [0.0] * len(ids) + [1.0]
            positions.append(mpos)
            directions.append(w_u @ coef)
        stacked = torch.stack(directions) if directions else w_u.new_zeros(0, w_u.shape[0])
        return cls(nodes, labels, values, weights, positions, stacked, metric)

    def zero_values(self, zero_logits: torch.Tensor) -> list[float]:
        """Each output's value in a run with every leaf at zero (``zero_logits`` ``[P, d_vocab]``):
        its bias."""
        out = []
        for node, pos in zip(self.nodes, self.positions, strict=True):
            row = zero_logits[pos]
            if node.kind == "logit":
                out.append(float(row[node.index] - row.mean()))
            else:
                out.append(float((row * self.metric.coefficients.to(row.device, row.dtype)).sum()))
        return out
