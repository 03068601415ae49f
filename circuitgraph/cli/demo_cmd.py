"""``circuitgraph demo``: the main job on the embedded default model.

Evaluates the model on its four tasks (held-out prompts) and, when the committed dictionaries
are present, reports their L0 / FVU / CE-loss recovered on held-out text.
"""

from __future__ import annotations

import argparse
import json
import time

from circuitgraph.models import resolve_model
from circuitgraph.models.loading import DEFAULT_DICTS_DIR
from circuitgraph.tasks.evaluate import evaluate_tasks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default model")
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=200, help="prompts per task")
    p.add_argument("--dict-seqs", type=int, default=16, help="held-out sequences for the dictionary metrics")
    p.add_argument("--graph-out", default="runs/ioi_circuit", help="where the IOI circuit graph is written")
    p.set_defaults(func=run)


def _ioi_circuit(model, dicts, out: str) -> dict:
    """Build the IOI circuit over every dictionary of the default set, print its faithfulness and the
    features that drive the answer's logit difference, write the graph."""
    from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset
    from circuitgraph.cli.trace_cmd import describe_into
    from circuitgraph.replacement import ReplacementModel
    from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset

    rm = ReplacementModel(model, dicts)
    ds = make_dataset("ioi", model, n=64, seed=0)
    res = trace_dataset(rm, ds, CircuitConfig("attribution", max_nodes=200), make_disjoint_dataset("ioi", model, 64, ds))
    describe_into(res.graph, rm, argparse.Namespace(describe_seqs=128, model="default"), ds.clean_tokens)
    res.graph.save(out)
    e = res.evaluation
    print(f"IOI circuit ({e.n_nodes} nodes: {e.n_feature_nodes} features + {e.n_error_nodes} error nodes), "
          f"on {e.n_prompts} held-out prompts: faithfulness {e.faithfulness:.3f}, features only "
          f"{e.faithfulness_features_only:.3f} (ceiling {e.ceiling:.3f}), errors only {e.faithfulness_errors_only:.3f}, "
          f"completeness {e.completeness:.3f} -> {out}")
    print("top upstream nodes of metric:logit_diff (direct edges):")
    for r in res.graph.upstream("metric:logit_diff", top_k=8):
        print(f"  {r.node:22s} weight={r.weight:+.3f}  {r.label}")
    return {**res.evaluation.to_dict(), "n_edges": res.graph.n_edges, "out": out}


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    model = resolve_model(args.model)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.n_heads} heads, vocab {model.cfg.d_vocab})")
    results = evaluate_tasks(model, n=args.n)
    print("tasks (held-out prompts):")
    for name, summary in results.items():
        print(f"  {name:14s} " + "  ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    if args.model == "default" and DEFAULT_DICTS_DIR.is_dir():
        from circuitgraph.cli.dicts_cmd import EVAL_SEED
        from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
        from dictionaries.metrics import evaluate_dictionaries
        from dictionaries.persistence import load_dictionaries

        dicts = load_dictionaries(DEFAULT_DICTS_DIR)
        corpus = ToyCorpus(CorpusConfig(seed=EVAL_SEED))
        tokens = corpus.tokens(args.dict_seqs)
        metrics = evaluate_dictionaries(model, dicts, tokens, density_tokens=corpus.tokens(500, offset=args.dict_seqs))
        print(f"committed dictionaries ({len(dicts)}, {next(iter(dicts.values())).cfg.arch}; dead fraction over 63k tokens):")
        for site, m in sorted(metrics.items()):
            print(f"  {site.id:16s} L0={m.l0:5.1f}  FVU={m.fvu:.3f}  dead={m.dead_frac:.3f}  CE_recovered={m.ce_recovered:.3f}")
        results["dictionaries"] = {s.id: m.summary() for s, m in sorted(metrics.items())}
        results["ioi_circuit"] = _ioi_circuit(model, dicts, args.graph_out)
    print(json.dumps(results))
    print(f"done in {time.time() - t0:.1f} s")
    return 0
