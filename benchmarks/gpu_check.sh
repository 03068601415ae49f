#!/usr/bin/env bash
# The prompt-graph scaling grid on a GPU, and our GPU edges against our CPU edges.
#
#   make bench-ct-env && bash benchmarks/gpu_check.sh            # CELLS=S,M,L to choose cells
#
# 1. benchmarks/bench_scaling.py with both libraries on cuda (equal work and defaults), written to
#    $OUT/gpu_grid.jsonl (OUT defaults to benchmarks/results);
# 2. each cell built by circuitgraph on the CPU and on cuda (equal-work settings): the sampled
#    edges must agree to 1e-4 relative (max |cpu - cuda| / max |cpu|), written to
#    $OUT/gpu_vs_cpu.jsonl; the script exits 1 when a cell disagrees or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-ct/bin/python}
CELLS=${CELLS:-S,S128,M,M128,L}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
if ! command -v nvidia-smi >/dev/null || ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA GPU here (nvidia-smi missing or torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_name.txt"
"$PY" benchmarks/bench_scaling.py --cells "$CELLS" --modes equal,defaults --device cuda --repeats 3 --json \
    | tee "$OUT/gpu_grid.jsonl"
"$PY" benchmarks/bench_scaling.py --cells "$CELLS" --modes equal --device cpu --check-device cuda --repeats 1 --json \
    | tee "$OUT/gpu_vs_cpu.jsonl"
"$PY" - "$OUT/gpu_vs_cpu.jsonl" <<'EOF'
import json, sys

bad = []
for line in open(sys.argv[1]):
    row = json.loads(line)
    rel = row.get("edges_max_rel_diff")
    ok = rel is not None and rel <= 1e-4 and row.get("same_feature_set")
    print(f"{row['cell']}: cpu {row['ours_s']} s, cuda {row['theirs_s']} s, edges max rel diff {rel}, "
          f"same features {row.get('same_feature_set')}: {'ok' if ok else 'FAIL'}")
    bad += [] if ok else [row["cell"]]
sys.exit(1 if bad else 0)
EOF
