"""Import EPD Predictor: converts an official EPD predictor (.pkl) into an EPD table (.safetensors) without
running anything from the pickle (epd_core/import_official.py), saves it into models/epd_params/ and
outputs it, so the Load EPD Params combo lists it from then on."""
from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from epd_core.import_official import MAX_PKL_BYTES, EPDImportError, import_official_bytes
from epd_core.params import EPDParams, EPDParamsError

from .params_nodes import CATEGORY, EPDParamsType, save_table, table_stem
from .tables import FOLDER, output_dir

_NO_FILE = "(no .pkl in models/epd_params)"  # keeps the combo valid when the folder has no .pkl yet


def pkl_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(".pkl")] or [_NO_FILE]


def allowed_pkl_folders() -> list[Path]:
    """Where pkl_path may point: ComfyUI's input/ folder (uploads) and the registered epd_params folders."""
    folders = [folder_paths.get_input_directory(), *folder_paths.get_folder_paths(FOLDER)]
    return [Path(f).resolve() for f in folders]


def resolve_source(predictor: str, pkl_path: str) -> Path:
    """The .pkl to read: `pkl_path` when given (relative to ComfyUI's input/ folder, or an absolute path inside
    input/ or models/epd_params/), else the combo entry from models/epd_params/. Every refusal gives the same
    message, so the node cannot be used to probe which files exist on the server."""
    given = pkl_path.strip()
    if given:
        refused = EPDImportError(
            f"pkl_path {given[:200]!r}: not an existing .pkl file in ComfyUI's input/ or models/epd_params/ folder. "
            "Upload the official EPD predictor (it lands in input/) and give its name, e.g. 'sd15_epd.pkl', or "
            "leave pkl_path empty and pick a file in 'predictor'.")
        if "\x00" in given or Path(given).suffix.lower() != ".pkl":
            raise refused
        raw = Path(given).expanduser()
        candidates = [raw] if raw.is_absolute() else [Path(folder_paths.get_input_directory()) / raw]
        try:
            real = candidates[0].resolve(strict=True)
        except (OSError, RuntimeError):
            raise refused from None
        # the real path (symlinks and '..' resolved) must lie inside an allowed folder
        if not real.is_file() or not any(real.is_relative_to(f) for f in allowed_pkl_folders()):
            raise refused
        return real
    full = None if predictor == _NO_FILE else folder_paths.get_full_path(FOLDER, predictor)
    if full is None:
        raise EPDImportError(f"'{predictor}': no predictor file found. Put the official .pkl into "
                             "models/epd_params/ and refresh the node list (R), or upload it to input/ and give its "
                             "name in pkl_path.")
    return Path(full)


def output_name_for(output_name: str, source: Path) -> str:
    """The table's file name: the one given, else the .pkl's name made safe for save_table."""
    name = output_name.strip()
    if any(bad in name for bad in ("/", "\\", "..")):  # save_table checks too; refuse before touching the folder
        raise EPDImportError(f"output_name '{output_name}' is not a plain file name. Use letters, digits, '_', "
                             "'-', '.' only; the table is always saved in models/epd_params/.")
    if not name:
        name = re.sub(r"[^A-Za-z0-9_.\- ]|\.\.+", "_", source.stem).strip("._- ")[:100] or "epd_predictor"
    try:
        return f"{table_stem(name)}.safetensors"
    except EPDParamsError as e:
        raise EPDImportError(f"output_name: {e}") from None


def _same_table(path: Path, params: EPDParams) -> bool:
    """Whether `path` already holds this table (re-running the node must not fail). Compared by content:
    safetensors does not write its metadata in a fixed order, so equal tables need not be equal bytes."""
    try:
        old = EPDParams.load(path)
    except EPDParamsError:
        return False
    return (all(torch.equal(a, b) for a, b in zip(old.tensors(), params.tensors()))
            and (old.scale_dir, old.scale_time) == (params.scale_dir, params.scale_time)
            and old.metadata == {**params.metadata, "num_steps": params.num_steps})


class EPDImportPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDImportPredictor", display_name="Import EPD Predictor", category=CATEGORY,
            is_output_node=True,  # converting and saving is useful on its own, without a sampler attached
            description="Convert an official EPD predictor (.pkl from the EPD authors) into an EPD table "
                        "(.safetensors in models/epd_params/). The pickle is read with a strict allow-list: "
                        "nothing in it is executed, and anything unexpected is refused.",
            inputs=[
                io.Combo.Input("predictor", options=pkl_files(),
                               tooltip="Official predictor file (.pkl) in models/epd_params/; press R to refresh."),
                io.String.Input("output_name", default="",
                                tooltip="File name for the converted table (saved in models/epd_params/); "
                                        "empty = the .pkl's name with .safetensors."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing table of that name (an identical one is always fine)."),
                io.String.Input("pkl_path", default="", optional=True,
                                tooltip="Optional: a .pkl you uploaded to ComfyUI's input/ folder (its name, "
                                        "e.g. sd15_epd.pkl); overrides 'predictor'. Paths outside input/ and "
                                        "models/epd_params/ are refused."),
            ],
            outputs=[EPDParamsType.Output(display_name="EPD_PARAMS",
                                          tooltip="The converted table, for EPD Sampler / EPD Sigmas.")],
        )

    @classmethod
    def fingerprint_inputs(cls, predictor, output_name, overwrite, pkl_path=""):
        # re-run when the .pkl changes on disk, not only when the inputs change
        try:
            st = os.stat(resolve_source(predictor, pkl_path or ""))
            return f"{st.st_mtime_ns}-{st.st_size}"
        except (OSError, EPDImportError):
            return ""

    @classmethod
    def execute(cls, predictor, output_name, overwrite, pkl_path="") -> io.NodeOutput:
        source = resolve_source(predictor, pkl_path or "")
        name = output_name_for(output_name, source)  # checked before the file is read
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_PKL_BYTES + 1)
        except OSError as e:
            raise EPDImportError(f"{source.name}: cannot read the file ({e.strerror}). Check its permissions.") from None
        # errors name the file (not its folder), the problem and the fix
        params = import_official_bytes(data, source=source.name, name=source.name)
        target = output_dir() / name
        if target.exists() and not overwrite and not _same_table(target, params):
            raise EPDImportError(f"{name}: a different table with this name already exists in models/epd_params/. "
                                 "Choose another output_name, or set overwrite to true to replace it.")
        path = save_table(params, name)
        return io.NodeOutput(params, ui={"text": [f"saved {path.name}: {params.describe()}"]})


IMPORT_NODES = [EPDImportPredictor]
