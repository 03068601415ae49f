"""``circuitgraph supernodes``: group a saved graph's features into supernodes, or expand them again."""

from __future__ import annotations

import argparse
import json
import logging

from circuitgraph.errors import CircuitGraphError

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("supernodes", help="collapse a graph's co-acting features into supernodes (or expand them)")
    p.add_argument("graph", help="graph folder written by `circuitgraph trace` (a collapsed one with --expand)")
    p.add_argument("--out", required=True, help="graph folder to write")
    defaults = _find_defaults()
    p.add_argument("--threshold", type=float, default=defaults["threshold"],
                   help="similarity at which two features of a layer are grouped (default: %(default)s)")
    p.add_argument("--min-size", type=int, default=defaults["min_size"],
                   help="smallest group kept as a supernode (default: %(default)s)")
    p.add_argument("--no-decoders", action="store_true",
                   help="group by graph neighbourhood only (default: also decoder similarity, from the graph's dictionaries)")
    p.add_argument("--expand", metavar="ORIGINAL", default=None,
                   help="instead: open the supernodes of GRAPH again using the ORIGINAL graph it was collapsed from")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_supernodes)


def _find_defaults() -> dict:
    """The defaults of :func:`find_supernodes` (the flags show and use them: one place for each)."""
    import inspect

    from circuitgraph.features.supernodes import find_supernodes

    return {k: v.default for k, v in inspect.signature(find_supernodes).parameters.items()}


def _decoder_directions(g, enabled: bool):
    """``[n_features, d_model]`` residual-stream directions of the graph's feature nodes, or None."""
    folder = g.metadata.get("dicts")
    if not enabled or not folder:
        return None
    import torch

    from circuitgraph.features.directions import residual_directions
    from circuitgraph.models.loading import resolve_model
    from dictionaries.errors import DictionaryError
    from dictionaries.persistence import load_dictionaries
    from dictionaries.site import Site

    try:
        dicts = load_dictionaries(folder)
        model = resolve_model(g.metadata.get("model", "default"))
    except (CircuitGraphError, DictionaryError, OSError, ValueError) as err:  # a graph from elsewhere: graph signal only
        log.warning("decoder similarity skipped (%s); grouping by graph neighbourhood only", err)
        return None
    rows = []
    for n in g.nodes:
        if n.kind == "feature":
            site = Site.parse(n.site)
            if site not in dicts:
                return None
            rows.append(residual_directions(model, site, dicts[site])[n.index])
    return torch.stack(rows) if rows else None


def run_supernodes(args: argparse.Namespace) -> int:
    from circuitgraph.features.supernodes import collapse, expand, find_supernodes
    from circuitgraph.graph.graph import Graph
    from circuitgraph.graph.storage import check_distinct, check_graph_target

    check_distinct(args.out, args.graph, args.expand)
    check_graph_target(args.out)
    if not args.expand and not 0 < args.threshold <= 1:
        raise CircuitGraphError(f"--threshold {args.threshold}: use a similarity in (0, 1]")
    if not args.expand and args.min_size < 2:
        raise CircuitGraphError(f"--min-size {args.min_size}: a supernode groups at least 2 features")
    g = Graph.load(args.graph)
    if args.expand:
        out = expand(g, Graph.load(args.expand))
        summary = {"n_nodes": out.n_nodes, "n_edges": out.n_edges, "out": args.out}
    else:
        groups = find_supernodes(g, args.threshold, _decoder_directions(g, not args.no_decoders), min_size=args.min_size)
        out = collapse(g, groups)
        summary = {"n_nodes": out.n_nodes, "n_edges": out.n_edges, "n_supernodes": len(groups),
                   "grouped_features": sum(len(s.members) for s in groups),
                   "supernodes": {s.name: s.members for s in groups}, "out": args.out}
    out.save(args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>16}: {v}")
    return 0
