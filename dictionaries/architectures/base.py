"""The shared body of every sparse dictionary.

    x_s      = x * norm_in                              # inputs scaled to mean squared norm d_in
    pre      = x_s @ W_enc + b_enc                       # [N, d_dict]
    latents  = sigma(pre)                                # architecture-specific sparsifier
    y_s      = latents @ W_dec + b_dec (+ x_s @ W_skip)  # [N, d_out]
    output   = y_s / norm_out                            # back in the model's units

An autoencoder has ``d_out == d_in`` and reconstructs its input; a transcoder maps one hook to
another (MLP input to MLP output). Subclasses define ``activation`` (``sigma``) and
``sparsity_loss``; training losses are computed in the scaled space so coefficients transfer
across sites and models.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
from torch import nn

from dictionaries.config import DictionaryConfig


class DictionaryOutput(NamedTuple):
    """What ``forward`` returns."""

    output: torch.Tensor
    """``[N, d_out]`` reconstruction in the model's units."""
    latents: torch.Tensor
    """``[N, d_dict]`` sparse feature activations."""
    pre_acts: torch.Tensor
    """``[N, d_dict]`` encoder pre-activations."""


class LossTerms(NamedTuple):
    """What ``training_loss`` returns (all scalars but ``fired``)."""

    total: torch.Tensor
    """The loss to minimise."""
    mse: torch.Tensor
    """Mean over tokens of the summed squared error, in the scaled space."""
    sparsity: torch.Tensor
    """The architecture's sparsity penalty (0 for TopK-style)."""
    aux: torch.Tensor
    """The auxiliary loss (AuxK for TopK-style, the gate reconstruction for Gated; else 0)."""
    l0: torch.Tensor
    """Mean number of active latents per token in the batch."""
    fired: torch.Tensor
    """``[d_dict]`` bool: latents active on at least one token of the batch."""


class SparseDictionary(nn.Module, abc.ABC):
    """Base class; see the module docstring for the equations."""

    unit_norm_decoder: bool = True
    """Whether decoder rows are kept at unit norm after every step."""

    def __init__(self, cfg: DictionaryConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_dict, d_out = cfg.d_in, cfg.d_dict, cfg.out_width
        w_dec = torch.randn(d_dict, d_out, generator=generator)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        if not self.unit_norm_decoder:
            w_dec = w_dec * 0.1
        self.W_dec = nn.Parameter(w_dec)
        if d_in == d_out:
            w_enc = w_dec.T.clone()  # encoder initialised as the decoder transpose
        else:
            w_enc = torch.randn(d_in, d_dict, generator=generator) / d_in**0.5
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_dict))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if cfg.skip else None
        self.register_buffer("norm_in", torch.ones(()))
        self.register_buffer("norm_out", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(d_dict, dtype=torch.long))

    # --- the equations -------------------------------------------------------------------
    def pre_acts(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """``[N, d_in]`` scaled inputs -> ``[N, d_dict]`` pre-activations."""
        return x_scaled @ self.W_enc + self.b_enc

    @abc.abstractmethod
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The sparsifier ``sigma``: ``[N, d_dict]`` -> ``[N, d_dict]``."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, d_in]`` activations in model units -> ``[N, d_dict]`` latents."""
        return self.activation(self.pre_acts(x * self.norm_in))

    def active_value(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, d_in]`` model-unit inputs -> ``[N, d_dict]`` affine pre-activations that equal each
        latent wherever it is active (the quantity a circuit graph attributes). Default: ``pre_acts``."""
        return self.pre_acts(x * self.norm_in)

    def active_directions(self) -> torch.Tensor:
        """``[d_in, d_dict]``: the linear part of :meth:`active_value` in model units, so that
        ``active_value(x) = x @ active_directions() + const`` (the gradient a graph target seeds)."""
        return self.W_enc * self.norm_in

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, d_dict]`` latents -> ``[N, d_out]`` in model units (without the skip term)."""
        return (latents @ self.W_dec + self.b_dec) / self.norm_out

    def skip_term(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, d_out]`` contribution of the linear skip (zero without one), model units."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.cfg.out_width, dtype=x.dtype, device=x.device)
        return (x * self.norm_in) @ self.W_skip / self.norm_out

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        """``[N, d_in]`` -> reconstruction, latents and pre-activations."""
        pre = self.pre_acts(x * self.norm_in)
        latents = self.activation(pre)
        out = self.decode(latents)
        if self.W_skip is not None:
            out = out + self.skip_term(x)
        return DictionaryOutput(out, latents, pre)

    # --- training ------------------------------------------------------------------------
    def observe_training_batch(self, latents: torch.Tensor) -> None:
        """Called by :meth:`training_loss` (only there) with the batch's latents; architectures
        with running statistics (BatchTopK's inference threshold) update them here, so other
        callers of :meth:`activation` (e.g. the interaction penalty) never move them."""
    def _recon_scaled(self, x_s: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        y = latents @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            y = y + x_s @ self.W_skip
        return y

    def training_loss(self, x: torch.Tensor, target: torch.Tensor, sparsity_scale: float = 1.0) -> LossTerms:
        """Loss on a batch: ``x`` ``[N, d_in]`` and ``target`` ``[N, d_out]`` in model units.

        ``sparsity_scale`` multiplies the sparsity penalty (the trainer ramps it up from 0)."""
        x_s, y_s = x * self.norm_in, target * self.norm_out
        pre = self.pre_acts(x_s)
        latents = self.activation(pre)
        self.observe_training_batch(latents)
        recon = self._recon_scaled(x_s, latents)
        mse = (recon - y_s).pow(2).sum(-1).mean()
        sparsity = sparsity_scale * self.sparsity_loss(pre, latents)
        aux = self.aux_loss(x_s, y_s, pre, latents, recon)
        with torch.no_grad():
            active = latents > 0
            l0, fired = active.sum(-1).float().mean(), active.any(0)
        return LossTerms(mse + sparsity + aux, mse, sparsity, aux, l0, fired)

    def sparsity_loss(self, pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The sparsity penalty added to the loss (default: none)."""
        return pre.new_zeros(())

    def aux_loss(self, x_s, y_s, pre, latents, recon) -> torch.Tensor:
        """An auxiliary loss (default: none)."""
        return pre.new_zeros(())

    @torch.no_grad()
    def update_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Dead-latent bookkeeping after a batch of ``n_tokens`` in which ``fired`` (``[d_dict]`` bool) fired."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    def dead_mask(self) -> torch.Tensor:
        """``[d_dict]`` bool: latents that have not fired for ``cfg.dead_after_tokens`` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    @torch.no_grad()
    def constrain_decoder(self) -> None:
        """Project decoder rows back to unit norm (architectures with ``unit_norm_decoder``)."""
        if self.unit_norm_decoder:
            self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of the decoder gradient that would change row norms (unit-norm archs)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec.data / self.W_dec.data.norm(dim=1, keepdim=True).clamp(min=1e-8)
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    def decoder_directions(self) -> torch.Tensor:
        """``[d_dict, d_out]`` decoder directions in model units (what a feature writes)."""
        return self.W_dec / self.norm_out
