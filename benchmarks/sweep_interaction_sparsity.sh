#!/bin/bash
# The 500k-token sweep of interaction weightings in the README (about 4 minutes per run on 2 cores).
#   bash benchmarks/sweep_interaction_sparsity.sh
set -e
export OMP_WAIT_POLICY=PASSIVE
train() {  # out penalty weighting
  .venv/bin/circuitgraph --threads 2 train-dictionaries --model default --sites attn_z,transcoder --layers all \
    --arch topk --k 16 --expansion 4 --tokens 500k --interaction-pairs all --out "$1" \
    --interaction-penalty "$2" --interaction-weighting "$3" > /dev/null
}
train runs/sweep/plain 0 edge
for spec in "edge 1.0" "jacobian 0.3" "jacobian 1.0" "concentration 3.0" "concentration 10.0"; do
  set -- $spec
  train "runs/sweep/$1_$2" "$2" "$1"
  echo "== $1 $2"
  .venv/bin/python benchmarks/bench_interaction_sparsity.py --threads 2 --baseline runs/sweep/plain \
    --sparse "runs/sweep/$1_$2" --no-circuits --overhead-steps 0 --prompts 2
done
