"""Where parameter tables live in ComfyUI, and which one the KSampler `epd` / `epd_plugin` entries use.

Files: `models/epd_params/` (the user's, first so new files land there) and the pack's `pretrained_params/`,
both under the one folder name "epd_params" so a single Load EPD Params combo lists them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import folder_paths
import torch

from epd_core.params import EPDParams, EPDParamsError

log = logging.getLogger("epd")
PACK_DIR = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = PACK_DIR / "pretrained_params"
FOLDER = "epd_params"
EXTENSIONS = {".safetensors", ".pkl"}  # .pkl only for Import EPD Predictor; never unpickled elsewhere

# ComfyUI model_config class names -> the family names tables carry in their metadata.
FAMILIES = {"sd15": "sd15", "sd20": "sd2", "sd21unclipl": "sd2", "sdxl": "sdxl", "sdxlrefiner": "sdxl",
            "ssd1b": "sdxl", "segmind_vega": "sdxl", "sd3": "sd3", "flux": "flux", "fluxschnell": "flux",
            "fluxinpaint": "flux", "flux2": "flux2", "wan21_t2v": "wan", "wan21_i2v": "wan", "hunyuanvideo": "hunyuan_video"}


def register_model_folder(name: str, extensions, *extra_paths) -> None:
    """models/<name>/ (then `extra_paths`) as a ComfyUI model folder; idempotent, keeps what others added."""
    paths, exts = folder_paths.folder_names_and_paths.get(name, ([], set()))
    for p in (os.path.join(folder_paths.models_dir, name), *map(str, extra_paths)):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))


def register_folder() -> None:
    register_model_folder(FOLDER, EXTENSIONS, PRETRAINED_DIR)


def table_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")]


def output_dir() -> Path:
    path = Path(folder_paths.get_folder_paths(FOLDER)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


_cache: dict[str, tuple[float, EPDParams]] = {}


def load_table(name: str) -> EPDParams:
    """Load by combo name (cached by modification time); errors name the file and the fix."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise EPDParamsError(f"EPD parameter file '{name}' not found in {folder_paths.get_folder_paths(FOLDER)}. "
                             "Refresh the node list (R) or put the file into models/epd_params/.")
    mtime = os.path.getmtime(path)
    hit = _cache.get(path)
    if hit is None or hit[0] != mtime:
        hit = (mtime, EPDParams.load(path))
        _cache[path] = hit
    return hit[1].clone()


def model_family(model_patcher_or_base) -> str:
    base = getattr(model_patcher_or_base, "model", model_patcher_or_base)
    config = getattr(base, "model_config", None)
    explicit = getattr(config, "epd_family", None)
    if explicit:
        return explicit
    name = type(config).__name__.lower() if config is not None else type(base).__name__.lower()
    return FAMILIES.get(name, name)


def _header_metadata(path: str) -> dict | None:
    """Read only a file's JSON metadata (cheap, bounded) to decide whether it is a candidate."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 1024 * 1024:
                return None
            header = json.loads(f.read(n))
        return json.loads(header["__metadata__"]["epd_metadata"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_preset(family: str, solver: str, steps: int) -> tuple[EPDParams, str] | None:
    """The best table for this model family, solver and number of steps to a positive sigma:
    an exact step count first (user files before the pack's), else the nearest step count of the family."""
    candidates = []
    for name in table_files():
        path = folder_paths.get_full_path(FOLDER, name)
        meta = _header_metadata(path) if path else None
        if meta and meta.get("model_family") == family and meta.get("solver") == solver:
            pretrained = Path(path).resolve().is_relative_to(PRETRAINED_DIR.resolve())
            candidates.append((abs(int(meta.get("num_steps", 0)) - steps), pretrained, name))
    for _, _, name in sorted(candidates):
        try:
            return load_table(name), name
        except EPDParamsError as e:  # a broken file must not break sampling with the others
            log.warning("EPD: skipping %s", e)
    return None


def neutral_table(solver: str, steps: int) -> EPDParams:
    """Used when no table exists for the model: one point at the geometric midpoint, i.e. exactly ComfyUI's
    dpm_2 (EPD) or an iPNDM-predicted midpoint (EPD-Plugin). Honest, never worse than that baseline."""
    return EPDParams.from_values(torch.full((max(steps, 1), 1), 0.5), torch.ones(max(steps, 1), 1), solver=solver,
                                 max_order=3 if solver == "epd_plugin" else 1,
                                 provenance={"source": "neutral fallback (no trained table for this model)"})
