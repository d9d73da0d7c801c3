"""The EPD Trainer's progress: a bar with a live loss / reward curve, and a text line under the node naming the
stage (teacher / training, rollouts / update) and the time left; the curves of a resumed run start from its
checkpoint."""
from __future__ import annotations

import math
import time
from pathlib import Path

import comfy.utils

from epd_core.training.distill import DistillError, load_checkpoint
from epd_core.training.rl import RLError

from .compat import send_progress_text
from .plotting import line_chart


def losses_so_far(ckpt: Path) -> list[float]:
    try:
        return list(load_checkpoint(ckpt)["losses"]) if ckpt.exists() else []
    except DistillError:
        return []  # distill() reports an unreadable checkpoint with its own clear error


def rewards_so_far(ckpt: Path) -> list[float]:
    from epd_core.training.rl.rdpo import load_checkpoint as load_rl_checkpoint
    try:
        return [h["reward"] for h in load_rl_checkpoint(ckpt)["history"]] if ckpt.exists() else []
    except RLError:
        return []


def loss_chart(losses, title):
    return line_chart({"loss": list(losses)}, f"EPD distillation loss: {title}", log_y=True)


def reward_chart(rewards, title):
    return line_chart({"mean reward": list(rewards)}, f"EPD RL (RDPO) reward: {title}", log_y=False)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TrainingProgress:
    """Progress bar (value = iteration, with a live loss-curve preview) and a text line under the node naming the
    stage and the time left, estimated from the measured iteration times.

    Distillation: the teacher solves one noise batch inside each of the first num_batches iterations (on_teacher
    marks it), so those 'teacher' iterations are slower than the 'training' ones after them. Until a training
    iteration was measured, the total can only be bounded: a training iteration is a teacher iteration without
    the teacher. RL (rl=True): each update is rollouts (on_rollouts marks their first model call) and a policy
    update. `losses` holds the values of the iterations done before (a resumed run starts after them)."""

    TEXT_EVERY_S = 10.0  # a text line at least this often too, whatever the iteration count

    def __init__(self, total, losses, node_id, title, label="loss", prefix="", rl=False, clock=time.monotonic):
        self.total, self.losses, self.node_id, self.title, self.label = total, losses, node_id, title, label
        self.prefix, self.rl, self.clock = prefix, rl, clock
        self.bar = comfy.utils.ProgressBar(total)
        self.every = max(1, total // 20)
        self.it = len(losses)  # iterations done
        self.started = None  # when the running iteration started (None: not known yet, e.g. the model loads)
        self.last_text = -math.inf
        self.teacher_now = False  # the running iteration includes a teacher batch
        self.teacher_total = self.teacher_started = 0
        self.teacher_s: list[float] = []  # seconds per iteration with a teacher batch
        self.train_s: list[float] = []  # seconds per iteration without one (per RL update)

    def on_teacher(self, batch, num_batches):
        self.started = self.started or self.clock()
        self.teacher_now, self.teacher_total = True, num_batches
        self.teacher_started += 1
        self._text(f"teacher: solving noise batch {self.teacher_started}/{num_batches} (one in each of the first "
                   f"{num_batches} iterations), {self.eta()}", force=True)

    def on_rollouts(self):
        self.started = self.started or self.clock()
        self._text(f"RL update {self.it + 1}/{self.total}: rollouts, {self.eta()}", force=self.it == 0)

    def eta(self) -> str:
        """The time left, from the mean time of the iterations measured so far (teacher ones separately)."""
        remaining = self.total - self.it
        teacher_left = min(remaining, max(0, self.teacher_total - self.teacher_started + self.teacher_now))
        train_left = remaining - teacher_left
        t = sum(self.teacher_s) / len(self.teacher_s) if self.teacher_s else None
        recent = self.train_s[-20:]  # recent ones: the end-to-end stage is slower than the per-step one
        s = sum(recent) / len(recent) if recent else None
        if remaining <= 0:
            return "done"
        if (teacher_left and t is None) or (train_left and s is None and t is None):
            return f"ETA after the first {'update' if self.rl else 'iteration'}"
        if train_left and s is None:  # bounded by teacher iterations, which include a training step
            bound = f"at most {duration(remaining * t)} (training iterations are faster than teacher ones)"
            return f"ETA teacher {duration(teacher_left * t)}, all {bound}" if teacher_left else f"ETA {bound}"
        return f"ETA {duration(teacher_left * (t or 0) + train_left * (s or 0))}"

    def __call__(self, it, loss):
        now = self.clock()
        if self.started is not None:
            (self.teacher_s if self.teacher_now else self.train_s).append(now - self.started)
        self.started = now  # the next iteration starts where this one ended
        was_teacher, self.teacher_now, self.it = self.teacher_now, False, it
        self.losses.append(loss)
        show = it % self.every == 0 or it == self.total
        chart = reward_chart if self.rl else loss_chart
        preview = ("PNG", chart(self.losses, self.title), 512) if show else None
        self.bar.update_absolute(it, self.total, preview)
        teacher_done = was_teacher and self.teacher_started >= self.teacher_total
        if self.rl:
            stage = f"RL update {it}/{self.total} done"
        elif was_teacher and not teacher_done:
            stage = (f"teacher (batch {self.teacher_started}/{self.teacher_total}) + training: "
                     f"iteration {it}/{self.total}")
        else:
            stage = f"training: iteration {it}/{self.total}"
        self._text(f"{stage}  {self.label} {loss:.4g}, {self.eta()}", force=show or teacher_done)

    def _text(self, text, force=False):
        now = self.clock()
        if force or now - self.last_text >= self.TEXT_EVERY_S:
            self.last_text = now
            send_progress_text(self.prefix + text, self.node_id)
