"""``circuitgraph trace`` (build a graph) and ``circuitgraph query`` (ask it questions)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from circuitgraph.errors import CircuitGraphError

log = logging.getLogger(__name__)

MAX_PATHS = 1000
"""Most paths ``query --paths`` lists (Yen's algorithm: each path is one more shortest-path search)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="build an attribution graph / circuit for a task dataset or one prompt")
    p.add_argument("--model", default="default", help="default, a model folder, a llama2.c .bin, or a TransformerLens name")
    p.add_argument("--dicts", default=None, help="dictionary folder (default: the committed ones for --model default)")
    p.add_argument("--sites", default=None,
                   help="site kinds to splice, e.g. attn_z,clt (default: every site of --dicts; one per output hook)")
    p.add_argument("--layers", default="all", help="layers to splice: all, 0,2 or 1-3")
    p.add_argument("--task", default="ioi", help="task whose prompt dataset is traced")
    p.add_argument("--dataset", default=None, metavar="FILE",
                   help="trace your own prompts instead of --task: a .jsonl / .json / .csv file with prompt (or "
                        "prompt_ids), answer (or answer_ids, or targets at several positions), optional wrong and "
                        "corrupted_prompt per row (docs/datasets.md)")
    p.add_argument("--metric", default=None, choices=["logit_diff", "logprob", "prob_diff", "kl"],
                   help="what dataset circuits explain (default: the task's own; logit_diff for --dataset): answer "
                        "minus wrong logit, log-probability of the answers, probability difference, or KL divergence "
                        "from the clean output distribution. --prompt: logit_diff only (with --answer/--contrast)")
    p.add_argument("--padding-side", default="right", choices=["right", "left"],
                   help="where prompts of different lengths are padded (masked either way; results agree)")
    p.add_argument("--n", type=int, default=64, help="number of prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="trace this one prompt with direct linear attribution instead of a dataset")
    p.add_argument("--answer", default=None,
                   help="--prompt: explain this next token's logit (one token, e.g. ' Mary') instead of the likeliest ones")
    p.add_argument("--contrast", default=None,
                   help="--prompt with --answer: explain the logit difference answer - contrast (e.g. ' John')")
    p.add_argument("--method", default="attribution", choices=["attribution", "ig", "acdc"])
    p.add_argument("--granularity", default="features", choices=["features", "components"],
                   help="dictionary features, or attention heads and MLPs as nodes")
    p.add_argument("--max-nodes", type=int, default=200,
                   help="dataset circuits: node budget, feature and error nodes counted alike")
    p.add_argument("--max-feature-nodes", type=int, default=None,
                   help="dataset circuits: an extra cap on feature nodes; --prompt: features visited (default 1000)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="held-out prompts the circuit is evaluated on (disjoint from the --n selection prompts; "
                        "0: evaluate on the selection prompts only; default 64, or half the rows of --dataset)")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out evaluation prompts")
    p.add_argument("--target-faithfulness", type=float, default=0.0,
                   help="attribution/ig: the smallest circuit (up to --max-nodes) reaching this faithfulness")
    p.add_argument("--target-kind", default="faithfulness", choices=["faithfulness", "faithfulness_features_only"],
                   help="what --target-faithfulness measures (features_only: every error node ablated)")
    p.add_argument("--max-edges", type=int, default=100, help="component circuits: edges kept by attribution / ig")
    p.add_argument("--positions", default="aggregate", choices=["aggregate", "from_end"],
                   help="dataset feature nodes: one per feature (aggregate) or one per feature and position counted "
                        "back from the answer (from_end; ids ...#f@-1 at the answer position)")
    p.add_argument("--ablation", default=None, choices=["patch", "mean", "zero"],
                   help="how nodes outside the circuit are ablated (default: patch with the corrupted prompts; "
                        "mean for a --dataset without corrupted prompts)")
    p.add_argument("--tau", type=float, default=0.002, help="ACDC threshold (fraction of the full-vs-empty metric gap)")
    p.add_argument("--acdc-skip-fraction", type=float, default=0.1,
                   help="ACDC: candidates scored below this fraction of tau form one group removed after one verifying "
                        "test (split and retested when it fails); 0: none")
    p.add_argument("--acdc-keep-factor", type=float, default=4.0,
                   help="ACDC: candidates scored above this many tau are kept untested; inf: test every candidate")
    p.add_argument("--acdc-group-size", type=int, default=8, help="ACDC: first group size (1: test one by one)")
    p.add_argument("--plain-acdc", action="store_true",
                   help="plain ACDC: every candidate tested alone (overrides the three --acdc-* settings)")
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--node-threshold", type=float, default=0.8, help="--prompt: cumulative influence kept when pruning")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="--prompt: cumulative edge influence kept")
    p.add_argument("--describe-seqs", type=int, default=128,
                   help="corpus sequences used to describe the graph's features (features.json, node labels); 0: skip")
    p.add_argument("--out", required=True, help="graph folder to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_trace)

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


def _load(args: argparse.Namespace):
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR, resolve_model
    from circuitgraph.replacement.model import ReplacementModel
    from dictionaries.persistence import load_dictionaries
    from dictionaries.site import expand_sites

    model = resolve_model(args.model)
    if args.granularity == "components":
        return model, None
    if args.dicts is None:
        if args.model != "default":
            raise CircuitGraphError("pass --dicts DIR: committed dictionaries exist only for --model default")
        args.dicts = str(DEFAULT_DICTS_DIR)
    dicts = load_dictionaries(args.dicts)
    kinds = args.sites or ",".join(sorted({s.kind for s in dicts}))
    try:
        wanted = set(expand_sites(kinds, args.layers, model.cfg.n_layers))
    except ValueError as err:
        raise CircuitGraphError(str(err)) from err
    if args.sites is None:
        wanted &= set(dicts)
        by_output: dict[str, list[str]] = {}
        for s in wanted:
            by_output.setdefault(s.output_hook, []).append(s.id)
        clash = sorted(v for v in by_output.values() if len(v) > 1)
        if clash:
            raise CircuitGraphError(f"{args.dicts} holds several dictionaries for one output ({', '.join(clash[0])}); "
                                    "choose the site kinds to splice with --sites, e.g. --sites attn_z,transcoder")
    missing = sorted(s.id for s in wanted - set(dicts))
    if missing:
        raise CircuitGraphError(f"{args.dicts} has no dictionaries for {', '.join(missing)}; train them or change --sites/--layers")
    return model, ReplacementModel(model, {s: d for s, d in dicts.items() if s in wanted})


def _acdc_config(args: argparse.Namespace):
    from circuitgraph.attribution.acdc import AcdcConfig

    try:
        if args.plain_acdc:
            return AcdcConfig.plain(args.tau)
        return AcdcConfig(args.tau, args.acdc_skip_fraction, args.acdc_keep_factor, args.acdc_group_size)
    except ValueError as err:
        raise CircuitGraphError(f"{err}; check --tau / --acdc-*") from err


def run_trace(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_distinct, check_graph_target

    start = time.perf_counter()
    check_graph_target(args.out)  # before any work: a bad --out must not cost a whole trace
    for flag in ("node_threshold", "edge_threshold"):
        value = getattr(args, flag)
        if not 0 < value <= 1:  # NaN fails this too
            raise CircuitGraphError(f"--{flag.replace('_', '-')} {value}: use a fraction in (0, 1]")
    if args.describe_seqs < 0:
        raise CircuitGraphError(f"--describe-seqs {args.describe_seqs}: use 0 (no descriptions) or more")
    check_distinct(args.out, args.dicts, args.model if args.model != "default" else None)
    if args.eval_n is not None and args.eval_n < 0:
        raise CircuitGraphError(f"--eval-n must be >= 0, got {args.eval_n}")
    if args.prompt is not None and args.dataset is not None:
        raise CircuitGraphError("--prompt traces one prompt and --dataset a file of prompts; give one of them")
    if args.prompt is None and (args.answer is not None or args.contrast is not None):
        raise CircuitGraphError("--answer / --contrast choose what a --prompt graph explains; a --task dataset uses "
                                "its own answers")
    if args.prompt is not None and args.metric not in (None, "logit_diff"):
        raise CircuitGraphError(f"--metric {args.metric} is not linear in the logits, and a --prompt graph's edges are "
                                "exact only for a linear target; use --answer/--contrast (a logit difference) or "
                                f"trace a --dataset with --metric {args.metric}")
    if args.prompt is not None and args.metric == "logit_diff" and (args.answer is None or args.contrast is None):
        raise CircuitGraphError("--prompt with --metric logit_diff needs --answer and --contrast (the two tokens)")
    acdc = _acdc_config(args)
    model, rm = _load(args)
    if args.prompt is not None:
        summary = _trace_prompt(args, model, rm)
    else:
        ds, eval_ds = _datasets(args, model)
        if args.granularity == "components":
            from circuitgraph.attribution.components import ComponentCircuitConfig, trace_components

            try:
                cfg = ComponentCircuitConfig(args.method, args.max_edges, acdc, ablation=args.ablation,
                                             ig_steps=args.ig_steps, batch_size=args.batch_size)
            except ValueError as err:
                raise CircuitGraphError(f"{err}; check --max-edges / --ig-steps / --batch-size") from err
            graph, meta = trace_components(model, ds, cfg, eval_ds, metric=args.metric)
            summary = dict(meta)
        else:
            from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
            from dictionaries import distributed

            distributed.maybe_init()  # under torchrun: prompts are sharded over the processes
            try:
                cfg = CircuitConfig(args.method, args.max_nodes, args.max_feature_nodes, args.ablation, args.ig_steps,
                                    args.batch_size, progress=distributed.is_main(),
                                    target_faithfulness=args.target_faithfulness, target_kind=args.target_kind,
                                    positions=args.positions, acdc=acdc)
            except ValueError as err:
                raise CircuitGraphError(f"{err}; check --method / --max-nodes / --target-faithfulness") from err
            graph = trace_dataset(rm, ds, cfg, eval_ds, metric=args.metric).graph
            meta = graph.metadata
            if not distributed.is_main():
                return 0
            summary = {k: v for k, v in meta.items() if k not in ("prompts", "eval_prompts", "budgets_tried", "sites")}
        if meta.get("acdc_suspicious"):
            print(f"warning: ACDC result is suspicious (flag {meta['acdc_suspicious']}: 1 = empty circuit, "
                  "2 = tiny metric gap)", file=sys.stderr)
        graph.metadata["model"] = args.model
        graph.metadata["dicts"] = args.dicts
        if rm is not None:
            describe_into(graph, rm, args, ds.clean_tokens)
        graph.save(args.out)
        summary.update({"n_graph_nodes": graph.n_nodes, "n_edges": graph.n_edges,
                        "seconds": time.perf_counter() - start, "method": args.method,
                        "granularity": args.granularity, "task": args.task if args.dataset is None else args.dataset,
                        "out": args.out})
    if args.json:
        from circuitgraph.graph.graph import json_safe

        print(json.dumps(json_safe(summary), allow_nan=False))
    else:
        for k, v in summary.items():
            print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


def _datasets(args: argparse.Namespace, model):
    """Selection and held-out prompt sets (a built-in task, or the rows of --dataset), and the
    resolved --ablation (patch needs corrupted prompts; a file without them gets mean ablation)."""
    from circuitgraph.tasks.files import dataset_from_file, split_held_out
    from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset

    if args.dataset is None:
        args.ablation = args.ablation or "patch"
        eval_n = 64 if args.eval_n is None else args.eval_n
        ds = make_dataset(args.task, model, n=args.n, seed=args.seed, padding_side=args.padding_side)
        if not eval_n:
            return ds, None
        return ds, make_disjoint_dataset(args.task, model, eval_n, ds, args.eval_seed, padding_side=args.padding_side)
    ds, has_corrupted = dataset_from_file(args.dataset, model, padding_side=args.padding_side)
    if args.ablation is None:
        args.ablation = "patch" if has_corrupted else "mean"
        if not has_corrupted:
            print(f"{args.dataset} has no corrupted prompts: nodes outside the circuit are mean-ablated "
                  "(--ablation mean)", file=sys.stderr)
    elif args.ablation == "patch" and not has_corrupted:
        raise CircuitGraphError(f"--ablation patch needs a corrupted_prompt in every row of {args.dataset}; add them "
                                "or use --ablation mean / zero")
    eval_n = min(64, len(ds) // 2) if args.eval_n is None else args.eval_n
    return split_held_out(ds, eval_n, args.eval_seed)


def _trace_prompt(args: argparse.Namespace, model, rm) -> dict:
    from circuitgraph.attribution.linear import LinearAttributionConfig, attribute_prompt
    from circuitgraph.graph.pruning import prune_graph, scores_of

    if rm is None:
        raise CircuitGraphError("--prompt traces dictionary features; drop --granularity components")
    from circuitgraph.models.tokenizer_files import require_tokenizer
    from circuitgraph.tasks.dataset import check_in_vocabulary

    require_tokenizer(model, "--prompt", "a --dataset file whose rows give prompt_ids and answer_ids")
    check_in_vocabulary(model, args.prompt, "--prompt")
    tokens = model.to_tokens(args.prompt, truncate=False)
    metric = _answer_metric(args, model)
    passes0 = rm.forward_passes
    lcfg = LinearAttributionConfig() if args.max_feature_nodes is None else \
        LinearAttributionConfig(max_feature_nodes=args.max_feature_nodes)
    full = attribute_prompt(rm, tokens, lcfg, metric=metric)
    passes = rm.forward_passes - passes0
    graph = prune_graph(full, args.node_threshold, args.edge_threshold)
    full_scores, pruned_scores = scores_of(full), scores_of(graph)
    graph.metadata.update({"model": args.model, "dicts": args.dicts, "replacement_score": full_scores.replacement,
                           "completeness_score": full_scores.completeness,
                           "pruned_replacement_score": pruned_scores.replacement,
                           "pruned_completeness_score": pruned_scores.completeness})
    describe_into(graph, rm, args, tokens)
    _ablation_effects_into(graph, rm, tokens)
    graph.save(args.out, children={"full": full})
    return {"n_nodes": graph.n_nodes, "n_edges": graph.n_edges, "faithfulness": None, "completeness": None,
            "replacement_score": full_scores.replacement, "completeness_score": full_scores.completeness,
            "full_nodes": full.n_nodes, "full_edges": full.n_edges, "forward_passes": passes,
            "seconds": full.metadata["seconds"], "method": "linear", "out": args.out,
            **_metric_summary(full, metric, args)}


def _answer_metric(args: argparse.Namespace, model):
    """``--answer`` (and ``--contrast``) as the metric a prompt graph explains, or None (likeliest logits)."""
    import torch

    from circuitgraph.attribution.targets import MetricTarget
    from circuitgraph.tasks.dataset import single_token_id

    if args.answer is None:
        if args.contrast is not None:
            raise CircuitGraphError("--contrast needs --answer (the token whose logit it is subtracted from)")
        return None
    answer = single_token_id(model, args.answer)
    if args.contrast is None:  # the answer's logit, mean-centred over the vocabulary like the logit nodes
        c = torch.full((model.cfg.d_vocab,), -1.0 / model.cfg.d_vocab)
        c[answer] += 1.0
        return MetricTarget("answer_logit", c)
    contrast = single_token_id(model, args.contrast)
    if contrast == answer:
        raise CircuitGraphError(f"--answer and --contrast are the same token ({args.answer!r}); the difference is 0")
    return MetricTarget.logit_diff([answer], [contrast], model.cfg.d_vocab)


def _metric_summary(graph, metric, args: argparse.Namespace) -> dict:
    if metric is None:
        return {}
    node = next(i for i, n in enumerate(graph.nodes) if n.kind == "metric")
    return {"metric": metric.name, "metric_value": float(graph.activation[node]), "answer": args.answer,
            "contrast": args.contrast}


def describe_into(graph, rm, args: argparse.Namespace, fallback_tokens) -> None:
    """Describe the graph's feature nodes (contexts, promoted tokens), label them, and keep the
    cards for :meth:`save` (``features.json``). The corpus: the toy corpus for the embedded model,
    else the traced prompts themselves."""
    from circuitgraph.features.descriptions import describe_features
    from dictionaries.site import Site

    if args.describe_seqs <= 0:
        return
    if args.model == "default":
        from circuitgraph.toylang.corpus import ToyCorpus

        corpus = ToyCorpus().sequences(9_000_000, args.describe_seqs)[:, :64]
    else:
        corpus = fallback_tokens[: args.describe_seqs]
    wanted = sorted({(Site.parse(n.site), n.index) for n in graph.nodes if n.kind == "feature"})
    cards = describe_features(rm, wanted, corpus)
    for i, node in enumerate(graph.nodes):
        card = cards.get(f"{node.site}#{node.index}") if node.kind == "feature" else None
        if card is not None:
            graph.labels[i] = card.label
    graph.features = {k: c.to_dict() for k, c in cards.items()}


def _ablation_effects_into(graph, rm, tokens) -> None:
    """For a prompt graph: each feature card gets the per-token log-likelihood change on the
    prompt when that feature is zeroed (shown as underlines by the viewer)."""
    from circuitgraph.features.descriptions import ablation_effect
    from dictionaries.site import Site

    for key in {f"{n.site}#{n.index}" for n in graph.nodes if n.kind == "feature"}:
        site, feature = key.split("#")
        if key in graph.features:
            graph.features[key]["ablation"] = ablation_effect(rm, tokens, Site.parse(site), int(feature))


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
