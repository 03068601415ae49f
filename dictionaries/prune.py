"""Remove latents that never fire: a dictionary with only the latents in ``keep``.

Wide dictionaries (and transcoders with a linear skip, which need fewer latents) end training with
latents that never fire. They cost memory and count as dead; removing them changes no output on
any input where they stay inactive. Which latents fire is counted on the *training* stream
(``circuitgraph dicts prune``), so the dead fraction measured afterwards on held-out text is an
honest one: a latent that fires only on held-out text was kept only if it fired in training too.
"""

from __future__ import annotations

import dataclasses

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.errors import DictionaryError

LATENT_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "tokens_since_fired": 0, "r_mag": 0, "b_mag": 0, "log_threshold": 0}
"""State-dict entries indexed by latent, and their latent axis (every other entry is copied)."""


@torch.no_grad()
def prune_latents(d: SparseDictionary, keep: torch.Tensor) -> SparseDictionary:
    """A copy of ``d`` with the latents where ``keep`` (``[d_dict]`` bool) is true, in their order."""
    if keep.shape != (d.cfg.d_dict,) or keep.dtype != torch.bool:
        raise DictionaryError(f"keep must be a [{d.cfg.d_dict}] bool mask, got {tuple(keep.shape)} {keep.dtype}")
    n = int(keep.sum())
    if d.cfg.arch in ("topk", "batchtopk") and n < d.cfg.k:
        raise DictionaryError(f"{d.cfg.site or 'dictionary'}: only {n} latents would remain, fewer than k={d.cfg.k}; "
                              "count firing on more tokens")
    if n == 0:
        raise DictionaryError(f"{d.cfg.site or 'dictionary'}: no latent fired; nothing would remain")
    idx = keep.nonzero().squeeze(1).to(d.W_enc.device)
    out = build_dictionary(dataclasses.replace(d.cfg, d_dict=n)).to(d.W_enc.device)
    state = {name: t.index_select(LATENT_AXIS[name], idx) if name in LATENT_AXIS else t
             for name, t in d.state_dict().items()}
    out.load_state_dict(state)
    out.train(d.training)
    return out
