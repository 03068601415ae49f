"""``circuitgraph tasks``: list the built-in tasks and evaluate a model on them."""

from __future__ import annotations

import argparse
import json

from circuitgraph.errors import TaskError
from circuitgraph.models import resolve_model
from circuitgraph.tasks.evaluate import evaluate_tasks
from circuitgraph.tasks.registry import TASKS, TOY_TASKS, get_task


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the built-in tasks or evaluate a model on them")
    tsub = p.add_subparsers(dest="tasks_command", required=True)
    ls = tsub.add_parser("list", help="print the built-in tasks")
    ls.set_defaults(func=run_list)
    ev = tsub.add_parser("eval", help="evaluate a model on task prompts")
    ev.add_argument("--model", default="default", help="'default', a saved model folder, or a TransformerLens name")
    ev.add_argument("--tasks", default=",".join(TOY_TASKS),
                    help="comma-separated task names (default: the embedded model's tasks; story_names is for story models)")
    ev.add_argument("--n", type=int, default=200, help="prompts per task (default: 200)")
    ev.add_argument("--split", choices=("heldout", "train"), default="heldout",
                    help="word pools of the tested roles: held-out (default) or training")
    ev.add_argument("--seed", type=int, default=0, help="prompt-generation seed")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=run_eval)


def run_list(args: argparse.Namespace) -> int:
    for task in TASKS.values():
        print(f"{task.name:14s} {task.description}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise TaskError("--tasks is empty; name at least one task, e.g. --tasks ioi")
    for name in names:
        get_task(name)
    if args.n <= 0:
        raise TaskError(f"--n {args.n}: the dataset would be empty; use --n 1 or more")
    model = resolve_model(args.model, device=args.device)
    results = evaluate_tasks(model, names, n=args.n, split=args.split, seed=args.seed)
    if args.json:
        print(json.dumps(results))
    else:
        for name, summary in results.items():
            print(f"{name:14s} " + "  ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    return 0
