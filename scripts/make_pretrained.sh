#!/usr/bin/env bash
# Regenerate pretrained_params/ for the demo digits model (seeded, CPU). One table per KSampler step count
# S = rows + 1 on the karras schedule (= polynomial rho 7 over the model's sigma range), CFG 2 as in the
# shipped workflows, with the analytic first step: latency NFE = 2 x rows (the final Euler step included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS=1
for solver in epd epd_plugin; do
  for rows in 2 3 4 5; do
    .venv/bin/python -m epd_core.train distill --model demo --guidance-scale 2 --schedule polynomial --rho 7 \
      --steps "$rows" --solver "$solver" -K 2 --afs --teacher heun -M 3 --iterations 200 --batch 8 --seed 0 \
      --quiet --out "pretrained_params/demo_digits_${solver}_s$((rows + 1)).safetensors" &
    while (( $(jobs -rp | wc -l) >= 2 )); do wait -n; done
  done
done
wait
ls -la pretrained_params
