"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) dictionaries with the AuxK loss.

TopK keeps the ``k`` largest positive pre-activations of each token. BatchTopK keeps the
``k * N`` largest over a batch of ``N`` tokens (so per-token sparsity adapts), and at inference
uses a per-dictionary threshold: the running mean of the smallest activation kept in training.

AuxK: latents that have not fired for ``dead_after_tokens`` tokens are "dead"; the ``aux_k``
largest dead pre-activations reconstruct the residual error ``e = y - y_hat``, with loss
``aux_coeff * ||e - e_hat||^2``. This revives dead latents.
"""

from __future__ import annotations

import torch

from dictionaries.architectures.base import LossTerms, SparseDictionary
from dictionaries.architectures.sparse_code import sparse_code
from dictionaries.config import DictionaryConfig


def topk_per_row(pre: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, D]`` -> the same with all but each row's ``k`` largest positive values zeroed."""
    values, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))


def topk_per_batch(pre: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, D]`` -> the same with all but the ``k * N`` largest positive values of the batch zeroed."""
    flat = torch.relu(pre).flatten()
    values, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, values).view_as(pre)


class TopKDictionary(SparseDictionary):
    """Exactly ``k`` active latents per token (fewer when pre-activations are negative).

    Training is sparse after the choice: the dense encoder product runs without autograd and
    only picks the ``k`` latents; :func:`sparse_code` decodes them and back-propagates into
    ``k`` encoder columns and decoder rows per token.
    """

    def __init__(self, cfg: DictionaryConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        with torch.no_grad():  # k latents add up: start each at 1/sqrt(k) of the transpose init
            self.W_enc.mul_(cfg.k**-0.5)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_per_row(pre, self.cfg.k)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor, sparsity_scale: float = 1.0) -> LossTerms:
        x_s, y_s = x * self.norm_in, target * self.norm_out
        with torch.no_grad():  # the one dense product; it only chooses the latents
            pre = (x_s @ self.W_enc).add_(self.b_enc)  # [N, d_dict]
            top, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)  # [N, k]
        code = sparse_code(x_s, self.W_enc, self.b_enc, self.W_dec, idx, top)
        recon = code.recon + self.b_dec
        if self.W_skip is not None:
            recon = recon + x_s @ self.W_skip
        mse = (recon - y_s).pow(2).sum(-1).mean()
        aux = mse.new_zeros(())
        dead_idx = self.dead_mask().nonzero().squeeze(1)
        if self.training and dead_idx.numel():
            k_aux = min(self.cfg.aux_k_resolved, dead_idx.numel())
            with torch.no_grad():  # the top-k search runs over dead latents only
                dead_top, local = pre[:, dead_idx].topk(k_aux, dim=-1, sorted=False)
            err_hat = sparse_code(x_s, self.W_enc, self.b_enc, self.W_dec, dead_idx[local], dead_top).recon
            aux = self.cfg.aux_coeff * (err_hat - (y_s - recon).detach()).pow(2).sum(-1).mean()
        with torch.no_grad():
            active = code.vals > 0
            fired = torch.zeros(self.cfg.d_dict, dtype=torch.bool, device=idx.device)
            fired[idx[active]] = True
            l0 = active.sum(-1).float().mean()
        return LossTerms(mse + aux, mse, mse.new_zeros(()), aux, l0, fired)


class BatchTopKDictionary(SparseDictionary):
    """``k * N`` active latents per batch of ``N`` tokens in training; a threshold at inference."""

    def __init__(self, cfg: DictionaryConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        with torch.no_grad():
            self.W_enc.mul_(cfg.k**-0.5)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return topk_per_batch(pre, self.cfg.k)
        return pre * (pre > self.threshold)

    @torch.no_grad()
    def observe_training_batch(self, latents: torch.Tensor) -> None:
        """The inference threshold follows the smallest kept activation of training batches."""
        kept = latents[latents > 0]
        if kept.numel():
            low = kept.min()
            if bool(self.threshold_initialised):
                self.threshold.mul_(0.99).add_(0.01 * low)
            else:
                self.threshold.copy_(low)
                self.threshold_initialised.fill_(True)

    def aux_loss(self, x_s, y_s, pre, latents, recon) -> torch.Tensor:
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or not self.training:
            return pre.new_zeros(())
        k_aux = min(self.cfg.aux_k_resolved, n_dead)
        dead_pre = pre.masked_fill(~dead, float("-inf"))
        aux_latents = topk_per_row(dead_pre.nan_to_num(neginf=-1e9), k_aux)
        err = (y_s - recon).detach()
        err_hat = aux_latents @ self.W_dec
        return self.cfg.aux_coeff * (err_hat - err).pow(2).sum(-1).mean()
