"""Interaction sparsity: an L1 penalty on the feature-to-feature connections of two dictionaries.

An *interaction pair* is a writer dictionary ``U`` (whose latents write into the residual stream)
and a later reader dictionary ``D`` (whose encoder reads the residual stream). For one token the
interaction of an active writer latent ``i`` with an active reader latent ``j`` is

    J[i, j] = d pre_D[j] / d a_U[i]        (same token, attention and normalisation frozen)

and, by default, the penalised quantity is the *edge* ``a_U[i] * J[i, j]`` -- exactly the direct
edge the graph engine (:mod:`circuitgraph.attribution.linear`) puts between the two features.
Only active x active pairs of each token are computed (``k_U * k_D`` numbers per token, gathered
from small per-step matrices), never the dense ``d_dict x d_dict`` Jacobian per token.

The path from ``U``'s output to ``D``'s input depends on the reader:

- ``resid_*`` reader: the residual stream's skip connection (identity);
- ``transcoder`` reader: the skip connection, then ``ln2`` with its per-token scale frozen;
- ``mlp_out`` reader: the skip connection, ``ln2`` (scale frozen) and the MLP itself, whose
  Jacobian is taken exactly at each token (the "Jacobian sparse autoencoder" pair around an MLP:
  ``U`` on ``resid_mid`` and ``D`` on ``mlp_out`` of the same layer).

Writers: ``resid_*`` and ``mlp_out`` SAEs and transcoders write the residual directly, ``attn_z``
dictionaries through ``W_O`` and neuron dictionaries (``mlp_post``) through ``W_out``. Paths
through attention or MLP blocks *between* the two sites are not part of the interaction: in a
graph those blocks are mediated by their own dictionaries (as with ``attn_z`` + ``transcoder``
sites, where the penalised term is precisely the same-position direct edge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from dictionaries.architectures.base import SparseDictionary
from dictionaries.site import ModelHooks, Site

Weighting = Literal["edge", "jacobian"]

_READERS = ("resid_pre", "resid_mid", "resid_post", "transcoder", "mlp_out")
_WRITERS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "transcoder", "attn_z", "mlp_post")


def _write_pos(site: Site) -> int:
    """Index of the residual-stream state a writer's latents first reach (3 states per layer)."""
    base = 3 * site.layer
    return {"resid_pre": base, "attn_z": base + 1, "resid_mid": base + 1}.get(site.kind, base + 3)


def _read_pos(site: Site) -> int:
    """Index of the residual-stream state a reader's encoder sees."""
    base = 3 * site.layer
    return {"resid_pre": base, "resid_mid": base + 1, "transcoder": base + 1, "mlp_out": base + 1}.get(site.kind, base + 3)


@dataclass(frozen=True, order=True)
class InteractionPair:
    """A writer dictionary's site and a later reader dictionary's site."""

    writer: Site
    """The upstream dictionary (its decoder writes into the residual stream)."""
    reader: Site
    """The downstream dictionary (its encoder reads the residual stream)."""

    def __post_init__(self) -> None:
        why = pair_problem(self.writer, self.reader)
        if why:
            raise ValueError(f"interaction pair {self.writer.id}>{self.reader.id}: {why}")

    @property
    def id(self) -> str:
        """``L0.transcoder>L1.transcoder``."""
        return f"{self.writer.id}>{self.reader.id}"


def pair_problem(writer: Site, reader: Site) -> str:
    """Why ``writer -> reader`` cannot be an interaction pair ('' when it can)."""
    if writer.kind not in _WRITERS:
        return f"{writer.kind} dictionaries do not write into the residual stream; writers: {', '.join(_WRITERS)}"
    if reader.kind not in _READERS:
        return f"{reader.kind} dictionaries are not supported as readers; readers: {', '.join(_READERS)}"
    if reader.kind == "mlp_out" and _write_pos(writer) > 3 * reader.layer + 1:
        return f"the writer comes after the MLP of layer {reader.layer}, which the reader reads"
    if writer == reader or _write_pos(writer) > _read_pos(reader):
        return "the writer must write the residual stream before the reader reads it"
    return ""


def parse_pairs(spec: str, sites: Sequence[Site]) -> list[InteractionPair]:
    """Pairs from ``spec``: ``adjacent`` (every valid pair whose writer is in the reader's layer or
    the one before), ``all`` (every valid pair), ``none``/empty, or a comma list of
    ``WRITER>READER`` site ids (both must be among ``sites``)."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec in ("adjacent", "all"):
        pairs = [InteractionPair(w, r) for r in sites for w in sites
                 if not pair_problem(w, r) and (spec == "all" or r.layer - w.layer <= 1)]
        return sorted(pairs)
    known = {s.id: s for s in sites}
    pairs = []
    for part in spec.split(","):
        left, sep, right = part.strip().partition(">")
        if not sep:
            raise ValueError(f"cannot parse interaction pair {part!r}; write WRITER>READER, e.g. L0.transcoder>L1.transcoder")
        w, r = Site.parse(left), Site.parse(right)
        missing = [s.id for s in (w, r) if s.id not in known]
        if missing:
            raise ValueError(f"interaction pair {part.strip()!r} names {', '.join(missing)}, which is not being trained; "
                             f"trained sites: {', '.join(known)}")
        pairs.append(InteractionPair(w, r))
    return pairs


def frozen_hooks(pairs: Sequence[InteractionPair], model_cfg) -> list[str]:
    """Hooks whose per-token values the penalty needs beside the dictionaries' own inputs."""
    hooks: set[str] = set()
    for p in pairs:
        if p.reader.kind in ("transcoder", "mlp_out"):
            hooks.add(ModelHooks.ln_scale(p.reader.layer, "ln2"))
        if p.reader.kind == "mlp_out":
            hooks.add(ModelHooks.mlp_pre(p.reader.layer))
            if model_cfg.gated_mlp:
                hooks.add(ModelHooks.mlp_pre_linear(p.reader.layer))
    return sorted(hooks)


class _Path:
    """Model weights on the path of one pair (fixed during dictionary training)."""

    def __init__(self, model: HookedTransformer, pair: InteractionPair) -> None:
        cfg, w, r = model.cfg, pair.writer, pair.reader
        self.pair = pair
        block_w = model.blocks[w.layer]
        if w.kind == "attn_z":
            self.write = block_w.attn.W_O.detach().reshape(cfg.n_heads * cfg.d_head, cfg.d_model)
        elif w.kind == "mlp_post":
            self.write = block_w.mlp.W_out.detach()
        else:
            self.write = None
        normed = r.kind in ("transcoder", "mlp_out")
        self.center = normed and cfg.normalization_type in ("LN", "LNPre")
        self.scale_hook = ModelHooks.ln_scale(r.layer, "ln2") if normed else ""
        self.mlp = None
        if r.kind == "mlp_out":
            mlp = model.blocks[r.layer].mlp
            if cfg.act_fn is not None and cfg.act_fn.startswith("solu"):
                raise ValueError(f"interaction pair {pair.id}: MLPs with an inner LayerNorm ({cfg.act_fn}) are not supported")
            ln_w = getattr(model.blocks[r.layer].ln2, "w", None)
            scale_in = ln_w.detach()[:, None] if ln_w is not None else 1.0
            self.mlp = {"W_in": mlp.W_in.detach() * scale_in, "W_out": mlp.W_out.detach(), "act_fn": mlp.act_fn,
                        "W_gate": mlp.W_gate.detach() * scale_in if cfg.gated_mlp else None,
                        "pre": ModelHooks.mlp_pre(r.layer), "pre_linear": ModelHooks.mlp_pre_linear(r.layer)}

    def left(self, writer: SparseDictionary) -> torch.Tensor:
        """``[d_dict_U, d_model]``: what each writer latent adds to the (centred) residual stream."""
        left = writer.decoder_directions()
        if self.write is not None:
            left = left @ self.write
        if self.center:
            left = left - left.mean(-1, keepdim=True)
        return left


def _mlp_gains(mlp: dict, frozen: Mapping[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token diagonal factors of the MLP Jacobian: ``act'(pre)`` (times the linear branch for
    gated MLPs) and, for gated MLPs, ``act(pre)``."""
    pre = frozen[mlp["pre"]][:n].detach().requires_grad_(True)
    with torch.enable_grad():
        out = mlp["act_fn"](pre)
        (slope,) = torch.autograd.grad(out.sum(), pre)
    if mlp["W_gate"] is None:
        return slope, None
    return slope * frozen[mlp["pre_linear"]][:n], out.detach()


def pair_interactions(path: _Path, writer: SparseDictionary, reader: SparseDictionary,
                      w_idx: torch.Tensor, r_idx: torch.Tensor, frozen: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, k_U, k_D]`` Jacobian entries ``d pre_D[r_idx] / d a_U[w_idx]`` per token.

    ``w_idx`` ``[N, k_U]`` and ``r_idx`` ``[N, k_D]`` are the active latents of the N tokens;
    ``frozen`` holds the per-token normalisation scales (and MLP pre-activations) of those tokens."""
    n = w_idx.shape[0]
    left = path.left(writer)  # [dU, d_model]
    enc = reader.active_directions()  # [d_in_D, dD]
    inv_scale = 1.0 / frozen[path.scale_hook][:n].reshape(n, 1, 1) if path.scale_hook else None
    if path.mlp is None:
        m = left @ enc  # [dU, dD]
        j = m[w_idx.unsqueeze(-1), r_idx.unsqueeze(-2)]
    else:
        mlp = path.mlp
        right = (mlp["W_out"] @ enc).T  # [dD, d_mlp]
        r_rows = right[r_idx]  # [N, kD, d_mlp]
        slope, act = _mlp_gains(mlp, frozen, n)
        first = mlp["W_gate"] if mlp["W_gate"] is not None else mlp["W_in"]
        j = torch.einsum("nim,nm,njm->nij", (left @ first)[w_idx], slope, r_rows)
        if act is not None:
            j = j + torch.einsum("nim,nm,njm->nij", (left @ mlp["W_in"])[w_idx], act, r_rows)
    return j * inv_scale if inv_scale is not None else j


class InteractionTerms(dict):
    """``{pair id: penalty}`` (scalar tensors with gradients)."""

    def total(self) -> torch.Tensor:
        return sum(self.values())  # type: ignore[return-value]


class InteractionPenalty:
    """Computes the interaction penalty of a set of pairs during joint training."""

    def __init__(self, model: HookedTransformer, pairs: Sequence[InteractionPair], weighting: Weighting = "edge") -> None:
        if weighting not in ("edge", "jacobian"):
            raise ValueError(f"unknown interaction weighting {weighting!r}; choose edge or jacobian")
        for p in pairs:
            for s in (p.writer, p.reader):
                s.check_model(model.cfg)
        self.pairs, self.weighting = list(pairs), weighting
        self.paths = [_Path(model, p) for p in self.pairs]
        self.hooks = frozen_hooks(self.pairs, model.cfg)

    def __call__(self, dicts: Mapping[Site, SparseDictionary], codes: Mapping[Site, tuple[torch.Tensor, torch.Tensor]],
                 frozen: Mapping[str, torch.Tensor]) -> InteractionTerms:
        """Mean over tokens of the summed |interaction| of every active x active pair, per pair.

        ``codes[site] = (idx, val)``: ``[N, m]`` active latent indices and values (with gradients)
        of the penalised tokens."""
        terms = InteractionTerms()
        for path in self.paths:
            w, r = path.pair.writer, path.pair.reader
            (w_idx, w_val), (r_idx, r_val) = codes[w], codes[r]
            j = pair_interactions(path, dicts[w], dicts[r], w_idx, r_idx, frozen)
            r_on = (r_val.detach() > 0).unsqueeze(-2)
            if self.weighting == "edge":
                weights = (w_val.unsqueeze(-1) * j).abs()
            else:
                weights = j.abs() * (w_val.detach() > 0).unsqueeze(-1)
            terms[path.pair.id] = (weights * r_on).sum((-1, -2)).mean()
        return terms
