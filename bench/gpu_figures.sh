#!/usr/bin/env bash
# GPU figures in one run of about 7 minutes, results under $OUT:
#   1. bench/speed.py on CUDA: the EPD step with an fp16 SD1.5 UNet at 512x512 (latent 64x64), batches 1 and 4;
#   2. bench/trainer_cost.py on CUDA at 512x512: the EPD Trainer's distillation with the node's defaults
#      (batch 8) for 2 iterations (one per stage of per_step+end_to_end), and with batch 1 when that fails.
# Exit status 0 when every step gave its figures (speed, and the trainer at batch 8 or else batch 1).
# Measured on an H200 (torch 2.11 + CUDA 13.0): 4.5 minutes in all.
#
# Run from the repository root on the GPU machine (no internet; python3 with torch + CUDA):
#     OUT=/path/to/results bash bench/gpu_figures.sh
# Needs, besides the tracked files: .whl/ (wheels of what the machine lacks, from `pip download`: torchsde and
# trampoline; torchvision 0.26.0 if the machine has none) and ComfyUI's code in .comfyui/ (comfy/, comfy_api/, comfy_execution/,
# folder_paths.py, node_helpers.py, protocol.py; or set COMFYUI_PATH). The random SD1.5 checkpoint is built in
# memory there (bench/real_checkpoints.py), not carried.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# wheels of what the machine lacks (.whl/, see above), installed outside the system site-packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[gpu_figures $((SECONDS - START))s] $*" | tee -a "$OUT/gpu_figures.log" >&2; }

# ComfyUI imports PyAV (video files) and torchvision (two model families' preprocessing) when its modules load;
# neither is used here. PyAV's wheel (36 MB) does not fit the transfer next to ComfyUI's code, and a torchvision
# wheel built for another CUDA major version refuses to import. For what still does not import, a stand-in
# package whose every attribute is a placeholder class lets the imports succeed (any real use raises).
SHIMS=/tmp/epd-import-shims
make_shim() {  # make_shim PACKAGE SUBMODULE...
  local pkg=$1; shift
  mkdir -p "$SHIMS/$pkg"
  cat > "$SHIMS/$pkg/__init__.py" <<'PY'
"""Import stand-in written by bench/gpu_figures.sh: the package is not installed; using it raises."""


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __or__(cls, other):  # `X | None` in annotations
        return cls

    __ror__ = __or__

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{__name__} is not installed on this machine (bench/gpu_figures.sh import stand-in)")


class Missing(metaclass=_Placeholder):
    pass


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing
PY
  local sub
  for sub in "$@"; do
    mkdir -p "$SHIMS/$pkg/$(dirname "$sub")"
    local parent="$SHIMS/$pkg"
    local part
    for part in $(dirname "$sub" | tr '/' ' '); do
      [[ $part == . ]] && continue
      parent="$parent/$part"
      [[ -f $parent/__init__.py ]] || printf 'from %s import __getattr__  # noqa: F401\n' "$pkg" > "$parent/__init__.py"
    done
    printf 'from %s import __getattr__  # noqa: F401\n' "$pkg" > "$SHIMS/$pkg/$sub.py"
  done
}
if ! python3 -c "import torchvision" 2>>"$OUT/gpu_figures.log"; then
  rm -rf /tmp/site/torchvision /tmp/site/torchvision-*.dist-info  # a carried wheel may not match: the machine's?
  if ! python3 -c "import torchvision" 2>>"$OUT/gpu_figures.log"; then
    log "torchvision does not import (see the log); using an import stand-in"
    make_shim torchvision transforms/functional ops io utils
  fi
fi
if ! python3 -c "import av" 2>/dev/null; then
  log "PyAV is not installed; using an import stand-in (no video is read or written)"
  make_shim av container subtitles/stream audio/frame video/frame
fi
[[ -d $SHIMS ]] && export PYTHONPATH="$SHIMS:$PYTHONPATH"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0))"
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|torchsde|numpy|safetensors|transformers|av) "
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" >&2

status=0
log "speed.py --device cuda --sd-dtype fp16 --batches 1,4"
timeout 240 python3 bench/speed.py --device cuda --sd-dtype fp16 --batches 1,4 --out "$OUT" 2> "$OUT/speed.log"
rc=$?
if [[ $rc != 0 ]]; then status=1; log "speed.py failed (exit $rc; 124 = timeout):"; tail -n 15 "$OUT/speed.log" >&2; fi

log "trainer_cost.py --device cuda --size 512 (EPD Trainer defaults: batch 8), 2 iterations"
if ! timeout 200 python3 bench/trainer_cost.py --device cuda --size 512 --iterations 2 --out "$OUT" \
     2> "$OUT/trainer_cost_b8.log"; then
  # measured on an H200 (139 GiB): batch 8 runs out of memory in the first iteration (a figure, not a failure)
  log "batch 8 did not finish (out of memory or timeout; see trainer_cost_cuda_512_b8.md / the log); batch 1:"
  tail -n 3 "$OUT/trainer_cost_b8.log" >&2
  if ! timeout 120 python3 bench/trainer_cost.py --device cuda --size 512 --iterations 2 --batch 1 --out "$OUT" \
       2> "$OUT/trainer_cost_b1.log"; then
    status=1
    log "batch 1 failed too"
    tail -n 15 "$OUT/trainer_cost_b1.log" >&2
  fi
fi
log "done; results in $OUT:"
ls -la "$OUT" >&2
exit $status
