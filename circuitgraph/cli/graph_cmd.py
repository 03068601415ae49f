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
    if args.paths:
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
    else:
        for r in rows:
            sys.stdout.write("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()) + "\n")
    return 0


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
