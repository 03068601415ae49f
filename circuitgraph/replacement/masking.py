"""Padding and attention direction: running a model on a padded batch as if each prompt ran alone.

TransformerLens 3.9 takes ``attention_mask`` (1 on real tokens) in ``HookedTransformer.forward``:
with it, absolute and rotary positions count from each row's first real token (so left padding
shifts nothing), and causal attention masks padded keys. Bidirectional attention
(``cfg.attention_dir == "bidirectional"``) does *not* mask them there (the mask reaches only
``apply_causal_mask``), so :func:`padding_hooks` masks padded keys in every layer's attention
scores. Queries at padding positions may read garbage; nothing real reads them.

Which positions a prompt's answer can depend on: in a causal model the positions up to the answer
position, in a bidirectional one every real token (:func:`is_causal`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import CircuitGraphError

Hook = tuple[str, Callable]


def is_causal(model: HookedTransformer) -> bool:
    """Whether each position attends only to itself and earlier positions."""
    direction = model.cfg.attention_dir
    if direction not in ("causal", "bidirectional"):
        raise CircuitGraphError(f"unknown attention direction {direction!r}; expected causal or bidirectional")
    return direction == "causal"


def model_mask(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to hand TransformerLens: ``None`` when every position is real (the unpadded code
    path, bit-identical to a run without a mask), else ``attention_mask`` checked against ``tokens``."""
    if attention_mask is None:
        return None
    if attention_mask.shape != tokens.shape:
        raise CircuitGraphError(f"attention mask {tuple(attention_mask.shape)} does not match the tokens "
                                f"{tuple(tokens.shape)}; give one 0/1 entry per token")
    real = attention_mask.bool()
    if not bool(real.any(1).all()):
        raise CircuitGraphError("a prompt of the batch is all padding (its attention mask has no 1); drop it")
    return None if bool(real.all()) else attention_mask.to(tokens.device).long()


def padding_hooks(model: HookedTransformer, mask: torch.Tensor | None) -> list[Hook]:
    """Hooks masking padded keys in every attention layer of a bidirectional model (causal models:
    TransformerLens does it; nothing to add). ``mask``: from :func:`model_mask`."""
    if mask is None or is_causal(model):
        return []
    padded = ~mask.bool()[:, None, None, :]  # [B, 1, 1, P_key]

    def mask_keys(scores: torch.Tensor, hook) -> torch.Tensor:
        return scores.masked_fill(padded.to(scores.device), float("-inf"))

    return [(block.attn.hook_attn_scores.name, mask_keys) for block in model.blocks]


def first_positions(batch: int, n_pos: int, mask: torch.Tensor | None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``[batch, n_pos]`` bool: each row's first real token. ``mask``: from :func:`model_mask`."""
    out = torch.zeros(batch, n_pos, dtype=torch.bool, device=device)
    first = torch.zeros(batch, dtype=torch.long, device=device) if mask is None else \
        mask.bool().to(device).long().argmax(1)
    out[torch.arange(batch, device=device), first] = True
    return out


def unspliced_positions(batch: int, n_pos: int, mask: torch.Tensor | None,
                        device: torch.device | str = "cpu", first: bool = True) -> torch.Tensor:
    """``[batch, n_pos]`` bool: positions a replacement model leaves unspliced, each row's first real
    token (BOS, where dictionaries are not trained; not with ``first=False``) and its padding.
    ``mask``: from :func:`model_mask`."""
    out = first_positions(batch, n_pos, mask, device) if first else \
        torch.zeros(batch, n_pos, dtype=torch.bool, device=device)
    if mask is not None:
        out |= ~mask.bool().to(device)
    return out


def run_model(model: HookedTransformer, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
              fwd_hooks: Sequence[Hook] = (), **kwargs) -> torch.Tensor:
    """``model(tokens)`` with padding handled (``attention_mask`` 1 on real tokens, or ``None``) and
    ``fwd_hooks`` attached for the pass."""
    mask = model_mask(tokens, attention_mask)
    hooks = [*padding_hooks(model, mask), *fwd_hooks]
    if not hooks:
        return model(tokens, attention_mask=mask, **kwargs)
    with model.hooks(fwd_hooks=hooks):
        return model(tokens, attention_mask=mask, **kwargs)
