"""How many feature nodes a dataset circuit needs as the dataset grows (why induction is large).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/study_circuit_scaling.py --threads 2

For each task and each dataset size n (disjoint groups of held-out prompts, up to ``--groups`` per
size), attribution-patching scores pick the top features; the study reports the fewest of them
whose circuit reaches faithfulness 0.8 (doubling + bisection, ``smallest_circuit``) and the
faithfulness of the top 200. A task whose prompts share one mechanism needs about the same
number of features at every n; a task whose prompts each need their own token-specific features
(induction copies random words) needs a number that grows with n. How the prompts are corrupted
matters as much: ``induction`` corrupts only the answer's first occurrence (a minimal pair), while
``induction_span`` replaces the whole first occurrence, so every feature before the repetition is
patched and the circuit must restore them.
Sites: the committed attention-z and transcoder dictionaries at every layer; patch ablation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.ablation import Ablator, faithfulness_ratio  # noqa: E402
from circuitgraph.attribution.circuit import select_top, smallest_circuit  # noqa: E402
from circuitgraph.attribution.dataset import DatasetAttributionConfig, score_nodes  # noqa: E402
from circuitgraph.models.loading import V1_DICTS_DIR, load_default  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.dataset import build_dataset  # noqa: E402
from circuitgraph.tasks.registry import make_dataset  # noqa: E402
from circuitgraph.toylang import templates as tp  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402


def dataset(task: str, model, n: int):
    """A task's 64 held-out prompts; two induction variants for the study:
    ``induction_span``: the prompts of ``make_dataset("induction")`` (same clean prompts, answers and
    wrong answers) with the whole first occurrence corrupted; ``induction_wordsK``: induction whose
    cue (the word before the answer, which the induction head looks up), answer and wrong answer
    come from a pool of only K words (the rest of the span stays random)."""
    if task == "induction_span":
        rng = random.Random("induction:heldout:0")  # make_dataset's stream for induction
        return build_dataset(task, [tp.induction(rng, corrupt="span") for _ in range(n)], model, "logit_diff")
    if task.startswith("induction_words"):
        rng = random.Random(f"{task}:0")
        pool = tp.random_span(rng, int(task.removeprefix("induction_words")))
        return build_dataset(task, [_pooled_induction(rng, pool) for _ in range(n)], model, "logit_diff")
    return make_dataset(task, model, n=n, seed=0)


def _pooled_induction(rng: random.Random, pool: list[str], span_len: int = 10) -> tp.TaskInstance:
    span = tp.random_span(rng, span_len)
    cut = rng.randint(1, span_len - 1)
    cue, answer, wrong = rng.sample(sorted(set(pool)), 3)
    span[cut - 1], span[cut] = cue, answer
    first = span[:cut] + [wrong] + span[cut + 1 :]
    return tp.TaskInstance("".join(span) + "".join(span[:cut]), (answer,), (wrong,),
                           "".join(first) + "".join(span[:cut]), "".join(span[cut:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="induction,induction_span,ioi",
                    help="task names; induction_span: induction with its whole first occurrence corrupted; "
                         "induction_wordsK: induction whose cue and answers come from K words")
    ap.add_argument("--sizes", default="1,4,16,64")
    ap.add_argument("--groups", type=int, default=4, help="disjoint prompt groups per size (fewer when 64/n is less)")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--budget", type=int, default=200, help="node budget (feature and error nodes counted alike)")
    ap.add_argument("--dicts", default=str(V1_DICTS_DIR), help="dictionary folder (default: the first committed set, v1)")
    ap.add_argument("--method", default="attribution", choices=["attribution", "ig"], help="node scores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    dicts = load_dictionaries(args.dicts)
    rm = ReplacementModel(model, {s: d for s, d in dicts.items() if s.kind in ("attn_z", "transcoder")})
    acfg = DatasetAttributionConfig(args.method, progress=False)
    rows = []
    for task in args.tasks.split(","):
        full = dataset(task, model, 64)
        for n in (int(x) for x in args.sizes.split(",")):
            needed, at_budget = [], []
            for g in range(min(args.groups, 64 // n)):
                ds = full.subset(slice(g * n, (g + 1) * n))
                scores = score_nodes(rm, ds, acfg)
                ablator = Ablator(rm, scores.runs, "patch")
                found = smallest_circuit(ablator, scores, args.target, max_nodes=8192)
                top = select_top(scores, args.budget)
                at_budget.append(faithfulness_ratio(ablator.metric(top), ablator.full(), ablator.empty()))
                needed.append(found.circuit.n_nodes() if found.reached else float("nan"))
            row = {"task": task, "method": args.method, "n_prompts": n, "groups": len(needed),
                   "nodes_for_target_median": statistics.median(needed),
                   "nodes_per_prompt": round(statistics.median(needed) / n, 1),
                   f"faithfulness_at_{args.budget}_nodes_median": round(statistics.median(at_budget), 3),
                   "nodes_for_target": needed, f"faithfulness_at_{args.budget}_nodes": [round(x, 3) for x in at_budget]}
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
