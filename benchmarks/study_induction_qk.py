"""Induction, explained by QK attribution, on the embedded model (issue 17, part 6).

1. Finds previous-token heads (mean attention from each position to the one before) and induction
   heads (mean attention from the answer position of the induction task to the token after the
   query token's earlier occurrence) on the task's prompts.
2. Splits every induction head's score at that key into (query source, key source) terms over the
   dataset (``aggregate_qk``) and sums them by source group, against the mean over the other keys.
3. Prompt by prompt, finds what *carries* the query's token at the answer position (its embedding
   and the features that vanish when that token is swapped for random ones) and what carries the
   previous token at the key (the features that vanish when the token before the key is swapped),
   and sums the terms pairing the two: the token match, at the induction key and at control keys
   whose previous token differs.
4. Writes ``docs/induction_qk.svg`` (head scores, the group heatmap and the per-prompt match) and prints every
   number it draws.

    .venv/bin/python benchmarks/study_induction_qk.py --threads 2 [--n 64] [--out docs/induction_qk.svg]
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import re
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.qk import QKContext  # noqa: E402
from circuitgraph.attribution.qk_dataset import aggregate_qk, prompt_rows  # noqa: E402
from circuitgraph.models import load_default  # noqa: E402
from circuitgraph.models.loading import DEFAULT_DICTS_DIR  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402

log = logging.getLogger("study_induction_qk")
SPAN = 10  # the induction task's span length: the key sits SPAN - 1 tokens before the answer position
_FEATURE = re.compile(r"^(L\d+\.[a-z_]+)#(\d+)@")


def head_scores(model, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, H]`` previous-token and induction scores (mean attention probabilities)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(ds.clean_tokens, attention_mask=ds.attention_mask)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    prev, ind = torch.zeros(n_layers, n_heads), torch.zeros(n_layers, n_heads)
    first = ds.attention_mask.argmax(1) if ds.attention_mask is not None else torch.zeros(len(ds.prompts), dtype=torch.long)
    for layer in range(n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]
        for i, a in enumerate(ds.answer_pos.tolist()):
            f = int(first[i])
            prev[layer] += pat[i, :, f + 1 : a + 1, f : a].diagonal(dim1=-2, dim2=-1).mean(-1) / len(ds.prompts)
            ind[layer] += pat[i, :, a, a - SPAN + 1] / len(ds.prompts)
    return prev, ind


def carriers(rm, tokens: torch.Tensor, pos: int, swap_pos: int, gen: torch.Generator, n_swaps: int = 8) -> set[str]:
    """Source ids at ``pos`` that carry the token at ``swap_pos``: features whose mean activation
    falls below half when that token is replaced by random ones (and the token embedding itself
    when ``swap_pos == pos``)."""
    batch = tokens.repeat(n_swaps, 1)
    batch[:, swap_pos] = torch.randint(1, rm.model.cfg.d_vocab, (n_swaps,), generator=gen)
    with torch.no_grad():
        clean, swapped = rm.run(tokens[None]), rm.run(batch)
    out = {f"tok@{pos}"} if swap_pos == pos else set()
    for site in rm.sites:
        act = clean.sites[site].latents[0, pos]
        drop = swapped.sites[site].latents[:, pos].mean(0) < 0.5 * act
        out |= {f"{site.id}#{f}@{pos}" for f in ((act > 0) & drop).nonzero().squeeze(1).tolist()}
    return out


def match_block(attr, query_carriers: set[str], key_carriers: set[str]) -> tuple[float, object]:
    """The sum of the terms pairing a query-side carrier with a key-side carrier, and the strongest such term."""
    rows = [i for i, q in enumerate(attr.query_ids) if q in query_carriers]
    cols = [j for j, k in enumerate(attr.key_ids) if k in key_carriers]
    if not rows or not cols:
        return 0.0, None
    block = attr.values[rows][:, cols]
    i, j = divmod(int(block.abs().argmax()), len(cols))
    return float(block.sum()), (attr.query_ids[rows[i]], attr.key_ids[cols[j]], float(block[i, j]))


def per_prompt_match(rm, ds, layer: int, head: int, n_controls: int = 3) -> list[dict]:
    """For each prompt, the part of the score that pairs what carries the query's token (at the
    answer position) with what carries the previous token at the key: at the induction key (whose
    previous token is the query's token) and at control keys (whose previous token differs)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for (tokens, ans), prompt in zip(prompt_rows(ds), ds.prompts, strict=True):
        ctx = QKContext(rm, tokens)
        qc = carriers(rm, tokens, ans, ans, gen)
        k = ans - SPAN + 1
        attr = ctx.attribute(layer, head, ans, k)
        match, best = match_block(attr, qc, carriers(rm, tokens, k, k - 1, gen))
        pool = [c for c in range(1, ans + 1) if c != k and int(tokens[c - 1]) != int(tokens[ans])]
        controls = [pool[int(i)] for i in torch.randperm(len(pool), generator=gen)[:n_controls]]
        ctrl = [(ctx.attribute(layer, head, ans, c), carriers(rm, tokens, c, c - 1, gen)) for c in controls]
        rows.append({"prompt": prompt, "query_token": rm.model.to_single_str_token(int(tokens[ans])),
                     "score": attr.score, "match": match, "best": best,
                     "control_score": sum(a.score for a, _ in ctrl) / len(ctrl),
                     "control_match": sum(match_block(a, qc, kc)[0] for a, kc in ctrl) / len(ctrl)})
    return rows


def _colour(v: float, vmax: float) -> str:
    """White at 0, blue for positive, red for negative, saturated at ``vmax``."""
    t = max(-1.0, min(1.0, v / vmax)) if vmax else 0.0
    end = (59, 110, 200) if t > 0 else (200, 60, 50)
    mix = [round(255 + (c - 255) * abs(t)) for c in end]
    return f"rgb({mix[0]},{mix[1]},{mix[2]})"


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", weight: str = "normal",
          rotate: float | None = None, fill: str = "#222") -> str:
    tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}"{tr}>{html.escape(s)}</text>')


def _grid(x0: float, y0: float, values: torch.Tensor, title: str, cell: int = 26) -> list[str]:
    """A small layers x heads heatmap of attention scores in [0, 1]."""
    out = [_text(x0, y0 - 8, title, 12, weight="bold")]
    for lyr in range(values.shape[0]):
        out.append(_text(x0 - 6, y0 + lyr * cell + cell * 0.65, f"L{lyr}", 11, "end"))
        for h in range(values.shape[1]):
            v = float(values[lyr, h])
            out.append(f'<rect x="{x0 + h * cell}" y="{y0 + lyr * cell}" width="{cell - 2}" height="{cell - 2}" '
                       f'fill="{_colour(v, 1.0)}"/>')
            out.append(_text(x0 + h * cell + cell / 2 - 1, y0 + lyr * cell + cell * 0.62, f"{v:.2f}", 9, "middle"))
    for h in range(values.shape[1]):
        out.append(_text(x0 + h * cell + cell / 2 - 1, y0 + values.shape[0] * cell + 12, f"h{h}", 11, "middle"))
    return out


def write_svg(path: Path, res, rows: list[dict], prev: torch.Tensor, ind: torch.Tensor) -> None:
    """The figure: head scores, the group heatmap of the main induction head, per-prompt pairs."""
    other = res.groups_other_keys or {}
    contrast = {g: res.groups.get(g, 0.0) - other.get(g, 0.0) for g in set(res.groups) | set(other)}
    q_weight: dict[str, float] = {}
    k_weight: dict[str, float] = {}
    for (a, b), v in contrast.items():
        q_weight[a] = q_weight.get(a, 0.0) + abs(v)
        k_weight[b] = k_weight.get(b, 0.0) + abs(v)
    groups = sorted(q_weight, key=lambda g: -q_weight[g])[:7]
    cols = sorted(k_weight, key=lambda g: -k_weight[g])[:7]
    vmax = max(abs(v) for v in contrast.values())
    cell_w, cell_h, x0, y0 = 70, 34, 170, 150
    w, h = 1240, 600
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="DejaVu Sans, Arial, sans-serif">', f'<rect width="{w}" height="{h}" fill="white"/>',
           _text(20, 30, f"Why induction head L{res.layer}.head{res.head} attends to the token after the earlier "
                 f"occurrence ({res.n_prompts} induction prompts, embedded model)", 16, weight="bold"),
           _text(20, 52, f"Mean score {res.mean_score:.2f} = sum of QK terms {res.total():.2f}; attention on that key "
                 f"{res.mean_pattern:.2f}. Cells: mean term at that key minus its mean over the other keys", 12),
           _text(20, 68, "(what lifts the key above the rest), summed by source group; attention features by the head "
                 "they encode.", 12),
           _text(x0 + len(cols) * cell_w / 2, y0 - 58, "key side (10 tokens back)", 13, "middle", "bold"),
           _text(24, y0 + len(groups) * cell_h / 2, "query side (answer position)", 13, "middle", "bold",
                 rotate=-90)]
    for j, g in enumerate(cols):
        out.append(_text(x0 + j * cell_w + 12, y0 - 8, g, 11, "start", rotate=-28))
    for i, a in enumerate(groups):
        out.append(_text(x0 - 8, y0 + i * cell_h + cell_h * 0.6, a, 11, "end"))
        for j, b in enumerate(cols):
            v = contrast.get((a, b), 0.0)
            out.append(f'<rect x="{x0 + j * cell_w}" y="{y0 + i * cell_h}" width="{cell_w - 2}" height="{cell_h - 2}" '
                       f'fill="{_colour(v, vmax)}"/>')
            out.append(_text(x0 + j * cell_w + cell_w / 2 - 1, y0 + i * cell_h + cell_h * 0.6, f"{v:+.2f}", 11, "middle",
                             fill="white" if abs(v) > 0.6 * vmax else "#222"))
    gy = y0 + len(groups) * cell_h + 50
    out += _grid(x0, gy, prev, "previous-token score")
    out += _grid(x0 + 200, gy, ind, "induction score")
    px, py, bar = 740, 100, 150
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in ("score", "match", "control_score", "control_match")}
    out += [_text(px, py, "Token match, prompt by prompt", 13, weight="bold"),
            _text(px, py + 18, "terms pairing what carries the query's token with what carries", 11),
            _text(px, py + 33, "the key's previous token (features that vanish when it is swapped)", 11),
            _text(px, py + 52, f"mean over {n}: induction key {mean['match']:+.2f} of score {mean['score']:.2f};", 11),
            _text(px, py + 67, f"control keys {mean['control_match']:+.2f} of score {mean['control_score']:.2f}", 11)]
    vmax = max(max(abs(r["match"]), abs(r["control_match"])) for r in rows)
    y = py + 92
    for r in rows[:16]:
        out.append(_text(px + 88, y + 9, r["query_token"][:11], 10, "end"))
        for dy, v, colour in ((0, r["match"], "rgb(59,110,200)"), (6, r["control_match"], "rgb(150,150,150)")):
            width = bar * abs(v) / vmax
            x = px + 96 if v >= 0 else px + 96 - width
            out.append(f'<rect x="{x:.1f}" y="{y + dy:.1f}" width="{width:.1f}" height="6" fill="{colour}"/>')
        if r["best"]:
            q, k, v = r["best"]
            out.append(_text(px + 100 + bar, y + 9, f"{q.split('@')[0]} x {k.split('@')[0]} {v:+.2f}", 9))
        y += 17
    out.append(_text(px + 96, y + 10, "blue: induction key, grey: control keys (mean); right: strongest such pair", 10))
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="induction prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/induction_qk.svg")
    parser.add_argument("--json", default=None, help="also write every number as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    model = load_default()
    rm = ReplacementModel(model, load_dictionaries(DEFAULT_DICTS_DIR))
    ds = make_dataset("induction", model, n=args.n, seed=0)
    prev, ind = head_scores(model, ds)
    log.info("previous-token score (rows: layers, columns: heads)\n%s", prev)
    log.info("induction score\n%s", ind)
    prev_heads = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in (prev.flatten() > 0.4).nonzero()]
    ind_heads = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in (ind.flatten() > 0.5).nonzero()]
    ind_heads.sort(key=lambda h: -float(ind[h]))
    log.info("previous-token heads %s, induction heads %s", prev_heads, ind_heads)
    results = aggregate_qk(rm, ds, ind_heads, query_offset=-1, key=-SPAN, contrast=True)
    for r in results:
        log.info("L%d.head%d: mean score %.3f (sum of terms %.3f), pattern %.3f", r.layer, r.head, r.mean_score,
                 r.total(), r.mean_pattern)
        for g in r.group_pairs(8):
            log.info("  %-16s x %-16s  at key %+.3f  other keys %+.3f", g["query"], g["key"], g["value"], g["other_keys"])
    main_head = results[0]
    rows = per_prompt_match(rm, ds, main_head.layer, main_head.head)
    n = len(rows)
    for key in ("score", "match", "control_score", "control_match"):
        log.info("mean %s: %.3f", key, sum(r[key] for r in rows) / n)
    log.info("prompts whose match at the induction key exceeds the controls' mean: %d of %d",
             sum(r["match"] > r["control_match"] for r in rows), n)
    for r in rows[:8]:
        log.info("  %r: match %+.2f (controls %+.2f), strongest pair %s", r["query_token"], r["match"],
                 r["control_match"], r["best"])
    summary = {"n_prompts": args.n, "previous_token_scores": prev.tolist(), "induction_scores": ind.tolist(),
               "previous_token_heads": prev_heads, "induction_heads": ind_heads,
               "heads": [r.to_dict(12) for r in results], "prompts": rows,
               "seconds": time.perf_counter() - start}
    write_svg(Path(args.out), main_head, rows, prev, ind)
    log.info("wrote %s in %.1f s", args.out, summary["seconds"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
