"""Small runtime helpers shared by the samplers and trainers: devices, ranks, seeds and one-time warnings."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("epd")
_logged: set = set()


def log_once(key, level: int, msg: str, *args) -> None:
    """Log the first time `key` is seen in this process: a sampler runs once per image, and its notes (which
    rows, which evaluation path, a skipped table) matter once, not per image."""
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def warn_once(key, msg: str, *args) -> None:
    log_once(key, logging.WARNING, msg, *args)


def is_oom(e: Exception) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom_type) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def free_cache(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


# ---- torch.distributed: every helper is the identity in a single process -------------------------------

def rank_and_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def comm_device():
    """Collectives run on CUDA under nccl, on the CPU otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(flat: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat = flat / world
    return flat


def sum_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of a tensor over all ranks (itself when world == 1), reduced on the collective's device."""
    if world == 1:
        return t
    return (mean_over_ranks(t.to(comm_device()), world) * world).to(t.device)


def any_rank(flag: bool, world: int) -> bool:
    """True on every rank when `flag` is True on any (e.g. Cancel pressed on rank 0)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device(), dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def batch_seed(seed: int, index: int) -> int:
    """Batch `index` comes from its own generator, so any rank (or a resumed run) rebuilds it alone."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 1) % (2 ** 63 - 1)
