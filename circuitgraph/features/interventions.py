"""Interventions on features: ablate, scale, set or add feature directions (steering); feature diffs.

An edit changes a latent before it is decoded; the site's error term keeps its clean value (the
replacement-model convention), so the change to the site's output is exactly the edited amount
times the feature's decoder direction. ``add`` works on any token, active or not: it is steering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from circuitgraph.errors import CircuitGraphError
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from dictionaries.site import Site

EditMode = Literal["ablate", "scale", "set", "add"]


@dataclass(frozen=True)
class FeatureEdit:
    """One change to one feature."""

    site: Site
    feature: int
    mode: EditMode = "ablate"
    """``ablate`` (to 0), ``scale`` (times ``value``), ``set`` (to ``value``), ``add`` (plus ``value``)."""
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    """Positions to edit (``None``: every position but BOS)."""


def _edit_fn(rm: ReplacementModel, edits: list[FeatureEdit]):
    for e in edits:
        if e.site not in rm.dicts:
            raise CircuitGraphError(f"no dictionary is spliced at {e.site.id}; spliced: {', '.join(s.id for s in rm.sites)}")
        if not 0 <= e.feature < rm.dicts[e.site].cfg.d_dict:
            raise CircuitGraphError(f"feature {e.feature} does not exist at {e.site.id} (0..{rm.dicts[e.site].cfg.d_dict - 1})")

    def edit(site: Site, lat: torch.Tensor) -> torch.Tensor:
        mine = [e for e in edits if e.site == site]
        if not mine:
            return lat
        lat = lat.clone()
        for e in mine:
            pos = slice(1, None) if e.positions is None else list(e.positions)
            col = lat[:, pos, e.feature]
            new = {"ablate": torch.zeros_like(col), "scale": col * e.value, "set": torch.full_like(col, e.value),
                   "add": col + e.value}[e.mode]
            lat[:, pos, e.feature] = new
        return lat

    return edit


class InterventionResult(NamedTuple):
    """What :func:`intervene` returns."""

    clean_logits: torch.Tensor
    """``[B, P, vocab]``."""
    edited_logits: torch.Tensor
    """``[B, P, vocab]``."""
    kl: torch.Tensor
    """``[B, P]`` KL(clean || edited) of the next-token distributions."""
    top_before: list[str]
    """Most likely next token at the last position, before (first prompt)."""
    top_after: list[str]
    """... and after the edit."""


@torch.no_grad()
def intervene(rm: ReplacementModel, tokens: torch.Tensor, edits: list[FeatureEdit], k: int = 5) -> InterventionResult:
    """Run ``tokens`` with ``edits`` and report how the predictions change."""
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    clean = rm.model(tokens)
    edited = rm.run(tokens, SpliceSpec(edit_latents=_edit_fn(rm, edits))).logits
    lp, lq = torch.log_softmax(clean.double(), -1), torch.log_softmax(edited.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    tok = rm.model.tokenizer

    def top(logits: torch.Tensor) -> list[str]:
        ids = logits[0, -1].topk(k).indices.tolist()
        return [tok.decode([i]) if tok is not None else str(i) for i in ids]

    return InterventionResult(clean, edited, kl.float(), top(clean), top(edited))


@torch.no_grad()
def generate(rm: ReplacementModel, tokens: torch.Tensor, edits: list[FeatureEdit], max_new_tokens: int = 20) -> torch.Tensor:
    """Greedy generation with ``edits`` applied at every position (steering); returns ``[1, P + new]``."""
    tokens = tokens.reshape(1, -1)
    edit = _edit_fn(rm, [FeatureEdit(e.site, e.feature, e.mode, e.value, None) for e in edits])
    for _ in range(max_new_tokens):
        if tokens.shape[1] >= rm.model.cfg.n_ctx:
            break
        logits = rm.run(tokens, SpliceSpec(edit_latents=edit)).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


class DiffRow(NamedTuple):
    """One feature in a feature diff."""

    site: str
    feature: int
    a: float
    """Activation (or mean activation) on the first input."""
    b: float
    """... on the second."""
    score: float
    """``b - a`` (prompt diff) or a standardised difference of means (dataset diff)."""


@torch.no_grad()
def prompt_feature_diff(rm: ReplacementModel, prompt: torch.Tensor, pre_prompt: torch.Tensor, top_k: int = 20) -> list[DiffRow]:
    """Features whose activation on ``prompt`` changes when ``pre_prompt`` comes first (summed over
    the prompt's positions): ``a`` alone, ``b`` after the pre-prompt. Both without BOS; BOS is added."""
    bos = torch.tensor([[rm.model.tokenizer.bos_token_id or 0]]) if rm.model.tokenizer is not None else torch.zeros(1, 1, dtype=torch.long)
    alone = torch.cat([bos, prompt.reshape(1, -1)], 1)
    joined = torch.cat([bos, pre_prompt.reshape(1, -1), prompt.reshape(1, -1)], 1)
    n = prompt.numel()
    ra, rb = rm.run(alone), rm.run(joined)
    rows = []
    for s in rm.sites:
        a = ra.sites[s].latents[0, -n:].sum(0)
        b = rb.sites[s].latents[0, -n:].sum(0)
        for f in (b - a).abs().topk(min(top_k, a.numel())).indices.tolist():
            rows.append(DiffRow(s.id, f, float(a[f]), float(b[f]), float(b[f] - a[f])))
    rows.sort(key=lambda r: -abs(r.score))
    return rows[:top_k]


@torch.no_grad()
def dataset_feature_diff(rm: ReplacementModel, tokens_a: torch.Tensor, tokens_b: torch.Tensor, top_k: int = 20,
                         batch_size: int = 32) -> list[DiffRow]:
    """Features that separate two prompt sets (e.g. normal vs anomalous): per prompt, each feature's
    maximum over positions (BOS excluded); score = difference of means over the pooled standard
    deviation (a t-like statistic; positive: more active on ``b``)."""
    def per_prompt(tokens: torch.Tensor) -> dict[Site, torch.Tensor]:
        out: dict[Site, list[torch.Tensor]] = {s: [] for s in rm.sites}
        for i in range(0, tokens.shape[0], batch_size):
            run = rm.run(tokens[i : i + batch_size])
            for s in rm.sites:
                out[s].append(run.sites[s].latents[:, 1:].amax(1))
        return {s: torch.cat(v) for s, v in out.items()}

    if tokens_a.shape[0] < 2 or tokens_b.shape[0] < 2:
        raise CircuitGraphError("a dataset feature diff needs at least 2 prompts in each set")
    pa, pb = per_prompt(tokens_a), per_prompt(tokens_b)
    rows = []
    for s in rm.sites:
        ma, mb = pa[s].mean(0), pb[s].mean(0)
        sd = ((pa[s].var(0) + pb[s].var(0)) / 2).sqrt() + 1e-6
        score = (mb - ma) / sd
        for f in score.abs().topk(min(top_k, score.numel())).indices.tolist():
            rows.append(DiffRow(s.id, f, float(ma[f]), float(mb[f]), float(score[f])))
    rows.sort(key=lambda r: -abs(r.score))
    return rows[:top_k]
