"""ComfyUI's own code imported in-process, on the CPU: from $COMFYUI_PATH, else the runtime that
scripts/setup_runtime.sh installs into .comfyui/ (the benchmarks' reference samplers and schedulers; the tests)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))


def import_comfy_sampling():
    """ComfyUI's k-diffusion samplers, imported in-process (CPU only) for reference comparisons."""
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    from comfy.k_diffusion import sampling
    return sampling
