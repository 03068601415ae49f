"""Other libraries' encoder/decoder weights -> one of our dictionaries, checked.

Readers of foreign formats (SAELens folders, Gemma Scope ``params.npz``) first bring the weights
to our layout and equations (``W_enc: [d_in, d_dict]``, ``W_dec: [d_dict, d_out]``, any input
centring folded into ``b_enc``) in a :class:`ForeignWeights`, then call :func:`build_from_weights`,
which checks every shape and value and fills a dictionary of the named architecture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import Architecture, DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.site import Site

logger = logging.getLogger(__name__)

_MIN_THRESHOLD = 1e-12
"""JumpReLU thresholds are stored as logarithms; a threshold at or below 0 (latents fire whenever
they are positive, as ReLU) is stored as this value, which differs only on pre-activations in (0, 1e-12]."""


@dataclass
class ForeignWeights:
    """Weights in our layout and equations (``pre = x @ W_enc + b_enc``; output ``latents @ W_dec + b_dec
    (+ x @ W_skip)``), ready for :func:`build_from_weights`."""

    arch: Architecture
    """Our architecture (``relu``, ``topk``, ``jumprelu``, ``gated``)."""
    W_enc: torch.Tensor
    """``[d_in, d_dict]`` encoder."""
    W_dec: torch.Tensor
    """``[d_dict, d_out]`` decoder."""
    b_enc: torch.Tensor
    """``[d_dict]`` encoder bias (``gated``: the gate bias), with any input centring folded in."""
    b_dec: torch.Tensor
    """``[d_out]`` decoder bias."""
    threshold: torch.Tensor | None = None
    """``[d_dict]`` JumpReLU thresholds (``jumprelu`` only)."""
    r_mag: torch.Tensor | None = None
    """``[d_dict]`` log-scale of the magnitude path (``gated`` only)."""
    b_mag: torch.Tensor | None = None
    """``[d_dict]`` magnitude bias, centring folded in (``gated`` only)."""
    W_skip: torch.Tensor | None = None
    """``[d_in, d_out]`` linear skip (transcoders with a skip connection), or ``None``."""
    k: int = 0
    """Active latents per token (``topk`` only)."""


def tl_model_name(name: str) -> str:
    """The ``cfg.model_name`` TransformerLens gives a model loaded by ``name`` (an alias such as
    ``gpt2-small`` becomes ``gpt2``), so a dictionary's model is compared by the same name; a name
    TransformerLens does not know is kept as it is."""
    return _tl_model_name(name) if name else ""


@lru_cache(maxsize=64)
def _tl_model_name(name: str) -> str:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name).split("/")[-1]
    except ValueError:
        return name


@torch.no_grad()
def build_from_weights(w: ForeignWeights, site: Site, model_name: str, source: str) -> SparseDictionary:
    """A dictionary of ``w.arch`` at ``site`` holding ``w``'s weights (float32, eval mode).

    ``source`` names the file in error messages. Raises :class:`DictionaryError` for inconsistent
    shapes, a missing architecture-specific tensor, or NaN / infinite values.
    """
    if w.W_enc.ndim != 2 or w.W_dec.ndim != 2:
        raise DictionaryError(f"{source}: W_enc and W_dec must be matrices, got shapes {tuple(w.W_enc.shape)} "
                              f"and {tuple(w.W_dec.shape)}")
    d_in, d_dict = w.W_enc.shape
    d_out = w.W_dec.shape[1]
    want = {"W_dec": (d_dict, d_out), "b_enc": (d_dict,), "b_dec": (d_out,)}
    extra = {"threshold": w.threshold, "r_mag": w.r_mag, "b_mag": w.b_mag, "W_skip": w.W_skip}
    needed = {"jumprelu": ["threshold"], "gated": ["r_mag", "b_mag"]}.get(w.arch, [])
    for name in needed:
        if extra[name] is None:
            raise DictionaryError(f"{source}: a {w.arch} dictionary needs tensor {name!r}, which the file lacks")
    want.update({name: (d_dict,) for name in ("threshold", "r_mag", "b_mag") if extra[name] is not None})
    if w.W_skip is not None:
        want["W_skip"] = (d_in, d_out)
    tensors = {"W_enc": w.W_enc, "W_dec": w.W_dec, "b_enc": w.b_enc, "b_dec": w.b_dec, **extra}
    bad = {k: tuple(tensors[k].shape) for k, shape in want.items() if tuple(tensors[k].shape) != shape}
    if bad:
        raise DictionaryError(f"{source}: tensors {bad} do not fit W_enc {tuple(w.W_enc.shape)} "
                              f"(d_in={d_in}, d_dict={d_dict}, d_out={d_out}); the file is inconsistent")
    not_finite = sorted(k for k, t in tensors.items() if t is not None and not bool(torch.isfinite(t).all()))
    if not_finite:
        raise DictionaryError(f"{source}: {', '.join(not_finite)} hold NaN or infinite values; the file is corrupt")
    if w.arch == "topk" and not 0 < w.k <= d_dict:
        raise DictionaryError(f"{source}: k={w.k} must be between 1 and the number of latents {d_dict}")
    cfg = DictionaryConfig(arch=w.arch, d_in=d_in, d_dict=d_dict, d_out=0 if d_out == d_in else d_out,
                           k=w.k if w.arch == "topk" else min(32, d_dict), skip=w.W_skip is not None,
                           site=site.id, model_name=tl_model_name(model_name))
    d = build_dictionary(cfg)
    d.W_enc.copy_(w.W_enc.float())
    d.W_dec.copy_(w.W_dec.float())
    d.b_enc.copy_(w.b_enc.float())
    d.b_dec.copy_(w.b_dec.float())
    if w.W_skip is not None:
        d.W_skip.copy_(w.W_skip.float())
    if w.arch == "jumprelu":
        low = int((w.threshold <= _MIN_THRESHOLD).sum())
        if low:
            logger.info("%s: %d JumpReLU thresholds <= 0 read as %g (ReLU on those latents)", source, low, _MIN_THRESHOLD)
        d.log_threshold.copy_(w.threshold.float().clamp(min=_MIN_THRESHOLD).log())
    if w.arch == "gated":
        d.r_mag.copy_(w.r_mag.float())
        d.b_mag.copy_(w.b_mag.float())
    d.eval()
    return d
