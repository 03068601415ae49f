"""Neuron resampling for L1-style dictionaries (Anthropic, "Towards Monosemanticity", 2023).

Dead latents are re-initialised towards inputs the dictionary reconstructs badly: inputs are
drawn with probability proportional to their squared reconstruction error; the decoder row becomes
the (unit-norm) error direction, the encoder column the same direction scaled to 0.2 times the
mean encoder norm of live latents, the encoder bias 0, and their Adam moments are reset.
"""

from __future__ import annotations

import torch

from dictionaries.architectures.base import SparseDictionary


@torch.no_grad()
def resample_dead(d: SparseDictionary, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  generator: torch.Generator | None = None) -> int:
    """Resample ``d``'s dead latents from the batch ``(x, y)``; returns how many were resampled."""
    dead = d.dead_mask().nonzero().squeeze(1)
    if dead.numel() == 0:
        return 0
    x_s, y_s = x * d.norm_in, y * d.norm_out
    out = d(x)
    err = y_s - out.output * d.norm_out
    weights = err.pow(2).sum(-1)
    if weights.sum() <= 0:
        return 0
    gen = generator or torch.Generator().manual_seed(int(d.tokens_since_fired.sum()) % (2**31))
    picks = torch.multinomial(weights.cpu(), dead.numel(), replacement=dead.numel() > weights.numel(), generator=gen)
    directions = err[picks.to(err.device)]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp(min=1e-8)
    alive = ~d.dead_mask()
    enc_norm = d.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    d.W_dec.data[dead] = directions
    if d.cfg.d_in == d.cfg.out_width:
        d.W_enc.data[:, dead] = (directions * enc_norm * 0.2).T
    else:
        inputs = x_s[picks.to(x_s.device)]
        d.W_enc.data[:, dead] = (inputs / inputs.norm(dim=1, keepdim=True).clamp(min=1e-8) * enc_norm * 0.2).T
    d.b_enc.data[dead] = 0.0
    for param, index_dim in ((d.W_dec, 0), (d.W_enc, 1), (d.b_enc, 0)):
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(index_dim, dead, 0.0)
    d.tokens_since_fired[dead] = 0
    return int(dead.numel())
