"""``circuitgraph query`` (ask a saved graph questions), ``view`` (its HTML page) and ``export``."""

from __future__ import annotations

import argparse
import json
import sys

from circuitgraph.errors import CircuitGraphError

MAX_PATHS = 1000
"""Most paths ``query --paths`` lists (Yen's algorithm: each path is one more shortest-path search)."""


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("query", help="ask a saved graph which nodes drive / are driven by a node")
    q.add_argument("graph", help="graph folder written by `circuitgraph trace`")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--upstream", metavar="NODE_ID")
    g.add_argument("--downstream", metavar="NODE_ID")
    g.add_argument("--top-features", metavar="NODE_ID", help="features with the largest influence on NODE_ID")
    g.add_argument("--paths", nargs=2, metavar=("SRC", "DST"))
    g.add_argument("--nodes", action="store_true", help="list node ids (filtered)")
    g.add_argument("--why-attends", metavar="LAYER.HEAD@Q:K",
                   help="head HEAD of block LAYER's score from query position Q to key position K, split into "
                        "(query source, key source) pairs: stored by `trace --qk`, else computed from the graph's "
                        "model, dictionaries and prompt")
    g.add_argument("--head-loadings", nargs=2, metavar=("SRC", "DST"),
                   help="the edge SRC -> DST into an attention feature split by head (`trace --qk`)")
    q.add_argument("--top-k", type=int, default=10)
    q.add_argument("--depth", type=int, default=1)
    q.add_argument("--layer", type=int, default=None)
    q.add_argument("--site", default=None, help="site id or kind")
    q.add_argument("--pos", type=int, default=None)
    q.add_argument("--kind", default=None)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_query)

    v = sub.add_parser("view", help="write the offline HTML viewer of a graph")
    v.add_argument("graph", help="graph folder written by `circuitgraph trace`")
    v.add_argument("--out", default="circuit.html")
    v.add_argument("--max-nodes", type=int, default=None, help="at most this many features in any view (default: no cap)")
    v.add_argument("--max-edges", type=int, default=500,
                   help="edges of the view the page opens on (circuit-tracer's thresholds); denser views hold up to 10x")
    v.add_argument("--open", action="store_true", help="open the page in the default browser")
    v.set_defaults(func=run_view)

    e = sub.add_parser("export", help="export a graph for other tools")
    e.add_argument("graph", help="graph folder written by `circuitgraph trace`")
    e.add_argument("--format", required=True, choices=["circuit-tracer", "node-link", "graphml"])
    e.add_argument("--out", required=True)
    e.set_defaults(func=run_export)


def run_query(args: argparse.Namespace) -> int:
    from circuitgraph.graph.graph import Graph
    from circuitgraph.graph.query import NodeFilter, downstream, paths, top_features, upstream

    if args.top_k < 1 or args.depth < 1:
        raise CircuitGraphError(f"--top-k and --depth must be at least 1 (got {args.top_k}, {args.depth})")
    if args.paths and args.top_k > MAX_PATHS:
        raise CircuitGraphError(f"--top-k {args.top_k}: --paths lists at most {MAX_PATHS} paths (each one costs a "
                                "shortest-path search)")
    g = Graph.load(args.graph)
    where = NodeFilter(args.layer, args.site, args.pos, args.kind)
    if args.why_attends:
        rows = [why_attends(g, args.why_attends, args.top_k)]
    elif args.head_loadings:
        rows = [{"head": h, "loading": v} for h, v in g.head_loadings(*args.head_loadings).items()]
    elif args.paths:
        rows = [r._asdict() for r in paths(g, args.paths[0], args.paths[1], args.top_k)]
    elif args.nodes:
        rows = [{"node": n.id, "activation": float(g.activation[i]), "label": g.labels[i]}
                for i, n in enumerate(g.nodes) if where.accepts(n)][: args.top_k]
    elif args.upstream:
        rows = [r._asdict() for r in upstream(g, args.upstream, args.depth, args.top_k, where)]
    elif args.downstream:
        rows = [r._asdict() for r in downstream(g, args.downstream, args.depth, args.top_k, where)]
    else:
        rows = [r._asdict() for r in top_features(g, args.top_features, args.top_k, where)]
    if args.json:
        from circuitgraph.graph.graph import json_safe

        print(json.dumps(json_safe(rows), allow_nan=False))
    elif args.why_attends:
        r = rows[0]
        head = f"L{r['layer']}.H{r['head']} {r['query']} -> {r['key']}"
        edge = f"  (edge {r['source']} -> {r['target']}: {r['edge']:.4g}, this head {r['head_loading']:.4g})" \
            if "source" in r else ""
        sys.stdout.write(f"{head}: score {r['score']:.4g} = sum of {r['n_terms']} terms {r['sum_of_terms']:.4g}, "
                         f"attention {r['pattern']:.3g}{edge}\n")
        for t in r["top_pairs"]:
            sys.stdout.write(f"  {t['value']:+.4g}  query {t['query']}  x  key {t['key']}\n")
    else:
        for r in rows:
            sys.stdout.write("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()) + "\n")
    return 0


def parse_why(text: str) -> tuple[int, int, int, int]:
    """``LAYER.HEAD@Q:K`` (e.g. ``1.3@9:4``) as ``(layer, head, query, key)``."""
    import re

    m = re.fullmatch(r"\s*L?(\d+)\.(?:head|H)?(\d+)@(-?\d+):(-?\d+)\s*", text)
    if m is None:
        raise CircuitGraphError(f"--why-attends {text!r}: write LAYER.HEAD@QUERY:KEY, e.g. 1.3@9:4 (head 3 of block 1, "
                                "query position 9, key position 4)")
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def why_attends(g, text: str, top_k: int) -> dict:
    """The stored QK split of a head's score, or one computed from the graph's model, dictionaries
    and prompt (``metadata``: ``model``, ``dicts``, ``sites``, ``prompt_tokens``)."""
    layer, head, q, k = parse_why(text)
    n_pos = len(g.metadata.get("prompt_tokens", []))
    if n_pos:  # negative positions count from the end, as `circuitgraph qk` counts them
        q, k = (p % n_pos if -n_pos <= p < 0 else p for p in (q, k))
    stored = g.why_attends(layer, head, q, k)
    if stored is not None and min(top_k, stored["n_terms"]) <= len(stored["top_pairs"]):
        return {**stored, "top_pairs": stored["top_pairs"][:top_k], "stored": True}
    meta = g.metadata
    if "prompt_tokens" not in meta or meta.get("method") != "linear":
        raise CircuitGraphError("--why-attends needs a prompt graph (trace --prompt): this graph has no prompt tokens")
    import torch

    from circuitgraph import api
    from circuitgraph.attribution.qk import attribute_qk
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR

    model = api.load_model(meta.get("model") or "default")
    dicts = api.load_dictionaries(meta.get("dicts") or str(DEFAULT_DICTS_DIR))
    from circuitgraph.replacement import ReplacementModel
    from dictionaries.site import Site

    sites = [Site.parse(x) for x in meta.get("sites", [])]
    missing = [s.id for s in sites if s not in dicts]
    if missing or not sites:
        raise CircuitGraphError(f"the graph's dictionaries ({meta.get('dicts')}) no longer hold its sites "
                                f"{missing or '(none recorded)'}; trace again with --qk")
    rm = ReplacementModel(model, {s: dicts[s] for s in sites})
    tokens = torch.tensor([meta["prompt_tokens"]])
    fresh = attribute_qk(rm, tokens, layer, head, q, k).to_dict(top_k)
    if stored is not None:  # more pairs than were stored: the edge's fields, the new pairs
        return {**stored, **fresh, "stored": False}
    return {**fresh, "stored": False}


def run_view(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_distinct, check_writable
    from circuitgraph.viewer.html import load_for_view, to_html

    check_distinct(args.out, args.graph)
    check_writable(args.out, is_file=True)
    if args.max_nodes is not None and args.max_nodes < 1:
        raise CircuitGraphError(f"--max-nodes {args.max_nodes}: show at least one node")
    if args.max_edges < 1:
        raise CircuitGraphError(f"--max-edges {args.max_edges}: show at least one edge")
    path = to_html(load_for_view(args.graph), args.out, args.max_nodes, args.max_edges)
    print(path)
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


def run_export(args: argparse.Namespace) -> int:
    from circuitgraph.graph.graph import Graph
    from circuitgraph.graph.storage import check_distinct, check_writable
    from circuitgraph.viewer.export import export_graph

    check_distinct(args.out, args.graph)
    check_writable(args.out, is_file=True)
    print(export_graph(Graph.load(args.graph), args.out, args.format))
    return 0
