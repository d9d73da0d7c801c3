"""The trainer loop distillation (distill.py) and RDPO (rl/rdpo.py) both run, `TrainingRun.iterate`: Cancel on any
rank before an iteration, the trainer's step, the loss / statistics history, rank 0's checkpoint every `interval`
iterations and at the end, progress. Around it the pieces both share: the one resume rule for a checkpoint path,
the settings check before resuming, the gradient all-reduce over torchrun ranks and what a stopped run leaves."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from epd_core.runtime import any_rank, mean_over_ranks, sum_over_ranks
from epd_core.tables.fileio import check_checkpoint_folder


@dataclass
class TrainingRun:
    """One run's bookkeeping: `iterate(step, save, history)` runs iterations `start` .. `iterations` - 1."""
    what: str                          # "distillation", "RL": what a Cancel message says was cancelled
    iterations: int
    checkpoint: Path | None            # None: no checkpoints
    interval: int                      # rank 0 saves every `interval` iterations and at the end
    cancelled: type[Exception]         # raised on Cancel
    start: int = 0                     # the resumed checkpoint's iteration
    resumed: bool = False
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        self.last_saved = self.start if self.resumed else None

    def iterate(self, step: Callable[[int], object], save: Callable[[int], None], history: list,
                progress: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> list:
        """step(it) -> the iteration's record (a loss, a dict of statistics), appended to `history`;
        save(done) writes the checkpoint after `done` iterations; progress(done, record); should_stop() before
        every iteration, on every rank (any rank's True stops all: `cancelled`, nothing new written)."""
        for it in range(self.start, self.iterations):
            if should_stop is not None and any_rank(bool(should_stop()), self.world):
                raise self.cancelled(cancel_message(self.what, it, self.checkpoint, self.last_saved))
            record = step(it)
            history.append(record)
            done = it + 1
            if self.checkpoint is not None and due(done, self.interval, self.iterations, self.rank):
                save(done)
                self.last_saved = done
            if progress is not None:
                progress(done, record)
        return history

    def kept(self) -> str:
        """What a run stopped by an error leaves behind, for its message."""
        return kept(self.checkpoint, self.last_saved)


def open_checkpoint(path: Path | None, resume: bool | None, error: type[Exception], load: Callable[[Path], dict],
                    rank: int = 0) -> dict | None:
    """The checkpoint to resume, or None to start. resume None = 'auto' (resume when the file exists), True = it
    must exist, False = it must not (nothing is ever overwritten by a fresh start). The folder is checked for
    writing before any work."""
    if path is None:
        if resume is True:
            raise error("resume was requested but no checkpoint path is set. Pass the checkpoint folder/path.")
        return None
    if rank == 0:
        check_checkpoint_folder(path, error)
    if not path.exists():
        if resume is True:
            raise error(f"no checkpoint to resume at {path}. Check the path, or run without resume to start.")
        return None
    if resume is False:
        raise error(f"a checkpoint already exists at {path}. Resume it (--resume / resume=True), or delete it or "
                    "choose another path to start over (nothing was overwritten).")
    return load(path)


def check_same_settings(saved: dict, now: dict, fields, path, error: type[Exception], defaults: dict | None = None):
    """Refuse to resume a checkpoint made with other result-changing settings (a field newer than the checkpoint
    counts as its default then)."""
    defaults = defaults or {}
    diffs = [f"{k}: {saved.get(k, defaults.get(k))!r} -> {now.get(k)!r}" for k in fields
             if saved.get(k, defaults.get(k)) != now.get(k)]
    if diffs:
        raise error(f"checkpoint {path} was made with different settings ({'; '.join(diffs[:4])}). Use the original "
                    "settings to resume, or delete the checkpoint / choose another name to start over.")


def reduce_gradients(params, world: int, extra: torch.Tensor | None = None, mean: bool = True) -> torch.Tensor:
    """All-reduce the parameters' gradients (and `extra` values, appended) in one flat collective, averaged
    (`mean`) or summed over the ranks, written back into `.grad`. Returns the flat reduced tensor."""
    parts = [(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in params]
    flat = torch.cat(parts + ([extra.reshape(-1)] if extra is not None else []))
    flat = mean_over_ranks(flat, world) if mean else sum_over_ranks(flat, world)
    offset = 0
    for q in params:
        q.grad = flat[offset:offset + q.numel()].view_as(q).clone()
        offset += q.numel()
    return flat


def due(done: int, interval: int, iterations: int, rank: int) -> bool:
    """Rank 0 saves every `interval` iterations and at the end."""
    return rank == 0 and (done % interval == 0 or done == iterations)


def kept(path, last_saved: int | None) -> str:
    """What a stopped run leaves behind, for its error message."""
    if path is None:
        return "No checkpoint was configured."
    if last_saved is None:
        return f"No checkpoint had been written yet ({path})."
    return f"The last checkpoint ({path}, iteration {last_saved}) is unchanged."


def cancel_message(what: str, it: int, path, last_saved: int | None) -> str:
    return f"{what} cancelled before iteration {it}; nothing new was written. {kept(path, last_saved)}" + (
        " Run again with resume to continue." if last_saved else "")
