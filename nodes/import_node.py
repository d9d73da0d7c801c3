"""Import EPD Predictor: converts an official EPD predictor (.pkl) or a published DyWeight table (.pkl snapshot,
FLUX .pt checkpoint) into an EPD table (.safetensors) without running anything from the file
(epd_core/tables/import_official.py), saves it into models/epd_params/ and outputs it, so the Load EPD Params combo
lists it from then on.

The predictor is a .pkl in models/epd_params/, an upload in input/ (pkl_path), or one of the authors' published
files by name ("official: sd15-best"): downloaded once from their repository at a pinned commit, its size and
SHA-256 checked, and cached as models/epd_params/official/<name>.pkl (checked again each time it is used).
The conversion runs in a child process with an address-space limit and a timeout."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import comfy.model_management
import folder_paths
import torch

from epd_core.tables.import_official import (MAX_PKL_BYTES, OFFICIAL_FILES, DownloadCancelled, EPDImportError,
                                             download_official, import_official_by_name, import_official_isolated,
                                             verify_official)
from epd_core.tables.fileio import WriteError, atomic_write_bytes
from epd_core.tables.formats import SOURCE_SUFFIXES
from epd_core.tables.params import EPDParams, EPDParamsError

from .compat import io
from .sockets import CATEGORY, EPDParamsType
from .privacy import private_errors
from .tables import FOLDER, output_dir, save_table, table_stem

_NO_FILE = "(no .pkl in models/epd_params)"  # keeps the combo valid when the folder has no .pkl yet
OFFICIAL_PREFIX = "official: "  # combo entries for the authors' published files, downloaded on first use
OFFICIAL_CACHE = "official"     # subfolder of models/epd_params/ holding the downloaded copies
log = logging.getLogger("epd")


def official_choices() -> list[str]:
    return [OFFICIAL_PREFIX + name for name in OFFICIAL_FILES]


def official_name(predictor: str) -> str | None:
    """The published name a combo entry stands for, or None for a local file."""
    if isinstance(predictor, str) and predictor.startswith(OFFICIAL_PREFIX):
        name = predictor[len(OFFICIAL_PREFIX):]
        return name if name in OFFICIAL_FILES else None
    return None


def _is_cached_official(entry: str) -> bool:
    parts = entry.replace("\\", "/").split("/")
    return len(parts) == 2 and parts[0] == OFFICIAL_CACHE and parts[1][:-len(".pkl")] in OFFICIAL_FILES


def pkl_files() -> list[str]:
    """Local .pkl files (the cached official downloads are listed by name instead), then the published names."""
    local = [f for f in folder_paths.get_filename_list(FOLDER)
             if f.lower().endswith(SOURCE_SUFFIXES) and not _is_cached_official(f)]
    return (local or [_NO_FILE]) + official_choices()


def official_cache_path(name: str) -> Path:
    return output_dir() / OFFICIAL_CACHE / f"{name}.pkl"


def fetch_official(name: str) -> bytes:
    """The verified bytes of the published predictor `name`: the cached copy in models/epd_params/official/ when
    its size and SHA-256 match, else a fresh download (which then replaces the cache, atomically)."""
    cache = official_cache_path(name)
    shown = f"models/epd_params/{OFFICIAL_CACHE}/{name}.pkl"  # errors never show the server's folders
    try:
        with open(cache, "rb") as f:
            data = f.read(MAX_PKL_BYTES + 1)
    except FileNotFoundError:
        data = None
    except OSError as e:
        log.warning("EPD: cannot read the cached %s (%s); downloading it again", shown, e.strerror)
        data = None
    if data is not None:
        try:
            return verify_official(name, data, shown)
        except EPDImportError:
            log.warning("EPD: the cached %s is not the published file (size or SHA-256 differ); downloading it "
                        "again", shown)
    try:
        data = download_official(name, out_hint=f"models/epd_params/{name}.safetensors",
                                 should_stop=comfy.model_management.processing_interrupted)
    except DownloadCancelled:
        comfy.model_management.throw_exception_if_processing_interrupted()  # ComfyUI's Cancel, as for sampling
        raise
    except EPDImportError as e:
        raise EPDImportError(
            f"{e} Or put the fetched file at {shown} (the node checks its SHA-256) and run the node again."
        ) from None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache, data)
    except (OSError, WriteError) as e:  # the table can still be made; only the cache is lost
        log.warning("EPD: could not cache the downloaded %s (%s)", shown, e)
    return data


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
        if "\x00" in given or Path(given).suffix.lower() not in SOURCE_SUFFIXES:
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
                        "nothing in it is executed, and anything unexpected is refused. The 'official: ...' "
                        "choices download the authors' published file once (SHA-256 checked) and cache it in "
                        "models/epd_params/official/.",
            inputs=[
                io.Combo.Input("predictor", options=pkl_files(),
                               tooltip="Official predictor file (.pkl) in models/epd_params/ (press R to "
                                       "refresh), or 'official: NAME' to download the authors' published file "
                                       "from their repository (once; the SHA-256 is checked)."),
                io.String.Input("output_name", default="",
                                tooltip="File name for the converted table (saved in models/epd_params/); "
                                        "empty = the .pkl's (or published) name with .safetensors."),
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
        name = None if (pkl_path or "").strip() else official_name(predictor)
        if name is not None:  # a published file never changes: its hash is its identity
            return f"official-{OFFICIAL_FILES[name].sha256}"
        try:
            st = os.stat(resolve_source(predictor, pkl_path or ""))
            return f"{st.st_mtime_ns}-{st.st_size}"
        except (OSError, EPDImportError):
            return ""

    @classmethod
    @private_errors
    def execute(cls, predictor, output_name, overwrite, pkl_path="") -> io.NodeOutput:
        official = None if (pkl_path or "").strip() else official_name(predictor)
        if official is not None:
            name = output_name_for(output_name, Path(f"{official}.pkl"))  # checked before anything is fetched
            data = fetch_official(official)  # verified: size and SHA-256
            params = import_official_by_name(official, data, source=f"{official}.pkl", isolated=True)
        else:
            source = resolve_source(predictor, pkl_path or "")
            name = output_name_for(output_name, source)  # checked before the file is read
            try:
                with open(source, "rb") as f:
                    data = f.read(MAX_PKL_BYTES + 1)
            except OSError as e:
                raise EPDImportError(f"{source.name}: cannot read the file ({e.strerror}). Check its "
                                     "permissions.") from None
            # errors name the file (not its folder), the problem and the fix. Converted in a child process with a
            # memory and time budget: should a crafted file get past the parser's budgets, it costs a refused
            # import, never the server (epd_core/tables/import_official.py, "defence in depth")
            params = import_official_isolated(data, source=source.name, name=source.name)
        target = output_dir() / name
        if target.exists() and not overwrite and not _same_table(target, params):
            raise EPDImportError(f"{name}: a different table with this name already exists in models/epd_params/. "
                                 "Choose another output_name, or set overwrite to true to replace it.")
        path = save_table(params, name)
        return io.NodeOutput(params, ui={"text": [f"saved {path.name}: {params.describe()}"]})


IMPORT_NODES = [EPDImportPredictor]
