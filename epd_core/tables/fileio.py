"""Files: atomic writes, bounded safetensors header reads, writable-folder checks and training checkpoints
(tensors, Adam's moments and string metadata in one safetensors file). Never pickle."""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

MAX_HEADER_BYTES = 1024 * 1024  # a table's or checkpoint's JSON header; anything larger is corrupt or crafted
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


class WriteError(ValueError):
    """A file could not be written; the message names the folder and the fix. Any earlier file is unchanged."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a new temp file in the same folder, fsync, rename over the target, fsync the folder.

    The temp name has a random part and is created exclusively: pid + id(data) was not unique across PID
    namespaces (two containers sharing a models folder both run as pid 1), and one writer then renamed the
    other's half-written temp file away."""
    path = Path(path)
    if not path.parent.exists():
        raise WriteError(f"{path}: folder {path.parent} does not exist. Create it or choose another path.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        created = True
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if created:
            try:
                tmp.unlink()
            except OSError:
                pass
        raise WriteError(f"{path}: cannot write into folder {path.parent} ({e.strerror}). Check free disk space "
                         f"and that folder's permissions, or choose another folder; any earlier file at this "
                         f"path is unchanged.") from None
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a power cut right after a save must not lose it). Best effort: some
    platforms and file systems cannot open or fsync a folder (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` ('does not exist', 'is not a folder', 'is not writable (...)'),
    or None. os.access is not enough (root, read-only mounts, quotas): a probe file is really created."""
    folder = Path(folder)
    if not folder.is_dir():
        return "is not a folder" if folder.exists() else "does not exist"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".epd-probe-"):
            pass
    except OSError as e:
        return f"is not writable ({e.strerror})"
    return None


def check_checkpoint_folder(path: Path, error: type[Exception]) -> None:
    """Raise `error` naming the fix when the checkpoint at `path` could not be written (checked before any work)."""
    folder = Path(path).parent
    problem = folder_problem(folder)
    if problem is None:
        return
    if folder.is_dir():  # it exists but does not take a file
        raise error(f"checkpoint folder {folder} {problem}. Fix its permissions or free space, or choose another "
                    "checkpoint folder.")
    raise error(f"checkpoint folder {folder} {problem}. Create it (mkdir -p) or choose another checkpoint folder.")


def read_safetensors_header(source) -> dict:
    """The JSON header of a safetensors file, given as bytes or a path (then only the header is read). Bounded
    and strict: raises ValueError with a readable reason for anything that is not a sane header."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:8 + MAX_HEADER_BYTES])
        total = len(source)
    else:
        with open(source, "rb") as f:
            data = f.read(8 + MAX_HEADER_BYTES)
        total = os.path.getsize(source)
    if len(data) < 8:
        raise ValueError("file is truncated (shorter than a safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > total or n > MAX_HEADER_BYTES:
        raise ValueError("file is truncated or not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except RecursionError:
        raise ValueError("safetensors header is nested far too deeply (file corrupt or crafted)") from None
    except (UnicodeDecodeError, ValueError):
        raise ValueError("safetensors header is not valid UTF-8 JSON (file corrupt)") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object (file corrupt)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("safetensors metadata must map strings to strings (file corrupt)")
    return header


# ---- training checkpoints ---------------------------------------------------------------------------------

def adam_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat CPU tensors named adam.<key>.<param index>."""
    return {f"adam.{key}.{j}": torch.as_tensor(st[key]).detach().cpu().reshape(-1).contiguous()
            for j, st in optimizer.state_dict()["state"].items() for key in _ADAM_KEYS}


def load_adam_state(optimizer: torch.optim.Optimizer, tensors: dict, params) -> None:
    """Inverse of adam_state_tensors for the optimizer's `params` (same order as when saved)."""
    state = {}
    for j, p in enumerate(params):
        if f"adam.step.{j}" in tensors:
            state[j] = {"step": tensors[f"adam.step.{j}"].reshape(()).clone(),
                        "exp_avg": tensors[f"adam.exp_avg.{j}"].view_as(p).to(p).clone(),
                        "exp_avg_sq": tensors[f"adam.exp_avg_sq.{j}"].view_as(p).to(p).clone()}
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def write_checkpoint(path, tensors: dict, meta: dict, error: type[Exception]) -> None:
    try:
        atomic_write_bytes(Path(path), st_save_bytes(tensors, metadata=meta))
    except WriteError as e:
        raise error(f"checkpoint not written: {e}") from None


def read_checkpoint(path, fmt: str, what: str, error: type[Exception], hint: str = "") -> tuple[dict, dict]:
    """(metadata, tensors) of a checkpoint of format `fmt`; any damage or foreign file -> `error`."""
    path = Path(path)
    try:
        data = path.read_bytes()
        meta = read_safetensors_header(data).get("__metadata__", {})
        if meta.get("format") != fmt:
            raise ValueError(f"not an {what} checkpoint (format {meta.get('format')!r})")
        return meta, st_load_bytes(data)
    except OSError as e:
        raise error(f"cannot read checkpoint {path} ({e.strerror}). Check the path.") from None
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged or foreign file
        raise error(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {e}). Delete it to start over"
                    f"{hint}.") from None
