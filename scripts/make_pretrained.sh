#!/usr/bin/env bash
# Regenerate pretrained_params/ for the embedded demo models (seeded, CPU): one table per latency NFE 3..10
# (model calls per image, what KSampler's `steps` means for these tables), EPD and EPD-Plugin, K = 2.
#
#   bash scripts/make_pretrained.sh            # both models
#   bash scripts/make_pretrained.sh mnist      # only the 28x28 MNIST model (digits: the 8x8 one)
#
# Recipe (the levers measured in the README's ablation table): the student's sigmas are learned with the table
# (--learn-schedule, end-to-end objective), and the last row steps to sigma 0 itself (--to-zero), so N rows cost
# 2N model calls (2N - 1 with the analytic first step, used for odd NFE) and no call is spent on a final denoise.
# Initial schedule: polynomial rho 7 from the model's sigma_max down to 0.1; teacher: Heun on a >= 100-step grid
# down to the model's sigma_min (0.0292, where ComfyUI's own sampling and the benchmark's reference end), then D.
# MNIST is trained without CFG (scale 1, as its shipped workflows run), the 8x8 model with CFG 2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS=1
MODELS=("${@:-mnist digits}")
for which in ${MODELS[@]}; do
  # the 8x8 model's ablation (bench/results/ablation_demo_nfe4.md) preferred per-step then end-to-end training
  if [[ $which == mnist ]]; then model=mnist; cfg=1; prefix=demo_mnist; iters=250; batch=8; objective=end_to_end
  else model=demo; cfg=2; prefix=demo_digits; iters=400; batch=16; objective=per_step+end_to_end; fi
  rm -f pretrained_params/${prefix}_*_nfe*.safetensors
  for nfe in 3 4 5 6 7 8 9 10; do
    rows=$(( (nfe + 1) / 2 )); afs=$([[ $((nfe % 2)) == 1 ]] && echo --afs || echo --no-afs)
    for solver in epd epd_plugin; do
      .venv/bin/python -m epd_core.train distill --model "$model" --guidance-scale "$cfg" --schedule polynomial \
        --rho 7 --sigma-min 0.1 --steps "$rows" --solver "$solver" -K 2 $afs --to-zero --learn-schedule \
        --objective "$objective" --lr 0.03 --schedule-lr 0.02 --teacher heun -M 3 --teacher-steps 100 \
        --teacher-sigma-min 0.0292 --iterations "$iters" --batch "$batch" --num-batches 16 --seed 0 --quiet \
        --out "pretrained_params/${prefix}_${solver}_nfe${nfe}.safetensors" &
      while (( $(jobs -rp | wc -l) >= 2 )); do wait -n; done
    done
  done
done
wait
ls -la pretrained_params
