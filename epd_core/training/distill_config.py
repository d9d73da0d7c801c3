"""What defines a distillation run (`DistillConfig`, validated with errors that name the fix) and its errors."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from epd_core.sampling.epd import EPDSamplingError, check_sigmas, positive_steps
from epd_core.tables.params import SCHEDULE_TYPES
from epd_core.sampling.registry import NAMES as SOLVER_NAMES
from epd_core.sampling.registry import predictor_order, variant
from epd_core.training.teachers import TEACHERS

OBJECTIVES = ("per_step", "end_to_end", "per_step+end_to_end")
LOSSES = ("mse", "rmse")  # mean squared error over the batch; mean over samples of each one's RMSE
# Fields that change the result: a checkpoint only resumes a run whose values are identical.
RESULT_FIELDS = ("sigmas", "num_points", "solver", "max_order", "afs", "teacher", "inserted_steps", "objective",
                 "teacher_steps", "teacher_sigma_min", "iterations", "per_step_fraction", "lr", "lr_schedule", "batch",
                 "num_batches", "seed", "spread", "scale_dir", "scale_time", "learn_schedule", "schedule_floor",
                 "schedule_lr", "to_zero", "builtin", "learn_table", "loss", "cfg_range", "grad_clip")


class DistillError(RuntimeError):
    """Distillation cannot run or continue; the message names the problem and the fix."""


class DistillCancelled(DistillError):
    """`should_stop()` asked to stop. Nothing new was written; the last checkpoint is intact."""


@dataclass
class DistillConfig:
    """Everything that defines a distillation run. `sigmas` is the student's descending sigma list (N+1
    positive values, optionally a final 0); the table gets one row per step to a positive sigma."""
    sigmas: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)   # type info for the table, e.g. {"type": "polynomial", "rho": 7}
    num_points: int = 2                            # K
    solver: str = "epd"                            # a name of solvers.NAMES (its entry: the variant's training)
    max_order: int = 3                             # Adams-Bashforth order of EPD-Plugin (EPD always uses 1)
    afs: bool = False                              # analytic first step
    # DPM++(2M): one model call per fine step, half of Heun's; on the MNIST demo at NFE 4 and 8 its own error stays
    # 1-6 % of the student's and the tables are as good (bench/results/teacher_cost_mnist.md)
    teacher: str = "dpmpp"
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
    # "rmse": the mean of per-sample RMSEs, the benchmark's metric; less dominated by a few hard samples than "mse".
    # None: the solver's own (solvers.SolverVariant.loss: rmse for epd_ms, mse for the paper's two)
    loss: str | None = None
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
    learn_table: bool = True                       # False: only the schedule is learned (an ablation: LD3/AYS-like)
    # A list of positive sigmas only: the last row steps to sigma 0 with its points anchored at the last sigma
    # (solver.integrate's to_zero): a denoised result with no final model call. Needs the teacher's end point.
    to_zero: bool = False
    # epd_ms / dyweight: the ComfyUI sampler its untrained table reproduces, where training starts
    # (its check_config names them); None: the solver's own (SolverVariant.untrained)
    builtin: str | None = None
    # the gradient-norm clip (0: none); None: the solver's own (SolverVariant.grad_clip: 1.0 for dyweight)
    grad_clip: float | None = None
    grad_checkpointing: bool = False               # recompute each student step in backward (end-to-end, big models)
    sequential_points: bool = False                # one model call per point (graphs that cannot batch K points)
    checkpoint_path: str | None = None             # a single file, written atomically
    checkpoint_interval: int = 50
    resume: bool | str = False                     # True: continue the checkpoint (must exist); 'auto': if present
    # metadata only: the table asks samplers to replace a scheduler's sigmas by its own schedule
    # (paper.table_schedule_for) - for student schedules no ComfyUI scheduler produces
    override_sigmas: bool = False
    guidance_scale: float | None = None            # metadata only (the CFG the model was built with)
    # [lo, hi]: every noise batch gets its own CFG scale drawn uniformly from it, passed to the model as the extra
    # argument `cfg` (the demo models and the EPD Trainer's guider take it): one table for a range of CFG scales
    cfg_range: list | None = None
    model_family: str | None = None                # metadata only

    def __post_init__(self):
        if self.solver not in SOLVER_NAMES:  # refused by validate()
            return
        v = variant(self.solver)
        if self.loss is None:
            self.loss = v.loss
        if self.builtin is None:
            self.builtin = v.untrained or "gradient_estimation"
        if self.grad_clip is None:
            self.grad_clip = v.grad_clip
        if v.objective is not None and self.objective == OBJECTIVES[-1]:  # the default: the solver's own instead
            self.objective = v.objective

    @property
    def calls_per_step(self) -> int:
        return variant(self.solver).calls_per_step

    @property
    def effective_order(self) -> int:
        return predictor_order(self.solver, self.max_order)

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
        steps = positive_steps(sig)
        need(steps >= 2, f"distillation needs at least 2 student steps (table rows), got {steps}",
             "Use steps >= 2 (a sigma list with at least 3 positive sigmas).")
        need(isinstance(self.num_points, int) and 1 <= self.num_points <= 64,
             f"K (num_points) must be 1..64, got {self.num_points!r}", "Use K = 1..3 as in the paper.")
        need(self.solver in SOLVER_NAMES, f"unknown solver {self.solver!r}", f"Use one of {SOLVER_NAMES}.")
        own = variant(self.solver)  # its recipe and checks
        need(own.objective in (None, self.objective), f"{self.solver} trains with the {own.objective} objective "
             f"only, not {self.objective!r}", f"Use objective='{own.objective}'.")
        need(self.grad_clip is not None and math.isfinite(self.grad_clip) and self.grad_clip >= 0,
             f"grad_clip={self.grad_clip!r}", "Use a positive gradient-norm bound such as 1.0, or 0 for none.")
        own.check_config(self, need)
        need(self.cfg_range is None or (isinstance(self.cfg_range, (list, tuple)) and len(self.cfg_range) == 2
                                        and all(type(v) in (int, float) and math.isfinite(v) and v >= 0
                                                for v in self.cfg_range) and self.cfg_range[0] <= self.cfg_range[1]),
             f"cfg_range={self.cfg_range!r}", "Give two CFG scales [lo, hi] with 0 <= lo <= hi, or none.")
        need(isinstance(self.max_order, int) and 1 <= self.max_order <= 4, f"max_order={self.max_order!r}",
             "EPD-Plugin supports Adams-Bashforth orders 1..4.")
        need(self.teacher in TEACHERS, f"unknown teacher {self.teacher!r}", f"Use one of {TEACHERS}.")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}", f"Use one of {OBJECTIVES}.")
        need(self.loss in LOSSES, f"unknown loss {self.loss!r}", f"Use one of {LOSSES}.")
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
        need(self.learn_table or self.learn_schedule, "learn_table=False with a fixed schedule learns nothing",
             "Use learn_schedule=True with it, or learn_table=True.")
        if self.learn_schedule:
            need(0 < self.schedule_floor < min(s for s in sig if s > 0), f"schedule_floor={self.schedule_floor}",
                 "Use a positive floor below the student's last positive sigma (e.g. 0.002).")
            need(math.isfinite(self.schedule_lr) and self.schedule_lr > 0, f"schedule_lr={self.schedule_lr!r}",
                 "Use a positive rate like 0.05.")
        need(self.batch % world_size == 0, f"batch {self.batch} does not split over {world_size} ranks",
             f"Use a batch that is a multiple of {world_size}.")
