"""Where a feature writes in the residual stream, and what that does to the logits."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from dictionaries.architectures.base import SparseDictionary
from dictionaries.site import Site


def residual_directions(model: HookedTransformer, site: Site, d: SparseDictionary) -> torch.Tensor:
    """``[d_dict, d_model]``: each feature's decoder direction mapped into the residual stream
    (through ``W_O`` for attention-``z`` features, ``W_out`` for neuron features; summed over the
    layers a cross-layer transcoder feature writes)."""
    dirs = d.decoder_directions().detach()
    if site.kind == "attn_z":
        w_o = model.blocks[site.layer].attn.W_O.detach()  # [H, d_head, d_model]
        h, dh, dm = w_o.shape
        return torch.einsum("fhd,hdm->fm", dirs.reshape(-1, h, dh), w_o)
    if site.is_cross_layer:  # everything it writes, into every later layer, ends in the residual stream
        return dirs.reshape(dirs.shape[0], -1, model.cfg.d_model).sum(1)
    if site.kind == "mlp_post":
        return dirs @ model.blocks[site.layer].mlp.W_out.detach()
    return dirs


def logit_effects(model: HookedTransformer, site: Site, d: SparseDictionary) -> torch.Tensor:
    """``[d_dict, d_vocab]`` direct logit effect of each feature's direction (``dir @ W_U``), mean-centred
    over the vocabulary (the final normalisation's scale is ignored)."""
    eff = residual_directions(model, site, d) @ model.W_U.detach()
    return eff - eff.mean(-1, keepdim=True)
