"""``circuitgraph qk``: why a head attends where it does (QK attribution).

One prompt: the pre-softmax score of ``--layer``/``--head`` from ``--query`` to ``--key`` split into
(query source, key source) terms (:mod:`circuitgraph.attribution.qk`). A dataset (``--task`` or
``--dataset``): mean terms over its prompts with positions counted from the answer, for named heads
or the heads a circuit depends on (:mod:`circuitgraph.attribution.qk_dataset`).
"""

from __future__ import annotations

import argparse
import json

from circuitgraph.errors import CircuitGraphError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qk", help="why an attention head attends: its score split into (query source, key source) terms")
    p.add_argument("--model", default="default", help="'default', a saved model folder, a llama2.c .bin, or a "
                                                      "TransformerLens name")
    p.add_argument("--dicts", default=None, help="dictionary folder (default: the committed set of --model default)")
    p.add_argument("--sites", default=None, help="site kinds to splice, e.g. attn_z,transcoder (default: every kind "
                                                 "in --dicts)")
    p.add_argument("--layers", default="all", help="layers whose dictionaries are spliced: all, 0,2 or 1-3")
    p.add_argument("--prompt", default=None, help="attribute this one prompt's score")
    p.add_argument("--task", default=None, help="attribute mean scores over a built-in task's prompts")
    p.add_argument("--dataset", default=None, help="attribute mean scores over a prompt file's rows (docs/datasets.md)")
    p.add_argument("--n", type=int, default=32, help="--task: number of prompts (default 32)")
    p.add_argument("--seed", type=int, default=0, help="--task: prompt seed")
    p.add_argument("--layer", type=int, default=None, help="the head's layer")
    p.add_argument("--head", type=int, default=None, help="the head")
    p.add_argument("--heads", default=None, help="--task/--dataset: several heads LAYER.HEAD, e.g. 2.3,2.0")
    p.add_argument("--circuit", default=None, help="--task/--dataset: take the heads a circuit graph folder depends on")
    p.add_argument("--n-heads", type=int, default=3, help="--circuit: how many of its heads (default 3)")
    p.add_argument("--query", type=int, default=-1,
                   help="--prompt: query position (negative counts from the end; default -1, the last token); "
                        "--task/--dataset: offset from the answer (-1: the answer position)")
    p.add_argument("--key", default="top",
                   help="--prompt: key position, 'all' (every key: the pattern's logits) or 'top' (the key the head "
                        "attends to most; default); --task/--dataset: 'top' or an offset from the answer")
    p.add_argument("--top-k", type=int, default=20, help="strongest terms shown (default 20)")
    p.add_argument("--no-fold-skips", action="store_true",
                   help="list transcoder skip terms as sources instead of folding them into what they read")
    p.add_argument("--no-contrast", action="store_true",
                   help="--task/--dataset: skip the group comparison with the other keys (faster)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_qk)


def _replacement_model(args: argparse.Namespace):
    from circuitgraph import api

    model = api.load_model(args.model)
    if args.dicts is None:
        if args.model != "default":
            raise CircuitGraphError("pass --dicts DIR: committed dictionaries exist only for --model default")
        args.dicts = "default"
    dicts = api.load_dictionaries(args.dicts, model=model)
    return model, api.replacement_model(model, dicts, sites=args.sites, layers=args.layers, source=str(args.dicts))


def _heads(args: argparse.Namespace, rm) -> list[tuple[int, int]]:
    from circuitgraph.attribution.qk_dataset import circuit_heads
    from circuitgraph.graph.graph import Graph

    given = [args.heads is not None, args.circuit is not None, args.layer is not None or args.head is not None]
    if sum(given) != 1:
        raise CircuitGraphError("name the heads once: --layer L --head H, --heads L.H,L.H or --circuit GRAPH")
    if args.circuit is not None:
        if args.n_heads < 1:
            raise CircuitGraphError(f"--n-heads {args.n_heads}: ask for at least one head")
        return circuit_heads(Graph.load(args.circuit), rm, args.n_heads)
    if args.heads is not None:
        try:
            heads = [tuple(int(x) for x in part.strip().split(".")) for part in args.heads.split(",") if part.strip()]
        except ValueError as err:
            raise CircuitGraphError(f"cannot parse --heads {args.heads!r}; write LAYER.HEAD pairs, e.g. 2.3,2.0") from err
        if not heads or any(len(h) != 2 for h in heads):
            raise CircuitGraphError(f"cannot parse --heads {args.heads!r}; write LAYER.HEAD pairs, e.g. 2.3,2.0")
        out = [(h[0], h[1]) for h in heads]
    else:
        if args.layer is None or args.head is None:
            raise CircuitGraphError("give both --layer and --head")
        out = [(args.layer, args.head)]
    cfg = rm.model.cfg
    for layer, head in out:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise CircuitGraphError(f"head {layer}.{head} does not exist; the model has layers 0..{cfg.n_layers - 1} "
                                    f"and heads 0..{cfg.n_heads - 1}")
    return out


def run_qk(args: argparse.Namespace) -> int:
    modes = [x is not None for x in (args.prompt, args.task, args.dataset)]
    if sum(modes) != 1:
        raise CircuitGraphError("give one of --prompt (one prompt), --task or --dataset (mean over prompts)")
    if args.top_k < 1:
        raise CircuitGraphError(f"--top-k {args.top_k}: show at least one term")
    model, rm = _replacement_model(args)
    out = _run_prompt(args, model, rm) if args.prompt is not None else _run_dataset(args, model, rm)
    if args.json:
        print(json.dumps(out))
    else:
        _print(out)
    return 0


def _run_prompt(args: argparse.Namespace, model, rm) -> dict:
    from circuitgraph import api
    from circuitgraph.attribution.qk import QKContext

    if args.heads is not None or args.circuit is not None:
        given = "--heads" if args.heads is not None else "--circuit"
        raise CircuitGraphError(f"{given} chooses heads for a dataset (--task / --dataset); --prompt attributes one "
                                "head: give --layer and --head and drop " + given)
    (layer, head), = _heads(args, rm)
    tokens = api.prompt_tokens(model, args.prompt)
    ctx = QKContext(rm, tokens, fold_skips=not args.no_fold_skips)
    q = ctx.position(args.query, "query")
    strings = model.to_str_tokens(tokens[0]) if model.tokenizer is not None else [str(t) for t in tokens[0].tolist()]
    base = {"prompt": args.prompt, "tokens": strings}
    if args.key == "all":
        return {**base, "layer": layer, "head": head, "query": q, "key": "all",
                "keys": [a.to_dict(args.top_k) for a in ctx.attribute_keys(layer, head, q)]}
    if args.key == "top":
        key = ctx.top_key(layer, head, q)
    else:
        try:
            key = int(args.key)
        except ValueError as err:
            raise CircuitGraphError(f"--key {args.key!r}: give a position, 'all' or 'top'") from err
    return {**base, **ctx.attribute(layer, head, q, key).to_dict(args.top_k)}


def _run_dataset(args: argparse.Namespace, model, rm) -> dict:
    from circuitgraph.attribution.qk_dataset import aggregate_qk
    from circuitgraph.tasks.prompts import PromptDataset

    if args.n < 1:
        raise CircuitGraphError(f"--n {args.n}: the dataset would be empty; use --n 1 or more")
    data = (PromptDataset.from_task(args.task, model, n=args.n, seed=args.seed) if args.task is not None
            else PromptDataset.from_file(args.dataset, model)).data
    key: str | int = args.key
    if key != "top":
        try:
            key = int(args.key)
        except ValueError as err:
            raise CircuitGraphError(f"--key {args.key!r}: give 'top' or an offset from the answer (e.g. -10)") from err
    heads = _heads(args, rm)
    res = aggregate_qk(rm, data, heads, query_offset=args.query, key=key, contrast=not args.no_contrast)
    return {"task": args.task, "dataset": args.dataset, "n_prompts": len(data), "heads": [r.to_dict(args.top_k) for r in res]}


def _print_pairs(rows: list[dict], indent: str = "  ") -> None:
    width = max((len(r["query"]) for r in rows), default=0)
    for r in rows:
        print(f"{indent}{r['query']:<{width}}  x  {r['key']:<28} {r['value']:+.4f}")


def _print(out: dict) -> None:
    if "heads" in out:  # dataset
        for h in out["heads"]:
            print(f"L{h['layer']}.head{h['head']}: query offset {h['query_offset']}, key {h['key']} "
                  f"(offsets {h['key_offsets']}), {h['n_prompts']} prompts: mean score {h['mean_score']:.4f} "
                  f"= sum of mean terms {h['mean_sum_of_terms']:.4f}, mean pattern {h['mean_pattern']:.3f}")
            _print_pairs(h["top_pairs"])
            print("  by source group (at the key / at the other keys):")
            for g in h["group_pairs"]:
                other = "" if g["other_keys"] is None else f"  (others {g['other_keys']:+.4f})"
                print(f"    {g['query']:<18} x  {g['key']:<18} {g['value']:+.4f}{other}")
        return
    entries = out["keys"] if out.get("key") == "all" else [out]
    for e in entries:
        print(f"L{e['layer']}.head{e['head']} {e['query']} -> {e['key']}: score {e['score']:.4f} = sum of "
              f"{e['n_terms']} terms {e['sum_of_terms']:.4f}; pattern {e['pattern']:.3f}")
        _print_pairs(e["top_pairs"])
