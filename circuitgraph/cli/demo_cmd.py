"""``circuitgraph demo``: the main job on the embedded default model."""

from __future__ import annotations

import argparse
import json
import time

from circuitgraph.models import resolve_model
from circuitgraph.tasks.evaluate import evaluate_tasks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default model")
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=200, help="prompts per task")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    model = resolve_model(args.model)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.n_heads} heads, vocab {model.cfg.d_vocab})")
    results = evaluate_tasks(model, n=args.n)
    for name, summary in results.items():
        print(f"  {name:14s} " + "  ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    print(json.dumps(results))
    print(f"done in {time.time() - t0:.1f} s")
    return 0
