"""Where parameter tables live in ComfyUI, and which one the KSampler entries of the registry's solvers use.

Files: `models/epd_params/` (the user's, first so new files land there) and the pack's `pretrained_params/`,
both under the one folder name "epd_params" so a single Load EPD Params combo lists them.

Which tables KSampler may pick by itself (`find_preset`, `find_presets`): anyone who can queue a graph can write
tables into models/epd_params/ (Save EPD Params, Import EPD Predictor, EPD Trainer), so a plain KSampler run must
not trust every file there. It picks only
  * the pack's own `pretrained_params/`, and
  * user tables the operator listed, one file name per line, in `ksampler_presets.txt` inside a registered
    epd_params folder (e.g. models/epd_params/ksampler_presets.txt). No node writes that file, and the Save /
    Import / Trainer nodes refuse to replace a listed table.
Both only with sane sizes (K <= PRESET_MAX_POINTS, steps <= PRESET_MAX_STEPS); a listed table that is broken or
too large is skipped with a log line naming the file. Every table can still be used explicitly through Load EPD
Params -> EPD Sampler.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import folder_paths

from epd_core.tables.fileio import read_safetensors_header
from epd_core.tables.formats import SOURCE_SUFFIXES
from epd_core.tables.params import MAX_FILE_BYTES, EPDParams, EPDParamsError
from epd_core.runtime import log_once
from epd_core.sampling.plan import size_on
from epd_core.sampling.registry import variant

from .compat import sampling_variant

PACK_DIR = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = PACK_DIR / "pretrained_params"
FOLDER = "epd_params"
# the published formats' files (.pkl, .pt) only for Import EPD Predictor, which never unpickles them either
EXTENSIONS = {".safetensors", *SOURCE_SUFFIXES}
PRESET_LIST = "ksampler_presets.txt"   # the operator's allow-list of user tables KSampler may pick by itself
PRESET_MAX_POINTS, PRESET_MAX_STEPS = 8, 200  # what the EPD Trainer can produce; more only through EPD Sampler


def preset_max_points(solver) -> int:
    """A table's K: points batched in one call, or (a variant without parallel points: dyweight) its past
    directions, as many as its steps."""
    return PRESET_MAX_POINTS if variant(solver).parallel_points else PRESET_MAX_STEPS
_PRESET_LIST_BYTES = 64 * 1024

# ComfyUI model_config class names -> the family names tables carry in their metadata.
FAMILIES = {"sd15": "sd15", "sd20": "sd2", "sd21unclipl": "sd2", "sdxl": "sdxl", "sdxlrefiner": "sdxl",
            "ssd1b": "sdxl", "segmind_vega": "sdxl", "sd3": "sd3", "flux": "flux", "fluxschnell": "flux",
            "fluxinpaint": "flux", "flux2": "flux2", "wan21_t2v": "wan", "wan21_i2v": "wan",
            "hunyuanvideo": "hunyuan_video"}


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


def is_pretrained(path) -> bool:
    return Path(path).resolve().is_relative_to(PRETRAINED_DIR.resolve())


def pretrained_names() -> set[str]:
    """File names of the pack's own tables (a saved table must not shadow one of them)."""
    try:
        return {p.name.lower() for p in PRETRAINED_DIR.iterdir() if p.suffix == ".safetensors"}
    except OSError:
        return set()


_cache: dict[str, tuple[float, EPDParams]] = {}


def load_table(name: str) -> EPDParams:
    """Load by combo name (cached by modification time); errors name the file (never the server's folders)."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise EPDParamsError(f"EPD parameter file '{name}' not found in models/epd_params/ or the pack's "
                             "pretrained_params/. Refresh the node list (R) or put the file into models/epd_params/.")
    return load_path(path, name)


def load_path(path, shown: str) -> EPDParams:
    """A table file, errors naming it as `shown` (its name, not the absolute path); cached by mtime."""
    path = str(path)
    try:
        st = os.stat(path)
        if st.st_size > MAX_FILE_BYTES:
            raise EPDParamsError(f"{shown}: {st.st_size} bytes is far too large for an EPD table; wrong file?")
        hit = _cache.get(path)
        if hit is None or hit[0] != st.st_mtime:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            hit = (st.st_mtime, EPDParams.from_bytes(data, source=shown))
            _cache[path] = hit
    except OSError as e:
        raise EPDParamsError(f"{shown}: cannot read the parameter file ({e.strerror}). "
                             "Check its permissions.") from None
    return hit[1].clone()


# ---- which model family a MODEL is ------------------------------------------------------------------------
def model_family(model_patcher_or_base) -> str:
    """The family name tables are matched by. A model whose model_sampling was patched to another prediction
    type (e.g. SD1.5 behind ModelSamplingSD3: flow instead of eps) or another noise scale is another family,
    '<family>_<type>' / '<family>_noise<scale>', so a table trained for the unpatched model is not picked for it
    silently (nodes/compat.py: the prediction types)."""
    base = getattr(model_patcher_or_base, "model", model_patcher_or_base)
    config = getattr(base, "model_config", None)
    explicit = getattr(config, "epd_family", None)
    if explicit:
        family = explicit
    else:
        name = type(config).__name__.lower() if config is not None else type(base).__name__.lower()
        family = FAMILIES.get(name, name)
    # ModelPatcher: object_patches holds a patched model_sampling; while the model is loaded for sampling the
    # patch is set on the model itself and the original waits in object_patches_backup
    active = (getattr(model_patcher_or_base, "object_patches", None) or {}).get("model_sampling")
    backup = (getattr(model_patcher_or_base, "object_patches_backup", None) or {}).get("model_sampling")
    own = backup if backup is not None else getattr(base, "model_sampling", None)
    variant = sampling_variant(active, own)
    if variant:
        family = f"{family}_{variant}"
        what = f"'{variant}' prediction" if not variant.startswith("noise") else f"noise scale {variant[5:]}"
        log_once(("family", family), logging.INFO, f"EPD: the model's sampling is patched to {what} "
                 f"({type(active).__name__}); tables are matched for family '{family}'")
    return family


# ---- tables KSampler may pick by itself -------------------------------------------------------------------
def _header_metadata(path: str) -> dict:
    """Only a file's JSON metadata (cheap, bounded) to decide whether it is a candidate; raises ValueError."""
    try:
        header = read_safetensors_header(path)  # its ValueError says what is wrong with the header
    except OSError as e:
        raise ValueError(f"cannot read it ({e.strerror})") from None
    try:
        meta = json.loads(header["__metadata__"]["epd_metadata"])
    except RecursionError:
        raise ValueError("its metadata is nested far too deeply") from None
    except (KeyError, TypeError, ValueError):
        raise ValueError("not an EPD table (no readable epd_metadata)") from None
    if not isinstance(meta, dict):
        raise ValueError("its epd_metadata is not a JSON object")
    return meta


def _count(meta: dict, key: str, limit: int) -> int:
    v = meta.get(key)
    if type(v) is not int or not 1 <= v <= limit:
        raise ValueError(f"'{key}' is {str(v)[:40]!r}, expected a whole number 1..{limit} for KSampler's "
                         "automatic choice")
    return v


def allowed_user_tables(folder: Path) -> list[str]:
    """The plain .safetensors file names the operator listed in `folder`/ksampler_presets.txt ('#' comments)."""
    try:
        with open(folder / PRESET_LIST, "rb") as f:
            text = f.read(_PRESET_LIST_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        if "/" in name or "\\" in name or name.startswith("."):
            log_once(("list", folder, name), logging.WARNING,
                     f"EPD: {PRESET_LIST}: '{name[:80]}' is not a plain file name; ignored")
            continue
        names.append(name)
    return names


def is_protected(name: str) -> bool:
    """Whether a table name is listed in a ksampler_presets.txt (the nodes never replace such a table)."""
    name = name.lower()
    return any(name == n.lower() for folder in _user_folders() for n in allowed_user_tables(folder))


def _user_folders() -> list[Path]:
    folders = []
    for folder in folder_paths.get_folder_paths(FOLDER):
        folder = Path(folder)
        if folder.is_dir() and not is_pretrained(folder):
            folders.append(folder)
    return folders


def preset_candidates() -> list[tuple[Path, str, bool]]:
    """(path, shown name, is the pack's own) of every table KSampler may pick by itself."""
    out = [(p, p.name, True) for p in sorted(PRETRAINED_DIR.glob("*.safetensors"))]
    for folder in _user_folders():
        out += [(folder / n, n, False) for n in allowed_user_tables(folder) if (folder / n).is_file()]
    return out


def _rank(meta: dict, steps: int, pretrained: bool, name: str, calls: int | None = None) -> tuple:
    """Sort key among matching tables: the closest size (plan.size_on: rows, or model calls for a table whose last
    row steps to 0) first, the operator's before the pack's, then by name."""
    return (size_on(meta, steps, calls), pretrained, name)


def find_preset(family: str, solver: str, steps: int, calls: int | None = None) -> tuple[EPDParams, str] | None:
    """The best table KSampler may pick by itself (see the module docstring) for this model family, solver and
    number of steps to a positive sigma (or, for "to_zero" tables, KSampler's step count `calls` as their
    latency NFE): an exact match first, else the nearest of the family.
    Broken or oversized candidates are skipped, each with one log line naming the file."""
    found = find_presets(family, solver, steps, calls)
    return found[0][:2] if found else None


def find_presets(family: str, solver: str, steps: int, calls: int | None = None) -> list[tuple[EPDParams, str, bool]]:
    """(table, shown name, is the pack's own) of every loadable table of the nearest size `find_preset` would
    consider, best first (e.g. the K = 1 and the K = 3 EPD-MS table of one NFE, or tables trained at several CFG
    scales: epd_core.sampling.cfg_guard chooses among them at the user's CFG)."""
    candidates = []
    for path, shown, pretrained in preset_candidates():
        try:
            meta = _header_metadata(str(path))
            if meta.get("model_family") != family or meta.get("solver") != solver:
                continue
            meta = dict(meta, num_steps=_count(meta, "num_steps", PRESET_MAX_STEPS))
            _count(meta, "num_points", preset_max_points(meta.get("solver")))
            if not isinstance(meta.setdefault("schedule", {}), dict):
                raise ValueError(f"'schedule' is {str(meta['schedule'])[:40]!r}, expected an object")
            rank = _rank(meta, steps, pretrained, shown, calls)
        except Exception as e:  # noqa: BLE001 - any broken header skips this table, never the sampling
            _skip(path, shown, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {str(e)[:120]}")
            continue
        candidates.append((rank, path, shown, pretrained))
    found, size = [], None
    for rank, path, shown, pretrained in sorted(candidates, key=lambda c: c[0]):
        if size is not None and rank[0] != size:
            break  # only the nearest size (an exact match when there is one)
        try:
            params = load_path(path, shown)
        except Exception as e:  # noqa: BLE001 - a broken file must not break sampling with the others
            _skip(path, shown, str(e) if isinstance(e, EPDParamsError) else f"{type(e).__name__}: {str(e)[:120]}")
            continue
        if params.num_points > preset_max_points(params.solver) or params.num_steps > PRESET_MAX_STEPS:
            _skip(path, shown, f"{params.num_steps} steps x K={params.num_points} exceeds the limits "
                               f"({PRESET_MAX_STEPS} x {PRESET_MAX_POINTS})")
            continue
        found.append((params, shown, pretrained))
        size = rank[0]
    return found


def ksampler_tables(family: str, solver: str, steps: int, calls: int) -> list[tuple[EPDParams, str]]:
    """The (table, name) candidates KSampler's entry hands the CFG guard: `find_presets`, only tables of exactly
    `calls` rows for a variant whose rows are per step (it runs its built-in otherwise), and only the first tier
    of the operator's listed tables before the pack's own."""
    found = find_presets(family, solver, steps, calls)
    if variant(solver).untrained:
        found = [f for f in found if f[0].num_steps == calls]
    return [(t, shown) for t, shown, pretrained in found if pretrained == found[0][2]] if found else []


def _skip(path, shown: str, problem: str) -> None:
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        mtime = None
    log_once(("skip", str(path), mtime), logging.WARNING, f"EPD: KSampler skips the table {shown}: {problem}")


# ---- tables a node writes -------------------------------------------------------------------------------
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,119}")
# Windows device names: "CON.safetensors" is the console there, whatever the extension
_RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9]|conin\$|conout\$)(\..*)?", re.IGNORECASE)


def table_stem(name: str) -> str:
    """The file name without .safetensors of a table a node writes, refused unless it is a plain name (no
    folders, no '..', no control characters or trailing dot / space, no Windows device name) and not the name of
    a pretrained_params table (it would hide the pack's own in Load EPD Params) or of a table the operator
    listed in ksampler_presets.txt."""
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    if not _SAFE_NAME.fullmatch(stem) or ".." in stem or stem.endswith((".", " ")):
        raise EPDParamsError(f"{_shown(name)} is not a plain file name; use letters, digits, '_', '-', '.' and "
                             "spaces only (at most 120 characters, starting with a letter or digit)")
    if _RESERVED.fullmatch(stem):
        raise EPDParamsError(f"'{stem}' is a reserved device name on Windows; choose another name")
    file = f"{stem}.safetensors"
    if file.lower() in pretrained_names():
        raise EPDParamsError(f"'{file}' is the name of one of the pack's own tables (pretrained_params/); a table "
                             "of that name in models/epd_params/ would hide it. Choose another name.")
    if is_protected(file):
        raise EPDParamsError(f"'{file}' is listed in {PRESET_LIST} by the server's operator, so nodes may not "
                             "replace it. Choose another name.")
    return stem


def _shown(name: str) -> str:
    return repr(name[:60] + ("..." if len(name) > 60 else ""))


def save_table(params: EPDParams, name: str, overwrite: bool = True):
    """Save into models/epd_params/ under a plain file name (no folders: nothing outside it is touched). Never
    over a pretrained name or an operator-listed table; over another existing table only with `overwrite`."""
    target = output_dir() / f"{table_stem(name)}.safetensors"
    if not overwrite and target.exists():
        raise EPDParamsError(f"'{target.name}' already exists in models/epd_params/. Choose another name, or set "
                             "overwrite to true to replace it.")
    return params.save(target)
