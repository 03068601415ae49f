"""The replacement model: a HookedTransformer with dictionaries spliced in at their sites.

At every spliced site and every position but each row's first real token (BOS, where dictionaries
are not trained; its activation is kept and attributed to the BOS token through the model's own
computation) and its padding (with an attention mask: :mod:`circuitgraph.replacement.masking`):

    latents = encode(site input)                   # [B, P, d_dict]  (or given values: leaves, patches)
    error   = true output - reconstruction          # [B, P, d_out]   (or given values)
    output  = decode(latents) + skip(input) + error

With computed errors the output equals the true activation, so the spliced forward pass
reproduces the original logits. Given latents / errors turn sites into *leaves*: downstream
computation depends on them and no longer on the site's input, which is what direct-effect
attribution differentiates. ``edit_latents`` / ``edit_errors`` express interventions (ablate,
scale, steer); the error is always computed from the unedited latents, so an edit changes the
output by exactly the edited decoder contribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformer_lens import HookedTransformer

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.frozen import FrozenState, freeze_hooks, record_frozen_hooks
from circuitgraph.replacement.masking import first_positions, model_mask, padding_hooks, unspliced_positions
from dictionaries.architectures.base import SparseDictionary
from dictionaries.cross_layer import layer_slice
from dictionaries.persistence import check_against_model
from dictionaries.site import ModelHooks, Site

_DEPTH = {"resid_pre": 0.0, "attn_z": 0.2, "resid_mid": 0.4, "mlp_post": 0.6, "transcoder": 0.7, "clt": 0.7,
          "mlp_out": 0.8, "resid_post": 0.9}


def site_depth(site: Site) -> float:
    """Order of sites in the forward pass: ``layer + offset`` (resid_pre < attn_z < ... < resid_post)."""
    return site.layer + _DEPTH[site.kind]


Edit = Callable[[Site, torch.Tensor], torch.Tensor]


@dataclass
class SpliceSpec:
    """How one forward pass treats the spliced sites. All tensors are ``[B, P, width]``."""

    latents: Mapping[Site, torch.Tensor] = field(default_factory=dict)
    """Latents to use instead of encoding the site input (leaves for attribution, patched values)."""
    errors: Mapping[Site, torch.Tensor] = field(default_factory=dict)
    """Error terms to use instead of computing them from the current input."""
    edit_latents: Edit | None = None
    """``(site, latents) -> latents`` applied last (interventions)."""
    edit_errors: Edit | None = None
    """``(site, errors) -> errors`` applied last (error ablations)."""
    embed: torch.Tensor | None = None
    """``[B, P, d_model]`` replacement for the token embeddings (a leaf for token nodes)."""
    frozen: FrozenState | None = None
    """Recorded attention patterns, normalisation scales and MLP gates to hold fixed."""
    offsets: Mapping[Site, torch.Tensor] = field(default_factory=dict)
    """Added to a site's output at spliced positions (zero leaves here give the gradient at the site
    output)."""
    unspliced: Mapping[Site, torch.Tensor] = field(default_factory=dict)
    """Values a site's output hook takes at *unspliced* positions (each row's first real token, BOS,
    and its padding) instead of the model's own activation there; broadcast against ``[B, P, d_out]``
    (``[B, 1, d]`` holds one value per row). Recorded activations here hold the BOS outputs fixed,
    circuit-tracer's convention; recorded values plus a zero leaf give the gradient there."""
    first_as_error: bool = False
    """Splice each row's first real token too, its encoded latents set to zero there: its whole output
    (less the dictionary's bias and skip term) is the site's error term, so ablating the error node
    ablates it (given latents and edits apply as everywhere). Dataset runs of bidirectional models use this: there position 0 reads every position
    and must be ablatable like the rest (in a causal model it depends on the BOS token alone)."""
    record_active_values: bool = False
    """Compute every latent's affine pre-activation (:attr:`SiteRecord.active_value`); costs a dense
    encoder product per site."""


def _zero_first(latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``latents`` ``[B, P, d]`` with each row's first real token zeroed (``SpliceSpec.first_as_error``)."""
    b, p = latents.shape[:2]
    return latents.masked_fill(first_positions(b, p, mask, latents.device).unsqueeze(-1), 0.0)


def _latents_of(d: SparseDictionary, site: Site, spec: SpliceSpec, x_flat: torch.Tensor, shape: tuple[int, int],
                mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, P, d_dict]``: the latents ``spec`` gives, else the encoded input (zero at each row's first
    token with ``spec.first_as_error``)."""
    if site in spec.latents:
        return spec.latents[site]
    latents = d.encode(x_flat).reshape(*shape, -1)
    return _zero_first(latents, mask) if spec.first_as_error else latents


class SiteRecord(NamedTuple):
    """What a forward pass saw at one site."""

    latents: torch.Tensor
    """``[B, P, d_dict]`` the latents used (after edits)."""
    errors: torch.Tensor
    """``[B, P, d_out]`` the error terms used (after edits)."""
    inputs: torch.Tensor
    """``[B, P, d_in]`` the site input, connected to the autograd graph."""
    active_value: torch.Tensor | None
    """``[B, P, d_dict]`` the affine pre-activation of every latent (what an active latent equals),
    computed from the site input; only with ``SpliceSpec.record_active_values``."""


class RunResult(NamedTuple):
    """What :meth:`ReplacementModel.run` returns."""

    logits: torch.Tensor
    """``[B, P, d_vocab]``."""
    sites: dict[Site, SiteRecord]
    """Per-site record."""
    frozen: FrozenState | None
    """Recorded patterns / scales / gates when ``record_frozen`` was set."""


class ReplacementModel:
    """A model plus one dictionary per spliced site (at most one per output hook)."""

    def __init__(self, model: HookedTransformer, dicts: Mapping[Site, SparseDictionary]) -> None:
        if not dicts:
            raise CircuitGraphError("no dictionaries given; pass at least one site (e.g. --sites attn_z,transcoder)")
        check_against_model(dicts, model.cfg)  # widths, model name, and a CLT's layers without gaps
        by_output: dict[str, Site] = {}
        for site in dicts:
            other = by_output.get(site.output_hook)
            if other is not None:
                raise CircuitGraphError(
                    f"sites {other.id} and {site.id} both replace {site.output_hook}; splice at most one "
                    "dictionary per output (choose e.g. transcoder or mlp_out, not both)"
                )
            by_output[site.output_hook] = site
        self.model = model
        self.dicts = {s: dicts[s] for s in sorted(dicts, key=site_depth)}
        for d in self.dicts.values():
            d.eval()
        self.forward_passes = 0
        """Number of (batched) forward passes :meth:`run` has made; reported by tracing methods."""

    @property
    def sites(self) -> list[Site]:
        """Spliced sites in forward order."""
        return list(self.dicts)

    def _site_hooks(self, site: Site, spec: SpliceSpec, out: dict[Site, SiteRecord],
                    mask: torch.Tensor | None) -> list[tuple[str, Callable]]:
        d = self.dicts[site]
        saved: dict[str, torch.Tensor] = {}

        def save_input(act: torch.Tensor, hook) -> None:
            saved["x"] = act

        def replace(act: torch.Tensor, hook) -> torch.Tensor:
            x = saved.pop("x") if site.is_transcoder else act
            b, p = act.shape[:2]
            x_flat = x.reshape(b * p, -1)
            active = d.active_value(x_flat).reshape(b, p, -1) if spec.record_active_values else None
            skip = d.skip_term(x_flat).reshape(b, p, -1) if d.W_skip is not None else 0.0
            latents = _latents_of(d, site, spec, x_flat, (b, p), mask)
            if site in spec.errors:
                errors = spec.errors[site]
            else:
                errors = act.reshape(b, p, -1) - (d.decode(latents.reshape(b * p, -1)).reshape(b, p, -1) + skip)
            if spec.edit_latents is not None:
                latents = spec.edit_latents(site, latents)
            if spec.edit_errors is not None:
                errors = spec.edit_errors(site, errors)
            out[site] = SiteRecord(latents, errors, x.reshape(b, p, -1), active)
            untouched = all(site not in x for x in (spec.latents, spec.errors, spec.offsets, spec.unspliced))
            if untouched and spec.edit_latents is None and spec.edit_errors is None:
                return act  # decode(encode(x)) + (x - decode(encode(x))) is x: return it bit-exactly
            decoded = d.decode(latents.reshape(b * p, -1)).reshape(b, p, -1)
            new = decoded + skip + errors
            if site in spec.offsets:
                new = new + spec.offsets[site]
            keep = unspliced_positions(b, p, mask, act.device, not spec.first_as_error).unsqueeze(-1)
            own = spec.unspliced[site].to(act.dtype) if site in spec.unspliced else act.reshape(b, p, -1)
            new = torch.where(keep, own, new)
            return new.reshape(act.shape).to(act.dtype)

        hooks: list[tuple[str, Callable]] = []
        if site.is_transcoder:
            hooks.append((site.input_hook, save_input))
        hooks.append((site.output_hook, replace))
        return hooks

    def _clt_hooks(self, spec: SpliceSpec, out: dict[Site, SiteRecord],
                   mask: torch.Tensor | None) -> list[tuple[str, Callable]]:
        """Hooks of the cross-layer transcoder sites: each source encodes its ``hook_resid_mid`` and
        adds its writes to every later layer; ``hook_mlp_out`` of layer j takes the sum of the writes
        into j plus its own error term (computed from the unedited writes, as for other sites).
        ``offsets`` of a ``clt`` site span all the layers it writes, in decoder order."""
        sites = [s for s in self.dicts if s.is_cross_layer]
        if not sites:
            return []
        width = self.model.cfg.d_model
        touched = (spec.edit_latents is not None or spec.edit_errors is not None
                   or any(s in x for s in sites for x in (spec.latents, spec.errors, spec.offsets, spec.unspliced)))
        clean_sum: dict[int, torch.Tensor] = {}
        used_sum: dict[int, torch.Tensor] = {}
        pending: dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

        def add(acc: dict[int, torch.Tensor], j: int, x: torch.Tensor) -> None:
            acc[j] = x if j not in acc else acc[j] + x

        def read(site: Site) -> Callable:
            d = self.dicts[site]

            def hook(act: torch.Tensor, hook) -> None:
                b, p = act.shape[:2]
                x_flat = act.reshape(b * p, -1)
                active = d.active_value(x_flat).reshape(b, p, -1) if spec.record_active_values else None
                latents = _latents_of(d, site, spec, x_flat, (b, p), mask)
                skip = d.skip_term(x_flat).reshape(b, p, -1) if d.W_skip is not None else 0.0
                clean = d.decode(latents.reshape(b * p, -1)).reshape(b, p, -1) + skip
                used = clean
                if spec.edit_latents is not None:
                    latents = spec.edit_latents(site, latents)
                    used = d.decode(latents.reshape(b * p, -1)).reshape(b, p, -1) + skip
                if site in spec.offsets:
                    used = used + spec.offsets[site]
                for j in range(site.layer, site.layer + d.cfg.out_layers):
                    cols = layer_slice(site, j, width)
                    add(clean_sum, j, clean[..., cols])
                    add(used_sum, j, used[..., cols])
                pending[site] = (latents, act.reshape(b, p, -1), active)

            return hook

        def write(site: Site) -> Callable:
            def hook(act: torch.Tensor, hook) -> torch.Tensor:
                b, p = act.shape[:2]
                clean, used = clean_sum.pop(site.layer), used_sum.pop(site.layer)
                errors = spec.errors[site] if site in spec.errors else act.reshape(b, p, -1) - clean
                if spec.edit_errors is not None:
                    errors = spec.edit_errors(site, errors)
                latents, inputs, active = pending.pop(site)
                out[site] = SiteRecord(latents, errors, inputs, active)
                if not touched:
                    return act  # the writes plus their error are the activation: return it bit-exactly
                keep = unspliced_positions(b, p, mask, act.device, not spec.first_as_error).unsqueeze(-1)
                own = spec.unspliced[site].to(act.dtype) if site in spec.unspliced else act.reshape(b, p, -1)
                new = torch.where(keep, own, used + errors)
                return new.reshape(act.shape).to(act.dtype)

            return hook

        return [(s.input_hook, read(s)) for s in sites] + [(s.output_hook, write(s)) for s in sites]

    @contextmanager
    def spliced(self, spec: SpliceSpec | None = None, record_frozen: FrozenState | None = None,
                mask: torch.Tensor | None = None) -> Iterator[dict[Site, SiteRecord]]:
        """Context in which ``self.model``'s forward passes run spliced; yields the per-site record.
        ``mask``: the padded batch's attention mask (from :func:`~circuitgraph.replacement.masking.model_mask`;
        the forward pass must be given the same mask)."""
        spec = spec or SpliceSpec()
        out: dict[Site, SiteRecord] = {}
        hooks: list[tuple[str, Callable]] = padding_hooks(self.model, mask)
        if spec.embed is not None:
            embed = spec.embed
            hooks.append((ModelHooks.embed, lambda act, hook: embed.to(act.dtype)))
        if spec.frozen is not None:
            hooks.extend(freeze_hooks(self.model, spec.frozen))
        if record_frozen is not None:
            hooks.extend(record_frozen_hooks(self.model, record_frozen))
        for site in self.dicts:
            if not site.is_cross_layer:
                hooks.extend(self._site_hooks(site, spec, out, mask))
        hooks.extend(self._clt_hooks(spec, out, mask))
        with self.model.hooks(fwd_hooks=hooks):
            yield out

    def run(self, tokens: torch.Tensor, spec: SpliceSpec | None = None, record_frozen: bool = False,
            attention_mask: torch.Tensor | None = None) -> RunResult:
        """One spliced forward pass of ``tokens`` ``[B, P]``; ``attention_mask`` ``[B, P]`` (1 on real
        tokens) for a padded batch: every prompt then runs as it would alone."""
        self.check_tokens(tokens)
        mask = model_mask(tokens, attention_mask)
        frozen = FrozenState({}, {}, {}) if record_frozen else None
        self.forward_passes += 1
        with self.spliced(spec, frozen, mask) as record:
            logits = self.model(tokens, attention_mask=mask)
        return RunResult(logits, dict(record), frozen)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Clear errors for token tensors the model cannot run."""
        if tokens.dim() != 2:
            raise CircuitGraphError(f"tokens must be [batch, positions], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.model.cfg.n_ctx:
            raise CircuitGraphError(
                f"prompt is {tokens.shape[1]} tokens but the model's context is {self.model.cfg.n_ctx}; shorten it"
            )
        if tokens.numel() and (int(tokens.max()) >= self.model.cfg.d_vocab or int(tokens.min()) < 0):
            raise CircuitGraphError(f"token ids must lie in 0..{self.model.cfg.d_vocab - 1}")
