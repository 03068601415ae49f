"""Direct writes into the residual stream: the vectors whose sum is the stream at one position.

With the replacement model's error terms, the residual stream entering block ``L`` at position
``p`` (``blocks.L.hook_resid_pre``) is exactly a sum of vectors, one per *source* at ``p``:

=============================== ===================================================================
source id                       vector
=============================== ===================================================================
``tok@p``                       the token embedding
``pos@p``                       the learned position embedding (absent with rotary positions)
``L1.transcoder#12@p``          an active feature: latent x decoder row (through ``W_O`` for
                                ``attn_z``, ``W_out`` for ``mlp_post``; a ``clt`` feature: its
                                writes into every MLP output before ``L``, summed)
``L1.transcoder#err@p``         a spliced site's error term (same projections)
``L1.transcoder#skip@p``        a transcoder's linear skip term, only with ``fold_skips=False``
``bias:L1.transcoder@p``        a dictionary's decoder bias (``b_dec``, same projections)
``L1.attn@p`` / ``L1.mlp@p``    the output of an attention layer / MLP no dictionary replaces,
                                without its output bias
``bias:L1.attn@p``              an attention layer's output bias ``b_O``
``bias:L1.mlp@p``               an MLP's output bias ``b_out`` (when no dictionary reconstructs it)
=============================== ===================================================================

A transcoder's skip term is linear in the stream it reads (its normalisation scale frozen), so by
default it is *folded* into the sources it reads, as a prompt graph folds that path into its edges:
a source's vector is its own write plus what the skip terms of later transcoders write because of
it (``fold_skips=False`` lists each skip term as a source instead). A CLT skip term whose input
precedes the residual-stream site below stays a source.

A residual-stream site (``resid_pre`` / ``resid_mid`` / ``resid_post``) replaces everything
written before it: the last one before block ``L`` contributes its features, error and bias, and
only writes after it are listed. Positions the replacement model leaves unspliced (each prompt's
first token, BOS) are decomposed into the token and position embeddings and the attention and MLP
outputs of every layer (``L0.attn@0``, ``L0.mlp@0``, ...) with their biases.

Feature and error ids are the graph's node ids (:mod:`circuitgraph.graph.nodes`); ``pos@``,
``bias:`` and ``#skip`` ids name the sources a prompt graph folds into its biases and paths.
Source vectors that are exactly zero (absent biases) are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.masking import unspliced_positions
from circuitgraph.replacement.model import ReplacementModel, SiteRecord
from dictionaries.cross_layer import layer_slice
from dictionaries.site import ModelHooks, Site

_RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")


class WriteRecord(NamedTuple):
    """One spliced forward pass of one prompt: everything :func:`residual_sources` reads.
    Tensors have no batch dimension."""

    tokens: torch.Tensor
    """``[P]`` the prompt."""
    sites: dict[Site, SiteRecord]
    """Per-site latents, errors and inputs (each ``[1, P, width]``, as :meth:`ReplacementModel.run` gives them)."""
    embed: torch.Tensor
    """``[P, d_model]`` token embeddings (``hook_embed``)."""
    pos_embed: torch.Tensor | None
    """``[P, d_model]`` position embeddings (``hook_pos_embed``); ``None`` for rotary models."""
    attn_out: list[torch.Tensor]
    """Per layer ``[P, d_model]``: ``hook_attn_out`` (output bias included)."""
    mlp_out: list[torch.Tensor | None]
    """Per layer ``[P, d_model]``: ``hook_mlp_out``; ``None`` for attention-only models."""
    ln1_scale: list[torch.Tensor | None]
    """Per layer ``[P]``: the attention input's normalisation scale; ``None`` without normalisation."""
    ln2_scale: list[torch.Tensor | None]
    """Per layer ``[P]``: the MLP input's normalisation scale (what a transcoder reads); ``None`` without."""
    resid_pre: list[torch.Tensor]
    """Per layer ``[P, d_model]``: ``hook_resid_pre`` (the stream the attention reads)."""
    scores: list[torch.Tensor]
    """Per layer ``[H, P, P]``: pre-softmax attention scores (``hook_attn_scores``; masked: ``-inf``)."""
    patterns: list[torch.Tensor]
    """Per layer ``[H, P, P]``: attention patterns."""
    unspliced: torch.Tensor
    """``[P]`` bool: positions the replacement model leaves unspliced (BOS)."""


class SourceVectors(NamedTuple):
    """The sources at one position and what each writes into the residual stream."""

    ids: list[str]
    """Source ids (see the module table), in forward order."""
    vectors: torch.Tensor
    """``[n_sources, d_model]``; the rows sum to the residual stream at that position."""


def record_writes(rm: ReplacementModel, tokens: torch.Tensor) -> WriteRecord:
    """One spliced forward pass of one prompt (``[P]`` or ``[1, P]``) recording what
    :func:`residual_sources` needs: site records, embeddings, every layer's attention and MLP
    outputs, ``ln1`` scales, attention scores and patterns."""
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise CircuitGraphError(f"QK attribution takes one prompt at a time, got a batch of {tokens.shape[0]}")
    rm.check_tokens(tokens)
    model = rm.model
    n_layers = model.cfg.n_layers
    saved: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook) -> None:
        saved[hook.name] = act.detach()[0]

    names = [ModelHooks.embed, *(f(layer) for layer in range(n_layers) for f in (
        ModelHooks.attn_out, ModelHooks.resid_pre, ModelHooks.attn_scores, ModelHooks.pattern))]
    if model.cfg.positional_embedding_type == "standard":
        names.append(ModelHooks.pos_embed)
    if not model.cfg.attn_only:
        names += [ModelHooks.mlp_out(layer) for layer in range(n_layers)]
    if model.cfg.normalization_type is not None:
        names += [ModelHooks.ln_scale(layer, "ln1") for layer in range(n_layers)]
        if not model.cfg.attn_only:
            names += [ModelHooks.ln_scale(layer, "ln2") for layer in range(n_layers)]
    rm.forward_passes += 1
    with torch.no_grad(), rm.spliced() as record, model.hooks(fwd_hooks=[(n, save) for n in names]):
        model(tokens)
    def scales(which: str) -> list[torch.Tensor | None]:
        return [saved[ModelHooks.ln_scale(layer, which)][:, 0] if ModelHooks.ln_scale(layer, which) in saved else None
                for layer in range(n_layers)]

    return WriteRecord(
        tokens=tokens[0],
        sites={s: SiteRecord(*(x.detach() if isinstance(x, torch.Tensor) else x for x in r)) for s, r in record.items()},
        embed=saved[ModelHooks.embed],
        pos_embed=saved.get(ModelHooks.pos_embed),
        attn_out=[saved[ModelHooks.attn_out(layer)] for layer in range(n_layers)],
        mlp_out=[saved.get(ModelHooks.mlp_out(layer)) for layer in range(n_layers)],
        ln1_scale=scales("ln1"),
        ln2_scale=scales("ln2"),
        resid_pre=[saved[ModelHooks.resid_pre(layer)] for layer in range(n_layers)],
        scores=[saved[ModelHooks.attn_scores(layer)] for layer in range(n_layers)],
        patterns=[saved[ModelHooks.pattern(layer)] for layer in range(n_layers)],
        unspliced=unspliced_positions(1, tokens.shape[1], None, tokens.device)[0],
    )


class _Accumulator:
    """Source vectors by id, summing repeated ids (a ``clt`` feature writes several MLP outputs),
    for the stream read by block ``target``; ``folded``: sites whose skip terms are folded in."""

    def __init__(self, target: int) -> None:
        self.index: dict[str, int] = {}
        self.rows: list[torch.Tensor] = []
        self.target = target
        self.folded: set[Site] = set()

    def add_to_each(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add ``fn(rows)`` (``[n, d_model]`` -> ``[n, d_model]``) to every source vector so far."""
        if self.rows:
            stacked = torch.stack(self.rows)
            self.rows = list(stacked + fn(stacked))

    def add(self, ids: list[str], vectors: torch.Tensor) -> None:
        for name, vec in zip(ids, vectors, strict=True):
            if name in self.index:
                self.rows[self.index[name]] = self.rows[self.index[name]] + vec
            else:
                self.index[name] = len(self.rows)
                self.rows.append(vec)

    def add_one(self, name: str, vector: torch.Tensor, drop_zero: bool = False) -> None:
        if drop_zero and not bool(vector.any()):
            return
        self.add([name], vector[None])

    def result(self, d_model: int, like: torch.Tensor) -> SourceVectors:
        vectors = torch.stack(self.rows) if self.rows else like.new_zeros(0, d_model)
        return SourceVectors(list(self.index), vectors)


Project = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ResidualWriter:
    """The sources of one recorded prompt at any (layer, position), cached: build it once and
    ask for many positions (:meth:`sources`)."""

    def __init__(self, rm: ReplacementModel, record: WriteRecord, fold_skips: bool = True) -> None:
        check_supported(rm)
        self.rm, self.record, self.model = rm, record, rm.model
        self.fold_skips = fold_skips
        self.dicts = rm.dicts
        self._dec: dict[Site, torch.Tensor] = {}
        self._bias: dict[Site, torch.Tensor] = {}
        self._cache: dict[tuple[int, int], SourceVectors] = {}

    def decoder(self, site: Site) -> torch.Tensor:
        if site not in self._dec:
            d = self.dicts[site]
            self._dec[site] = d.decoder_directions().detach()  # [d_dict, d_out]
            self._bias[site] = d.decode(self._dec[site].new_zeros(1, d.cfg.d_dict)).detach()[0]  # [d_out]
        return self._dec[site]

    def site_writes(self, acc: _Accumulator, site: Site, pos: int, project: Project,
                    error: Project | None, skip: bool = True) -> None:
        """Features, error (when ``error`` projects it), decoder bias and (``skip``) skip term of one site."""
        rec = self.record.sites[site]
        dec = self.decoder(site)
        lat = rec.latents[0, pos]  # [d_dict]
        active = lat.nonzero().squeeze(1)
        acc.add([f"{site.id}#{f}@{pos}" for f in active.tolist()], project(lat[active, None] * dec[active]))
        if error is not None:
            acc.add_one(f"{site.id}#err@{pos}", error(rec.errors[0, pos]))
        acc.add_one(f"bias:{site.id}@{pos}", project(self._bias[site]), drop_zero=True)
        d = self.dicts[site]
        if skip and d.W_skip is not None:
            acc.add_one(f"{site.id}#skip@{pos}", project(d.skip_term(rec.inputs[0, pos][None]).detach()[0]))

    def fold_skip(self, acc: _Accumulator, site: Site, pos: int, project: Project) -> None:
        """Fold ``site``'s skip term into the sources of the stream it reads (``acc`` holds that
        stream's decomposition now): each gains the skip's linear response to it."""
        d = self.dicts[site]
        if d.W_skip is None:
            return
        norm = self.model.cfg.normalization_type
        scale = self.record.ln2_scale[site.layer]

        def reads(rows: torch.Tensor) -> torch.Tensor:  # the dictionary's input: ln2's normalised stream (transcoder)
            if site.kind == "clt" or norm is None:
                return rows
            if norm in ("LN", "LNPre"):
                rows = rows - rows.mean(-1, keepdim=True)
            return rows / scale[pos]

        acc.add_to_each(lambda rows: project(d.skip_term(reads(rows)).detach()))
        acc.folded.add(site)

    def attention(self, acc: _Accumulator, layer: int, pos: int, spliced: bool) -> None:
        attn = self.model.blocks[layer].attn
        b_o = attn.b_O.detach()
        site = Site(layer, "attn_z")
        if spliced and site in self.dicts:
            w_o = attn.W_O.detach().reshape(-1, b_o.shape[0])  # [H * d_head, d_model]

            def through_w_o(x: torch.Tensor) -> torch.Tensor:
                return x @ w_o

            self.site_writes(acc, site, pos, through_w_o, through_w_o)
        else:
            acc.add_one(f"L{layer}.attn@{pos}", self.record.attn_out[layer][pos] - b_o)
        acc.add_one(f"bias:L{layer}.attn@{pos}", b_o, drop_zero=True)

    def mlp(self, acc: _Accumulator, layer: int, pos: int, spliced: bool) -> None:
        mlp = self.model.blocks[layer].mlp
        b_out = getattr(mlp, "b_out", None)
        b_out = None if b_out is None else b_out.detach()
        clt = [s for s in self.dicts if s.is_cross_layer and s.layer <= layer]
        if spliced and Site(layer, "mlp_post") in self.dicts:
            w_out = mlp.W_out.detach()  # [d_mlp, d_model]

            def through_w_out(x: torch.Tensor) -> torch.Tensor:
                return x @ w_out

            self.site_writes(acc, Site(layer, "mlp_post"), pos, through_w_out, through_w_out)
        elif spliced and (Site(layer, "mlp_out") in self.dicts or Site(layer, "transcoder") in self.dicts):
            site = Site(layer, "mlp_out") if Site(layer, "mlp_out") in self.dicts else Site(layer, "transcoder")
            if self.fold_skips:
                self.fold_skip(acc, site, pos, _identity)
            self.site_writes(acc, site, pos, _identity, _identity, skip=not self.fold_skips)
            return  # the reconstruction holds b_out
        elif spliced and clt:
            width = self.model.cfg.d_model
            own = Site(layer, "clt")
            if self.fold_skips:  # its skip reads this stream; fold every write it makes before the target block
                cols = [layer_slice(own, j, width) for j in range(layer, acc.target)]
                self.fold_skip(acc, own, pos, lambda x: sum(x[..., c] for c in cols))
            for s in sorted(clt, key=lambda s: s.layer):
                c = layer_slice(s, layer, width)
                self.site_writes(acc, s, pos, lambda x, c=c: x[..., c], _identity if s == own else None,
                                 skip=s not in acc.folded)
            return
        else:
            full = self.record.mlp_out[layer][pos]
            acc.add_one(f"L{layer}.mlp@{pos}", full - b_out if b_out is not None else full)
        if b_out is not None:
            acc.add_one(f"bias:L{layer}.mlp@{pos}", b_out, drop_zero=True)

    def sources(self, layer: int, pos: int) -> SourceVectors:
        """The sources at ``pos`` of the stream block ``layer``'s attention reads (module table);
        the rows sum to ``record.resid_pre[layer][pos]``."""
        cfg = self.model.cfg
        if not 0 <= layer < cfg.n_layers:
            raise CircuitGraphError(f"layer {layer} is out of range; the model has layers 0..{cfg.n_layers - 1}")
        if not 0 <= pos < self.record.tokens.numel():
            raise CircuitGraphError(f"position {pos} is out of range; the prompt has positions "
                                    f"0..{self.record.tokens.numel() - 1}")
        if (layer, pos) not in self._cache:
            self._cache[layer, pos] = self._sources(layer, pos)
        return self._cache[layer, pos]

    def _sources(self, layer: int, pos: int) -> SourceVectors:
        cfg = self.model.cfg
        acc = _Accumulator(layer)
        spliced = not bool(self.record.unspliced[pos])
        stages: list[tuple[str, int]] = []
        for lyr in range(layer):
            stages += [("resid_pre", lyr), ("attn", lyr), ("resid_mid", lyr)]
            stages += [] if cfg.attn_only else [("mlp", lyr)]
            stages.append(("resid_post", lyr))
        stages.append(("resid_pre", layer))
        start, base = 0, None
        if spliced:
            for i, (kind, lyr) in enumerate(stages):
                if kind in _RESID_KINDS and Site(lyr, kind) in self.dicts:  # type: ignore[arg-type]
                    start, base = i + 1, Site(lyr, kind)  # type: ignore[arg-type]
        if base is None:
            acc.add_one(f"tok@{pos}", self.record.embed[pos])
            if self.record.pos_embed is not None:
                acc.add_one(f"pos@{pos}", self.record.pos_embed[pos])
        else:
            self.site_writes(acc, base, pos, _identity, _identity)
        for kind, lyr in stages[start:]:
            if kind == "attn":
                self.attention(acc, lyr, pos, spliced)
            elif kind == "mlp":
                self.mlp(acc, lyr, pos, spliced)
        return acc.result(cfg.d_model, self.record.embed)


def check_supported(rm: ReplacementModel) -> None:
    """Refuse models whose residual stream or attention scores are not covered here."""
    cfg = rm.model.cfg
    if cfg.parallel_attn_mlp or getattr(cfg, "use_normalization_before_and_after", False):
        raise CircuitGraphError("QK attribution needs sequential pre-norm blocks; this model has parallel attention "
                                "and MLP or extra normalisations around them")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        raise CircuitGraphError(f"QK attribution supports learned or rotary positions, not "
                                f"{cfg.positional_embedding_type!r}")
    if cfg.use_qk_norm or cfg.clip_qkv is not None or cfg.use_logn_attn or cfg.attn_scores_soft_cap > 0:
        raise CircuitGraphError("QK attribution needs scores bilinear in the residual stream; this model normalises, "
                                "clips, rescales or soft-caps queries, keys or scores")


def residual_sources(rm: ReplacementModel, record: WriteRecord, layer: int, pos: int,
                     fold_skips: bool = True) -> SourceVectors:
    """The sources at position ``pos`` and their writes into the residual stream that block
    ``layer``'s attention reads (``blocks.layer.hook_resid_pre``); see the module table. The rows
    sum to ``record.resid_pre[layer][pos]``. For many positions build one :class:`ResidualWriter`."""
    return ResidualWriter(rm, record, fold_skips).sources(layer, pos)
