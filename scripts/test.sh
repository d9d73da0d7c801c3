#!/usr/bin/env bash
# The linter, then the whole test suite including the real-ComfyUI server tests. Sets everything up on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_runtime.sh"
cd "$ROOT"
# style holds without reviews: pyflakes (unused imports / variables) and pycodestyle, line length 120 (pyproject.toml)
"$ROOT/.venv/bin/python" -m ruff check "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
