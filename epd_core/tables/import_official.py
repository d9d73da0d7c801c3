"""Convert the EPD authors' official predictor files (.pkl) into this pack's safetensors tables, safely.

An official file is a plain pickle of {'model': <EPD_predictor>, ...} written with EDM's
`torch_utils.persistence`: the predictor is stored as the call `_reconstruct_persistent_obj(meta)`, where
meta carries the class's Python source (`module_src`) and the module's __dict__ (`state`). `pickle.load`
would execute that source and anything else the file names, so the pack never unpickles it:

1. epd_core/tables/predictor_pickle.py reads the file into inert values without torch: an opcode walk on abstract
   values refuses anything over its budgets (PICKLE_MAX_*) before anything is built, then our own pickle
   evaluator builds only the allowed stand-ins (the persistence hook returns its meta, storages are read by
   epd_core/tables/torch_storage.py, tensors are numpy arrays); any other name is refused, naming the file and the
global. 2. The CLI and the Import node do that in a child process (epd_core/tables/import_child.py,
`import_official_isolated`).
3. `_extract` reads the four logit tables and the hyperparameters out of the meta.

The official activations are ours (docs/method.md, "The table"), so r_params / weight_s / scale_dir_params /
scale_time_params are exactly theta_r / theta_w / theta_c / theta_a. CLI:
    python -m epd_core.import_official IN.pkl OUT.safetensors [--print]
    python -m epd_core.import_official --official sd15-best OUT.safetensors      (download, verify, convert)
    python -m epd_core.import_official --official sd15-best IN.pkl OUT.safetensors  (verify a copy fetched by hand)

Official tables by name (OFFICIAL_FILES): the authors' published predictors, fetched from their repository at a
fixed commit with the standard library only (a timeout, a size cap), their size and SHA-256 checked before a
single byte is unpickled (and even then only by the restricted unpickler above).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

import torch

from epd_core.tables.import_child import MARK, OUT_OF_MEMORY
from epd_core.tables.formats import FORMATS
from epd_core.tables.params import MAX_POINTS, MAX_STEPS, SCHEDULE_TYPES, EPDParams, EPDParamsError
from epd_core.tables.predictor_pickle import (_FIX_BUDGET, _MAX_EXACT_INT, MAX_PKL_BYTES, Refusal, _Array, _Budget,
                                              _first_line, _plain, _Record, _TooBig, failer, parse)
from epd_core.sampling.registry import SOLVERS, variant

IMPORTER_VERSION = 1
# official parameter name -> ours (same activations, docs/method.md, "The table")
_TABLES = {"theta_r": "r_params", "theta_w": "weight_s", "theta_c": "scale_dir_params",
           "theta_a": "scale_time_params"}
_SOLVERS = {v.official: v.name for v in SOLVERS.values() if v.official}  # official sampler_stu -> our solver
_OFFICIAL_SCHEDULES = ("discrete", "polynomial", "logsnr", "time_uniform", "flowmatch")
_SCHEDULE_NUMBERS = ("sigma_min", "sigma_max", "shift", "mu")  # copied when the file records them
_NAME = re.compile(r"[a-z0-9_-]{1,64}")  # dataset / backend names that become a table's model_family


class EPDImportError(EPDParamsError, Refusal):
    """An official predictor file cannot be converted; the message names the file, the problem and the fix."""


# ---- official tables by name ------------------------------------------------------------------------------
class OfficialFile(NamedTuple):
    name: str
    size: int      # bytes
    sha256: str
    where: str = ""  # its path in the repository at `base`; "" for the EPD authors' exps/<family>/<name>.pkl
    base: str = ""   # the raw URL of the repository at its pinned commit; "" for the EPD authors' (DEFAULT_BASE_URL)

    @property
    def path(self) -> str:
        """Where the file lies in the authors' repository: exps/<family>/<name>.pkl, the family being the name
        without its last part (sd3-1024-best -> exps/sd3-1024/sd3-1024-best.pkl), as the authors' README links it."""
        return self.where or f"exps/{self.name.rsplit('-', 1)[0]}/{self.name}.pkl"

    @property
    def published_url(self) -> str:
        return f"{self.base or DEFAULT_BASE_URL}/{self.path}"


OFFICIAL_REPO = "BeierZhu/EPD"
OFFICIAL_BRANCH = "EPD-Solver++"
OFFICIAL_COMMIT = "88a91f0914069afd700bfee1b590c7b61ceae240"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{OFFICIAL_REPO}/{OFFICIAL_COMMIT}"
BASE_URL_ENV = "EPD_OFFICIAL_BASE_URL"  # e.g. a mirror; tests point it at a local server
DOWNLOAD_TIMEOUT = 30.0                 # seconds for the whole download (connecting included)
MAX_DOWNLOAD_BYTES = 1024 * 1024        # the published files are ~7 kB
# The published predictors (name, size, SHA-256), from the authors' repository at OFFICIAL_COMMIT.
OFFICIAL_FILES: dict[str, OfficialFile] = {f.name: f for f in (
    OfficialFile("flux-best", 7622, "f96cc971995114a31bfb0e9edf16d48ffdd5191e40a247714ca6834843815198"),
    OfficialFile("flux-start", 7255, "f9fc1e997d8e8e0bc673add9511daca5a8cb28a644e5f9f7fd4c1bb0c7ad8a2a"),
    OfficialFile("sd15-best", 7177, "2e14a48e6b28944091b49d7cb3f0aa009bafad8668888fa584b09da5205ba227"),
    OfficialFile("sd15-distilled", 7177, "f0852617b62481a94de4b85d3db4a1ae3cb9d74c4f2ae86260296b0902415f9d"),
    OfficialFile("sd15-start", 7028, "d4100761bd11deb2f4d831dc147d088a39c52a6df13675b979deaa9a3b0aead3"),
    OfficialFile("sd3-1024-best", 7319, "ef67ea4f157a3dc119276e9427e5a32389a18072e32afce846f700b75639edd3"),
    OfficialFile("sd3-1024-distilled", 7319, "d4d0657122cbac4e31a2d4c1170dc6b078e79caeab622463a2e6e76781b99173"),
    OfficialFile("sd3-1024-start", 7166, "81d0c0df1d7a5d58d8535337ca50ed90623c5216dbed53cd4dd6995711d0d867"),
    OfficialFile("sd3-512-best", 7319, "fd088ef6d9b6c4156c5abe20b303bb626329edcbf00e655c749c2a33a28f0344"),
    OfficialFile("sd3-512-distilled", 7319, "c315cb5a1f8548228d08a8e8be4f2c4da6e9b95fd71bc50e5bfbcec1f9033527"),
    OfficialFile("sd3-512-start", 7166, "9f53994ff9428690792650c64c96009d4c1c668652d16dd6fa26658f4d78caab"),
    # the other formats' published files (formats.py), from their repositories at pinned commits
    *(OfficialFile(*entry, base=fmt.BASE_URL) for fmt in FORMATS for entry in fmt.PUBLISHED),
)}


def official_file(name: str) -> OfficialFile:
    entry = OFFICIAL_FILES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise EPDImportError(f"'{str(name)[:60]}' is not a published EPD predictor. Known names: "
                             f"{', '.join(OFFICIAL_FILES)}.")
    return entry


def official_url(name: str, base_url: str | None = None) -> str:
    """The file's raw URL: `base_url`, else $EPD_OFFICIAL_BASE_URL, else the authors' repository at the pinned
    commit, followed by the file's path."""
    entry = official_file(name)
    base = base_url or os.environ.get(BASE_URL_ENV) or entry.base or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{entry.path}"


def convert_command(name: str, pkl: str | None = None, out: str = "OUT.safetensors") -> str:
    """The command that verifies and converts a copy of the file fetched by hand."""
    suffix = Path(official_file(name).path).suffix if name in OFFICIAL_FILES else ".pkl"
    return f"python -m epd_core.import_official --official {name} {pkl or name + suffix} {out}"


def verify_official(name: str, data: bytes, source: str) -> bytes:
    """Check size and SHA-256 against OFFICIAL_FILES (before anything is unpickled); returns `data`."""
    entry = official_file(name)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or digest != entry.sha256:
        raise EPDImportError(
            f"{source}: refused: this is not the published '{name}' predictor (expected {entry.size} bytes with "
            f"SHA-256 {entry.sha256}, got {len(data)} bytes with SHA-256 {digest}). Nothing was unpickled or "
            f"written. The download was corrupted or altered, or the file is another one: fetch "
            f"{official_file(name).published_url} again.")
    return data


class DownloadCancelled(EPDImportError):
    """The caller's `should_stop()` turned true during a download (e.g. ComfyUI's Cancel); nothing was written."""


class _HttpsRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an https URL (urllib's default also follows http and ftp)."""

    def http_error_302(self, req, fp, code, msg, headers):
        newurl = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise EPDImportError(f"{req.full_url}: refused: the server redirects to {newurl[:200]}, and only "
                                 "redirects to https URLs are followed; nothing was written. Check "
                                 f"${BASE_URL_ENV} (a mirror must serve the file itself or redirect to https).")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_POLL_S = 0.1  # how often the caller checks the deadline and should_stop while the download runs


def download_official(name: str, base_url: str | None = None, timeout: float = DOWNLOAD_TIMEOUT,
                      out_hint: str = "OUT.safetensors", should_stop=None) -> bytes:
    """Download the published predictor `name` with the standard library and return its bytes, verified
    (size and SHA-256). Bounded in time (`timeout` seconds in all, connecting included: a server that sends a
    byte now and then is cut off), in size (MAX_DOWNLOAD_BYTES), and redirects go to https only. The transfer
    runs in a daemon thread so that `should_stop()` (polled every 0.1 s) can cancel it: DownloadCancelled.
    Writes nothing. Without a connection the error gives the URL to fetch by hand and the command that converts
    the fetched file."""
    entry = official_file(name)
    url = official_url(name, base_url)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise EPDImportError(f"{url}: only http(s) URLs are downloaded (check ${BASE_URL_ENV}).")

    def offline(problem: str):
        raise EPDImportError(
            f"cannot download the official predictor '{name}' from {url}: {problem}. Without network access, "
            f"fetch {official_file(name).published_url} by hand ({entry.size} bytes, SHA-256 {entry.sha256}) "
            f"and convert it with: {convert_command(name, out=out_hint)}")

    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    failure: list[BaseException] = []
    done, stop = threading.Event(), threading.Event()

    def fetch():
        total = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "ComfyUI-EPD"})
            opener = urllib.request.build_opener(_HttpsRedirectsOnly)
            with opener.open(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                if length is not None and length.strip().isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
                    raise EPDImportError(f"{url}: refused: the server announces {int(length)} bytes, far more "
                                         f"than an EPD predictor ({entry.size} bytes); nothing was written.")
                while not stop.is_set():
                    chunk = response.read1(64 * 1024)  # what has arrived: a trickle cannot hold a read open
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > MAX_DOWNLOAD_BYTES:
                        raise EPDImportError(f"{url}: refused: the download exceeds {MAX_DOWNLOAD_BYTES} bytes, "
                                             f"far more than an EPD predictor ({entry.size} bytes); nothing was "
                                             "written.")
                    chunks.append(chunk)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=fetch, name=f"epd-download-{name}", daemon=True).start()
    while not done.wait(_POLL_S):
        if should_stop is not None and should_stop():
            stop.set()
            raise DownloadCancelled(f"{url}: the download was cancelled; nothing was written.")
        if time.monotonic() > deadline:
            stop.set()
            offline(f"the download took longer than {timeout:g} s")
    if failure:
        e = failure[0]
        if isinstance(e, EPDImportError):
            raise e
        if isinstance(e, urllib.error.HTTPError):
            offline(f"HTTP {e.code} {e.reason}")
        if isinstance(e, urllib.error.URLError):
            offline(f"{e.reason}")
        if isinstance(e, (OSError, http.client.HTTPException, ValueError)):  # timeouts, resets, bad responses
            offline(f"{type(e).__name__}: {_first_line(e)}")
        raise e
    return verify_official(name, b"".join(chunks), url)


def import_official_by_name(name: str, data: bytes, source: str, isolated: bool = False) -> EPDParams:
    """Verify `data` as the published predictor `name`, then convert it (restricted unpickler; with `isolated`,
    in a child process: import_official_isolated)."""
    verify_official(name, data, source)
    convert = import_official_isolated if isolated else import_official_bytes
    params = convert(data, source=source, name=f"{name}.pkl")
    params.metadata["provenance"]["official_name"] = name
    params.metadata["provenance"]["official_url"] = official_file(name).published_url
    return params



# ---- reading ----------------------------------------------------------------------------------------------
def import_official(path, isolated: bool = False) -> EPDParams:
    """Read an official EPD predictor .pkl and return it as an EPDParams table (not saved); with `isolated`, the
    conversion runs in a child process (import_official_isolated)."""
    path = Path(path)
    data = _read_pkl(path)
    convert = import_official_isolated if isolated else import_official_bytes
    return convert(data, source=str(path), name=path.name)


def _read_pkl(path: Path) -> bytes:
    fail = _failer(str(path))
    try:
        size = path.stat().st_size
        if size > MAX_PKL_BYTES:
            fail(f"{size} bytes is far too large for an EPD predictor (limit {MAX_PKL_BYTES})",
                 "Official predictor files are a few tens of kB; check that this is the right file.")
        with open(path, "rb") as f:
            return f.read(MAX_PKL_BYTES + 1)  # bounded even for a device or FIFO, whose size reads as 0
    except OSError as e:
        fail(f"cannot read the file ({e.strerror})", "Check the path and the file permissions.")


# ---- defence in depth: the conversion in a child process -------------------------------------------------
# The opcode walk and the storage parser bound everything known; should a future gap remain, the CLI and the
# Import node convert in a child process that may use CHILD_MEMORY_BYTES more address space than after its
# imports (RLIMIT_AS, Linux) and CHILD_TIMEOUT_S seconds in all, so the gap costs a refused import, not the
# server (epd_core/tables/import_child.py: it parses without torch first, so a refusal costs no torch start-up). Where
# RLIMIT_AS cannot be set (Windows has no `resource` module; macOS does not enforce it) the child still runs
# under the timeout, and a crash still ends only the child.
CHILD_TIMEOUT_S = 60.0            # wall clock, interpreter and torch start-up included (~2-3 s)
CHILD_MEMORY_BYTES = 512 << 20    # a real conversion adds ~20 MB
_PACK_ROOT = Path(__file__).resolve().parents[2]
_CHILD_SCRIPT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                 "from epd_core.tables.import_child import main; sys.exit(main(sys.argv[2:]))")


def import_official_isolated(data: bytes, source: str = "<bytes>", name: str | None = None,
                             timeout: float = CHILD_TIMEOUT_S, memory: int = CHILD_MEMORY_BYTES) -> EPDParams:
    """Like import_official_bytes, but converted in a child process (see CHILD_* above); the child sends the table
    back as safetensors bytes, read here by the bounded table loader. Same errors, plus refusals that name the
    child's budget when it runs out of time or memory or dies."""
    fail = _failer(source)
    if len(data) > MAX_PKL_BYTES:
        fail(f"{len(data)} bytes is far too large for an EPD predictor", "Check that this is the right file.")
    cmd = [sys.executable, "-c", _CHILD_SCRIPT, str(_PACK_ROOT), source, name or source, str(int(memory))]
    fix = _FIX_BUDGET.replace("built, run", "run")
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # run() has killed the child
        fail(f"refused: converting the file took longer than {timeout:g} s (budget: {timeout:g} s for the isolated "
             "converter)", fix)
    except OSError as e:
        fail(f"cannot start the isolated converter {sys.executable} ({e.strerror})",
             "Check that this Python can start a copy of itself (python -c works).")
    if proc.returncode == 0:
        try:
            return EPDParams.from_bytes(proc.stdout, source=source)
        except EPDParamsError as e:
            fail(f"the isolated converter returned an invalid table ({e})")
    stderr = proc.stderr.decode("utf-8", "replace")
    marked = [line for line in stderr.splitlines() if line.startswith(MARK)]
    if marked:
        raise EPDImportError(str(json.loads(marked[-1][len(MARK):])))
    if proc.returncode == OUT_OF_MEMORY or "MemoryError" in stderr:
        fail(f"refused: converting the file needed more than {memory >> 20} MB (budget: {memory >> 20} MB of address "
             "space for the isolated converter)", fix)
    fail(f"refused: the isolated converter died ({_exit_reason(proc.returncode)}: "
         f"{_first_line(Exception(stderr.strip().splitlines()[-1] if stderr.strip() else ''))}) while reading the "
         "file (budget: a crash costs the import, not the server)", fix)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            import signal
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def import_official_bytes(data: bytes, source: str = "<bytes>", name: str | None = None) -> EPDParams:
    """Like import_official, for file contents already in memory; `source` names them in errors."""
    fail = _failer(source)
    top = parse(data, fail)  # epd_core/tables/predictor_pickle.py: inert values, or refused
    for fmt in FORMATS:  # another published format's file (formats.py; a torch zip is None)
        if fmt.recognises(top):
            return fmt.convert(top, data, name or source, fail)
    return _extract(top, data, name or source, fail)


def _failer(source: str):
    return failer(source, EPDImportError)




def _extract(top, data: bytes, name: str, fail) -> EPDParams:
    record = top.get("model") if isinstance(top, dict) else None
    if not isinstance(record, _Record):
        fail("not an official EPD predictor: expected a pickled dict whose 'model' entry was saved with "
             "torch_utils.persistence")
    meta = record.meta
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("state"), dict)):
        fail("the 'model' entry is not a persistent class record (no meta type='class' with a state dict)")
    if meta.get("class_name") != "EPD_predictor":
        fail(f"the 'model' entry is a {_brief(meta.get('class_name'))}, not an EPD_predictor",
             "Pass the predictor file (the one holding the learned r/w/c/a tables), not another snapshot.")
    state = meta["state"]
    weights = state.get("_parameters")
    if not isinstance(weights, dict):
        fail("the predictor has no '_parameters' dict")

    num_steps, num_points = _int(state, "num_steps", fail), _int(state, "num_points", fail)
    shape = (num_steps - 1, num_points)  # the official num_steps counts time points: one row fewer
    tables = []
    for theirs in _TABLES.values():
        arr = weights.get(theirs)
        if not isinstance(arr, _Array):
            fail(f"parameter '{theirs}' is missing")
        t = arr.tensor
        if not t.is_floating_point() or tuple(t.shape) != shape:
            fail(f"parameter '{theirs}' is a {t.dtype} tensor of shape {tuple(t.shape)}, but num_steps="
                 f"{num_steps} and num_points={num_points} require floats of shape {shape}",
                 "The file is inconsistent; download it again.")
        if not torch.isfinite(t).all():
            fail(f"parameter '{theirs}' contains NaN or inf", "The training run diverged; use another file.")
        tables.append(t.float())

    sampler = state.get("sampler_stu")
    solver = _SOLVERS.get(sampler) if isinstance(sampler, str) else None
    if solver is None:
        fail(f"student sampler {_brief(sampler)} is not supported",
             "Only 'epd' (EPD-Solver) and 'ipndm' (EPD-Plugin) predictors can be imported.")
    max_order = 1
    if variant(solver).default_order > 1:  # a multistep predictor: its order is in the file
        max_order = state.get("max_order")
        if not (type(max_order) is int and 1 <= max_order <= 4):
            fail(f"max_order={_brief(max_order)} for an iPNDM predictor", "EPD-Plugin supports orders 1..4.")
    schedule_type = state.get("schedule_type")
    if schedule_type not in _OFFICIAL_SCHEDULES or schedule_type not in SCHEDULE_TYPES:
        fail(f"schedule_type {_brief(schedule_type)} is unknown", f"Expected one of {_OFFICIAL_SCHEDULES}.")
    schedule = {"type": schedule_type}
    backend_config = state.get("backend_config") if isinstance(state.get("backend_config"), dict) else {}
    for key, value in [("rho", state.get("schedule_rho"))] + [(k, backend_config.get(k, state.get(k)))
                                                              for k in _SCHEDULE_NUMBERS]:
        if _number(value):
            schedule[key] = float(value)
    guidance = state.get("guidance_rate")

    budget = _Budget()
    try:
        provenance = {key: _plain(state.get(attr), budget, attr) for key, attr in _PROVENANCE}
        provenance["persistence_version"] = _plain(meta.get("version"), budget, "version")
    except _TooBig as e:
        fail(str(e), "An official predictor records a few small hyperparameters; this file is crafted or not "
                     "an EPD predictor, and nothing was written.")
    metadata = {
        "solver": solver,
        "max_order": max_order,
        "afs": _flag(state, "afs", fail),
        "fix_last_dir_scale": _flag(state, "fcn", fail),
        "schedule": schedule,
        "guidance_scale": float(guidance) if _number(guidance) else None,
        "model_family": _model_family(state.get("backend"), state.get("dataset_name"), fail),
        "num_points": num_points,
        "provenance": {
            "format": "official EPD predictor (.pkl)",
            "source": Path(name).name[:200],
            "sha256": hashlib.sha256(data).hexdigest(),
            "importer_version": IMPORTER_VERSION,
            "official_num_steps": num_steps,  # time points, i.e. one more than the table's steps
            **provenance,
        },
    }
    scales = [_scale(state, key, fail) for key in ("scale_dir", "scale_time")]
    try:
        return EPDParams(*tables, *scales, metadata)
    except EPDParamsError as e:
        fail(f"the converted table is invalid ({e})", "The file is inconsistent; download it again.")


def _int(state: dict, key: str, fail) -> int:
    v = state.get(key)
    limit = MAX_STEPS + 1 if key == "num_steps" else MAX_POINTS
    if not (type(v) is int and (2 if key == "num_steps" else 1) <= v <= limit):
        fail(f"attribute '{key}' is {_brief(v)}, not a valid count", "The file is incomplete; download it again.")
    return v


def _flag(state: dict, key: str, fail) -> bool:
    v = state.get(key)
    if v is not None and type(v) not in (bool, int):
        fail(f"attribute '{key}' is {_brief(v)}, expected a boolean", "The file is inconsistent.")
    return bool(v)


def _scale(state: dict, key: str, fail) -> float:
    v = state.get(key)
    if v is None or v is False:
        return 0.0  # the official code uses None/0 for "disabled"
    if not (_number(v) and 0.0 <= v < 1.0):
        fail(f"attribute '{key}' is {_brief(v)}, expected a bound in [0, 1) or None",
             "The file is inconsistent; download it again.")
    return float(v)


def _number(v) -> bool:
    if type(v) is int:
        return abs(v) <= _MAX_EXACT_INT  # math.isfinite(10**400) raises OverflowError
    return type(v) is float and math.isfinite(v)


def _model_family(backend, dataset, fail) -> str | None:
    """The family KSampler matches tables by: 'sd15' / 'sd3' / 'flux' for the published text-to-image
    predictors, else the dataset's name. Names must be plain ([a-z0-9_-], at most 64 characters)."""
    names = []
    for key, v in (("backend", backend), ("dataset_name", dataset)):
        if v is None or v == "":
            names.append("")
            continue
        low = v.lower() if type(v) is str else None
        if low is None or not _NAME.fullmatch(low):
            fail(f"attribute '{key}' is {_brief(v)}, not a plain name (letters, digits, '_', '-'; at most 64)",
                 "The file is crafted or damaged; use the predictor published by the EPD authors.")
        names.append(low)
    backend, dataset = names
    if backend in ("sd3", "flux"):
        return backend
    if backend == "ldm" and ("ms_coco" in dataset or "sd1" in dataset):
        return "sd15"  # the published text-to-image LDM predictor: Stable Diffusion 1.5 on MS-COCO prompts
    return dataset or backend or None


# (provenance key, predictor attribute): the hyperparameters worth keeping; nothing else of the state is copied
_PROVENANCE = (("teacher", "sampler_tea"), ("M", "M"), ("dataset_name", "dataset_name"),
               ("img_resolution", "img_resolution"), ("backend", "backend"), ("backend_config", "backend_config"),
               ("guidance_type", "guidance_type"), ("predict_x0", "predict_x0"),
               ("lower_order_final", "lower_order_final"), ("alpha", "alpha"))


def _brief(v) -> str:
    """A short, safe rendering of an untrusted value for an error message (no recursion into containers)."""
    if v is None or type(v) in (bool, float) or (type(v) is int and abs(v) <= _MAX_EXACT_INT):
        return repr(v)
    if type(v) is int:
        return "a very large integer"
    if type(v) is str:
        return repr(v[:60] + ("..." if len(v) > 60 else ""))
    return f"a {type(v).__name__.strip('_')}"


# ---- command line -----------------------------------------------------------------------------------------
def format_table(params: EPDParams) -> str:
    """The activated table as its variant pictures it (registry entry's `picture`), one line per step: the
    points' r, w, c, a (or what the variant shows), or a row of its weight matrix."""
    pic = params.variant.picture(params)
    lines = [f"{pic.heading} table: {params.describe()}"]
    if hasattr(pic, "matrix"):  # a lower-triangular weight matrix over past directions, not K points
        lines.append("step  W row  |  " + pic.caption)
        lines += [f"{i:4d}  " + " ".join(f"{float(v):8.4f}" for v in pic.matrix[i, :i + 1]) + f"  |  {pic.labels(i)}"
                  for i in range(pic.matrix.shape[0])]
    else:
        lines += [f"{i:4d}  " + "  ".join(pic.labels(i)) for i in range(pic.r.shape[0])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m epd_core.import_official",
        description="Convert an official EPD predictor (.pkl) or a published DyWeight FLUX checkpoint (.pt) into "
                    "an EPD safetensors table, without executing anything from the file. With --official NAME, "
                    "download the authors' published file (or verify a copy fetched by hand) and check its SHA-256 "
                    "first.",
        epilog=f"Published names: {', '.join(OFFICIAL_FILES)}.")
    ap.add_argument("paths", nargs="+", metavar="IN.pkl OUT.safetensors",
                    help="official predictor file (.pkl) and the table to write (.safetensors); with --official, "
                         "IN.pkl is optional (a copy fetched by hand; without it the file is downloaded)")
    ap.add_argument("--official", metavar="NAME", choices=list(OFFICIAL_FILES),
                    help=f"a published predictor: {', '.join(OFFICIAL_FILES)}")
    ap.add_argument("--print", dest="show", action="store_true", help="print the converted table")
    args = ap.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.official):
        ap.error("give IN.pkl OUT.safetensors, or --official NAME [IN.pkl] OUT.safetensors")
    source, output = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    try:
        if source is not None and Path(output).resolve() == Path(source).resolve():
            raise EPDImportError(f"{output}: the output would overwrite the input. Choose another output path.")
        if args.official and source is None:
            data = download_official(args.official, out_hint=output)  # verified: size and SHA-256
            params = import_official_by_name(args.official, data, official_url(args.official), isolated=True)
        elif args.official:
            try:
                with open(source, "rb") as f:
                    data = f.read(MAX_DOWNLOAD_BYTES + 1)
            except OSError as e:
                raise EPDImportError(f"{source}: cannot read the file ({e.strerror}). Check the path.") from None
            params = import_official_by_name(args.official, data, source, isolated=True)
        else:
            params = import_official(source, isolated=True)
        params.save(output)
    except EPDParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {params.describe()}")
    if args.show:
        print(format_table(params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
