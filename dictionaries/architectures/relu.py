"""ReLU + L1: ``latents = relu(pre)``; penalty ``l1 * sum_i latents_i * ||W_dec_i||`` (decoder norms
are free, so the penalty is weighted by them, as in Anthropic's 2024 recipe)."""

from __future__ import annotations

import torch

from dictionaries.architectures.base import SparseDictionary


class ReluDictionary(SparseDictionary):
    """Standard sparse autoencoder / transcoder with an L1 penalty."""

    unit_norm_decoder = False

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def sparsity_loss(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.cfg.l1_coeff * (latents * self.W_dec.norm(dim=1)).sum(-1).mean()
