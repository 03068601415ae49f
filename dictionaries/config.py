"""Configuration of one sparse dictionary (architecture and sizes), stored as ``cfg.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

Architecture = Literal["relu", "gated", "topk", "batchtopk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


@dataclass(frozen=True)
class DictionaryConfig:
    """Shape and sparsity mechanism of one dictionary. Weight layout everywhere:
    ``W_enc: [d_in, d_dict]``, ``W_dec: [d_dict, d_out]``."""

    arch: Architecture
    """Sparsity mechanism: ``relu`` (ReLU + L1 weighted by decoder norms), ``gated``, ``topk``
    (+ AuxK dead-latent loss), ``batchtopk`` (TopK over the whole batch; a threshold at inference),
    ``jumprelu`` (per-latent thresholds trained with a straight-through L0 penalty)."""
    d_in: int
    """Width of the input activation."""
    d_dict: int
    """Number of latents (features)."""
    d_out: int = 0
    """Width of the reconstructed activation; 0 means ``d_in`` (an autoencoder)."""
    k: int = 32
    """Active latents per token for ``topk``; mean active latents per token for ``batchtopk``."""
    l1_coeff: float = 5.0
    """L1 coefficient (``relu``, ``gated``), on inputs normalised to mean squared norm ``d_in``."""
    l0_coeff: float = 0.5
    """L0 coefficient of ``jumprelu``."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the JumpReLU pseudo-gradient."""
    jumprelu_init_threshold: float = 0.05
    """Initial JumpReLU threshold."""
    aux_k: int = 0
    """Dead latents used by the AuxK loss (``topk``/``batchtopk``); 0 means ``d_in // 2``."""
    aux_coeff: float = 1.0
    """Weight of the AuxK loss."""
    dead_after_tokens: int = 100_000
    """A latent that has not fired for this many training tokens counts as dead (AuxK, resampling)."""
    out_layers: int = 1
    """Consecutive layers whose outputs the decoder writes (a cross-layer transcoder at layer L of an
    n-layer model: n - L); ``d_out`` is ``out_layers`` times one layer's width, that layer first."""
    skip: bool = False
    """Add a linear skip connection ``x @ W_skip`` (transcoders)."""
    site: str = ""
    """Site id the dictionary was trained at (e.g. ``L2.resid_post``); informational."""
    model_name: str = ""
    """Model the dictionary was trained on; informational."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.d_dict <= 0 or self.d_out < 0:
            raise ValueError(f"widths must be positive (d_in={self.d_in}, d_dict={self.d_dict}, d_out={self.d_out})")
        if self.out_layers < 1 or self.out_width % self.out_layers:
            raise ValueError(f"out_layers={self.out_layers} must be >= 1 and divide the output width {self.out_width}")
        if self.arch in ("topk", "batchtopk") and not 0 < self.k <= self.d_dict:
            raise ValueError(f"k={self.k} must be between 1 and d_dict={self.d_dict}")

    @property
    def out_width(self) -> int:
        """``d_out`` with 0 resolved to ``d_in``."""
        return self.d_out or self.d_in

    @property
    def error_width(self) -> int:
        """Width of one layer's output (of the error term a replacement model keeps per layer)."""
        return self.out_width // self.out_layers

    @property
    def aux_k_resolved(self) -> int:
        """``aux_k`` with 0 resolved to ``d_in // 2`` (at most ``d_dict``)."""
        return min(self.aux_k or max(1, self.d_in // 2), self.d_dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown dictionary config fields {sorted(unknown)}; the file is from another tool or version")
        return cls(**data)
