"""Errors a client sees name files the way a user knows them (models/epd_params/x.safetensors), never the
server's absolute folders: a queued graph must not learn where ComfyUI lives or how its disk is laid out."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import folder_paths

PACK_DIR = Path(__file__).resolve().parents[1]


def _known_folders() -> list[tuple[str, str]]:
    """(absolute folder, what a user calls it), longest first, each also in its resolved spelling."""
    pairs = []
    for kind in ("epd_params", "epd_rewards"):
        try:
            folders = folder_paths.get_folder_paths(kind)
        except (KeyError, AttributeError):
            folders = []
        pairs += [(f, f"models/{kind}") for f in folders]
    pairs += [(folder_paths.get_input_directory(), "input"), (folder_paths.get_output_directory(), "output"),
              (folder_paths.get_temp_directory(), "temp"), (folder_paths.models_dir, "models"),
              (str(PACK_DIR), "custom_nodes/ComfyUI-EPD"), (folder_paths.base_path, "ComfyUI")]
    out = []
    for folder, shown in pairs:
        for spelling in {str(folder), os.path.realpath(folder)}:
            if len(spelling) > 1:
                out.append((spelling.rstrip("/"), shown))
    return sorted(out, key=lambda p: -len(p[0]))


def private(text: str) -> str:
    """`text` with every known server folder replaced by its user-facing name."""
    for folder, shown in _known_folders():
        text = text.replace(folder, shown)
    return text


def private_errors(func):
    """Decorator for a node's execute: a ValueError, RuntimeError or OSError whose message holds a server folder
    is raised again, same type, with the folder replaced (see `private`); anything else passes unchanged."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            text = str(e)
            shown = private(text)
            if shown == text:
                raise
            try:
                clean = type(e)(shown)
            except Exception:  # noqa: BLE001 - an exception type with another signature: a plain one
                clean = RuntimeError(shown)
            raise clean from None
    return wrapper
