"""Shared fixtures. ComfyUI's own code (for reference samplers and the real server) comes from
COMFYUI_PATH or the runtime that scripts/setup_runtime.sh installs into .comfyui/."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def import_comfy_sampling():
    """ComfyUI's k-diffusion samplers, imported in-process (CPU only) for reference comparisons."""
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    from comfy.k_diffusion import sampling
    return sampling


@pytest.fixture(scope="session")
def comfy_sampling():
    return import_comfy_sampling()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (main.py --cpu) with this pack and the test-only nodes, shared by the session."""
    from comfyui_server import ComfyServer
    server = ComfyServer(tmp_path_factory.mktemp("comfy_base")).start()
    yield server
    server.stop()
