#!/usr/bin/env bash
# The main job on the embedded default: a real ComfyUI started headless runs the shipped demo workflow on
# the pack's own digits model, then the quality-vs-NFE benchmark of the demo model is plotted.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_runtime.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
