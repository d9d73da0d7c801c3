"""ComfyUI-EPD: EPD-Solver / EPD-Plugin fast parallel ODE samplers for ComfyUI (GPL-3.0).

ComfyUI loads this file as the pack. The pack folder goes on sys.path so `epd_core` (pure torch, usable
without ComfyUI) imports the same way here, in scripts and in `python -m epd_core.train`."""
import importlib.util
import os
import sys

_PACK = os.path.dirname(os.path.abspath(__file__))
if _PACK not in sys.path:  # appended: never shadow ComfyUI's own top-level modules (e.g. its nodes.py)
    sys.path.append(_PACK)

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: E402
else:  # imported outside ComfyUI (e.g. by pytest collecting the repo): nothing to register
    comfy_entrypoint = None

__all__ = ["comfy_entrypoint"]
