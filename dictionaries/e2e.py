"""The end-to-end KL term: how much splicing each dictionary in changes the model's predictions.

For a batch of whole sequences, every dictionary is spliced in on its own (its reconstruction
replaces the site's activation, BOS untouched) and the KL divergence of the next-token
distribution from the clean model's is averaged over positions. Added to the training loss with
``e2e_kl_coeff`` it trains dictionaries toward what the model downstream uses, not only toward
low reconstruction error (as in "Identifying functionally important features with end-to-end
sparse dictionary learning", Braun et al. 2024). Gradients reach the dictionaries only: the
model's weights are frozen for the duration (see :func:`frozen_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from dictionaries.architectures.base import SparseDictionary
from dictionaries.site import Site
from dictionaries.splice import splice_hooks


@dataclass(frozen=True)
class EndToEndConfig:
    """The end-to-end KL term of a training run (``TrainConfig.e2e``; CLI flags ``--e2e-*``)."""

    kl_coeff: float = 0.0
    """Weight of the KL of the model's next-token predictions with each dictionary spliced in, from
    the clean ones (0 disables)."""
    sequences: int = 4
    """Whole sequences per step on which the term is computed."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.kl_coeff) or self.kl_coeff < 0 or self.sequences <= 0:
            raise ValueError(f"e2e_kl_coeff must be a finite number >= 0 (got {self.kl_coeff}) and e2e_sequences "
                             f"positive (got {self.sequences})")


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """Turn off gradients of ``model``'s parameters inside the block; restore them afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def e2e_kl(model: HookedTransformer, dicts: Mapping[Site, SparseDictionary], tokens: torch.Tensor) -> dict[Site, torch.Tensor]:
    """``{site: KL(clean || spliced)}``, mean over the non-BOS positions of ``[B, P]`` ``tokens``,
    with gradients to each dictionary (call inside :func:`frozen_weights`)."""
    tokens = tokens.to(model.cfg.device)
    with torch.no_grad():
        clean = F.log_softmax(model(tokens).float(), -1)
    out = {}
    for site, d in dicts.items():
        with model.hooks(fwd_hooks=splice_hooks(site, d, "reconstruct", group=dicts)):
            spliced = F.log_softmax(model(tokens).float(), -1)
        out[site] = (clean.exp() * (clean - spliced)).sum(-1)[:, 1:].mean()
    return out
