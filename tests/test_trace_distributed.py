"""Data-parallel dataset tracing with torchrun: 2 CPU processes give the single-process circuit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from circuitgraph.graph.graph import Graph

ARGS = ["trace", "--task", "greater_than", "--n", "12", "--method", "acdc", "--tau", "0.01", "--max-feature-nodes", "60", "--eval-n", "12",
        "--batch-size", "4", "--describe-seqs", "0", "--json"]


def _run(cmd: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_match_one(tmp_path) -> None:
    single = _run([sys.executable, "-m", "circuitgraph", *ARGS, "--out", str(tmp_path / "one")], tmp_path)
    # torchrun's own parser would take --n for one of its options: the arguments go in a script
    script = tmp_path / "trace_two.py"
    script.write_text("import sys\nfrom circuitgraph.cli.main import main\n"
                      f"sys.exit(main({[*ARGS, '--out', str(tmp_path / 'two')]!r}))\n")
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
                str(script)], tmp_path)
    assert ddp["n_nodes"] == single["n_nodes"] and ddp["n_edges"] == single["n_edges"]
    assert abs(ddp["faithfulness"] - single["faithfulness"]) < 1e-4
    a, b = Graph.load(tmp_path / "one"), Graph.load(tmp_path / "two")
    assert [n.id for n in a.nodes] == [n.id for n in b.nodes]
    assert torch.allclose(a.node_scores, b.node_scores, atol=1e-5, rtol=1e-4)
    assert torch.allclose(a.weights, b.weights, atol=1e-5, rtol=1e-3)
    assert b.metadata["world_size"] == 2 and a.metadata["world_size"] == 1
