"""Forward hooks that put a dictionary's reconstruction (or zeros) in place of a site's activation.

Position 0 (BOS) is left untouched: dictionaries are not trained on it (its activations are
outliers), and the convention matches how the CE-loss metrics are reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.cross_layer import splice_output_hooks
from dictionaries.site import Site

Mode = Literal["reconstruct", "zero"]


def splice_hooks(site: Site, d: SparseDictionary | None, mode: Mode = "reconstruct",
                 group: Mapping[Site, SparseDictionary] | None = None) -> list[tuple[str, object]]:
    """``[(hook_name, fn), ...]`` for ``model.hooks(fwd_hooks=...)``. A cross-layer transcoder
    site reconstructs its own layer's MLP output from every ``clt`` dictionary of ``group`` at or
    before it (``group`` is required for ``clt`` sites in ``reconstruct`` mode)."""
    if site.is_cross_layer and mode == "reconstruct":
        if group is None:
            raise ValueError(f"site {site.id} is a cross-layer transcoder layer: pass the whole CLT as group=")
        return splice_output_hooks(group, site.layer)
    saved: dict[str, torch.Tensor] = {}

    def save_input(act: torch.Tensor, hook) -> None:
        saved["x"] = act

    def replace(act: torch.Tensor, hook) -> torch.Tensor:
        shape = act.shape
        if mode == "zero":
            new = torch.zeros_like(act)
        else:
            x = saved.pop("x") if site.is_transcoder else act
            flat = x.reshape(shape[0], shape[1], -1)
            new = d(flat.reshape(-1, flat.shape[-1])).output.reshape(shape).to(act.dtype)
        return torch.cat([act[:, :1], new[:, 1:]], 1)  # out of place: gradients can flow (e2e training)

    hooks: list[tuple[str, object]] = []
    if site.is_transcoder and mode == "reconstruct":
        hooks.append((site.input_hook, save_input))
    hooks.append((site.output_hook, replace))
    return hooks
