"""Training checkpoints shared by distillation and RDPO: tensors (incl. Adam's moments) plus string metadata in
one safetensors file, written atomically so a crash or a full disk leaves the previous checkpoint untouched.
Never pickle."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .params import EPDParamsError, atomic_write_bytes

_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


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
    except EPDParamsError as e:
        raise error(f"checkpoint not written: {e}") from None


def read_checkpoint(path, fmt: str, what: str, error: type[Exception], hint: str = "") -> tuple[dict, dict]:
    """(metadata, tensors) of a checkpoint of format `fmt`; any damage or foreign file -> `error`."""
    path = Path(path)
    try:
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        if meta.get("format") != fmt:
            raise ValueError(f"not an {what} checkpoint (format {meta.get('format')!r})")
        return meta, st_load_bytes(data)
    except OSError as e:
        raise error(f"cannot read checkpoint {path} ({e.strerror}). Check the path.") from None
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged or foreign file
        raise error(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {e}). Delete it to start over"
                    f"{hint}.") from None
