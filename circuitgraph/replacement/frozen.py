"""Freezing the nonlinear parts of a transformer that are not graph nodes.

With attention patterns, normalisation scales and MLP activation gates held at the values of a
recorded run, every site's input is an affine function of the upstream node values (token
embeddings, dictionary latents, error terms), and the forward pass at the recorded point is
unchanged. This is what makes direct edges exact (circuit-tracer freezes attention and
normalisation; freezing MLP gates additionally covers MLPs that no transcoder replaces):

    pattern  <- recorded pattern                       # z = pattern @ v is linear in v
    scale    <- recorded normalisation scale           # LayerNorm / RMSNorm become linear
    mlp_post <- mlp_pre * (recorded post / recorded pre)  # act(x) = x * frozen gate
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import CircuitGraphError
from dictionaries.site import ModelHooks

Hook = tuple[str, Callable]


@dataclass
class FrozenState:
    """Recorded values (batch dimension 1 or matching the run) keyed by hook name."""

    patterns: dict[str, torch.Tensor]
    """``[B, H, P, P]`` attention patterns."""
    scales: dict[str, torch.Tensor]
    """``[B, P, 1]`` normalisation scales (``ln1``, ``ln2``, ``ln_final``)."""
    gates: dict[str, torch.Tensor]
    """``[B, P, d_mlp]`` MLP gates: post / (pre or pre_linear), 0 where the denominator is 0."""


def _gate_input_hook(model: HookedTransformer, layer: int) -> str:
    return ModelHooks.mlp_pre_linear(layer) if model.cfg.gated_mlp else ModelHooks.mlp_pre(layer)


def _check_supported(model: HookedTransformer) -> None:
    if model.cfg.act_fn is not None and model.cfg.act_fn.startswith("solu"):
        raise CircuitGraphError(
            f"act_fn {model.cfg.act_fn!r} has a normalisation inside the MLP that cannot be frozen; "
            "use a model with gelu/relu/silu MLPs"
        )


def _scale_hooks(model: HookedTransformer) -> list[str]:
    if model.cfg.normalization_type is None:
        return []
    names = [ModelHooks.final_scale]
    for layer in range(model.cfg.n_layers):
        names.append(ModelHooks.ln_scale(layer, "ln1"))
        if not model.cfg.attn_only:
            names.append(ModelHooks.ln_scale(layer, "ln2"))
    return [n for n in names if n in model.hook_dict]


def record_frozen_hooks(model: HookedTransformer, out: FrozenState) -> list[Hook]:
    """Hooks that fill ``out`` with the patterns, scales and gates of the run they are attached to."""
    _check_supported(model)
    hooks: list[Hook] = []
    pre: dict[int, torch.Tensor] = {}

    def save_to(store: dict, name: str) -> Callable:
        def fn(act: torch.Tensor, hook) -> None:
            store[name] = act.detach()
        return fn

    for layer in range(model.cfg.n_layers):
        hooks.append((ModelHooks.pattern(layer), save_to(out.patterns, ModelHooks.pattern(layer))))
        if model.cfg.attn_only:
            continue

        def keep_pre(act: torch.Tensor, hook, layer: int = layer) -> None:
            pre[layer] = act.detach()

        def gate(act: torch.Tensor, hook, layer: int = layer) -> None:
            x = pre.pop(layer)
            safe = torch.where(x == 0, torch.ones_like(x), x)
            out.gates[ModelHooks.mlp_post(layer)] = torch.where(x == 0, torch.zeros_like(x), act.detach() / safe)

        hooks.append((_gate_input_hook(model, layer), keep_pre))
        hooks.append((ModelHooks.mlp_post(layer), gate))
    for name in _scale_hooks(model):
        hooks.append((name, save_to(out.scales, name)))
    return hooks


def _match(recorded: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    if recorded.shape[0] == act.shape[0]:
        return recorded
    if recorded.shape[0] == 1:
        return recorded.expand(act.shape[0], *recorded.shape[1:])
    raise CircuitGraphError(
        f"frozen values were recorded for batch {recorded.shape[0]} but the run has batch {act.shape[0]}; "
        "record with batch 1 or with the same batch"
    )


def freeze_hooks(model: HookedTransformer, frozen: FrozenState) -> list[Hook]:
    """Hooks that replace patterns, scales and gates by the recorded ones (see the module docstring)."""
    _check_supported(model)
    hooks: list[Hook] = []
    pre: dict[int, torch.Tensor] = {}

    def replace_with(table: dict, name: str) -> Callable:
        def fn(act: torch.Tensor, hook) -> torch.Tensor:
            return _match(table[name], act).to(act.dtype)
        return fn

    for name in frozen.patterns:
        hooks.append((name, replace_with(frozen.patterns, name)))
    for name in frozen.scales:
        hooks.append((name, replace_with(frozen.scales, name)))
    for layer in range(model.cfg.n_layers):
        post_name = ModelHooks.mlp_post(layer)
        if post_name not in frozen.gates:
            continue

        def keep_pre(act: torch.Tensor, hook, layer: int = layer) -> None:
            pre[layer] = act

        def linear_post(act: torch.Tensor, hook, layer: int = layer, name: str = post_name) -> torch.Tensor:
            return pre.pop(layer) * _match(frozen.gates[name], act).to(act.dtype)

        hooks.append((_gate_input_hook(model, layer), keep_pre))
        hooks.append((post_name, linear_post))
    return hooks
