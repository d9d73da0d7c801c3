#!/usr/bin/env bash
# ComfyUI's own execution tests (tests/execution of the ComfyUI tree the suite runs on) with this pack installed
# in custom_nodes/: the pack patches global sampler lists and registers an on-prompt handler, and must not break
# the execution of other nodes. Runs on a throw-away copy of the tree in out/comfyui-execution/, so the tree
# itself is never changed. Those tests start `python main.py` from PATH: the venv's bin/ comes first.
# Fails when the suite fails, or when the pack was not imported by every server the suite started.
# Arguments go to pytest (e.g. -k test_lazy_input for a quick subset). EPD_PACK_DIR: the folder installed as the
# pack (default: this repository); EPD_EXECUTION_WORK: where the copy and the log go (default: out/comfyui-execution).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY="$(cd "${COMFYUI_PATH:-$ROOT/.comfyui}" && pwd)"
VENV="$ROOT/.venv"
if [[ ! -d "$COMFY/tests/execution" ]]; then
  echo "[execution] $COMFY has no tests/execution (ComfyUI's own tests); use a ComfyUI tree that has them" >&2
  exit 1
fi
PACK="$(cd "${EPD_PACK_DIR:-$ROOT}" && pwd)"
WORK="${EPD_EXECUTION_WORK:-$ROOT/out/comfyui-execution}"
TREE="$WORK/ComfyUI"
LOG="$WORK/execution.log"
rm -rf "$WORK"
mkdir -p "$WORK"
# the tree without run-time state (a user's models, outputs, database) nor the random test checkpoints cached in
# it (several GiB that tar would write out in full); then the pack as a custom node
mkdir -p "$TREE"
tar -C "$COMFY" --exclude=./user --exclude=./output --exclude=./temp --exclude=./input --exclude='__pycache__' \
    --exclude=./tests/inference/samples --exclude=./custom_nodes/ComfyUI-EPD \
    --exclude=./epd-test-models -cf - . | tar -C "$TREE" -xf -
ln -sfn "$PACK" "$TREE/custom_nodes/ComfyUI-EPD"
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cd "$TREE"
start=$SECONDS
set +e
PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1 python -m pytest tests/execution -p no:cacheprovider -q --port "$PORT" \
  "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
echo "[execution] ComfyUI's tests/execution took $((SECONDS - start)) s (log: $LOG)" >&2
# every server start lists its custom nodes' import times; the pack must be there each time, never failed
starts=$(grep -c "^Starting server" "$LOG" || true)
loaded=$(grep -cE "seconds: .*/custom_nodes/ComfyUI-EPD$" "$LOG" || true)
if grep -qE "IMPORT FAILED.*ComfyUI-EPD|Cannot import .*ComfyUI-EPD" "$LOG"; then
  echo "[execution] FAILED: ComfyUI could not import the pack (see $LOG)" >&2
  exit 1
fi
if [[ "$starts" -lt 1 || "$loaded" -lt "$starts" ]]; then
  echo "[execution] FAILED: the pack was imported by $loaded of $starts server starts (see $LOG)" >&2
  exit 1
fi
echo "[execution] the pack was imported by all $starts server starts" >&2
exit "$status"
