"""The BOS convention of prompt graphs: who gets credit for what the sites output at position 0.

Dictionaries are not spliced at the first position (BOS): there every site outputs the model's
own activation. Two conventions (``LinearAttributionConfig.bos``):

* ``keep`` (default): that output is computed from ``tok@0`` through the frozen model, so its
  effect on every target is credited to ``tok@0`` (and drops out of the biases);
* ``detach`` (circuit-tracer's): it is held at its recorded value, a constant, so it is part of
  every target's bias and ``tok@0`` is credited only with the embedding's own paths. Graphs built
  so compare edge for edge with circuit-tracer's.

In a causal model position 0 depends on ``tok@0`` alone, and under the frozen patterns, scales and
gates each site's BOS output is affine in it: ``out_s = J_s e_0 + c_s``. So ``keep`` costs no more
than ``detach``: the backward passes hold the BOS outputs fixed and carry a zero leaf there whose
gradient ``g_s`` is read off, and ``tok@0``'s edge gains ``sum_s g_s . (J_s e_0)``, where
``J_s e_0`` is the recorded output minus the output with ``e_0`` zeroed (one frozen run,
:func:`bos_deltas`). A bidirectional model's position 0 reads every position; there ``keep``
leaves the BOS outputs live in the backward passes (exact, slower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from circuitgraph.replacement.model import ReplacementModel, RunResult, SpliceSpec
from dictionaries.site import Site

BosMode = Literal["keep", "detach"]


def _capture(store: dict[Site, torch.Tensor], site: Site) -> Callable:
    def hook(act: torch.Tensor, hook) -> None:
        store[site] = act.detach()[:, :1].reshape(act.shape[0], 1, -1)  # [B, 1, d_out] at position 0

    return hook


def clean_run(rm: ReplacementModel, tokens: torch.Tensor) -> tuple[RunResult, dict[Site, torch.Tensor]]:
    """The clean run recording frozen state, and each site's output at position 0 (``[1, 1, d_out]``)."""
    outputs: dict[Site, torch.Tensor] = {}
    with torch.no_grad(), rm.model.hooks(fwd_hooks=[(s.output_hook, _capture(outputs, s)) for s in rm.sites]):
        clean = rm.run(tokens, record_frozen=True)
    return clean, outputs


def bos_deltas(rm: ReplacementModel, tokens: torch.Tensor, clean: RunResult,
               recorded: dict[Site, torch.Tensor]) -> dict[Site, torch.Tensor]:
    """``J_s e_0`` per site (see the module docstring): recorded BOS output minus the BOS output of
    the frozen run with ``tok@0``'s embedding zeroed (causal models only)."""
    embed = rm.model.embed(tokens).detach().clone()
    embed[:, 0] = 0
    spec = SpliceSpec(latents={s: clean.sites[s].latents for s in rm.sites},
                      errors={s: clean.sites[s].errors for s in rm.sites}, embed=embed, frozen=clean.frozen)
    zeroed: dict[Site, torch.Tensor] = {}
    rm.forward_passes += 1
    with torch.no_grad(), rm.spliced(spec):  # capture hooks registered after the splice: they see its output
        with rm.model.hooks(fwd_hooks=[(s.output_hook, _capture(zeroed, s)) for s in rm.sites]):
            rm.model(tokens, stop_at_layer=rm.model.cfg.n_layers)
    return {s: recorded[s] - zeroed[s] for s in rm.sites}
