"""Forward hooks that put a dictionary's reconstruction (or zeros) in place of a site's activation.

Position 0 (BOS) is left untouched: dictionaries are not trained on it (its activations are
outliers), and the convention matches how the CE-loss metrics are reported.
"""

from __future__ import annotations

from typing import Literal

import torch

from dictionaries.architectures.base import SparseDictionary
from dictionaries.site import Site

Mode = Literal["reconstruct", "zero"]


def splice_hooks(site: Site, d: SparseDictionary | None, mode: Mode = "reconstruct") -> list[tuple[str, object]]:
    """``[(hook_name, fn), ...]`` for ``model.hooks(fwd_hooks=...)``."""
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
