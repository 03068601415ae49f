"""Dataset circuits of every embedded task: faithfulness at <= 200 feature nodes, and ACDC's passes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_circuits.py --threads 2 [--methods attribution,ig,acdc]

Sites: attention-z and transcoder dictionaries at every layer (the committed ones); 64 held-out
prompts per task; ablation by patching from the corrupted prompts. Prints one row per task and
method: feature / error nodes, faithfulness, completeness, forward passes (and plain ACDC's).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from circuitgraph.attribution.circuit import CircuitConfig, trace_dataset  # noqa: E402
from circuitgraph.models.loading import DEFAULT_DICTS_DIR, load_default  # noqa: E402
from circuitgraph.replacement import ReplacementModel  # noqa: E402
from circuitgraph.tasks.registry import make_dataset  # noqa: E402
from dictionaries.persistence import load_dictionaries  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="ioi,agreement,greater_than,induction")
    ap.add_argument("--methods", default="attribution,ig,acdc")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-feature-nodes", type=int, default=200)
    ap.add_argument("--tau", type=float, default=0.002)
    ap.add_argument("--positions", default="aggregate", choices=["aggregate", "from_end"],
                    help="feature nodes aggregated over positions, or one per offset from the answer position")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_default()
    dicts = load_dictionaries(DEFAULT_DICTS_DIR)
    rm = ReplacementModel(model, {s: d for s, d in dicts.items() if s.kind in ("attn_z", "transcoder")})
    print(f"{'task':13s} {'method':12s} {'features':>8s} {'errors':>6s} {'faithful':>8s} {'complete':>8s} "
          f"{'passes':>7s} {'plain':>6s} {'seconds':>7s}")
    for task in args.tasks.split(","):
        ds = make_dataset(task, model, n=args.n, seed=0)
        for method in args.methods.split(","):
            res = trace_dataset(rm, ds, CircuitConfig(method, args.max_feature_nodes, tau=args.tau, progress=False,
                                                          positions=args.positions))
            m = res.graph.metadata
            passes = m.get("acdc_forward_passes", m["forward_passes"])
            plain = m.get("plain_acdc_forward_passes", "")
            print(f"{task:13s} {method:12s} {m['n_feature_nodes']:8d} {m['n_error_nodes']:6d} {m['faithfulness']:8.3f} "
                  f"{m['completeness']:8.3f} {passes:7d} {plain!s:>6s} {res.seconds:7.1f}")


if __name__ == "__main__":
    main()
