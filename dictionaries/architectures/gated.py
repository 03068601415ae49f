"""Gated SAE (Rajamanoharan et al. 2024): a gate decides *which* latents fire, a magnitude path
decides *how much*, sharing encoder directions:

    pi_gate = x_s @ W_enc + b_enc                                  # the pre-activation
    pi_mag  = x_s @ (W_enc * exp(r_mag)) + b_mag
            = (pi_gate - b_enc) * exp(r_mag) + b_mag               # so it follows from pi_gate
    latents = 1[pi_gate > 0] * relu(pi_mag)

Loss: reconstruction + ``l1 * sum relu(pi_gate) * ||W_dec||`` + the auxiliary reconstruction of
``relu(pi_gate)`` through a frozen copy of the decoder (gives the gate a gradient).
"""

from __future__ import annotations

import torch
from torch import nn

from dictionaries.architectures.base import SparseDictionary
from dictionaries.config import DictionaryConfig


class GatedDictionary(SparseDictionary):
    """Gated sparse dictionary."""

    def __init__(self, cfg: DictionaryConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_dict))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_dict))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        pi_mag = (pre - self.b_enc) * self.r_mag.exp() + self.b_mag
        return (pre > 0).to(pre.dtype) * torch.relu(pi_mag)

    def active_value(self, x: torch.Tensor) -> torch.Tensor:
        """The magnitude path ``pi_mag`` (what an active latent equals)."""
        pre = self.pre_acts(x * self.norm_in)
        return (pre - self.b_enc) * self.r_mag.exp() + self.b_mag

    def active_directions(self) -> torch.Tensor:
        return self.W_enc * self.r_mag.exp() * self.norm_in

    def sparsity_loss(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.cfg.l1_coeff * (torch.relu(pre) * self.W_dec.norm(dim=1)).sum(-1).mean()

    def aux_loss(self, x_s, y_s, pre, latents, recon) -> torch.Tensor:
        via_gate = torch.relu(pre) @ self.W_dec.detach() + self.b_dec.detach()
        if self.W_skip is not None:
            via_gate = via_gate + x_s @ self.W_skip.detach()
        return (via_gate - y_s).pow(2).sum(-1).mean()
