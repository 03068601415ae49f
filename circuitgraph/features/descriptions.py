"""Feature descriptions: top-activating contexts, promoted / suppressed tokens, ablation effects.

* Contexts: the ``k`` strongest activations of the feature over a corpus, each with a window of
  tokens and the feature's activation on every token of it. Position 0 (BOS) is skipped: its
  activations are outliers on every site, and dictionaries are not trained there.
* Tokens: the largest and smallest entries of the feature's direct logit effect (direction @ W_U).
* Ablation effect: on a given prompt, the change in log-likelihood of each actual next token when
  the feature is set to zero at every position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from circuitgraph.features.directions import logit_effects
from circuitgraph.replacement.model import ReplacementModel, SpliceSpec
from dictionaries.site import Site


@dataclass
class Context:
    """One activating context."""

    tokens: list[str]
    """Token strings of the window."""
    activations: list[float]
    """The feature's activation on each token of the window."""
    peak: int
    """Index in ``tokens`` of the activation the context was chosen for."""


@dataclass
class FeatureCard:
    """Everything the viewer and queries show about one feature."""

    site: str
    feature: int
    label: str
    """Short automatic label: the token the feature fires on most, and its top promoted token."""
    density: float
    """Fraction of corpus tokens (BOS excluded) on which the feature is active."""
    contexts: list[Context] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.site}#{self.feature}"

    def to_dict(self) -> dict:
        return asdict(self)


def _tok(model, ids: Iterable[int]) -> list[str]:
    return [model.tokenizer.decode([int(i)]) if model.tokenizer is not None else str(int(i)) for i in ids]


@torch.no_grad()
def describe_features(rm: ReplacementModel, features: list[tuple[Site, int]], corpus: torch.Tensor, k: int = 6,
                      window: int = 10, n_tokens: int = 6, batch_size: int = 32, progress: bool = True) -> dict[str, FeatureCard]:
    """Cards for ``features`` (``(site, index)`` pairs) from ``corpus`` ``[N, P]`` token ids."""
    model = rm.model
    by_site: dict[Site, list[int]] = {}
    for s, i in features:
        by_site.setdefault(s, []).append(i)
    idx = {s: torch.tensor(sorted(set(v))) for s, v in by_site.items()}
    n, p_len = corpus.shape
    acts = {s: torch.zeros(n, p_len, len(v)) for s, v in idx.items()}  # [N, P, F] kept for the windows
    for b0 in tqdm(range(0, n, batch_size), desc="feature contexts", disable=not progress, leave=False):
        run = rm.run(corpus[b0 : b0 + batch_size])
        for s, fi in idx.items():
            acts[s][b0 : b0 + batch_size] = run.sites[s].latents[:, :, fi]
    cards: dict[str, FeatureCard] = {}
    for s, fi in idx.items():
        eff = logit_effects(model, s, rm.dicts[s])[fi]  # [F, vocab]
        top_v, top_i = eff.topk(n_tokens, dim=1)
        low_v, low_i = (-eff).topk(n_tokens, dim=1)
        body = acts[s][:, 1:]  # BOS excluded
        density = (body > 0).float().mean((0, 1))
        flat = body.permute(2, 0, 1).reshape(len(fi), -1)  # [F, N*(P-1)]
        vals, where = flat.topk(min(k, flat.shape[1]), dim=1)
        for j, f in enumerate(fi.tolist()):
            contexts, peaks = [], []
            for v, w in zip(vals[j].tolist(), where[j].tolist(), strict=True):
                if v <= 0:
                    continue
                seq, pos = w // (p_len - 1), w % (p_len - 1) + 1
                lo, hi = max(1, pos - window), min(p_len, pos + 3)
                contexts.append(Context(_tok(model, corpus[seq, lo:hi]),
                                        [round(float(x), 4) for x in acts[s][seq, lo:hi, j]], pos - lo))
                peaks.append(int(corpus[seq, pos]))
            promoted = list(zip(_tok(model, top_i[j]), [round(float(x), 4) for x in top_v[j]], strict=True))
            suppressed = list(zip(_tok(model, low_i[j]), [round(-float(x), 4) for x in low_v[j]], strict=True))
            if contexts:
                fires_on = _tok(model, [max(set(peaks), key=peaks.count)])[0].strip() or "␣"
                label = f"{fires_on} → {promoted[0][0].strip()}"
            else:
                label = "(never active)"
            cards[f"{s.id}#{f}"] = FeatureCard(s.id, f, label, float(density[j]), contexts, promoted, suppressed)
    return cards


@torch.no_grad()
def ablation_effect(rm: ReplacementModel, tokens: torch.Tensor, site: Site, feature: int) -> dict:
    """Change in ``log p(next token)`` at every position when ``feature`` is zeroed everywhere.

    Returns ``{"tokens": [P] strings, "delta_logprob": [P-1] floats}`` (entry t is about token t+1)."""
    tokens = tokens.reshape(1, -1)
    clean = torch.log_softmax(rm.model(tokens)[0].double(), -1)

    def edit(s: Site, lat: torch.Tensor) -> torch.Tensor:
        if s != site:
            return lat
        lat = lat.clone()
        lat[..., feature] = 0
        return lat

    ablated = torch.log_softmax(rm.run(tokens, SpliceSpec(edit_latents=edit)).logits[0].double(), -1)
    nxt = tokens[0, 1:]
    delta = ablated[:-1].gather(1, nxt[:, None]) - clean[:-1].gather(1, nxt[:, None])
    return {"tokens": _tok(rm.model, tokens[0]), "delta_logprob": [round(float(x), 5) for x in delta[:, 0]]}
