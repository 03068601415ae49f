"""Dataset circuits of every embedded task, honestly counted: held-out faithfulness at <= 200 nodes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_circuits.py --threads 2 \
        [--methods attribution,ig,acdc,plain_acdc] [--tasks ioi,greater_than]

Sites: attention-z and transcoder dictionaries at every layer (the committed ones). Each circuit is
selected on 64 prompts (seed 0) and evaluated on 64 disjoint held-out prompts (seed 1); ablation
by patching from the corrupted prompts. The node budget counts feature and error nodes alike.
Prints, per task and method: nodes (features + errors), held-out faithfulness, features-only
faithfulness (every error node ablated), errors-only faithfulness (no feature kept), the
features-only ceiling (every feature kept, every error ablated), completeness, the selection-set
faithfulness, and the work done: forward passes of the whole trace and, for ACDC, the metric
evaluations of the search. ``plain_acdc`` is measured, not computed: every candidate whose
ablation changes anything is tested alone (the no-op candidates, whose clean value equals the
ablated one, are removed as one verified group on both sides). ACDC rows have no node budget
unless ``--acdc-max-nodes`` is given (their size is set by tau; a capped set is one ACDC never tested).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.acdc import AcdcConfig  # noqa: E402
from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset  # noqa: E402
from circuitgraph.models.loading import V1_DICTS_DIR, load_default  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset, make_disjoint_dataset  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="ioi,agreement,greater_than,induction")
    ap.add_argument("--methods", default="attribution,ig,acdc", help="attribution, ig, acdc, plain_acdc")
    ap.add_argument("--n", type=int, default=64, help="selection prompts (and as many held-out ones)")
    ap.add_argument("--max-nodes", type=int, default=200)
    ap.add_argument("--tau", type=float, default=0.002)
    ap.add_argument("--acdc-max-nodes", type=int, default=None,
                    help="node budget for ACDC rows (default: none; ACDC's size is set by tau, and a capped set is one "
                         "ACDC never tested)")
    ap.add_argument("--dicts", default=str(V1_DICTS_DIR))
    ap.add_argument("--positions", default="aggregate", choices=["aggregate", "from_end"],
                    help="feature nodes aggregated over positions, or one per offset from the answer position")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    dicts = load_dictionaries(args.dicts)
    rm = ReplacementModel(model, {s: d for s, d in dicts.items() if s.kind in ("attn_z", "transcoder")})
    print(f"# {args.n} selection + {args.n} held-out prompts per task, <= {args.max_nodes} nodes (errors counted), "
          f"patch ablation, {args.threads} threads, positions {args.positions}, dicts {args.dicts}")
    if not args.json:
        print(f"{'task':13s} {'method':11s} {'feat':>4s} {'err':>3s} {'faithful':>8s} {'feat-only':>9s} {'err-only':>8s} "
              f"{'ceiling':>7s} {'complete':>8s} {'select':>6s} {'passes':>6s} {'evals':>5s} {'seconds':>7s}")
    for task in args.tasks.split(","):
        ds = make_dataset(task, model, n=args.n, seed=0)
        held = make_disjoint_dataset(task, model, args.n, ds, seed=1)
        for method in args.methods.split(","):
            acdc = AcdcConfig.plain(args.tau) if method == "plain_acdc" else AcdcConfig(args.tau)
            budget = (args.acdc_max_nodes or 10**9) if "acdc" in method else args.max_nodes
            cfg = CircuitConfig("acdc" if "acdc" in method else method, budget, progress=False,
                                positions=args.positions, acdc=acdc)
            res = trace_dataset(rm, ds, cfg, held)
            e, m = res.evaluation, res.graph.metadata
            row = {"task": task, "method": method, **e.to_dict(), "selection_faithfulness": res.selection.faithfulness,
                   "forward_passes": res.forward_passes, "acdc_evaluations": m.get("acdc_evaluations"),
                   "acdc_candidates_changed": (m["acdc_candidates"] - m["acdc_no_op"]) if "acdc" in method else None,
                   "acdc_rescued": m.get("acdc_rescued"), "acdc_nodes_found": m.get("acdc_nodes_found"), "acdc_suspicious": m.get("acdc_suspicious"),
                   "acdc_capped": m.get("acdc_capped", False), "seconds": res.seconds}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                ev = "" if row["acdc_evaluations"] is None else row["acdc_evaluations"]
                print(f"{task:13s} {method:11s} {e.n_feature_nodes:4d} {e.n_error_nodes:3d} {e.faithfulness:8.3f} "
                      f"{e.faithfulness_features_only:9.3f} {e.faithfulness_errors_only:8.3f} {e.ceiling:7.3f} "
                      f"{e.completeness:8.3f} {res.selection.faithfulness:6.3f} {res.forward_passes:6d} {ev!s:>5s} "
                      f"{res.seconds:7.1f}{' capped' if row['acdc_capped'] else ''}", flush=True)


if __name__ == "__main__":
    main()
