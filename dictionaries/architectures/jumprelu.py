"""JumpReLU (Rajamanoharan et al. 2024): ``latents = pre * 1[pre > theta]`` with a learned
per-latent threshold ``theta = exp(log_threshold)``, trained with an L0 penalty.

The step function has zero gradient almost everywhere, so the threshold learns through a
straight-through pseudo-gradient: a rectangle kernel of width ``eps`` (``jumprelu_bandwidth``)
around the threshold, ``d/dtheta 1[z > theta] ~ -(1/eps) * 1[|z - theta| < eps/2]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dictionaries.architectures.base import SparseDictionary
from dictionaries.config import DictionaryConfig


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = (-(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * grad).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = (-(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * grad).sum(0)
        return torch.zeros_like(z), grad_theta, None


class JumpReluDictionary(SparseDictionary):
    """JumpReLU dictionary with an L0 sparsity penalty."""

    def __init__(self, cfg: DictionaryConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_dict,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        """``[d_dict]`` thresholds."""
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def sparsity_loss(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        l0 = _Step.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return self.cfg.l0_coeff * l0
