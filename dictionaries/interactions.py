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
  ``U`` on ``resid_mid`` and ``D`` on ``mlp_out`` of the same layer);
- ``attn_z`` reader: ``ln1`` (scale frozen), the value projection and the *frozen attention
  pattern* -- a cross-position interaction: writer latent ``i`` at key position ``s`` reaches
  reader latent ``j`` at query position ``t`` with ``sum_h A_h[t, s] * J_h[i, j]``. For each query
  only the ``n_keys`` keys with the most attention (summed over heads) are penalised, BOS excluded.

The penalty is computed on whole sequences (a small extra forward pass per training step, see
:meth:`InteractionPenalty.capture`), so that cross-position pairs are available.

Writers: ``resid_*`` and ``mlp_out`` SAEs and transcoders write the residual directly, ``attn_z``
dictionaries through ``W_O`` and neuron dictionaries (``mlp_post``) through ``W_out``. Paths
through attention or MLP blocks *between* the two sites are not part of the interaction: in a
graph those blocks are mediated by their own dictionaries (as with ``attn_z`` + ``transcoder``
sites, where the penalised term is precisely the same-position direct edge).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import HookedTransformer

from dictionaries.architectures.base import SparseDictionary
from dictionaries.site import ModelHooks, Site

Weighting = Literal["edge", "jacobian", "concentration"]

@dataclass(frozen=True)
class InteractionConfig:
    """The interaction-sparsity term of a training run (``TrainConfig.interaction``; CLI flags
    ``--interaction-*``)."""

    penalty: float = 0.0
    """Coefficient of the penalty on feature-to-feature interactions of ``pairs`` (0 disables)."""
    warmup_frac: float = 0.1
    """Fraction of steps over which the coefficient ramps up from 0."""
    pairs: str = "adjacent"
    """Penalised dictionary pairs: adjacent, all, or a comma list WRITER>READER of site ids
    (e.g. L0.transcoder>L1.transcoder)."""
    weighting: Weighting = "edge"
    """edge: L1 of graph edges (latent value x Jacobian entry) of active pairs; jacobian: L1 of the
    Jacobian entries; concentration: log of the effective number of incoming edges (L1^2 / L2^2)
    of each active reader latent (scale-free)."""
    sequences: int = 4
    """Whole sequences per step on which the penalty is computed (one extra forward)."""
    keys: int = 8
    """Attention (attn_z reader) pairs: keys per query, those with the most attention, penalised."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.penalty) or self.penalty < 0:
            raise ValueError(f"interaction_penalty={self.penalty} must be a finite number >= 0")
        if not 0 <= self.warmup_frac <= 1:
            raise ValueError(f"interaction_warmup_frac={self.warmup_frac} must lie in [0, 1]")
        if self.sequences <= 0 or self.keys <= 0:
            raise ValueError("interaction_sequences and interaction_keys must be positive")
        if self.weighting not in ("edge", "jacobian", "concentration"):
            raise ValueError(f"interaction_weighting must be edge, jacobian or concentration, got {self.weighting!r}")


_READERS = ("resid_pre", "resid_mid", "resid_post", "transcoder", "mlp_out", "attn_z")
_WRITERS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "transcoder", "attn_z", "mlp_post")


def _write_pos(site: Site) -> int:
    """Index of the residual-stream state a writer's latents first reach (3 states per layer)."""
    base = 3 * site.layer
    return {"resid_pre": base, "attn_z": base + 1, "resid_mid": base + 1}.get(site.kind, base + 3)


def _read_pos(site: Site) -> int:
    """Index of the residual-stream state a reader's encoder sees."""
    base = 3 * site.layer
    reads = {"resid_pre": base, "attn_z": base, "resid_mid": base + 1, "transcoder": base + 1, "mlp_out": base + 1}
    return reads.get(site.kind, base + 3)


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
        if p.reader.kind == "attn_z":
            hooks.update({ModelHooks.ln_scale(p.reader.layer, "ln1"), ModelHooks.pattern(p.reader.layer)})
    return sorted(hooks)


class _Path:
    """Model weights on the path of one pair (fixed during dictionary training)."""

    def __init__(self, model: HookedTransformer, pair: InteractionPair) -> None:
        cfg, w, r = model.cfg, pair.writer, pair.reader
        self.pair = pair
        block_w, block_r = model.blocks[w.layer], model.blocks[r.layer]
        if w.kind == "attn_z":
            self.write = block_w.attn.W_O.detach().reshape(cfg.n_heads * cfg.d_head, cfg.d_model)
        elif w.kind == "mlp_post":
            self.write = block_w.mlp.W_out.detach()
        else:
            self.write = None
        ln = {"transcoder": "ln2", "mlp_out": "ln2", "attn_z": "ln1"}.get(r.kind)
        self.center = ln is not None and cfg.normalization_type in ("LN", "LNPre")
        self.scale_hook = ModelHooks.ln_scale(r.layer, ln) if ln else ""  # type: ignore[arg-type]
        ln_w = getattr(getattr(block_r, ln), "w", None) if ln else None
        scale_in = ln_w.detach()[:, None] if ln_w is not None else 1.0
        self.mlp = None
        self.values = None
        if r.kind == "mlp_out":
            mlp = block_r.mlp
            if cfg.act_fn is not None and cfg.act_fn.startswith("solu"):
                raise ValueError(f"interaction pair {pair.id}: MLPs with an inner LayerNorm ({cfg.act_fn}) are not supported")
            self.mlp = {"W_in": mlp.W_in.detach() * scale_in, "W_out": mlp.W_out.detach(), "act_fn": mlp.act_fn,
                        "W_gate": mlp.W_gate.detach() * scale_in if cfg.gated_mlp else None,
                        "pre": ModelHooks.mlp_pre(r.layer), "pre_linear": ModelHooks.mlp_pre_linear(r.layer)}
        elif r.kind == "attn_z":
            w_v = block_r.attn.W_V.detach()  # [H, d_model, d_head]
            self.values = w_v * scale_in.unsqueeze(0) if ln_w is not None else w_v
            self.pattern_hook = ModelHooks.pattern(r.layer)

    def left(self, writer: SparseDictionary) -> torch.Tensor:
        """``[d_dict_U, d_model]``: what each writer latent adds to the (centred) residual stream."""
        left = writer.decoder_directions()
        if self.write is not None:
            left = left @ self.write
        if self.center:
            left = left - left.mean(-1, keepdim=True)
        return left


def _mlp_gains(mlp: dict, frozen: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token diagonal factors of the MLP Jacobian: ``act'(pre)`` (times the linear branch for
    gated MLPs) and, for gated MLPs, ``act(pre)``."""
    pre = frozen[mlp["pre"]].detach().requires_grad_(True)
    with torch.enable_grad():
        out = mlp["act_fn"](pre)
        (slope,) = torch.autograd.grad(out.sum(), pre)
    if mlp["W_gate"] is None:
        return slope, None
    return slope * frozen[mlp["pre_linear"]], out.detach()


def pair_interactions(path: _Path, writer: SparseDictionary, reader: SparseDictionary,
                      w_idx: torch.Tensor, r_idx: torch.Tensor, frozen: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, k_U, k_D]`` same-token Jacobian entries ``d pre_D[r_idx] / d a_U[w_idx]`` (pairs whose
    reader is not ``attn_z``).

    ``w_idx`` ``[N, k_U]`` and ``r_idx`` ``[N, k_D]`` are the active latents of N tokens;
    ``frozen`` holds ``[N, ...]`` per-token normalisation scales (and MLP pre-activations)."""
    if path.values is not None:
        raise ValueError(f"pair {path.pair.id} is cross-position; use attention_interactions")
    n = w_idx.shape[0]
    left = path.left(writer)  # [dU, d_model]
    enc = reader.active_directions()  # [d_in_D, dD]
    if path.mlp is None:
        m = left @ enc  # [dU, dD]
        j = m[w_idx.unsqueeze(-1), r_idx.unsqueeze(-2)]
    else:
        mlp = path.mlp
        r_rows = (mlp["W_out"] @ enc).T[r_idx]  # [N, kD, d_mlp]
        slope, act = _mlp_gains(mlp, frozen)
        first = mlp["W_gate"] if mlp["W_gate"] is not None else mlp["W_in"]
        j = torch.einsum("nim,nm,njm->nij", (left @ first)[w_idx], slope, r_rows)
        if act is not None:
            j = j + torch.einsum("nim,nm,njm->nij", (left @ mlp["W_in"])[w_idx], act, r_rows)
    return j / frozen[path.scale_hook].reshape(n, 1, 1) if path.scale_hook else j


def attention_keys(pattern: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``[B, H, P, P]`` patterns: the ``n_keys`` key positions ``s`` (``1 <= s <= t``) of each
    query ``t`` with the largest attention summed over heads, ``[B, P, K]``, and which are valid."""
    score = pattern.sum(1)  # [B, P, P]
    n_pos = score.shape[-1]
    t, s = torch.arange(n_pos)[:, None], torch.arange(n_pos)[None, :]
    score = score.masked_fill(~((s >= 1) & (s <= t)).to(score.device), float("-inf"))
    k = min(n_keys, n_pos - 1)
    top = score.topk(k, dim=-1)
    return top.indices, torch.isfinite(top.values)


def attention_interactions(path: _Path, writer: SparseDictionary, reader: SparseDictionary,
                           w_idx: torch.Tensor, r_idx: torch.Tensor, keys: torch.Tensor,
                           frozen: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[B, P, K, k_U, k_D]`` Jacobian entries ``d pre_D[t, r_idx[t]] / d a_U[s, w_idx[s]]`` for
    every query ``t`` and its keys ``s = keys[b, t, :]`` through the frozen pattern (attn_z readers).

    ``w_idx`` ``[B, P, k_U]``, ``r_idx`` ``[B, P, k_D]``; ``frozen`` holds ``[B, P, 1]`` ln1 scales
    and the ``[B, H, P, P]`` pattern."""
    if path.values is None:
        raise ValueError(f"pair {path.pair.id} is not an attention pair; use pair_interactions")
    n_heads, _, d_head = path.values.shape
    n_seq, n_pos, _ = keys.shape
    # factor J_h = (left W_V^h) (enc^h): gather contiguous [H * d_head] rows, never a dU x dD table
    left_v = torch.einsum("um,hmd->uhd", path.left(writer), path.values)  # [dU, H, d_head]
    enc_t = reader.active_directions().T.reshape(-1, n_heads, d_head)  # [dD, H, d_head]
    b_idx = torch.arange(n_seq, device=keys.device)[:, None, None]
    q_idx = torch.arange(n_pos, device=keys.device)[None, :, None]
    weight = frozen[path.pattern_hook].permute(0, 2, 3, 1)[b_idx, q_idx, keys]  # [B, P, K, H]
    weight = weight / frozen[path.scale_hook].reshape(n_seq, -1)[b_idx, keys].unsqueeze(-1)
    k_u, k_d, width = w_idx.shape[-1], r_idx.shape[-1], n_heads * d_head
    per_pos = left_v.reshape(-1, width).index_select(0, w_idx.reshape(-1)).view(n_seq * n_pos, k_u * width)
    at_keys = per_pos.index_select(0, (b_idx * n_pos + keys).reshape(-1))  # [B*P*K, kU*H*dh]
    queries = enc_t.reshape(-1, width).index_select(0, r_idx.reshape(-1)).view(n_seq, n_pos, 1, k_d, n_heads, d_head)
    queries = (queries * weight[:, :, :, None, :, None]).reshape(-1, k_d, width)  # [B*P*K, kD, H*dh]
    j = torch.bmm(at_keys.view(-1, k_u, width), queries.transpose(1, 2))  # [B*P*K, kU, kD]
    return j.view(n_seq, n_pos, keys.shape[-1], k_u, k_d)


def active_codes(d: SparseDictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, m]`` indices and values (with gradients) of the active latents of ``[N, d_in]`` inputs
    (``m`` = the most active latents of any token; inactive padding has value 0)."""
    latents = d.activation(d.pre_acts(x * d.norm_in))
    m = max(1, int((latents > 0).sum(-1).max()))
    idx = latents.detach().topk(m, dim=-1, sorted=False).indices
    return idx, latents.gather(1, idx)


class InteractionTerms(dict):
    """``{pair id: penalty}`` (scalar tensors with gradients)."""

    def total(self) -> torch.Tensor:
        return sum(self.values())  # type: ignore[return-value]


class InteractionPenalty:
    """The interaction penalty of a set of pairs, on whole sequences (see the module docstring)."""

    def __init__(self, model: HookedTransformer, pairs: Sequence[InteractionPair], weighting: Weighting = "edge",
                 n_keys: int = 8) -> None:
        if weighting not in ("edge", "jacobian", "concentration"):
            raise ValueError(f"unknown interaction weighting {weighting!r}; choose edge, jacobian or concentration")
        if n_keys < 1:
            raise ValueError(f"n_keys={n_keys}: penalise at least one key per query")
        for p in pairs:
            for s in (p.writer, p.reader):
                s.check_model(model.cfg)
        self.model, self.pairs, self.weighting, self.n_keys = model, list(pairs), weighting, n_keys
        self.paths = [_Path(model, p) for p in self.pairs]
        sites = {s for p in self.pairs for s in (p.writer, p.reader)}
        self.frozen = frozen_hooks(self.pairs, model.cfg)
        self.hooks = sorted(set(self.frozen) | {s.input_hook for s in sites})

    @torch.no_grad()
    def capture(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{hook: [B, P, ...]}`` activations the penalty needs, from one forward of ``tokens``."""
        acts: dict[str, torch.Tensor] = {}

        def save(act: torch.Tensor, hook) -> None:
            acts[hook.name] = act.float() if act.dtype in (torch.float16, torch.bfloat16) else act

        layers = [int(h.split(".")[1]) for h in self.hooks if h.startswith("blocks.")]
        stop = max(layers) + 1 if layers else None
        with self.model.hooks(fwd_hooks=[(h, save) for h in self.hooks]):
            self.model(tokens.to(self.model.cfg.device), stop_at_layer=stop if stop and stop < self.model.cfg.n_layers else None)
        return acts

    def __call__(self, dicts: Mapping[Site, SparseDictionary], acts: Mapping[str, torch.Tensor]) -> InteractionTerms:
        """Per pair: the mean over (non-BOS) tokens of the summed |interaction| of every active
        writer latent with every active reader latent of that token (for attention pairs: over the
        token's top keys). ``acts`` comes from :meth:`capture`; gradients reach both dictionaries."""
        any_act = acts[self.pairs[0].writer.input_hook]
        n_seq, n_pos = any_act.shape[:2]
        codes = {}
        for s in {s for p in self.pairs for s in (p.writer, p.reader)}:
            x = acts[s.input_hook][:, 1:].reshape(n_seq * (n_pos - 1), -1)
            idx, val = active_codes(dicts[s], x)
            codes[s] = (idx.reshape(n_seq, n_pos - 1, -1), val.reshape(n_seq, n_pos - 1, -1))
        frozen_flat = {h: acts[h][:, 1:].reshape(n_seq * (n_pos - 1), -1) for h in self.frozen if "hook_pattern" not in h}
        terms = InteractionTerms()
        sums: dict[Site, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for path in self.paths:
            w, r = path.pair.writer, path.pair.reader
            (w_idx, w_val), (r_idx, r_val) = codes[w], codes[r]
            r_on = (r_val.detach() > 0)
            if path.values is None:
                j = pair_interactions(path, dicts[w], dicts[r], w_idx.flatten(0, 1), r_idx.flatten(0, 1), frozen_flat)
                wv, r_on = w_val.flatten(0, 1).unsqueeze(-1), r_on.flatten(0, 1).unsqueeze(-2)  # [N,kU,1], [N,1,kD]
                valid = None
            else:
                # positions 1.. only: pad a BOS row so indices stay absolute, then drop query 0
                pad = lambda t: torch.cat([t[:, :1] * 0, t], 1)  # noqa: E731
                keys, valid = attention_keys(acts[path.pattern_hook], self.n_keys)
                frozen = {path.pattern_hook: acts[path.pattern_hook], path.scale_hook: acts[path.scale_hook]}
                j = attention_interactions(path, dicts[w], dicts[r], pad(w_idx), pad(r_idx), keys, frozen)[:, 1:]
                b_idx = torch.arange(n_seq)[:, None, None]
                wv = pad(w_val)[b_idx, keys[:, 1:]].unsqueeze(-1)  # [B, P-1, K, kU, 1]
                r_on = r_on[:, :, None, None, :]
                valid = valid[:, 1:, :, None, None]
            mask = r_on if valid is None else r_on * valid
            edges = wv * j * mask
            dims = (-2,) if valid is None else (-3, -2)  # sum over writer latents (and keys): [N, kD] per target
            if self.weighting == "edge":
                terms[path.pair.id] = edges.abs().sum(dims).reshape(-1, edges.shape[-1]).sum(-1).mean()
            elif self.weighting == "jacobian":
                terms[path.pair.id] = (j.abs() * (wv.detach() > 0) * mask).sum(dims).reshape(-1, j.shape[-1]).sum(-1).mean()
            else:
                l1 = edges.abs().sum(dims).reshape(-1, edges.shape[-1])
                l2 = edges.pow(2).sum(dims).reshape(-1, edges.shape[-1])
                sums.setdefault(r, []).append((l1, l2, r_on.reshape(-1, r_on.shape[-1])))
        for r, parts in sums.items():  # concentration: mean log effective number of incoming edges per active target
            l1 = sum(p[0] for p in parts)
            l2 = sum(p[1] for p in parts)
            on = parts[0][2] & (l2 > 0)
            eff = l1.pow(2) / l2.clamp(min=1e-30)
            terms[f"into {r.id}"] = eff[on].log().mean() if on.any() else l1.sum() * 0
        return terms
