"""Configuration of one sparse dictionary (architecture and sizes), stored as ``cfg.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_type_hints

Architecture = Literal["relu", "gated", "topk", "batchtopk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


@dataclass(frozen=True)
class CoderConfig:
    """What every dictionary of a training run is, whatever its site (the site-independent part of
    :class:`DictionaryConfig`; ``TrainConfig.coder``). The defaults of the sparsity settings live
    here and nowhere else."""

    arch: Architecture = "topk"
    """Architecture of every dictionary: relu, gated, topk, batchtopk or jumprelu."""
    expansion: int = 8
    """Latents per input dimension (d_dict = expansion * d_in)."""
    k: int = 16
    """Active latents per token (topk; mean active latents per token for batchtopk)."""
    l1_coeff: float = 5.0
    """L1 coefficient (relu, gated), on inputs normalised to mean squared norm d_in."""
    l0_coeff: float = 0.5
    """L0 coefficient (jumprelu)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the JumpReLU pseudo-gradient."""
    jumprelu_init_threshold: float = 0.05
    """Initial JumpReLU threshold."""
    aux_k: int = 0
    """Dead latents used by the AuxK loss (topk, batchtopk); 0 means d_in // 2."""
    aux_coeff: float = 1.0
    """AuxK loss weight (topk, batchtopk)."""
    dead_after_tokens: int = 100_000
    """Tokens without firing after which a latent counts as dead (AuxK, resampling)."""
    transcoder_skip: bool = False
    """Give transcoders a linear skip connection."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        for name in ("expansion", "k", "dead_after_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("l1_coeff", "l0_coeff", "aux_coeff"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):  # a width and a log-threshold's argument
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value} must be a finite number > 0")
        if self.aux_k < 0:
            raise ValueError(f"aux_k={self.aux_k} must be >= 0 (0: d_in // 2)")

    def dictionary_config(self, d_in: int, d_out: int, site: str = "", model_name: str = "", transcoder: bool = False,
                          out_layers: int = 1) -> DictionaryConfig:
        """The full config of one dictionary reading ``d_in`` and writing ``d_out`` at ``site``."""
        return DictionaryConfig(
            arch=self.arch, d_in=d_in, d_dict=self.expansion * d_in, d_out=d_out if d_out != d_in else 0, k=self.k,
            l1_coeff=self.l1_coeff, l0_coeff=self.l0_coeff, jumprelu_bandwidth=self.jumprelu_bandwidth,
            jumprelu_init_threshold=self.jumprelu_init_threshold, aux_k=self.aux_k, aux_coeff=self.aux_coeff,
            dead_after_tokens=self.dead_after_tokens, skip=self.transcoder_skip and transcoder, out_layers=out_layers,
            site=site, model_name=model_name,
        )


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
    k: int = CoderConfig.k
    """Active latents per token for ``topk``; mean active latents per token for ``batchtopk``."""
    l1_coeff: float = CoderConfig.l1_coeff
    """L1 coefficient (``relu``, ``gated``), on inputs normalised to mean squared norm ``d_in``."""
    l0_coeff: float = CoderConfig.l0_coeff
    """L0 coefficient of ``jumprelu``."""
    jumprelu_bandwidth: float = CoderConfig.jumprelu_bandwidth
    """Width of the rectangle kernel of the JumpReLU pseudo-gradient."""
    jumprelu_init_threshold: float = CoderConfig.jumprelu_init_threshold
    """Initial JumpReLU threshold."""
    aux_k: int = CoderConfig.aux_k
    """Dead latents used by the AuxK loss (``topk``/``batchtopk``); 0 means ``d_in // 2``."""
    aux_coeff: float = CoderConfig.aux_coeff
    """Weight of the AuxK loss."""
    dead_after_tokens: int = CoderConfig.dead_after_tokens
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


def flat_fields(cls: type, prefix: str = "") -> dict[str, tuple[tuple[str, ...], dataclasses.Field, type]]:
    """Every leaf field of a config dataclass whose fields may themselves be config dataclasses, by
    its flat name: ``{flat name: (attribute path, field, owning class)}``. A nested field ``f``
    contributes its fields with the prefix ``cls.FLAT_PREFIX[f]`` (default ``f + "_"``), so
    ``TrainConfig.interaction.penalty`` is ``interaction_penalty`` and ``TrainConfig.coder.k`` is
    ``k``. Fields named in ``cls.FLAT_SKIP`` are set by their parent and left out. The CLI flags and
    :func:`from_flat` use these names."""
    hints = get_type_hints(cls)
    prefixes: Mapping[str, str] = getattr(cls, "FLAT_PREFIX", {})
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field, type]] = {}
    for f in dataclasses.fields(cls):
        if f.name in getattr(cls, "FLAT_SKIP", ()):
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            inner = flat_fields(hint, prefix + prefixes.get(f.name, f.name + "_"))
            items = {name: ((f.name, *path), leaf, owner) for name, (path, leaf, owner) in inner.items()}
        else:
            items = {prefix + f.name: ((f.name,), f, cls)}
        clash = sorted(set(items) & set(out))
        if clash:
            raise TypeError(f"{cls.__name__}: flat setting names {clash} occur twice; give the nested config a prefix")
        out.update(items)
    return out


def from_flat(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls`` built from flat names (see :func:`flat_fields`); names not given keep their defaults."""
    names = flat_fields(cls)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {', '.join(unknown)}")
    tree: dict[str, Any] = {}
    for name, value in values.items():
        node = tree
        path = names[name][0]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _build(cls, tree)


def _build(cls: type, tree: Mapping[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs = {k: _build(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in tree.items()}
    return cls(**kwargs)


def to_flat(config: Any) -> dict[str, Any]:
    """The flat settings of a (nested) config: the inverse of :func:`from_flat`."""
    out = {}
    for name, (path, _, _) in flat_fields(type(config)).items():
        value = config
        for part in path:
            value = getattr(value, part)
        out[name] = value
    return out
