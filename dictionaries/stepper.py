"""One dictionary's optimizer step, usable on raw activations without a model.

:class:`DictionaryStepper` holds a dictionary and its Adam optimizer and runs the per-step
routine every trainer shares (:func:`dictionaries.training.run_training`, the benchmarks, the
synthetic-recovery tests): loss (checked finite), decoder-norm constraint, gradient clipping,
dead-latent bookkeeping and optional resampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from dictionaries import distributed
from dictionaries.architectures.base import LossTerms, SparseDictionary
from dictionaries.errors import DictionaryError
from dictionaries.resampling import resample_dead


class StepStats(NamedTuple):
    """Numbers from one optimizer step of one dictionary."""

    loss: float
    l0: float
    """Mean active latents per token in the batch."""
    fvu: float
    """Batch fraction of variance unexplained."""


class DictionaryStepper:
    """One dictionary, its Adam optimizer and the per-step routine (loss, decoder constraint,
    dead-latent bookkeeping, optional resampling). Usable on raw activations without a model."""

    def __init__(self, d: SparseDictionary, lr: float, resample_every: int = 0, ckpt: Path | None = None,
                 grad_clip: float = 0.0) -> None:
        self.d, self.resample_every, self.ckpt, self.grad_clip = d, resample_every, ckpt, grad_clip
        self.opt = torch.optim.Adam(d.parameters(), lr=lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, sparsity_scale: float = 1.0, step: int = 0) -> StepStats:
        """One optimizer step on its own (loss, backward, update)."""
        terms = self.losses(x, y, sparsity_scale, step)
        terms.total.backward()
        return self.update(terms, x, y, lr, step)

    def losses(self, x: torch.Tensor, y: torch.Tensor, sparsity_scale: float = 1.0, step: int = 0) -> LossTerms:
        """The loss terms of a batch (checked finite); the caller runs ``backward`` then :meth:`update`."""
        return self.check_finite(self.d.training_loss(x, y, sparsity_scale=sparsity_scale), step)

    def check_finite(self, terms: LossTerms, step: int) -> LossTerms:
        """``terms``, or a clear error naming the dictionary, the step and the intact checkpoint."""
        if not torch.isfinite(terms.total):
            raise DictionaryError(
                f"loss of dictionary {self.d.cfg.site or self.d.cfg.arch} became {terms.total.item()} at step {step}; "
                f"lower the learning rate. The last good checkpoint {self.ckpt} is intact"
            )
        return terms

    def update(self, terms: LossTerms, x: torch.Tensor, y: torch.Tensor, lr: float, step: int = 0) -> StepStats:
        """Apply the gradients already accumulated: optimizer step, decoder constraint, dead-latent
        bookkeeping, optional resampling."""
        d = self.d
        distributed.average_gradients(d)
        d.remove_parallel_gradient()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(d.parameters(), self.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        d.constrain_decoder()
        d.update_firing(distributed.any_across_ranks(terms.fired), x.shape[0] * distributed.world()[1])
        if (self.resample_every and (step + 1) % self.resample_every == 0 and d.cfg.arch in ("relu", "gated")
                and d.cfg.out_layers == 1):
            resample_dead(d, self.opt, x, y)
        with torch.no_grad():
            y_s = y * d.norm_out
            var = (y_s - y_s.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
            return StepStats(terms.total.item(), terms.l0.item(),
                             (terms.mse / var).item())
