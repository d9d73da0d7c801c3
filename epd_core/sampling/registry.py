"""The solver variants this pack knows, one entry each: a variant's facts and its behaviour, the latter as direct
references to functions of its own module (the paper's two: paper.py; epd_ms: multistep.py; dyweight:
dyweight.py), so that no other code compares a solver's name:
    its table  - the tensors it stores, their activation into rows, what a table must satisfy, its untrained table,
                 its picture (picture.py);
    sampling   - its part of plan.plan (which sigmas and rows a table gets on a list) and the front-end
                 sample_<name>(model, x, sigmas, params, ...);
    training   - distillation's rows, loop and trained table, DistillConfig's checks, the EPD Trainer's fields, the
                 recipe the command line and the table-making scripts share, the options the command line implies,
                 and the recipe's loss, objective, gradient clip and lr scale.
Every list of solvers (table validation, the trainers' options, the command line, the node dropdowns and tooltips,
KSampler's sampler names) is read from here too. A new variant is its module and one entry (an import and a
SolverVariant below); where its tables are published in another format, that format is an entry of
epd_core/tables/formats.py.
This module imports the variant modules; they and tables/params.py never import it at module level (params.py reaches
it when it validates or activates a table), so the package's module-level imports have no cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from epd_core.sampling import dyweight, multistep
from epd_core.sampling import paper
from epd_core.tables.params import HISTORY_TENSOR, TENSOR_NAMES


@dataclass(frozen=True)
class SolverVariant:
    name: str
    title: str                  # with the description: the node tooltips
    description: str
    default_order: int          # Adams-Bashforth order of the predictor direction (1: plain d_cur)
    calls_per_step: int         # sequential model calls one step costs (its latency), the K points being one call
    rl: bool                    # RDPO can fine-tune it (a Dirichlet policy over softmax weights)
    own_last_step: bool         # the table's last row is the step to sigma 0 (no separate final Euler call)
    parallel_points: bool       # a row's K columns are points evaluated in one model call (dyweight: past directions)
    # ---- its table and its sampling
    tensors: tuple[str, ...]    # what its tables store and a trainer optimises, in the order of EPDParams.tensors()
    table_rows: Callable        # (tensors, scales, fix_last_dir_scale=False) -> {row name: tensor}: the activation
    check_table: Callable       # (params, fail): what its tables must satisfy beyond the file format
    # (sigmas, num_points, builtin, spread=, scale_dir=, scale_time=, afs=) -> the table a training run starts from
    untrained_table: Callable
    sample: Callable            # the front-end sample_<name>(model, x, sigmas, params, ...)
    # (params, sigmas, model_sampling=, own_schedule=, strict=) -> plan.Plan: the sigmas, table rows and end-point
    # mode a table (None: the variant's built-in) gets on a sigma list; plan.plan dispatches here
    plan: Callable
    # ---- its training (distill.py, DistillConfig, the EPD Trainer)
    train_rows: Callable        # (leaves, scales) -> the differentiable rows the student runs
    # (model, x, sigmas, rows, extra_args, callback, disable=, max_order=, afs=, evaluate=, detach_steps=,
    # checkpoint_steps=, to_zero=) -> the student's state at the end of `sigmas`
    train_loop: Callable
    trained_table: Callable     # (leaves, scales, cfg, metadata) -> the EPDParams a run returns
    check_config: Callable      # (cfg, need): what a DistillConfig of it must satisfy
    # the EPD Trainer's recipe: (scheduler_list, steps=, num_points=, cfg_scale=, lr=, sigma_min=) -> DistillConfig
    # fields, scheduler_list(n) giving a ComfyUI scheduler's n + 1 positive sigmas and a final 0 with their spec
    trainer_fields: Callable
    picture: Callable           # (params, sigmas) -> its table as a picture.PointsPicture / MatrixPicture (Preview)
    # (positive sigmas, sigma_min, lr) -> the DistillConfig fields its recipe sets, which the EPD Trainer (through
    # trainer_fields), the command line (for options left at their defaults) and the table-making scripts share
    recipe: Callable | None = None
    trainer_note: str = ""      # the EPD Trainer's tooltip: what its inputs mean for this variant
    official: str | None = None  # the student sampler the authors' predictor files name it by (import_official)
    from_scheduler: bool = False  # the EPD Trainer starts it from a ComfyUI scheduler's list, never an EPD schedule
    implies: tuple[tuple[str, object], ...] = ()  # (option, value) the command line always sets for it
    lr_scale: float = 1.0       # the EPD Trainer's learning rate times this (free coefficients move less than logits)
    # None: a table's rows are resampled to any step count, and without a table a neutral one runs; else the
    # ComfyUI sampler it is exactly without a table, which also runs where no table has the asked step count
    untrained: str | None = None
    # the distance to the teacher a trainer uses unless told (DistillConfig.loss): "rmse", the mean of per-sample
    # RMSEs (the benchmark's metric), trained better EPD-MS tables than "mse" side by side (docs/results.md)
    loss: str = "mse"
    # its training recipe where it differs from DistillConfig's defaults: the only objective it trains with (None:
    # any), and the gradient-norm clip (0: none)
    objective: str | None = None
    grad_clip: float = 0.0

    def sample_fn(self):
        return self.sample


def _paper(name: str, title: str, description: str, order: int, sample, official: str) -> SolverVariant:
    """EPD-Solver and EPD-Plugin: the paper's step and table (paper.py), told apart by the predictor's order."""
    return SolverVariant(
        name, title, description, order, calls_per_step=2, rl=True, own_last_step=False, parallel_points=True,
        tensors=TENSOR_NAMES, table_rows=paper.table_rows, check_table=paper.check_table,
        untrained_table=partial(paper.untrained_table, solver=name, max_order=order), sample=sample,
        plan=paper.plan, picture=paper.picture,
        train_rows=paper.table_rows, train_loop=paper.train_loop, trained_table=paper.trained_table,
        check_config=paper.check_config, trainer_fields=paper.trainer_fields,
        trainer_note="steps = table rows (KSampler then takes steps + 1 steps)", official=official)


SOLVERS: dict[str, SolverVariant] = {v.name: v for v in (
    _paper("epd", "EPD-Solver", "the paper's step: d_cur, then K parallel points in one call", 1, paper.sample_epd,
           official="epd"),
    _paper("epd_plugin", "EPD-Plugin", "EPD with an Adams-Bashforth (iPNDM) predictor for the K points",
           paper.PLUGIN_ORDER, paper.sample_epd_plugin, official="ipndm"),
    SolverVariant(
        "epd_ms", "EPD-MS", "one call per step: the current point and K-1 look-ahead points in one call, combined "
        "with the last 3 directions by learned coefficients on a learned schedule", 1, calls_per_step=1, rl=False,
        own_last_step=True, parallel_points=True, tensors=(*TENSOR_NAMES, HISTORY_TENSOR),
        table_rows=multistep.table_rows, check_table=multistep.check_table,
        untrained_table=multistep.untrained_table, sample=multistep.sample_epd_ms, plan=multistep.plan,
        train_rows=multistep.table_rows,
        train_loop=multistep.train_loop, trained_table=multistep.trained_table, check_config=multistep.check_config,
        trainer_fields=multistep.trainer_fields, recipe=multistep.recipe, picture=multistep.picture,
        trainer_note="steps = KSampler steps = model calls on the chosen ComfyUI scheduler's list, K counts the "
                     "current point; starts as the built-in strongest at the CFG and learns its coefficients with "
                     "the schedule",
        from_scheduler=True, implies=(("to_zero", True), ("afs", False)), lr_scale=0.1,
        untrained="gradient_estimation", loss="rmse"),
    SolverVariant(
        "dyweight", "DyWeight", "one call per step: past directions combined by a learned lower-triangular weight "
        "matrix, each evaluated at a learned time scale (arXiv 2603.11607)", 1, calls_per_step=1, rl=False,
        own_last_step=True, parallel_points=False, tensors=TENSOR_NAMES,
        table_rows=dyweight.table_rows, check_table=dyweight.check_table, untrained_table=dyweight.untrained_table,
        sample=dyweight.sample_dyweight, plan=dyweight.plan, train_rows=dyweight.train_rows,
        train_loop=dyweight.train_loop,
        trained_table=dyweight.trained_table, check_config=dyweight.check_config,
        trainer_fields=dyweight.trainer_fields, picture=dyweight.picture,
        trainer_note="steps = KSampler steps = model calls, K ignored; starts as euler, end to end with gradient "
                     "clipping",
        lr_scale=0.1, untrained="euler",
        # DyWeight's recipe: Adam, cosine decay, gradient clipping, end-to-end L2 to the teacher
        objective="end_to_end", grad_clip=1.0),
)}
NAMES = tuple(SOLVERS)


class UnknownSolver(ValueError):
    pass


def variant(name: str) -> SolverVariant:
    if name not in SOLVERS:
        raise UnknownSolver(f"unknown solver {name!r}: use one of {', '.join(NAMES)}")
    return SOLVERS[name]


def predictor_order(solver: str, max_order: int | None) -> int:
    """The predictor order a run of `solver` uses: the given order for variants with a multistep predictor
    (default: the variant's), 1 for the others."""
    v = variant(solver)
    if v.default_order == 1:
        return 1
    return int(max_order or v.default_order)
