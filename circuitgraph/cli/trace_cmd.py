"""``circuitgraph trace``: an attribution graph of one prompt, or a circuit of a prompt dataset.

The method settings are not declared here: their flags are generated from the config dataclasses
the Python API uses (:class:`~circuitgraph.attribution.circuit.CircuitConfig` for dataset circuits,
:class:`~circuitgraph.attribution.components.ComponentCircuitConfig` for component circuits,
:class:`~circuitgraph.attribution.linear.LinearAttributionConfig` for prompt graphs, whose two
clashing names get a ``prompt-`` prefix), so every default and its documentation live in one
place. The work itself is :func:`circuitgraph.api.trace`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
import time

from circuitgraph.cli.config_flags import given_flags
from circuitgraph.errors import CircuitGraphError

log = logging.getLogger(__name__)



def _prune_default(name: str) -> float:
    from circuitgraph.graph.pruning import prune_graph

    return inspect.signature(prune_graph).parameters[name].default


def register(sub: argparse._SubParsersAction) -> None:
    from circuitgraph.attribution.circuit import CircuitConfig
    from circuitgraph.attribution.components import ComponentCircuitConfig
    from circuitgraph.attribution.linear import PROMPT_RENAME, LinearAttributionConfig
    from circuitgraph.attribution.prompt.qk_attach import QKAttachConfig
    from circuitgraph.cli.config_flags import add_dataclass_flags
    from dictionaries.config import flat_fields

    p = sub.add_parser("trace", help="build an attribution graph / circuit for a task dataset or one prompt",
                       description=__doc__.splitlines()[0])
    what = p.add_argument_group("what to trace")
    what.add_argument("--model", default="default", help="default, a model folder (ours or Hugging Face), a llama2.c "
                                                         ".bin, or a TransformerLens name (docs/models.md)")
    what.add_argument("--dicts", default=None, help="dictionaries: our folder, SAELens / sparsify / circuit-tracer / "
                      "Gemma Scope files, or hf:ORG/REPO[/PATH] (default: the committed set of --model default)")
    what.add_argument("--sites", default=None,
                      help="site kinds to splice, e.g. attn_z,clt (default: every site of --dicts; one per output hook)")
    what.add_argument("--layers", default="all", help="layers to splice: all, 0,2 or 1-3")
    what.add_argument("--task", default=None, help="built-in task whose prompt dataset is traced (default: ioi)")
    what.add_argument("--dataset", default=None, metavar="FILE",
                      help="trace your own prompts instead of --task: a .jsonl / .json / .csv file with prompt (or "
                           "prompt_ids), answer (or answer_ids, or targets at several positions), optional wrong and "
                           "corrupted_prompt per row (docs/datasets.md)")
    what.add_argument("--metric", default=None, choices=["logit_diff", "logprob", "prob_diff", "kl"],
                      help="what dataset circuits explain (default: the task's own; logit_diff for --dataset): answer "
                           "minus wrong logit, log-probability of the answers, probability difference, or KL divergence "
                           "from the clean output distribution. --prompt: logit_diff only (with --answer/--contrast)")
    what.add_argument("--padding-side", default=None, choices=["right", "left"],
                      help="where prompts of different lengths are padded (masked either way; results agree; "
                           "default: right)")
    what.add_argument("--n", type=int, default=None, help="--task: selection prompts (default: 64)")
    what.add_argument("--seed", type=int, default=None, help="--task: seed of the selection prompts (default: 0)")
    what.add_argument("--eval-n", type=int, default=None,
                      help="held-out prompts the circuit is evaluated on (disjoint from the selection prompts; "
                           "0: evaluate on the selection prompts only; default 64, or half the rows of --dataset, "
                           "at most 64)")
    what.add_argument("--eval-seed", type=int, default=None,
                      help="seed of the held-out prompts (or of the row shuffle; default: 1)")
    what.add_argument("--prompt", default=None, help="trace this one prompt with direct linear attribution instead of a dataset")
    what.add_argument("--answer", default=None,
                      help="--prompt: explain this next token's logit (one token, e.g. ' Mary') instead of the likeliest ones")
    what.add_argument("--contrast", default=None,
                      help="--prompt with --answer: explain the logit difference answer - contrast (e.g. ' John')")
    what.add_argument("--granularity", default="features", choices=["features", "components"],
                      help="dictionary features, or attention heads and MLPs as nodes")

    circuit = p.add_argument_group("dataset circuits (CircuitConfig)")
    shared = add_dataclass_flags(circuit, CircuitConfig, skip=("progress",), aliases={"acdc_tau": ["--tau"]})
    circuit.add_argument("--plain-acdc", action="store_true", default=None,
                         help="plain ACDC: every candidate tested alone (sets --acdc-skip-fraction 0, --acdc-keep-factor "
                              "inf, --acdc-group-size 1)")
    comp = p.add_argument_group("component circuits (ComponentCircuitConfig; the shared settings above apply too)")
    comp_only = add_dataclass_flags(comp, ComponentCircuitConfig, skip=(*shared, "progress"))
    prompt = p.add_argument_group("prompt graphs (LinearAttributionConfig) and their pruning")
    prompt_flags = add_dataclass_flags(prompt, LinearAttributionConfig, skip=("progress",), rename=PROMPT_RENAME)
    prompt.add_argument("--qk", action="store_true", default=None,
                        help="attach head loadings of the pruned graph's edges into attention features and QK pairs "
                             "of the strongest cross-position ones (why the head attended; query --why-attends)")
    qk_flags = add_dataclass_flags(prompt, QKAttachConfig, prefix="qk_")
    prompt.add_argument("--node-threshold", type=float, default=None,
                        help=f"cumulative influence kept when pruning (default: {_prune_default('node_threshold')})")
    prompt.add_argument("--edge-threshold", type=float, default=None,
                        help=f"cumulative edge influence kept when pruning (default: {_prune_default('edge_threshold')})")
    out = p.add_argument_group("output")
    out.add_argument("--describe-seqs", type=int, default=128,
                     help="corpus sequences used to describe the graph's features (features.json, node labels); 0: skip")
    out.add_argument("--out", required=True, help="graph folder to write")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_trace, _flag_groups={
        "task": ["task", "n", "seed"],
        "dataset": ["eval_n", "eval_seed", "padding_side", "plain_acdc", *shared, *comp_only],
        "features": [n for n in shared if n not in flat_fields(ComponentCircuitConfig)],
        "components": list(comp_only),
        "prompt": ["node_threshold", "edge_threshold", "qk", *("qk_" + n for n in qk_flags),
                   *(PROMPT_RENAME.get(n, n) for n in prompt_flags)],
    })



def _refuse_unused(args: argparse.Namespace) -> None:
    """Refuse flags the chosen mode would silently ignore, naming them and what they belong to."""
    groups = args._flag_groups
    if args.prompt is not None and args.max_feature_nodes is not None:
        raise CircuitGraphError("--max-feature-nodes caps dataset circuits; a --prompt graph's budget is "
                                "--prompt-max-feature-nodes (features visited)")
    if args.prompt is None and args.prompt_max_feature_nodes is not None:
        raise CircuitGraphError("--prompt-max-feature-nodes is the budget of a --prompt graph; a dataset circuit's "
                                "sizes are --max-nodes and --max-feature-nodes")
    qk_given = given_flags(args, [n for n in groups["prompt"] if n.startswith("qk_")])
    if qk_given and not args.qk:
        raise CircuitGraphError(f"{', '.join(qk_given)} set(s) what --qk attaches; add --qk or drop them")
    if args.qk and args.prompt is not None:
        from circuitgraph.attribution.prompt.qk_attach import QKAttachConfig
        from circuitgraph.cli.config_flags import dataclass_from_flags

        try:  # before the graph is built
            dataclass_from_flags(QKAttachConfig, args, prefix="qk_")
        except ValueError as err:
            raise CircuitGraphError(f"{err}; check --qk-edges / --qk-top-k") from err
    if args.prompt is not None:
        mode = "--prompt (one prompt graph)"
        unused = {"a --task dataset": "task", "dataset circuits": "dataset"}
    elif args.dataset is not None:
        mode = f"--dataset {args.dataset}"
        unused = {"a built-in --task's prompts": "task", "--prompt graphs": "prompt"}
    else:
        mode = f"--task {args.task or 'ioi'}"
        unused = {"--prompt graphs": "prompt"}
    for owner, group in unused.items():
        given = given_flags(args, groups[group])
        if given:
            one = len(given) == 1
            raise CircuitGraphError(f"{', '.join(given)} {'is' if one else 'are'} for {owner}, which {mode} does not "
                                    f"use; drop {'it' if one else 'them'}")
    if args.prompt is None:
        method = args.method or "attribution"
        by_method = {"ig": [n for n in ("ig_steps",) if getattr(args, n, None) is not None],
                     "acdc": [n for n in vars(args) if n.startswith("acdc_") and getattr(args, n) is not None]
                     + (["plain_acdc"] if args.plain_acdc else [])}
        for needs, names in by_method.items():
            if names and method != needs:
                flags = ", ".join("--" + n.replace("_", "-") for n in names)
                raise CircuitGraphError(f"{flags} set(s) --method {needs}, but the method is {method}; add --method "
                                        f"{needs} or drop {flags}")
        if getattr(args, "target_kind", None) is not None and not getattr(args, "target_faithfulness", None):
            raise CircuitGraphError("--target-kind says which faithfulness --target-faithfulness aims at; give "
                                    "--target-faithfulness too, or drop --target-kind")
        other = "components" if args.granularity == "features" else "features"
        given = given_flags(args, groups[other])
        if given:
            one = len(given) == 1
            raise CircuitGraphError(f"{', '.join(given)} {'is' if one else 'are'} for --granularity {other}, but "
                                    f"--granularity is {args.granularity}; drop {'it' if one else 'them'} or use "
                                    f"--granularity {other}")


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Defaults of the flags left unset so that :func:`_refuse_unused` could tell given from default."""
    defaults = {"task": "ioi", "n": 64, "seed": 0, "eval_seed": 1, "padding_side": "right",
                "node_threshold": _prune_default("node_threshold"), "edge_threshold": _prune_default("edge_threshold"),
                "plain_acdc": False, "qk": False}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _load(args: argparse.Namespace):
    """The model and, for feature graphs, the replacement model of ``--dicts`` / ``--sites`` / ``--layers``."""
    from circuitgraph import api
    from circuitgraph.models.loading import DEFAULT_DICTS_DIR

    model = api.load_model(args.model)
    if args.granularity == "components":
        return model, None
    if args.dicts is None:
        if args.model != "default":
            raise CircuitGraphError("pass --dicts DIR: committed dictionaries exist only for --model default")
        args.dicts = str(DEFAULT_DICTS_DIR)
    dicts = api.load_dictionaries(args.dicts)
    return model, api.replacement_model(model, dicts, args.sites, args.layers, source=args.dicts)


def _check_args(args: argparse.Namespace) -> None:
    """Refusals that need no model: before any work."""
    from circuitgraph.graph.storage import check_distinct, check_graph_target

    check_graph_target(args.out)  # a bad --out must not cost a whole trace
    if args.prompt is not None and args.dataset is not None:
        raise CircuitGraphError("--prompt traces one prompt and --dataset a file of prompts; give one of them")
    _refuse_unused(args)
    _resolve_defaults(args)
    for flag in ("node_threshold", "edge_threshold"):
        value = getattr(args, flag)
        if not 0 < value <= 1:  # NaN fails this too
            raise CircuitGraphError(f"--{flag.replace('_', '-')} {value}: use a fraction in (0, 1]")
    if args.describe_seqs < 0:
        raise CircuitGraphError(f"--describe-seqs {args.describe_seqs}: use 0 (no descriptions) or more")
    check_distinct(args.out, args.dicts, args.model if args.model != "default" else None)
    if args.eval_n is not None and args.eval_n < 0:
        raise CircuitGraphError(f"--eval-n must be >= 0, got {args.eval_n}")
    if args.prompt is None:
        if args.answer is not None or args.contrast is not None:
            source = f"--dataset {args.dataset} gives its answers in its rows" if args.dataset else \
                "a --task dataset uses its own answers"
            raise CircuitGraphError(f"--answer / --contrast choose what a --prompt graph explains; {source}")
        return
    if args.contrast is not None and args.answer is None:
        raise CircuitGraphError("--contrast needs --answer (the token whose logit it is subtracted from)")
    if args.metric not in (None, "logit_diff"):
        raise CircuitGraphError(f"--metric {args.metric} is not linear in the logits, and a --prompt graph's edges are "
                                "exact only for a linear target; use --answer/--contrast (a logit difference) or "
                                f"trace a --dataset with --metric {args.metric}")
    if args.metric == "logit_diff" and (args.answer is None or args.contrast is None):
        raise CircuitGraphError("--prompt with --metric logit_diff needs --answer and --contrast (the two tokens)")


def _config(cls: type, args: argparse.Namespace, **overrides):
    from circuitgraph.cli.config_flags import dataclass_from_flags

    if args.plain_acdc and cls.__name__ != "LinearAttributionConfig":
        overrides.update(acdc_skip_fraction=0.0, acdc_keep_factor=math.inf, acdc_group_size=1)
    from circuitgraph.attribution.linear import PROMPT_RENAME

    rename = PROMPT_RENAME if cls.__name__ == "LinearAttributionConfig" else None
    try:
        return dataclass_from_flags(cls, args, rename=rename, **overrides)
    except ValueError as err:
        raise CircuitGraphError(f"{err}; check the {cls.__name__} flags (circuitgraph trace --help)") from err


def run_trace(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_args(args)
    model, rm = _load(args)
    if args.prompt is not None:
        summary = _trace_prompt(args, model, rm)
    else:
        summary = _trace_dataset(args, model, rm, start)
        if summary is None:  # a torchrun rank other than 0
            return 0
    if args.json:
        from circuitgraph.graph.graph import json_safe

        print(json.dumps(json_safe(summary), allow_nan=False))
    else:
        for k, v in summary.items():
            print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


def _trace_dataset(args: argparse.Namespace, model, rm, start: float) -> dict | None:
    from circuitgraph import api
    from circuitgraph.attribution.circuit import CircuitConfig
    from circuitgraph.attribution.components import ComponentCircuitConfig
    from dictionaries import distributed

    select, held_out = _datasets(args, model)
    if args.granularity == "components":
        cfg = _config(ComponentCircuitConfig, args, ablation=args.ablation or select.default_ablation)
        graph = api.trace(model, None, select, eval_data=held_out, granularity="components", metric=args.metric,
                          config=cfg)
        summary = dict(graph.metadata)
    else:
        distributed.maybe_init()  # under torchrun: prompts are sharded over the processes
        cfg = _config(CircuitConfig, args, progress=distributed.is_main(),
                      ablation=args.ablation or select.default_ablation)
        graph = api.trace(rm, None, select, eval_data=held_out, metric=args.metric, config=cfg)
        if not distributed.is_main():
            return None
        summary = {k: v for k, v in graph.metadata.items() if k not in ("prompts", "eval_prompts", "budgets_tried", "sites")}
    if graph.metadata.get("acdc_suspicious"):
        print(f"warning: ACDC result is suspicious (flag {graph.metadata['acdc_suspicious']}: 1 = empty circuit, "
              "2 = tiny metric gap)", file=sys.stderr)
    graph.metadata["model"] = args.model
    graph.metadata["dicts"] = args.dicts
    if rm is not None:
        describe_into(graph, rm, args, select.data.clean_tokens)
    graph.save(args.out)
    summary.update({"n_graph_nodes": graph.n_nodes, "n_edges": graph.n_edges, "seconds": time.perf_counter() - start,
                    "method": cfg.method, "granularity": args.granularity, "ablation": cfg.ablation,
                    "task": args.task if args.dataset is None else args.dataset, "out": args.out})
    return summary


def _datasets(args: argparse.Namespace, model):
    """Selection and held-out prompt sets: a built-in task (held-out prompts drawn disjoint), or the
    rows of --dataset (shuffled with --eval-seed and split). Says so when a file has no corrupted
    prompts (then circuits use mean ablation)."""
    from circuitgraph.tasks.files import dataset_from_file
    from circuitgraph.tasks.prompts import PromptDataset
    from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset

    if args.dataset is None:
        eval_n = 64 if args.eval_n is None else args.eval_n
        ds = make_dataset(args.task, model, n=args.n, seed=args.seed, padding_side=args.padding_side)
        held = make_disjoint_dataset(args.task, model, eval_n, ds, args.eval_seed, padding_side=args.padding_side) \
            if eval_n else None
        return PromptDataset(ds, True), None if held is None else PromptDataset(held, True)
    ds, has_corrupted = dataset_from_file(args.dataset, model, padding_side=args.padding_side)
    data = PromptDataset(ds, has_corrupted)
    if args.ablation == "patch" and not has_corrupted:
        raise CircuitGraphError(f"--ablation patch needs a corrupted_prompt in every row of {args.dataset}; add them "
                                "or use --ablation mean / zero")
    if args.ablation is None and not has_corrupted:
        print(f"{args.dataset} has no corrupted prompts: nodes outside the circuit are mean-ablated "
              "(--ablation mean)", file=sys.stderr)
    eval_n = min(64, len(ds) // 2) if args.eval_n is None else args.eval_n
    if eval_n == 0:
        why = "--eval-n 0" if args.eval_n == 0 else f"{args.dataset} has {len(ds)} row: too few to hold one out"
        print(f"{why}: the circuit is evaluated on the prompts it was selected on (its faithfulness is then "
              "optimistic; add rows for a held-out evaluation)", file=sys.stderr)
    return data.split(eval_n, args.eval_seed)


def _trace_prompt(args: argparse.Namespace, model, rm) -> dict:
    from circuitgraph import api
    from circuitgraph.attribution.linear import LinearAttributionConfig
    from circuitgraph.graph.pruning import prune_graph, scores_of
    from circuitgraph.models.tokenizer_files import require_tokenizer

    if rm is None:
        raise CircuitGraphError("--prompt traces dictionary features; drop --granularity components")
    require_tokenizer(model, "--prompt", "a --dataset file whose rows give prompt_ids and answer_ids")
    if args.qk:
        from circuitgraph.attribution.prompt.qk_attach import require_attention_sites

        require_attention_sites(rm)  # before the build
    tokens = api.prompt_tokens(model, args.prompt)
    passes0 = rm.forward_passes
    full = api.trace(rm, None, tokens, answer=args.answer, contrast=args.contrast,
                     config=_config(LinearAttributionConfig, args))
    passes = rm.forward_passes - passes0
    graph = prune_graph(full, args.node_threshold, args.edge_threshold)
    full_scores, pruned_scores = scores_of(full), scores_of(graph)
    graph.metadata.update({"model": args.model, "dicts": args.dicts, "replacement_score": full_scores.replacement,
                           "completeness_score": full_scores.completeness,
                           "pruned_replacement_score": pruned_scores.replacement,
                           "pruned_completeness_score": pruned_scores.completeness})
    qk = {}
    if args.qk:
        from circuitgraph.attribution.prompt.qk_attach import QKAttachConfig, attach_qk
        from circuitgraph.cli.config_flags import dataclass_from_flags

        start = time.perf_counter()
        try:
            qk_cfg = dataclass_from_flags(QKAttachConfig, args, prefix="qk_")
        except ValueError as err:
            raise CircuitGraphError(str(err)) from err
        info = attach_qk(graph, rm, tokens, qk_cfg, also=full)
        qk = {"qk_edges_with_loadings": len(info["loadings"]), "qk_pairs": len(info["pairs"]),
              "qk_seconds": time.perf_counter() - start}
    describe_into(graph, rm, args, tokens)
    _ablation_effects_into(graph, rm, tokens)
    graph.save(args.out, children={"full": full})
    return {**qk, "n_nodes": graph.n_nodes, "n_edges": graph.n_edges, "faithfulness": None, "completeness": None,
            "replacement_score": full_scores.replacement, "completeness_score": full_scores.completeness,
            "full_nodes": full.n_nodes, "full_edges": full.n_edges,
            "visited_features": full.metadata["n_visited_features"], "active_features": full.metadata["n_active_features"],
            "forward_passes": passes,
            "seconds": full.metadata["seconds"], "method": "linear", "out": args.out, **_metric_summary(full, args)}


def _metric_summary(graph, args: argparse.Namespace) -> dict:
    node = next((i for i, n in enumerate(graph.nodes) if n.kind == "metric"), None)
    if node is None:
        return {}
    return {"metric": graph.nodes[node].id.split(":", 1)[1], "metric_value": float(graph.activation[node]),
            "answer": args.answer, "contrast": args.contrast}


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
