"""FISTA sparse coding with a fixed dictionary: an alternative to the learned encoder.

Solves, per token, ``min_{z >= 0} 0.5 * ||y_s - (z @ W_dec + b_dec)||^2 + l1 * sum(z)`` in the
dictionary's scaled space (``y_s = y * norm_out``) with the accelerated proximal-gradient method
of Beck & Teboulle (2009); the step is ``1 / L`` with ``L`` the largest eigenvalue of
``W_dec @ W_dec.T`` (power iteration). Useful to measure how much of a dictionary's error comes
from its amortised encoder rather than its decoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dictionaries.architectures.base import SparseDictionary


class FistaResult(NamedTuple):
    """What :func:`fista_encode` returns."""

    latents: torch.Tensor
    """``[N, d_dict]`` non-negative sparse codes."""
    output: torch.Tensor
    """``[N, d_out]`` reconstruction in model units."""
    iterations: int
    """Iterations run."""


def lipschitz(w_dec: torch.Tensor, iters: int = 50) -> float:
    """Largest eigenvalue of ``w_dec @ w_dec.T`` by power iteration (``w_dec``: ``[d_dict, d_out]``)."""
    v = torch.ones(w_dec.shape[1], dtype=w_dec.dtype, device=w_dec.device)
    for _ in range(iters):
        v = w_dec.T @ (w_dec @ v)
        v = v / v.norm().clamp(min=1e-12)
    return float((w_dec @ v).pow(2).sum())


@torch.no_grad()
def fista_encode(d: SparseDictionary, y: torch.Tensor, l1: float = 0.1, iters: int = 200, tol: float = 1e-6) -> FistaResult:
    """Sparse codes of ``y`` (``[N, d_out]``, model units) under ``d``'s decoder."""
    w, b = d.W_dec.detach(), d.b_dec.detach()
    target = y * d.norm_out - b
    step = 1.0 / lipschitz(w)
    z = torch.zeros(y.shape[0], w.shape[0], dtype=y.dtype, device=y.device)
    m, t = z.clone(), 1.0
    it = 0
    for it in range(1, iters + 1):
        grad = (m @ w - target) @ w.T
        z_next = torch.relu(m - step * grad - step * l1)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        m = z_next + ((t - 1) / t_next) * (z_next - z)
        delta = (z_next - z).norm() / z.norm().clamp(min=1e-12)
        z, t = z_next, t_next
        if it > 1 and delta < tol:
            break
    return FistaResult(z, (z @ w + b) / d.norm_out, it)
