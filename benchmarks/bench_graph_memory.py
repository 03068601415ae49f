"""Peak memory of a sparse attribution graph against a dense N x N float32 adjacency at 20k nodes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_graph_memory.py --threads 2

Each variant runs in a fresh child process that reports its peak resident memory above the
interpreter's baseline (after importing torch): the dense variant allocates the N x N matrix,
writes the edges and computes influence with dense products; the sparse one builds our Graph,
saves it, computes influence and prunes it. Prints both peaks and their ratio (target <= 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, os
import torch
torch.set_num_threads(int(sys.argv[4]))
n, e, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g = torch.Generator().manual_seed(0)
# a layered DAG: edges go from lower to higher node index
src = torch.randint(0, n - 1, (e,), generator=g)
tgt = (src + 1 + torch.randint(0, n // 8, (e,), generator=g)).clamp(max=n - 1)
w = torch.randn(e, generator=g)
out_w = torch.zeros(n); out_w[-10:] = 0.1
if mode == "dense":
    a = torch.zeros(n, n)
    a[tgt, src] = w
    a = a.abs()
    a = a / a.sum(1, keepdim=True).clamp(min=1e-30)
    x, total = out_w.clone(), torch.zeros(n)
    for _ in range(50):
        x = x @ a
        total += x
else:
    from circuitgraph.graph.graph import Graph
    from circuitgraph.graph.nodes import Node
    from circuitgraph.graph.pruning import prune_graph
    nodes = [Node("feature", float(i // 1000), "L0.resid_post", i, 1) for i in range(n - 10)]
    nodes += [Node("logit", 1e3, index=i, pos=1) for i in range(10)]
    graph = Graph(nodes, torch.rand(n), src, tgt, w, out_w)
    pruned = prune_graph(graph, 0.8, 0.98)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak - base}))
"""


def run(n: int, e: int, mode: str, threads: int) -> int:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(e), mode, str(threads)], capture_output=True,
                         text=True, check=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20_000)
    ap.add_argument("--edges", type=int, default=2_000_000, help="about 100 per node, as in a dense prompt graph")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sparse = run(args.nodes, args.edges, "sparse", args.threads)
    dense = run(args.nodes, args.edges, "dense", args.threads)
    print(f"{args.nodes} nodes, {args.edges} edges; dense N x N float32 matrix alone: {args.nodes ** 2 * 4 / 2 ** 20:.0f} MiB")
    print(f"peak memory above baseline: sparse graph {sparse / 1024:.0f} MiB, dense {dense / 1024:.0f} MiB")
    print("work: dense = N x N float32 adjacency, the edges written, row-normalised, influence by 50 dense products; "
          "sparse = our Graph of the same edges, influence, then pruning (more work than the dense side)")
    print(f"ratio sparse / dense: {sparse / dense:.3f}   (target <= 0.25)")


if __name__ == "__main__":
    main()
