"""The solver variants this pack knows and their shared facts, in one place: every list of solvers (table
validation, the trainers' options, the command line, the node dropdowns, KSampler's sampler names) and the
training recipe's per-solver values (loss, objective, gradient clip, learning-rate scale) are read from here.
Not yet here: each variant's tensors and validation (params.py), its untrained table and training loop hooks
(distill.py) and its picture (nodes/plotting.py) still branch on the name, so a new variant touches those too.
Imports nothing from the package (params.py imports it); the sampling front-ends are looked up lazily by name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SolverVariant:
    name: str
    title: str
    description: str
    default_order: int          # Adams-Bashforth order of the predictor direction (1: plain d_cur)
    calls_per_step: int         # sequential model calls one step costs (its latency), the K points being one call
    learns: tuple[str, ...]     # the table tensors a trainer optimises
    rl: bool                    # RDPO can fine-tune it (a Dirichlet policy over softmax weights)
    own_last_step: bool         # the table's last row is the step to sigma 0 (no separate final Euler call)
    sampler: str                # "module:function" of the front-end sample_<name>(model, x, sigmas, params, ...)
    paper: bool                 # the published method (official tables use it); False for this pack's own
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
        module, fn = self.sampler.split(":")
        return getattr(importlib.import_module(module, __package__), fn)


_PAPER_TENSORS = ("theta_r", "theta_w", "theta_c", "theta_a")

SOLVERS: dict[str, SolverVariant] = {v.name: v for v in (
    SolverVariant("epd", "EPD-Solver", "the paper's step: d_cur, then K parallel points in one call", 1, 2,
                  _PAPER_TENSORS, True, False, ".solver:sample_epd", True),
    SolverVariant("epd_plugin", "EPD-Plugin", "EPD with an Adams-Bashforth (iPNDM) predictor for the K points", 3, 2,
                  _PAPER_TENSORS, True, False, ".solver:sample_epd_plugin", True),
    SolverVariant("epd_ms", "EPD-MS", "one call per step: the current point and K-1 look-ahead points in one call, "
                  "combined with the last 3 directions by learned coefficients on a learned schedule", 1, 1,
                  ("theta_r", "theta_w", "theta_h"), False, True, ".multistep:sample_epd_ms", False, 0.1,
                  "gradient_estimation", "rmse"),
    SolverVariant("dyweight", "DyWeight", "one call per step: past directions combined by a learned lower-triangular "
                  "weight matrix, each evaluated at a learned time scale (arXiv 2603.11607)", 1, 1,
                  ("theta_w", "theta_a"), False, True, ".dyweight:sample_dyweight", True, 0.1, "euler",
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
