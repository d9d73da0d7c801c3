#!/usr/bin/env bash
# The linter, then the whole test suite including the real-ComfyUI server tests, then ComfyUI's own execution tests
# with the pack installed. Sets everything up on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_runtime.sh"
cd "$ROOT"
# style holds without reviews: pyflakes (unused imports / variables) and pycodestyle, line length 120 (pyproject.toml)
"$ROOT/.venv/bin/python" -m ruff check "$ROOT"
"$ROOT/.venv/bin/python" -m pytest tests "$@"
# ComfyUI's own tests/execution (232 tests, about 3 minutes) with the pack installed in custom_nodes/: the pack must
# not break other nodes' execution. Only for the whole suite (arguments select some of the pack's tests instead).
if [[ $# -eq 0 ]]; then
  bash "$ROOT/scripts/comfyui_execution_tests.sh"
fi
