"""Output targets of an attribution: logits and custom linear metrics over the logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MetricTarget:
    """A linear function of one position's logits: ``sum(coefficients * logits[pos])``.

    Example: the IOI logit difference is +1 on the answer and -1 on the wrong name."""

    name: str
    """Short name used in the node id ``metric:<name>``."""
    coefficients: torch.Tensor
    """``[d_vocab]`` weights on the logits."""
    pos: int = -1
    """Position whose logits the metric reads (negative counts from the end)."""

    @classmethod
    def logit_diff(cls, answer_ids: list[int], wrong_ids: list[int], d_vocab: int, pos: int = -1,
                   name: str = "logit_diff") -> MetricTarget:
        """Mean logit of ``answer_ids`` minus mean logit of ``wrong_ids``."""
        c = torch.zeros(d_vocab)
        c[answer_ids] += 1.0 / len(answer_ids)
        if wrong_ids:
            c[wrong_ids] -= 1.0 / len(wrong_ids)
        return cls(name, c, pos)
