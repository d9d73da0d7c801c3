"""Which sigmas and rows a table gets on a sigma list: ONE decision, `plan(params, sigmas, ...)`, that KSampler's
entries, EPD Sampler, EPD Compare, both RL entry points and the benchmark reach (the variants' samplers call it),
each variant's part of it being its registry entry's `plan` (paper.plan for epd / epd_plugin, multistep.plan,
dyweight.plan), which returns a `Plan`: the sigmas the loop runs, the table whose rows run (None: the variant's
untrained built-in on those sigmas), how they were chosen and the end-point mode (`to_zero`: the last row steps to 0
from the list's last positive sigma, its anchor). A table's own list is `sampler_sigmas` (EPD Sigmas' output, what
`plan` takes without a list).

The shared rule (`own_schedule`): a table whose schedule says "override_sigmas" runs on its own sigmas when the list
is a full denoise of it (`full_denoise`): the list starts at the table's first sigma, at the model's sigma_max (the
noise level KSampler and EPD Compare start from), or is the table's own list after its first sigma. A learned
schedule may start below sigma_max (the MNIST EPD-MS NFE 7 table's starts at 14.44, ddim_uniform's first sigma,
where KSampler's full denoise starts at 14.61): its own sigmas then run with the first one replaced by the list's,
the noise level x is at, logged once. Measured on the MNIST demo model (32 noises, RMSE to a 200-step Heun
reference): 0.028 that way, 0.030 with the schedule rescaled to start at sigma_max, 0.034 on the stored schedule
from x at sigma_max, 0.035-0.072 on KSampler's own lists (row i for step i), the path before this rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from epd_core.sampling.epd import EPDSamplingError, check_sigmas
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.runtime import warn_once
from epd_core.sampling.schedules import REBUILDABLE, sigmas_for, with_final_zero

FULL_DENOISE_RTOL = 1e-3  # a list "starts at" a sigma within this relative tolerance (ComfyUI's float32 lists)


@dataclass
class Plan:
    sigmas: torch.Tensor                # the list the variant's loop runs
    table: EPDParams | None             # the table whose rows run (resampled to the list's steps where needed);
    #                                     None: the variant's untrained built-in on `sigmas` (epd_ms, dyweight)
    mode: str                           # 'exact' | 'by_index' | 'resampled' | 'builtin' (see paper.rows_for_sigmas)
    to_zero: bool                       # the last row steps to 0 from the list's last positive sigma (its anchor)
    own: bool = False                   # the table's own schedule replaced the given list

    def rows(self, device=None, dtype=torch.float32) -> dict:
        """The table's activated rows on `device` in `dtype` (None for the built-in)."""
        if self.table is None:
            return None
        return {k: v.to(device=device, dtype=dtype) for k, v in self.table.activated().items()}


def plan(params: EPDParams | None, sigmas=None, model_sampling=None, solver: str | None = None, own_schedule=None,
         strict: bool = False, **options) -> Plan:
    """The sigmas, rows and end-point mode `params` gets on `sigmas` (a ComfyUI list ending in 0, or positive
    sigmas whose last one anchors the step to 0). `model_sampling`: the model's noise schedule (its sigma_max marks a
    full denoise; a ComfyUI sampler's `model` carries it, see `model_sampling_of`). `solver`: the variant when
    `params` is None (its built-in). No `sigmas`: the table's own list (`sampler_sigmas`). `own_schedule` False:
    never the table's own sigmas; `strict`: an error where the rows would not be the table's exact ones; `options`:
    what the variant's own part takes (epd_ms: `builtin`; dyweight: `model`)."""
    from epd_core.sampling.registry import variant  # the registry imports the variant modules, which import this one
    if params is None:
        return variant(solver).plan(None, sigmas, model_sampling=model_sampling, own_schedule=own_schedule,
                                    strict=strict, **options)
    if sigmas is None:  # the table's own list, as EPD Sigmas gives it
        sigmas = sampler_sigmas(params, model_sampling)
    # a table whose schedule is defined through the model: its rows are exact on its own list from any node
    params = with_own_sigmas(params, sigmas, model_sampling)
    return params.variant.plan(params, sigmas, model_sampling=model_sampling, own_schedule=own_schedule,
                               strict=strict, **options)


def sampler_plan(solver: str, sampler_model, sigmas, params: EPDParams | None, model_sampling=None, how: str = "",
                 **options) -> Plan:
    """`plan` for a variant's sampler: `params` must be None or a table of `solver` (else an error that says `how`
    to get one), the model's noise schedule is the one `sampler_model` (the sampler's `model`) carries unless
    `model_sampling` is given."""
    if params is not None and not isinstance(params, EPDParams):
        raise EPDSamplingError(f"params must be an EPDParams table, got {type(params).__name__}")
    if params is not None and params.solver != solver:
        from epd_core.sampling.registry import variant  # the registry imports the variant modules
        article = "an" if solver[0] in "aeiou" else "a"
        raise EPDSamplingError(f"this is an {params.solver} table ({params.describe()}); {variant(solver).title} "
                               f"needs {article} {solver} table ({how}), or sample it with its own solver")
    ms = model_sampling if model_sampling is not None else model_sampling_of(sampler_model)
    return plan(params, sigmas, ms, solver=solver, **options)


def size_on(metadata: dict, steps: int, calls: int | None = None) -> int:
    """How far a table (its header metadata) is from a KSampler run of `steps` steps to a positive sigma and `calls`
    steps in all: its rows against `steps`, except for a table whose last row steps to 0 (schedule "to_zero"),
    which `plan` runs on its own sigmas on any full denoise, so KSampler's steps mean its model calls (N rows cost N
    times its variant's calls per step, one less with AFS; never the header's "latency_nfe")."""
    if calls is not None and metadata["schedule"].get("to_zero") is True:
        from epd_core.sampling.registry import variant  # the registry imports the variant modules
        per_step = variant(metadata["solver"]).calls_per_step
        return abs(per_step * metadata["num_steps"] - int(metadata.get("afs") is True) - calls)
    return abs(metadata["num_steps"] - steps)


def sigma_max_of(model_sampling) -> float | None:
    value = getattr(model_sampling, "sigma_max", None)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None


def model_sampling_of(model):
    """The noise schedule behind a ComfyUI sampler function's `model` (its CFG wrapper's patcher), found by duck
    typing (epd_core never imports ComfyUI); None elsewhere."""
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    try:
        return patcher.get_model_object("model_sampling") if patcher is not None else None
    except (AttributeError, KeyError):
        return None


def full_denoise(first: float, own, sigma_max: float | None = None, positive=None) -> bool:
    """Whether a list starting at `first` (its positive sigmas `positive`) denoises fully for a table whose own
    positive sigmas are `own`: it starts at the table's first sigma or at the model's `sigma_max`, or its sigmas
    after the first are the table's own (EPD Sigmas' list for a table whose schedule starts below sigma_max)."""
    own = [float(s) for s in own]
    if math.isclose(first, own[0], rel_tol=FULL_DENOISE_RTOL):
        return True
    if sigma_max is not None and math.isclose(first, sigma_max, rel_tol=FULL_DENOISE_RTOL):
        return len(own) < 2 or first > own[1]  # its own sigmas from there on still descend
    if positive is None or first < own[0]:
        return False
    rest = [float(s) for s in positive[1:]]
    n = len(rest)
    return 0 < n <= len(own) - 1 and np.allclose(rest, own[1:n + 1], rtol=FULL_DENOISE_RTOL, atol=0)


def starting_at(params: EPDParams, own, first: float):
    """`own` (the table's own sigmas, a tensor or list) with its first sigma replaced by `first`, the noise level x
    is at, where they differ (logged once); else `own` itself."""
    start = float(own[0])
    if math.isclose(first, start, rel_tol=FULL_DENOISE_RTOL):
        return own
    warn_once((id(params), "first-sigma", round(first, 4)), "EPD: this table's schedule starts at %.4g, the sigma "
              "list (a full denoise) at %.4g: its own sigmas run with the first one replaced by %.4g (%s)", start,
              first, first, params.describe())
    if isinstance(own, list):
        return [first, *own[1:]]
    own = own.clone()
    own[0] = first
    return own


def own_schedule(params: EPDParams, sigmas, sigma_max: float | None = None):
    """The table's own sigma list replacing `sigmas`, or None to use `sigmas` as given.

    Only for tables whose schedule says "override_sigmas": true (tables trained on a schedule that ComfyUI's
    schedulers do not produce, e.g. the shipped demo tables: polynomial rho 7 ending at a last sigma well above
    the model's sigma_min, so that the final Euler step's model call does useful work; learned schedules). Lists
    ending in 0 are replaced, keeping their first sigma (the noise level of x) and their number of steps:
      - full denoise (`full_denoise`), same step count: the table's training sigmas (rows 'exact'), the first one
        replaced by the list's where they differ (`starting_at`);
      - otherwise (other step count, or img2img starting lower): the table's schedule type (polynomial /
        logsnr / time_uniform) rebuilt from the list's first sigma down to the table's last sigma.
    A "to_zero" table (its last row steps to 0) gets its own positive sigmas on any full denoise. Lists without a
    final 0, schedules that need the model (discrete, flowmatch) and starts below the table's last sigma are used
    as given."""
    spec = params.schedule or {}
    table = params.schedule_sigmas
    if not spec.get("override_sigmas") or table is None:
        return None
    sig = check_sigmas(sigmas)
    n_pos = len(sig) - 1
    if len(sig) < 3 or sig[-1] != 0:
        return None
    full = full_denoise(sig[0], table.tolist(), sigma_max, sig[:-1])
    if params.to_zero and full:  # positive sigmas only: its last row steps to 0 (any step count:
        ref = torch.as_tensor(sigmas)  # the table was picked for its model calls, see nodes/tables.py)
        return starting_at(params, table, sig[0]).to(dtype=ref.dtype, device=ref.device)
    if n_pos == table.numel() and full:
        own = starting_at(params, table, sig[0])
    elif spec.get("type") in REBUILDABLE and n_pos >= 2 and sig[0] > 2 * float(table[-1]):
        rebuilt = {k: v for k, v in spec.items() if k != "sigmas"}
        rebuilt.update(sigma_min=float(table[-1]), sigma_max=sig[0])
        own = sigmas_for(rebuilt, n_pos - 1)
    else:
        return None
    ref = torch.as_tensor(sigmas)
    own = torch.cat([own, own.new_zeros(1)])
    if np.allclose(own.numpy(), np.asarray(sig), rtol=1e-3, atol=0):
        return None  # already the table's own list
    return own.to(dtype=ref.dtype, device=ref.device)


def own_sigmas(params: EPDParams, model_sampling=None) -> torch.Tensor:
    """The N+1 positive sigmas a table was trained on, rebuilt for a model (its ComfyUI `model_sampling`, needed
    by discrete and flowmatch schedules and by imported tables whose range comes from the model)."""
    if params.schedule.get("type") is None and params.schedule_sigmas is None:
        raise EPDParamsError(f"the table ({params.describe()}) records no schedule; use a scheduler node instead "
                             "of EPD Sigmas, or re-train the table")
    return sigmas_for(params.schedule, params.num_steps, model_sampling)


def sampler_sigmas(params: EPDParams, model_sampling=None, append_zero: bool | None = None) -> torch.Tensor:
    """The sigma list a sampler is given for this table (EPD Sigmas' output): its `own_sigmas`, then 0 when
    `append_zero` (None: when its training list ended in 0). A variant that owns its last step (epd_ms) keeps
    its anchor out of a list ending in 0: N steps, as a scheduler would give them. Given the model, a table that
    samples on its own schedule starts at the model's sigma_max, as KSampler's full denoise does (plan.starting_at:
    a learned schedule may start below it), so that this list gives KSampler's samples."""
    own = own_sigmas(params, model_sampling)
    sigma_max = sigma_max_of(model_sampling)
    if sigma_max is not None and params.schedule.get("override_sigmas") and full_denoise(sigma_max, own, sigma_max):
        own = starting_at(params, own, sigma_max)
    if append_zero is None:
        append_zero = params.schedule.get("final_zero", True) or params.variant.own_last_step
    if not append_zero:
        return own
    if params.variant.own_last_step:
        own = own[:-1]
    return with_final_zero(own)


def with_own_sigmas(params: EPDParams, sigmas, model_sampling) -> EPDParams:
    """A table that records a schedule type but no sigmas (discrete / flowmatch through the model; an imported
    polynomial table's range comes from the model too), given `sigmas` that are exactly its `own_sigmas` for this
    model: a copy with those sigmas written in, so its rows are 'exact' (the same whether the list came from EPD
    Sigmas, a scheduler or KSampler). Otherwise the table itself."""
    if params.schedule_sigmas is not None or params.schedule.get("type") is None or model_sampling is None:
        return params
    try:
        own = own_sigmas(params, model_sampling).double()
    except (EPDParamsError, ValueError, AttributeError, RuntimeError):
        return params
    pos = torch.as_tensor(sigmas).detach().double().cpu()
    pos = pos[pos > 0]
    if pos.shape != own.shape or not torch.allclose(pos, own, rtol=1e-4, atol=0):
        return params
    table = params.clone()
    table.metadata["schedule"] = dict(table.schedule, sigmas=own.tolist())
    return table
