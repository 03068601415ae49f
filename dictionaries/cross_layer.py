"""Cross-layer transcoders (CLT): features that read one layer and write every later MLP output.

A CLT of an ``n``-layer model is a set of ``clt`` sites ``L0.clt .. L{n-1}.clt`` (a set may start
at a later layer, but runs to the last one). The dictionary of ``Ll.clt`` is an ordinary
:class:`SparseDictionary` with ``d_in = d_model`` reading ``blocks.l.hook_resid_mid`` and
``d_out = (n - l) * d_model``: the concatenation of what each feature writes into
``hook_mlp_out`` of layers ``l, l+1, .., n-1``. The MLP output of layer ``j`` is reconstructed by

    recon_j = sum over l <= j of decode_l(latents_l)[slice j - l]   (+ skip terms)

Training is joint (:func:`clt_losses`): the loss of output ``j`` (normalised by that layer's scale)
reaches every source ``l <= j``. Everything else treats each ``clt`` site as a site: its
latents are its features, its error term is that of ``hook_mlp_out`` at its own layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from dictionaries.architectures.base import LossTerms, SparseDictionary
from dictionaries.architectures.sparse_code import sparse_code
from dictionaries.architectures.topk import TopKDictionary
from dictionaries.site import ModelHooks, Site

CLT_ARCHS = ("topk", "batchtopk", "relu", "jumprelu")


def clt_sites(sites: Sequence[Site]) -> list[Site]:
    """The ``clt`` sites of ``sites``, by layer."""
    return sorted((s for s in sites if s.is_cross_layer), key=lambda s: s.layer)


def check_clt_sites(sites: Sequence[Site], n_layers: int) -> None:
    """``ValueError`` unless the ``clt`` sites are consecutive layers ending at the last one
    (every MLP output a CLT writes needs its own site, which holds that output's error term)."""
    layers = [s.layer for s in clt_sites(sites)]
    if layers and layers != list(range(layers[0], n_layers)):
        raise ValueError(
            f"cross-layer transcoder layers {layers} must be consecutive and end at the last layer {n_layers - 1} "
            f"(a CLT layer writes every later MLP output); use --layers {layers[0]}-{n_layers - 1} or all"
        )


def layer_slice(source: Site, target_layer: int, width: int) -> slice:
    """Columns of ``source``'s decoder output that go to ``hook_mlp_out`` of ``target_layer``."""
    j = target_layer - source.layer
    return slice(j * width, (j + 1) * width)


@torch.no_grad()
def initialise_clt(d: SparseDictionary, x: torch.Tensor, y_own: torch.Tensor) -> None:
    """Input and output scales from the source layer's input and *own* MLP output; ``b_dec`` writes
    the mean of that output into its own layer only (later layers get theirs from their own source)."""
    d.norm_in.fill_((x.shape[1] ** 0.5) / x.norm(dim=1).mean().clamp(min=1e-8))
    d.norm_out.fill_((y_own.shape[1] ** 0.5) / y_own.norm(dim=1).mean().clamp(min=1e-8))
    d.b_dec.zero_()
    d.b_dec[: y_own.shape[1]] = (y_own * d.norm_out).mean(0)


class _Code(NamedTuple):
    pre: torch.Tensor
    """``[N, d_dict]`` pre-activations (no gradient on the TopK path)."""
    latents: torch.Tensor | None
    """``[N, d_dict]`` latents on the dense path (None on the TopK path)."""
    decoded: torch.Tensor
    """``[N, d_out]`` ``latents @ W_dec`` in the scaled space."""
    l0: torch.Tensor
    fired: torch.Tensor


def _code(d: SparseDictionary, x_s: torch.Tensor) -> _Code:
    """TopK takes the sparse path (only the k chosen latents get gradients); the others the dense one."""
    if isinstance(d, TopKDictionary):
        with torch.no_grad():
            pre = (x_s @ d.W_enc).add_(d.b_enc)
            top, idx = pre.topk(d.cfg.k, dim=-1, sorted=False)
        code = sparse_code(x_s, d.W_enc, d.b_enc, d.W_dec, idx, top)
        fired = torch.zeros(d.cfg.d_dict, dtype=torch.bool, device=x_s.device)
        fired[idx[code.vals > 0]] = True
        return _Code(pre, None, code.recon, (code.vals > 0).sum(-1).float().mean(), fired)
    pre = d.pre_acts(x_s)
    latents = d.activation(pre)
    d.observe_training_batch(latents)
    active = latents > 0
    return _Code(pre, latents, latents @ d.W_dec, active.sum(-1).float().mean(), active.any(0))


def clt_losses(dicts: Mapping[Site, SparseDictionary], xs: Mapping[Site, torch.Tensor], ys: Mapping[Site, torch.Tensor],
               sparsity_scale: float = 1.0) -> dict[Site, LossTerms]:
    """Joint training loss of the ``clt`` dictionaries: ``xs[site]`` is the source layer's
    ``hook_resid_mid``, ``ys[site]`` that layer's ``hook_mlp_out`` (model units, ``[N, d_model]``).

    Site ``Lj.clt``'s ``mse`` is the squared error of output ``j`` (summed over sources ``<= j``),
    scaled by source ``j``'s output scale, so each layer counts like a normalised autoencoder loss;
    its sparsity and AuxK terms are its own latents'. AuxK: the dead latents of source ``l``
    reconstruct the residual error of every output it writes (in ``l``'s scaled space)."""
    sites = clt_sites(list(dicts))
    width = dicts[sites[0]].cfg.error_width  # one layer's MLP output (ys may hold other sites too)
    recon: dict[int, torch.Tensor] = {}
    codes: dict[Site, tuple[torch.Tensor, _Code]] = {}
    for s in sites:
        d = dicts[s]
        x_s = xs[s] * d.norm_in
        code = _code(d, x_s)
        out = code.decoded + d.b_dec
        if d.W_skip is not None:
            out = out + x_s @ d.W_skip
        out = out / d.norm_out  # model units
        for j in range(s.layer, s.layer + d.cfg.out_layers):
            part = out[:, layer_slice(s, j, width)]
            recon[j] = part if j not in recon else recon[j] + part
        codes[s] = (x_s, code)
    terms: dict[Site, LossTerms] = {}
    for s in sites:
        d = dicts[s]
        x_s, code = codes[s]
        mse = ((recon[s.layer] - ys[s]) * d.norm_out).pow(2).sum(-1).mean()
        sparsity = mse.new_zeros(()) if code.latents is None else sparsity_scale * d.sparsity_loss(code.pre, code.latents)
        aux = mse.new_zeros(())
        dead_idx = d.dead_mask().nonzero().squeeze(1)
        if d.training and dead_idx.numel() and d.cfg.arch in ("topk", "batchtopk"):
            residual = torch.cat([ys[t] - recon[t.layer] for t in sites if t.layer >= s.layer], 1).detach() * d.norm_out
            with torch.no_grad():
                top, local = code.pre.detach()[:, dead_idx].topk(min(d.cfg.aux_k_resolved, dead_idx.numel()), dim=-1,
                                                                 sorted=False)
            err_hat = sparse_code(x_s, d.W_enc, d.b_enc, d.W_dec, dead_idx[local], top).recon
            aux = d.cfg.aux_coeff * (err_hat - residual).pow(2).sum(-1).mean()
        terms[s] = LossTerms(mse + sparsity + aux, mse, sparsity, aux, code.l0, code.fired)
    return terms


def reconstruct(dicts: Mapping[Site, SparseDictionary], inputs: Mapping[int, torch.Tensor], layer: int) -> torch.Tensor:
    """Reconstruction of ``hook_mlp_out`` at ``layer`` from the ``clt`` sources ``<= layer``;
    ``inputs[l]`` is ``hook_resid_mid`` of layer ``l`` (``[N, d_model]``, model units)."""
    total = None
    for s in clt_sites(list(dicts)):
        if s.layer > layer:
            break
        d = dicts[s]
        out = d(inputs[s.layer]).output
        part = out[:, layer_slice(s, layer, d.cfg.error_width)]
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"no cross-layer transcoder layer at or before {layer}")
    return total


def splice_output_hooks(dicts: Mapping[Site, SparseDictionary], layer: int) -> list[tuple[str, object]]:
    """Forward hooks that put the CLT reconstruction in place of ``hook_mlp_out`` at ``layer`` only
    (the sources encode this forward pass's own ``hook_resid_mid``; BOS is left untouched)."""
    saved: dict[int, torch.Tensor] = {}
    sources = [s for s in clt_sites(list(dicts)) if s.layer <= layer]

    def save(source: Site):
        def hook(act: torch.Tensor, hook) -> None:
            saved[source.layer] = act

        return hook

    def replace(act: torch.Tensor, hook) -> torch.Tensor:
        b, p, w = act.shape
        inputs = {s.layer: saved.pop(s.layer).reshape(b * p, -1) for s in sources}
        new = reconstruct(dicts, inputs, layer).reshape(b, p, w).to(act.dtype)
        return torch.cat([act[:, :1], new[:, 1:]], 1)

    return [(s.input_hook, save(s)) for s in sources] + [(ModelHooks.mlp_out(layer), replace)]
