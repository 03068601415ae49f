"""What a graph explains, in words and numbers the viewer shows: the metric as a formula over
named tokens, the model's own next-token probabilities, the page title.

A prompt graph with a metric (``--answer`` / ``--contrast``) gives its logit nodes no output weight,
so the graph itself cannot say how likely each token is. :func:`prompt_outputs` reads the model's
own distribution at trace time (one forward pass) and :func:`circuitgraph.api.trace` stores it in
``graph.metadata["outputs"]``; graphs traced before it was recorded show no probabilities rather
than wrong ones.
"""

from __future__ import annotations

import torch

METRIC_FORMULAS = {"logit_diff": "logit(answer) − logit(wrong)", "logprob": "log p(answer)",
                   "prob_diff": "p(answer) − p(wrong)", "kl": "KL(p_clean ‖ p)"}
"""Dataset metrics in words (docs/datasets.md); a callable's name is shown as it is."""
TOP_K = 10
"""Next tokens recorded per prompt graph (besides its logit nodes, answer and contrast)."""


def prompt_outputs(model, tokens: torch.Tensor, answer: str | None = None, contrast: str | None = None,
                   extra_ids: list[int] | tuple[int, ...] = ()) -> dict:
    """The model's next-token distribution after the prompt ``tokens`` (``[1, P]``), for the page.

    Returns ``{"position": P - 1, "top": [[token id, text, probability, logit], ...]}`` for the
    :data:`TOP_K` likeliest tokens and ``extra_ids`` (e.g. the graph's logit nodes), plus
    ``"answer"`` / ``"contrast"`` entries ``[token id, text, probability, logit]`` when given.
    """
    from circuitgraph.tasks.dataset import single_token_id

    tokens = tokens.reshape(1, -1)
    with torch.no_grad():
        logits = model(tokens.to(model.W_U.device))[0, -1].double()  # [d_vocab]
    probs = torch.softmax(logits, -1)

    def row(t: int) -> list:
        text = model.tokenizer.decode([t]) if model.tokenizer is not None else str(t)
        return [t, text, float(probs[t]), float(logits[t])]

    ids = torch.argsort(probs, descending=True)[:TOP_K].tolist()
    ids += [int(t) for t in extra_ids if int(t) not in ids]
    out: dict = {"position": int(tokens.shape[1]) - 1, "top": [row(t) for t in ids]}
    for key, text in (("answer", answer), ("contrast", contrast)):
        if text is not None:
            out[key] = row(single_token_id(model, text))
    return out


def quoted(text: str, limit: int = 12) -> str:
    """A token as the page writes it: JSON-quoted (spaces visible), long ones cut with ``…``."""
    from circuitgraph.viewer.layout import short_label

    return '"' + short_label(text, limit).replace('"', '\\"') + '"'


def metric_formula(meta: dict, name: str | None) -> str:
    """The metric of a graph as a formula: ``logit(" Mary") − logit(" John")`` for a prompt graph
    traced with an answer and a contrast, ``logit(" Mary") − mean logit`` with an answer only, a
    dataset metric in words (:data:`METRIC_FORMULAS`), else its name."""
    outs = meta.get("outputs") if isinstance(meta.get("outputs"), dict) else {}
    answer, contrast = outs.get("answer"), outs.get("contrast")
    if answer and contrast and name == "logit_diff":
        return f"logit({quoted(answer[1])}) − logit({quoted(contrast[1])})"
    if answer and name == "answer_logit":
        return f"logit({quoted(answer[1])}) − mean logit"
    if "n_prompts" in meta and name in METRIC_FORMULAS:
        return f"mean {METRIC_FORMULAS[name]}"
    return name or "metric"


def output_probabilities(meta: dict) -> dict[int, float]:
    """Token id -> the model's probability, from ``metadata["outputs"]`` (empty when not recorded)."""
    outs = meta.get("outputs") if isinstance(meta.get("outputs"), dict) else {}
    rows = list(outs.get("top", [])) + [outs[k] for k in ("answer", "contrast") if outs.get(k)]
    return {int(r[0]): float(r[2]) for r in rows}


def top_outputs_text(meta: dict, k: int = 5) -> str | None:
    """``next token at position 14 (the model's probabilities): " Mary" 0.999, ...``, or ``None``."""
    outs = meta.get("outputs") if isinstance(meta.get("outputs"), dict) else {}
    top = sorted(outs.get("top", []), key=lambda r: -r[2])[:k]
    if not top:
        return None
    return (f"the model's next token after position {outs.get('position')}: "
            + ", ".join(f"{quoted(r[1])} {r[2]:.3g}" for r in top))


def page_heading(meta: dict) -> str:
    """What the page shows: ``prompt graph of "<prompt>"``, ``ioi circuit (64 prompts)`` or ``graph``."""
    if isinstance(meta.get("prompt"), str):
        prompt = meta["prompt"] if len(meta["prompt"]) <= 80 else meta["prompt"][:79] + "…"
        return f'prompt graph of "{prompt}"'
    if isinstance(meta.get("task"), str):
        n = meta.get("n_prompts")
        return f"{meta['task']} circuit" + (f" ({n} prompts)" if isinstance(n, int) else "")
    return "graph"


def page_title(meta: dict, metric: str | None) -> str:
    """The page's title: the prompt or task, and what the graph explains."""
    return f"{page_heading(meta)} → {metric}" if metric else page_heading(meta)
