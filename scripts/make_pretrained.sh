#!/usr/bin/env bash
# Regenerate pretrained_params/ for the demo digits model (seeded, CPU). One table per KSampler step count
# S = rows + 1, CFG 2 as in the shipped workflows, with the analytic first step: latency NFE = 2 x rows (the
# final Euler step included).
#
# Student schedule: polynomial rho 7 from the model's sigma_max down to a last sigma chosen per step count
# (measured on fitting noises of the demo model, epd, 150 iterations: rows 2 -> 0.6 beat the model's
# sigma_min 0.0292 by 2.0x in held-out RMSE; rows 4 -> 0.1 by 1.06x; 0.3 / 1.0 were worse; rows 3 and 5
# interpolated). With the model's sigma_min as the last sigma the final Euler step D(x, 0.029) barely changes x
# and its model call is wasted. --override-sigmas marks the tables so that KSampler's epd / epd_plugin (any
# scheduler, e.g. the shipped workflow's karras 5 steps) sample on the table's own schedule
# (epd_core.solver.table_schedule_for: same step count -> its training sigmas; img2img / other counts -> its
# polynomial rebuilt from the list's first sigma). Used by step index on karras instead, these rows are poor
# (rows 2: RMSE 3.2 instead of 0.10). The EPD Sigmas node gives the same list explicitly.
# Teacher: Heun on a >= 100-step grid that continues below the last student sigma to the model's sigma_min
# (0.0292, the end point of ComfyUI's own sampling and of the benchmark's reference), then D.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS=1
declare -A LAST=([2]=0.6 [3]=0.25 [4]=0.1 [5]=0.05)
for solver in epd epd_plugin; do
  for rows in 2 3 4 5; do
    .venv/bin/python -m epd_core.train distill --model demo --guidance-scale 2 --schedule polynomial --rho 7 \
      --sigma-min "${LAST[$rows]}" --steps "$rows" --solver "$solver" -K 2 --afs --teacher heun -M 3 \
      --teacher-steps 100 --teacher-sigma-min 0.0292 --override-sigmas --iterations 200 --batch 8 --seed 0 \
      --quiet --out "pretrained_params/demo_digits_${solver}_s$((rows + 1)).safetensors" &
    while (( $(jobs -rp | wc -l) >= 2 )); do wait -n; done
  done
done
wait
ls -la pretrained_params
