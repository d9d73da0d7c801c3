"""Distillation of an EPD table from a teacher solver (docs/method.md, "Training"). Pure torch; never imports ComfyUI.

    teacher:  a more accurate solver on a fine grid (>= `teacher_steps` steps overall, >= M inserted between
              student sigmas, continuing below the last student sigma to `teacher_sigma_min` so the final target
              is the ODE's end point), run once per noise batch without gradients; its states at the student's
              sigmas are cached. (With only M = 3 insertions the teacher itself was worse than ComfyUI's best
              sampler at 4-6 NFE on the 64-d mixture, and every student matched the teacher's error.)
    student:  EPD / EPD-Plugin with differentiable rows r, w, c, a = activate(logits)  (params.activate).
    per_step:   sum_i |x_{i+1}(row i; x_i detached) - T_{i+1}|^2   (the paper: each step from the student's
                own previous state; gradients reach only row i)
    end_to_end: |x_final(all rows) - T_final|^2                     (through the whole student trajectory)
    optimiser:  Adam on the logits (theta_r, theta_w, theta_c, theta_a), cosine learning-rate decay.

Works with any callable `model(x, sigma_vector, **extra_args) -> denoised` (k-diffusion convention, CFG included
through extra_args). Fault tolerant: periodic atomic checkpoints (logits, Adam state, iteration, config) that
resume bit-for-bit, Cancel through `should_stop`, clear errors. Under torch.distributed each rank trains on its
slice of the same full batch and gradients are averaged, so N ranks x batch b == one process with batch N*b.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .checkpoint import adam_state_tensors, folder_problem, load_adam_state, read_checkpoint, write_checkpoint
from .params import SCHEDULE_TYPES, EPDParams, activate
from .schedules import schedule_logits, sigmas_from_logits
from .solver import EPDSamplingError, PointEvaluator, adams_bashforth, check_sigmas, epd_step, integrate

log = logging.getLogger("epd")

TEACHERS = ("heun", "dpm2", "dpmpp", "ipndm", "euler")
OBJECTIVES = ("per_step", "end_to_end", "per_step+end_to_end")
CHECKPOINT_FORMAT = "epd-distill-checkpoint-v1"
# Fields that change the result: a checkpoint only resumes a run whose values are identical.
_RESULT_FIELDS = ("sigmas", "num_points", "solver", "max_order", "afs", "teacher", "inserted_steps", "objective",
                  "teacher_steps", "teacher_sigma_min", "iterations", "per_step_fraction", "lr", "lr_schedule", "batch",
                  "num_batches", "seed", "spread", "scale_dir", "scale_time", "learn_schedule", "schedule_floor",
                  "schedule_lr", "to_zero")


class DistillError(RuntimeError):
    """Distillation cannot run or continue; the message names the problem and the fix."""


class DistillCancelled(DistillError):
    """`should_stop()` asked to stop. Nothing new was written; the last checkpoint is intact."""


# ================================================================================================= teachers

def refine_sigmas(sigmas, inserted: int) -> tuple[torch.Tensor, list[int]]:
    """The teacher's fine grid: `inserted` sigmas between each pair of positive student sigmas, uniform in
    log sigma (t_j = a^(1-j/(M+1)) b^(j/(M+1))). A final step to 0 is kept as ONE step (a geometric grid cannot
    reach 0); every teacher takes it as the same Euler step the student takes, x = D(x, sigma_N).
    Returns the fine sigmas and the fine index of each student sigma."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()  # a few floats; the caller moves the grid to x
    pos = sig[sig > 0]
    frac = torch.arange(inserted + 1, dtype=torch.float64) / (inserted + 1)
    pieces = [a * (b / a) ** frac for a, b in zip(pos[:-1], pos[1:])]
    fine = torch.cat(pieces + [pos[-1:]] + ([sig.new_zeros(1)] if sig[-1] == 0 else []))
    index = [i * (inserted + 1) for i in range(len(pos))] + ([len(fine) - 1] if sig[-1] == 0 else [])
    return fine, index


def teacher_grid(sigmas, inserted: int, fine_steps: int = 0, sigma_end: float | None = None,
                 rho: float = 7.0) -> tuple[torch.Tensor, list[int]]:
    """The teacher's fine grid and the fine index of each student sigma. fine_steps = 0: `refine_sigmas`
    (M geometric insertions per interval). fine_steps > 0: each interval [a, b] gets max(M, its share of a
    `fine_steps`-step EDM (rho 7) grid) insertions, uniform in sigma^(1/rho); when the list ends in 0 the
    teacher also integrates on below the last student sigma down to `sigma_end` (same density) before its final
    Euler step, so the target at sigma 0 is the ODE's end point and not D(x, sigma_N) (which differs from it by
    O(sigma_N^2) and is a floor no student can beat when sigma_N is not tiny)."""
    if fine_steps <= 0:
        return refine_sigmas(sigmas, inserted)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()  # the grid is built from Python floats (CPU)
    pos = sig[sig > 0]
    final_zero = bool(sig[-1] == 0)
    end = min(float(sigma_end), float(pos[-1])) if (final_zero and sigma_end) else float(pos[-1])
    knots = pos.tolist() + ([end] if end < float(pos[-1]) * (1 - 1e-9) else [])
    u = [k ** (1 / rho) for k in knots]
    span = max(u[0] - u[-1], 1e-300)
    pieces, index, count = [], [], 0
    for i, (a, b) in enumerate(zip(u[:-1], u[1:])):
        n = max(int(inserted), math.ceil(fine_steps * (a - b) / span) - 1)
        frac = torch.arange(n + 1, dtype=torch.float64) / (n + 1)
        pieces.append((a + frac * (b - a)) ** rho)
        if i < len(pos):
            index.append(count)
        count += n + 1
    pieces.append(torch.tensor([knots[-1]], dtype=torch.float64))
    if len(index) < len(pos):
        index.append(count)
    fine = torch.cat(pieces)
    fine[index] = pos  # exact student sigmas (no rounding through the rho power)
    if final_zero:
        fine = torch.cat([fine, fine.new_zeros(1)])
        index.append(len(fine) - 1)
    return fine, index


def _denoiser(model, extra_args):
    def denoise(x, sigma):
        return model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
    return denoise


def teacher_euler(denoise, x, t):
    for i in range(len(t) - 1):
        x = x + (t[i + 1] - t[i]) * (x - denoise(x, t[i])) / t[i]
        yield x


def teacher_heun(denoise, x, t):
    """Heun (EDM, no churn): trapezoid of the slopes at both ends; Euler into sigma 0."""
    for i in range(len(t) - 1):
        h = t[i + 1] - t[i]
        d = (x - denoise(x, t[i])) / t[i]
        x_euler = x + h * d
        if t[i + 1] == 0:
            x = x_euler
        else:
            x = x + h * (d + (x_euler - denoise(x_euler, t[i + 1])) / t[i + 1]) / 2
        yield x


def teacher_dpm2(denoise, x, t):
    """DPM-Solver-2 as ComfyUI's dpm_2: the slope at the geometric midpoint carries the whole step."""
    for i in range(len(t) - 1):
        d = (x - denoise(x, t[i])) / t[i]
        if t[i + 1] == 0:
            x = x + (t[i + 1] - t[i]) * d
        else:
            t_mid = (t[i] * t[i + 1]).sqrt()
            x_mid = x + (t_mid - t[i]) * d
            x = x + (t[i + 1] - t[i]) * (x_mid - denoise(x_mid, t_mid)) / t_mid
        yield x


def teacher_dpmpp(denoise, x, t):
    """DPM-Solver++(2M), data prediction, as k-diffusion's sample_dpmpp_2m. With lambda = -log sigma and
    h = lambda_{i+1} - lambda_i:  x' = (sigma_{i+1}/sigma_i) x - expm1(-h) D', where D' extrapolates the
    denoised values linearly in lambda: D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h."""
    old = None
    for i in range(len(t) - 1):
        den = denoise(x, t[i])
        if t[i + 1] == 0:
            x = den
        else:
            h = (t[i] / t[i + 1]).log()
            if old is not None:
                r = (t[i - 1] / t[i]).log() / h
                den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            else:
                den_d = den
            x = (t[i + 1] / t[i]) * x - torch.expm1(-h) * den_d
        old = den
        yield x


def teacher_ipndm(denoise, x, t, max_order: int = 4):
    """iPNDM: Adams-Bashforth on the slopes (equal-step coefficients), order up to 4, as ComfyUI's ipndm."""
    history: list[torch.Tensor] = []
    for i in range(len(t) - 1):
        den = denoise(x, t[i])
        d = (x - den) / t[i]
        x = den if t[i + 1] == 0 else x + (t[i + 1] - t[i]) * adams_bashforth(d, history, max_order)
        history = (history + [d])[-(max_order - 1):]
        yield x


_TEACHER_FNS = {"euler": teacher_euler, "heun": teacher_heun, "dpm2": teacher_dpm2, "dpmpp": teacher_dpmpp,
                "ipndm": teacher_ipndm}


@torch.no_grad()
def teacher_states(model, x, sigmas, teacher: str = "heun", inserted: int = 3, extra_args=None, poll=None,
                   fine_steps: int = 0, sigma_end: float | None = None):
    """The teacher's states at every student sigma (x itself first), from a run on the fine grid
    (`teacher_grid`: fine_steps = 0 is the plain M-insertion grid)."""
    if teacher not in _TEACHER_FNS:
        raise DistillError(f"unknown teacher {teacher!r}; use one of {TEACHERS}")
    fine, index = teacher_grid(sigmas, inserted, fine_steps, sigma_end)
    fine = fine.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    keep = set(index)
    states = [x]
    for j, x_j in enumerate(_TEACHER_FNS[teacher](_denoiser(model, extra_args or {}), x, fine), start=1):
        if j in keep:
            states.append(x_j)
        if poll is not None:
            poll()
    return states


# ==================================================================================================== config

@dataclass
class DistillConfig:
    """Everything that defines a distillation run. `sigmas` is the student's descending sigma list (N+1
    positive values, optionally a final 0); the table gets one row per step to a positive sigma."""
    sigmas: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)   # type info for the table, e.g. {"type": "polynomial", "rho": 7}
    num_points: int = 2                            # K
    solver: str = "epd"                            # 'epd' | 'epd_plugin'
    max_order: int = 3                             # Adams-Bashforth order of EPD-Plugin (EPD always uses 1)
    afs: bool = False                              # analytic first step
    teacher: str = "heun"
    inserted_steps: int = 3                        # M: the least number of teacher steps inserted per interval
    # The teacher's accuracy caps the student's. With only M = 3 insertions a 2-4 step student gets a teacher
    # that is worse than ComfyUI's best 4-NFE sampler (64-d mixture: RMSE 0.216 at 2 rows), so the fine grid
    # has at least `teacher_steps` steps overall (0: just the M insertions, the old behaviour) and, for lists
    # ending in 0, continues below the last student sigma to `teacher_sigma_min` (the ODE's end point).
    teacher_steps: int = 100
    teacher_sigma_min: float = 0.002
    # per_step+end_to_end had the lowest held-out error at 7 of 8 NFEs (3..10) on the 64-d mixture, and was
    # within 0.5 % at the 8th, against per_step or end_to_end alone (GMM benchmark, 300/600 iterations)
    objective: str = "per_step+end_to_end"
    per_step_fraction: float = 0.5                 # share of iterations in the per-step stage (combined objective)
    iterations: int = 200                          # with batch 8 as good as 300 x 32 on the mixture benchmark
    lr: float = 0.1
    lr_schedule: str = "cosine"                    # 'cosine' decay to 0 within each stage, or 'constant'
    batch: int = 8                                 # samples per iteration (over all ranks)
    num_batches: int = 8                           # noise pool: teacher trajectories computed once per batch and cached
    seed: int = 0
    spread: float = 1.0                            # initial position logits in [-spread, spread] (no K-collapse)
    scale_dir: float = 0.05                        # bound of the direction scale c (0 disables)
    scale_time: float = 0.0                        # bound of the time scale a (0 disables)
    # Learn the student's sigmas with the table (end-to-end stage): sigma_0 stays, the other N sigmas move
    # freely above `schedule_floor` (schedules.sigmas_from_logits). A list without a final 0 then ends at its
    # learned last sigma with no final model call (latency NFE = 2N, 2N - 1 with AFS), its target being the
    # teacher's end point at sigma 0.
    learn_schedule: bool = False
    schedule_floor: float = 0.002
    schedule_lr: float = 0.05                      # Adam rate of the schedule logits (cosine-decayed like lr)
    # A list of positive sigmas only: the last row steps to sigma 0 with its points anchored at the last sigma
    # (solver.integrate's to_zero): a denoised result with no final model call. Needs the teacher's end point.
    to_zero: bool = False
    grad_checkpointing: bool = False               # recompute each student step in backward (end-to-end, big models)
    sequential_points: bool = False                # one model call per point (graphs that cannot batch K points)
    checkpoint_path: str | None = None             # a single file, written atomically
    checkpoint_interval: int = 50
    resume: bool | str = False                     # True: continue the checkpoint (must exist); 'auto': if present
    # metadata only: the table asks samplers to replace a scheduler's sigmas by its own schedule
    # (solver.table_schedule_for) - for student schedules no ComfyUI scheduler produces
    override_sigmas: bool = False
    guidance_scale: float | None = None            # metadata only
    model_family: str | None = None                # metadata only

    @property
    def effective_order(self) -> int:
        return self.max_order if self.solver == "epd_plugin" else 1

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self, world_size: int = 1) -> None:
        def need(ok, problem, fix):
            if not ok:
                raise DistillError(f"{problem}. {fix}")
        try:
            sig = check_sigmas(torch.as_tensor(self.sigmas, dtype=torch.float64))
        except EPDSamplingError as e:
            raise DistillError(f"bad student sigmas: {e}") from None
        steps = sum(1 for s in sig[1:] if s > 0)
        need(steps >= 2, f"distillation needs at least 2 student steps (table rows), got {steps}",
             "Use steps >= 2 (a sigma list with at least 3 positive sigmas).")
        need(isinstance(self.num_points, int) and 1 <= self.num_points <= 64,
             f"K (num_points) must be 1..64, got {self.num_points!r}", "Use K = 1..3 as in the paper.")
        need(self.solver in ("epd", "epd_plugin"), f"unknown solver {self.solver!r}", "Use 'epd' or 'epd_plugin'.")
        need(isinstance(self.max_order, int) and 1 <= self.max_order <= 4, f"max_order={self.max_order!r}",
             "EPD-Plugin supports Adams-Bashforth orders 1..4.")
        need(self.teacher in TEACHERS, f"unknown teacher {self.teacher!r}", f"Use one of {TEACHERS}.")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}", f"Use one of {OBJECTIVES}.")
        need(isinstance(self.inserted_steps, int) and self.inserted_steps >= 0,
             f"inserted steps M={self.inserted_steps!r}", "Use M >= 0 (3 is close to the exact trajectory).")
        need(isinstance(self.teacher_steps, int) and self.teacher_steps >= 0,
             f"teacher_steps={self.teacher_steps!r}", "Use 0 (M insertions only) or e.g. 100.")
        need(math.isfinite(self.teacher_sigma_min) and self.teacher_sigma_min >= 0,
             f"teacher_sigma_min={self.teacher_sigma_min!r}", "Use a small positive sigma such as 0.002, or 0 to stop "
             "at the last student sigma.")
        need(self.iterations >= 1 and self.batch >= 1 and self.num_batches >= 1,
             f"iterations={self.iterations}, batch={self.batch}, num_batches={self.num_batches}", "All must be >= 1.")
        need(math.isfinite(self.lr) and self.lr > 0, f"learning rate {self.lr!r}", "Use a positive rate like 0.05.")
        need(self.lr_schedule in ("cosine", "constant"), f"lr_schedule {self.lr_schedule!r}",
             "Use 'cosine' or 'constant'.")
        need(0.0 < self.per_step_fraction < 1.0, f"per_step_fraction={self.per_step_fraction}",
             "Use a value in (0, 1).")
        need(0.0 <= self.scale_dir < 1.0 and 0.0 <= self.scale_time < 1.0,
             f"scale bounds {self.scale_dir}, {self.scale_time}", "Use small bounds such as 0.05, or 0 to disable.")
        need(self.checkpoint_interval >= 1, f"checkpoint_interval={self.checkpoint_interval}", "Use >= 1.")
        need(self.resume in (False, True, "auto"), f"resume={self.resume!r}", "Use False, True or 'auto'.")
        need(self.schedule.get("type") in (None, *SCHEDULE_TYPES), f"schedule type {self.schedule.get('type')!r}",
             f"Use one of {SCHEDULE_TYPES} ('explicit' for any other sigma list).")
        need(not (self.to_zero and sig[-1] == 0), "to_zero with a sigma list ending in 0",
             "Give the positive sigmas only: the last one anchors the final step to 0.")
        if self.learn_schedule:
            need(0 < self.schedule_floor < min(s for s in sig if s > 0), f"schedule_floor={self.schedule_floor}",
                 "Use a positive floor below the student's last positive sigma (e.g. 0.002).")
            need(math.isfinite(self.schedule_lr) and self.schedule_lr > 0, f"schedule_lr={self.schedule_lr!r}",
                 "Use a positive rate like 0.05.")
        need(self.batch % world_size == 0, f"batch {self.batch} does not split over {world_size} ranks",
             f"Use a batch that is a multiple of {world_size}.")


# ================================================================================================ objectives

def mse(a, b):
    return (a - b).square().mean()


def _final_state(model, x_last, sigmas, extra_args):
    """A sigma list ending in 0 finishes with the plain Euler step x = D(x, sigma_N) (no table row)."""
    if float(sigmas[-1].detach()) != 0.0:
        return x_last
    return _denoiser(model, extra_args)(x_last, sigmas[-2])


def _positive(sigmas):
    return sigmas[:-1] if float(sigmas[-1].detach()) == 0.0 else sigmas


def per_step_losses(model, x, sigmas, rows, targets, extra_args=None, max_order=1, afs=False, evaluate=None,
                    feature_fn=None, to_zero=False):
    """One loss per table row: step i starts from the student's OWN previous state, detached, so row i's
    loss reaches only row i. The last row's loss is on the final output (through the final Euler step to 0
    when the list ends in 0), with `feature_fn` distances if given."""
    extra_args = extra_args or {}
    states: list[torch.Tensor] = []
    integrate(model, x, _positive(sigmas), rows, extra_args, disable=True, max_order=max_order, afs=afs,
              evaluate=evaluate, detach_steps=True, states=states, to_zero=to_zero)
    n = len(states) - 1
    losses = [mse(states[i + 1], targets[i + 1]) for i in range(n - 1)]
    final = _final_state(model, states[-1], sigmas, extra_args)
    losses.append(_final_loss(final, targets[-1], feature_fn))
    return losses


def end_to_end_loss(model, x, sigmas, rows, target, extra_args=None, max_order=1, afs=False, evaluate=None,
                    feature_fn=None, checkpointed=False, to_zero=False):
    """Error of the final state through the whole student trajectory: every row gets gradient."""
    extra_args = extra_args or {}
    run = _trajectory_checkpointed if checkpointed else _trajectory
    x_last = run(model, x, _positive(sigmas), rows, extra_args, max_order, afs, evaluate, to_zero)
    return _final_loss(_final_state(model, x_last, sigmas, extra_args), target, feature_fn)


def _final_loss(final, target, feature_fn):
    return mse(final, target) if feature_fn is None else mse(feature_fn(final), feature_fn(target))


def _trajectory(model, x, sigmas, rows, extra_args, max_order, afs, evaluate, to_zero=False):
    return integrate(model, x, sigmas, rows, extra_args, disable=True, max_order=max_order, afs=afs,
                     evaluate=evaluate, to_zero=to_zero)


def _trajectory_checkpointed(model, x, sigmas, rows, extra_args, max_order, afs, evaluate, to_zero=False):
    """Same steps as solver.integrate, each wrapped in torch.utils.checkpoint: activations of one step at a
    time are kept, the model runs again in backward (memory ~ 1 step instead of N for big models)."""
    evaluate = evaluate or PointEvaluator(model, extra_args)
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []

    def step(i, x, *hist):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        if afs and i == 0:
            d_cur = x / torch.sqrt(1 + t_cur ** 2)
        else:
            d_cur = (x - model(x, t_cur * s_in, **extra_args)) / t_cur
        d_pred = adams_bashforth(d_cur, list(hist), max_order) if max_order > 1 else d_cur
        t_end = t_next.new_zeros(()) if to_zero and i == len(sigmas) - 2 else None
        return epd_step(evaluate, x, d_pred, t_cur, t_next, *(rows[n][i] for n in "rwca"), t_end=t_end), d_cur

    for i in range(len(sigmas) - 1):
        x, d_cur = grad_checkpoint(step, i, x, *history, use_reentrant=False)
        if max_order > 1:
            history = (history + [d_cur])[-(max_order - 1):]
    return x


# ============================================================================================= distributed

def _dist():
    """(rank, world_size); (0, 1) unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_mean(flat: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat = flat / world
    return flat


def _any_rank(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


# ================================================================================================= batches

def batch_seed(seed: int, index: int) -> int:
    """Noise batch `index` comes from its own generator, so any rank (or a resumed run) rebuilds it alone."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 1) % (2 ** 63 - 1)


def _shard(value, n: int, rank: int, world: int):
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        size = n // world
        return value[rank * size:(rank + 1) * size]
    return value


def make_batch(index: int, cfg: DistillConfig, noise_fn, extra_args_fn, rank: int = 0, world: int = 1):
    """The FULL batch drawn from its seed, then this rank's slice: the union of all ranks' slices is
    exactly the single-process batch (N ranks x b == 1 process x N*b)."""
    g = torch.Generator().manual_seed(batch_seed(cfg.seed, index))
    x = noise_fn(g, cfg.batch)
    extra = extra_args_fn(g, cfg.batch) if extra_args_fn is not None else {}
    return _shard(x, cfg.batch, rank, world), {k: _shard(v, cfg.batch, rank, world) for k, v in extra.items()}


# ============================================================================================= checkpoints

def save_checkpoint(path, theta, optimizer, iteration: int, losses: list, cfg: DistillConfig, scales) -> None:
    """Logits, Adam moments and steps, loss history, iteration and config in one safetensors file, written
    atomically (temp + fsync + rename): a crash or a full disk leaves the previous checkpoint untouched.
    Noise needs no RNG state: batch j is always drawn from batch_seed(seed, j)."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in zip(_LEAF_NAMES, theta)}
    tensors.update(adam_state_tensors(optimizer))
    tensors["loss_history"] = torch.tensor(losses, dtype=torch.float64)
    meta = {"format": CHECKPOINT_FORMAT, "iteration": str(iteration), "config": json.dumps(cfg.to_json()),
            "scales": json.dumps(list(scales)), "rng": json.dumps({"seed": cfg.seed, "scheme": "batch_seed(seed, j)"}),
            "torch": torch.__version__}
    write_checkpoint(path, tensors, meta, DistillError)


def load_checkpoint(path) -> dict:
    meta, tensors = read_checkpoint(path, CHECKPOINT_FORMAT, "EPD distillation", DistillError,
                                    ", or point to the right file")
    try:
        return {"iteration": int(meta["iteration"]), "config": json.loads(meta["config"]),
                "scales": tuple(json.loads(meta["scales"])), "tensors": tensors,
                "losses": tensors["loss_history"].tolist()}
    except Exception as e:  # noqa: BLE001 - missing fields: a damaged or foreign file
        raise DistillError(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {e}). Delete it to start over, "
                           "or point to the right file.") from None


def _check_checkpoint_folder(path: Path) -> None:
    folder = path.parent
    problem = folder_problem(folder)
    if problem is None:
        return
    if folder.is_dir():  # it exists but does not take a file
        raise DistillError(f"checkpoint folder {folder} {problem}. Fix its permissions or free space, or choose "
                           "another checkpoint folder.")
    raise DistillError(f"checkpoint folder {folder} {problem}. Create it (mkdir -p) or choose another checkpoint "
                       "folder.")


def _check_resumable(ckpt: dict, cfg: DistillConfig, path) -> None:
    saved, now = ckpt["config"], cfg.to_json()
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in _RESULT_FIELDS if saved.get(k) != now.get(k)]
    if diffs:
        raise DistillError(f"checkpoint {path} was made with different settings ({'; '.join(diffs[:4])}). Use the "
                           "original settings to resume, or delete the checkpoint / choose another name to start over.")


# ================================================================================================= training

def _lr_factor(cfg: DistillConfig, it: int, start: int, end: int) -> float:
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (it - start) / max(end - start, 1)))


def _stages(cfg: DistillConfig) -> list[tuple[str, int, int]]:
    if cfg.objective != "per_step+end_to_end":
        return [(cfg.objective, 0, cfg.iterations)]
    split = min(max(1, round(cfg.iterations * cfg.per_step_fraction)), cfg.iterations - 1) if cfg.iterations > 1 else 1
    return [("per_step", 0, split), ("end_to_end", split, cfg.iterations)]


def _stage_at(cfg, it):
    return next(s for s in _stages(cfg) if s[1] <= it < s[2])


def initial_logits(cfg: DistillConfig, init: EPDParams | None, steps: int, device):
    """Logits (float64 leaves) and scale bounds. A given table must have the right shape; its own bounds are
    kept (the logits mean nothing without them)."""
    if init is None:
        init = EPDParams.neutral(steps, cfg.num_points, spread=cfg.spread, scale_dir=cfg.scale_dir,
                                 scale_time=cfg.scale_time)
    elif (init.num_steps, init.num_points) != (steps, cfg.num_points):
        raise DistillError(f"the initial table has {init.num_steps} steps x K={init.num_points}, the run needs "
                           f"{steps} x K={cfg.num_points}. Use a matching table or none.")
    theta = [t.detach().to(device=device, dtype=torch.float64).clone().requires_grad_(True) for t in init.tensors()]
    return theta, (float(init.scale_dir), float(init.scale_time))


def _check_model_gradient(model, x, sigma, extra_args):
    """A model run under no_grad / inference_mode (or detaching) gives silently useless tables."""
    probe = x[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(probe, sigma * probe.new_ones([1]), **_shard_first(extra_args, x.shape[0]))
    if not out.requires_grad:
        raise DistillError("the model's output carries no gradient w.r.t. its input (it runs under torch.no_grad / "
                           "inference_mode, or detaches). Distillation back-propagates through the model: call it "
                           "with gradients enabled (torch.inference_mode(False), torch.enable_grad()).")


def _shard_first(extra_args, n):
    return {k: (v[:1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v) for k, v in extra_args.items()}


def distill(model, sigmas=None, noise_fn=None, config: DistillConfig | None = None, extra_args_fn=None,
            progress=None, should_stop=None, init: EPDParams | None = None, feature_fn=None,
            history: list | None = None, on_teacher=None) -> EPDParams:
    """Train an EPD table for `model` on the student `sigmas` (default: config.sigmas).

    noise_fn(generator, n) -> the n starting states x at sigmas[0] (e.g. sigma_0 * randn, or ComfyUI's noise
        scaling); extra_args_fn(generator, n) -> model keyword arguments for those samples (e.g. class labels),
        tensors with first dimension n are sliced per rank. progress(iteration, loss) after every iteration;
        should_stop() before every iteration (True -> DistillCancelled, nothing new written). feature_fn(x) ->
        features for the last step's loss (default plain L2). `history` receives the loss of every iteration
        (including those before a resume). on_teacher(batch, num_batches) just before the teacher solves a
        batch (the slow first pass over the batches: a caller can show it as its own stage)."""
    cfg = dataclasses.replace(config or DistillConfig())
    if sigmas is not None:
        cfg.sigmas = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    rank, world = _dist()
    cfg.validate(world)
    if noise_fn is None:
        raise DistillError("noise_fn is required: noise_fn(generator, n) -> n starting states at sigmas[0]")
    ckpt_path = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    ckpt = _prepare_checkpoint(cfg, ckpt_path, rank)

    x_probe, extra_probe = make_batch(0, cfg, noise_fn, extra_args_fn, rank, world)
    device, dtype = x_probe.device, torch.promote_types(x_probe.dtype, torch.float32)
    sig = torch.tensor(cfg.sigmas, dtype=dtype, device=device)
    steps = int((sig[1:] > 0).sum())
    # a learned schedule's target is the ODE's end point at sigma 0, whatever the student's last sigma becomes
    end_target = (cfg.learn_schedule or cfg.to_zero) and float(sig[-1]) > 0
    teacher_sig = torch.cat([sig, sig.new_zeros(1)]) if end_target else sig
    theta, scales, optimizer, start, losses = _starting_state(cfg, init, ckpt, steps, device)
    _check_model_gradient(model, x_probe, sig[0], extra_probe)
    teacher_cache: dict[int, tuple] = {}
    poll = _poller(should_stop) if world == 1 else None
    last_saved = start if ckpt is not None else None

    for it in range(start, cfg.iterations):
        if should_stop is not None and _any_rank(bool(should_stop()), world, device):
            raise DistillCancelled(_cancel_message(it, ckpt_path, last_saved))
        name, s0, s1 = _stage_at(cfg, it)
        if it == s0 and s0 > 0:
            optimizer = _adam(theta, cfg)  # fresh moments for the end-to-end fine-tuning stage
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(cfg, it, s0, s1)

        j = it % cfg.num_batches
        if j not in teacher_cache:  # (x0, extra_args, teacher states): the teacher runs once per batch
            if on_teacher is not None:
                on_teacher(j, cfg.num_batches)
            x0, extra = make_batch(j, cfg, noise_fn, extra_args_fn, rank, world)
            teacher_cache[j] = (x0, extra, teacher_states(model, x0, teacher_sig, cfg.teacher, cfg.inserted_steps,
                                                               extra, poll, cfg.teacher_steps, cfg.teacher_sigma_min))
        batch = teacher_cache[j]

        try:
            loss_value = _loss_and_gradients(name, model, batch, sig, theta, scales, cfg, feature_fn, world)
        except EPDSamplingError as e:
            raise DistillError(f"iteration {it}: {e} {_kept(ckpt_path, last_saved)}") from None
        if not math.isfinite(loss_value) or not all(torch.isfinite(t.grad).all() for t in theta):
            raise DistillError(f"the loss became {loss_value} at iteration {it} (training diverged). Lower the "
                               f"learning rate (now {cfg.lr}) or check the model and its precision. "
                               f"{_kept(ckpt_path, last_saved)}")
        optimizer.step()
        losses.append(loss_value)

        done = it + 1
        if ckpt_path is not None and rank == 0 and (done % cfg.checkpoint_interval == 0 or done == cfg.iterations):
            save_checkpoint(ckpt_path, theta, optimizer, done, losses, cfg, scales)
            last_saved = done
        if progress is not None:
            progress(done, loss_value)

    if history is not None:
        history[:] = losses
    if len(theta) > 4:  # the learned schedule becomes the table's own
        with torch.no_grad():
            cfg.sigmas = learned_sigmas(theta, sig.double(), cfg).tolist()
    return _result_table(theta[:4], scales, cfg, losses, steps, world)


def _starting_state(cfg, init, ckpt, steps, device):
    """Logits, scale bounds, Adam, first iteration and loss history: fresh, or exactly as checkpointed."""
    theta, scales = initial_logits(cfg, init, steps, device)
    if cfg.learn_schedule:
        positive = [s for s in cfg.sigmas if s > 0]
        theta.append(schedule_logits(positive, cfg.schedule_floor).to(device).requires_grad_(True))
    optimizer = _adam(theta, cfg)
    if ckpt is None:
        return theta, scales, optimizer, 0, []
    with torch.no_grad():
        for name, t in zip(_LEAF_NAMES, theta):
            t.copy_(ckpt["tensors"][name])
    load_adam_state(optimizer, ckpt["tensors"], theta)
    return theta, tuple(ckpt["scales"]), optimizer, ckpt["iteration"], list(ckpt["losses"])


_LEAF_NAMES = ("theta_r", "theta_w", "theta_c", "theta_a", "schedule_logits")


def _adam(theta, cfg: DistillConfig):
    """Adam over the table logits (lr) and, when learned, the schedule logits (schedule_lr)."""
    groups = [{"params": theta[:4], "base_lr": cfg.lr}]
    if len(theta) > 4:
        groups.append({"params": theta[4:], "base_lr": cfg.schedule_lr})
    return torch.optim.Adam([{**g, "lr": g["base_lr"]} for g in groups])


def learned_sigmas(theta, sig, cfg: DistillConfig, train_schedule: bool = True):
    """The student's sigma list: fixed, or built from the learned schedule logits (theta[4])."""
    if len(theta) <= 4:
        return sig
    logits = theta[4] if train_schedule else theta[4].detach()
    pos = sigmas_from_logits(sig[0], cfg.schedule_floor, logits).to(sig.dtype)
    return torch.cat([pos, sig.new_zeros(1)]) if float(sig[-1]) == 0 else pos


def _loss_and_gradients(name, model, batch, sig, theta, scales, cfg, feature_fn, world) -> float:
    """Loss of this rank's batch and its gradient in theta[*].grad, both averaged over the ranks (equal shards,
    so the average of the means is the mean over the full batch). Returns the loss. A learned schedule is
    trained by the end-to-end objective only: the per-step targets sit at the initial student sigmas."""
    x0, extra, targets = batch
    sig = learned_sigmas(theta, sig, cfg, train_schedule=name != "per_step")
    rows = {k: v.to(sig.dtype) for k, v in activate(*theta[:4], *scales).items()}
    evaluate = PointEvaluator(model, extra, sequential=cfg.sequential_points)
    kw = dict(extra_args=extra, max_order=cfg.effective_order, afs=cfg.afs, evaluate=evaluate, feature_fn=feature_fn,
              to_zero=cfg.to_zero)
    if name == "per_step":
        loss = torch.stack(per_step_losses(model, x0, sig, rows, targets, **kw)).sum()
    else:
        loss = end_to_end_loss(model, x0, sig, rows, targets[-1], checkpointed=cfg.grad_checkpointing, **kw)
    grads = torch.autograd.grad(loss, theta, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(grads, theta)]
                     + [loss.detach().to(torch.float64).reshape(1)])
    flat = _all_mean(flat, world)
    offset = 0
    for t in theta:
        t.grad = flat[offset:offset + t.numel()].view_as(t).clone()
        offset += t.numel()
    return float(flat[-1])


def _prepare_checkpoint(cfg: DistillConfig, path: Path | None, rank: int) -> dict | None:
    """Check the folder (before any work) and load the checkpoint to resume, if any."""
    if path is None:
        if cfg.resume is True:
            raise DistillError("resume was requested but no checkpoint path is set. Pass the checkpoint folder/path.")
        return None
    if rank == 0:
        _check_checkpoint_folder(path)
    if path.exists():
        if cfg.resume is False:
            raise DistillError(f"a checkpoint already exists at {path}. Resume it (--resume / resume=True), or delete "
                               "it or choose another path to start over (nothing was overwritten).")
        ckpt = load_checkpoint(path)
        _check_resumable(ckpt, cfg, path)
        log.info("EPD distill: resuming %s at iteration %d/%d", path, ckpt["iteration"], cfg.iterations)
        return ckpt
    if cfg.resume is True:
        raise DistillError(f"no checkpoint to resume at {path}. Check the path, or run without resume to start.")
    return None


def _poller(should_stop):
    if should_stop is None:
        return None

    def poll():
        if should_stop():
            raise DistillCancelled("cancelled while computing the teacher trajectories; nothing new was written")
    return poll


def _kept(path, last_saved) -> str:
    if path is None:
        return "No checkpoint was configured."
    if last_saved is None:
        return f"No checkpoint had been written yet ({path})."
    return f"The last checkpoint ({path}, iteration {last_saved}) is unchanged."


def _cancel_message(it, path, last_saved) -> str:
    return f"distillation cancelled before iteration {it}; nothing new was written. {_kept(path, last_saved)}" + (
        " Run again with resume to continue." if last_saved else "")


def _result_table(theta, scales, cfg: DistillConfig, losses, steps, world) -> EPDParams:
    positive = [s for s in cfg.sigmas if s > 0]
    schedule = dict(cfg.schedule)
    schedule.setdefault("type", "explicit")
    schedule["sigmas"] = positive
    schedule["final_zero"] = cfg.sigmas[-1] == 0
    if cfg.override_sigmas or cfg.learn_schedule:
        schedule["override_sigmas"] = True
    if cfg.learn_schedule:
        schedule.update(type="explicit", learned=True, floor=cfg.schedule_floor)
    if cfg.to_zero:
        schedule["to_zero"] = True
    provenance = {"trainer": "epd_core.distill", "teacher": cfg.teacher, "M": cfg.inserted_steps,
                  "teacher_steps": cfg.teacher_steps, "teacher_sigma_min": cfg.teacher_sigma_min,
                  "objective": cfg.objective, "iterations": cfg.iterations, "lr": cfg.lr, "batch": cfg.batch,
                  "num_batches": cfg.num_batches, "seed": cfg.seed, "world_size": world,
                  "final_loss": losses[-1] if losses else None,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    meta = {"solver": cfg.solver, "max_order": cfg.effective_order, "afs": cfg.afs, "schedule": schedule,
            "guidance_scale": cfg.guidance_scale, "model_family": cfg.model_family, "provenance": provenance,
            "num_points": cfg.num_points,
            "latency_nfe": 2 * steps - int(cfg.afs) + int(cfg.sigmas[-1] == 0)}  # to_zero: no final call
    t = [p.detach().to("cpu", torch.float32) for p in theta]
    return EPDParams(*t, scales[0], scales[1], meta)
