"""ComfyUI-EPD: EPD-Solver / EPD-Plugin fast parallel ODE samplers for ComfyUI (GPL-3.0).

ComfyUI loads this file as the pack. The pack folder goes on sys.path so `epd_core` (pure torch, usable
without ComfyUI) imports the same way here, in scripts and in `python -m epd_core.train`."""
import os
import sys

_PACK = os.path.dirname(os.path.abspath(__file__))
if _PACK not in sys.path:
    sys.path.insert(0, _PACK)

from .nodes import comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint"]
