"""EPD-Solver and EPD-Plugin as ComfyUI / k-diffusion samplers: `sample_epd(model, x, sigmas, params)`
(EPD-MS, this pack's one-call variant: `sample_epd_ms`, in multistep.py; DyWeight: dyweight.py; every variant:
registry.SOLVERS).

The step and the loop are in `epd.py`, a table's own sigmas and the one decision of which sigmas and rows it gets
in `plan.py`; this module holds the paper variants' part of that decision (`plan`: which rows a sigma list gets,
`rows_for_sigmas`; whether a table samples on its own schedule, `table_schedule_for`), how options reach the loop,
and at the end the paper variants' table and training functions their registry entries (epd, epd_plugin) refer to.
"""
from __future__ import annotations

import numpy as np
import torch

from epd_core.sampling.epd import (EPDSamplingError, adams_bashforth, check_sigmas, epd_step, final_euler_step,
                                   integrate, positive_part, positive_steps)
from epd_core.tables.params import EPDParams, activate
from epd_core.sampling.picture import PointsPicture
from epd_core.sampling.points import PointEvaluator
from epd_core.sampling.plan import Plan, model_sampling_of, own_schedule, sigma_max_of
from epd_core.sampling.plan import plan as table_plan
from epd_core.runtime import warn_once

__all__ = ["sample_epd", "sample_epd_plugin", "rows_for_sigmas",
           "table_schedule_for", "table_for_sigmas", "plan", "integrate",
           "epd_step", "adams_bashforth", "check_sigmas", "PointEvaluator", "EPDSamplingError"]
PLUGIN_ORDER = 3  # EPD-Plugin's predictor order unless a table or the caller gives one


def rows_for_sigmas(params: EPDParams, sigmas, device=None, dtype=torch.float32) -> tuple[dict, str]:
    """The table rows to use for a sigma list, and how they were chosen (`table_for_sigmas`)."""
    table, mode = table_for_sigmas(params, sigmas)
    return {k: v.to(device=device, dtype=dtype) for k, v in table.activated().items()}, mode


def table_for_sigmas(params: EPDParams, sigmas) -> tuple[EPDParams, str]:
    """The table whose rows run on a sigma list (one row per step to a positive sigma), and how it was chosen:
    'exact'    - the sigmas are the table's own training schedule;
    'by_index' - same number of steps, schedule unknown or different: row i for step i;
    'resampled'- different number of steps: logits interpolated at each step's normalised log-sigma midpoint
                 within the table's schedule (or its step index when the schedule was not recorded).
    A table is only exact for its own schedule; the other two are documented approximations."""
    sig = check_sigmas(sigmas)
    pos = [s for s in sig if s > 0]
    n_pos = positive_steps(sig)
    table = params.schedule_sigmas
    n = params.num_steps
    thetas = [t.detach().double() for t in params.tensors()]
    if n_pos == n and table is not None and np.allclose(pos[:n + 1], table.tolist(), rtol=1e-3):
        mode, picked = "exact", thetas
    elif n_pos == n:
        mode, picked = "by_index", thetas
    else:
        mode = "resampled"
        steps = np.arange(n_pos)
        mids = np.log(np.asarray(pos[:-1])[:n_pos] * np.asarray(pos[1:n_pos + 1])) / 2 if n_pos else steps
        if table is not None:
            tlog = table.log().numpy()
            t_mid = (tlog[:-1] + tlog[1:]) / 2
            u_table = (t_mid[0] - t_mid) / max(t_mid[0] - t_mid[-1], 1e-12) if n > 1 else np.zeros(1)
            u = (mids[0] - mids) / max(mids[0] - mids[-1], 1e-12) if n_pos > 1 else np.zeros(n_pos)
        else:
            u_table = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
            u = np.linspace(0, 1, n_pos) if n_pos > 1 else np.zeros(n_pos)
        picked = [torch.from_numpy(np.stack([np.interp(u, u_table, th[:, k].numpy())
                                             for k in range(th.shape[1])], axis=1)) for th in thetas]
    resampled = params.with_tensors([p.float() for p in picked],
                                    {k: v for k, v in params.metadata.items() if k not in ("schedule", "num_steps")})
    return resampled, mode


def table_schedule_for(params: EPDParams, sigmas, sigma_max: float | None = None):
    """The table's own sigma list replacing `sigmas`, or None to use `sigmas` as given: plan.own_schedule (the
    one rule every variant's plan follows; `sigma_max`: the model's, marking a full denoise)."""
    return own_schedule(params, sigmas, sigma_max)


def sample_epd(model, x, sigmas, params: EPDParams, extra_args=None, callback=None, disable=None, **opts):
    """EPD-Solver. Options: afs (default: the table's), max_batch (max samples per model call for the
    K points), sequential (one call per point with a uniform sigma), strict (error instead of resampling
    the table when the sigma list is not its training schedule), own_schedule (False: never replace the
    sigmas by the table's own schedule, see `table_schedule_for`; default: when the table asks for it)."""
    return _sample(model, x, sigmas, params, extra_args, callback, disable, max_order=1, **opts)


def sample_epd_plugin(model, x, sigmas, params: EPDParams, extra_args=None, callback=None, disable=None, **opts):
    """EPD-Plugin: EPD with an Adams-Bashforth (iPNDM) predictor. Extra option: max_order (1..4, default:
    the table's own when its variant has a multistep predictor (an epd_plugin table), else PLUGIN_ORDER)."""
    own = params.max_order if params.variant.default_order > 1 else None
    order = int(opts.pop("max_order", None) or own or PLUGIN_ORDER)
    if not 1 <= order <= 4:
        raise EPDSamplingError(f"max_order={order}: EPD-Plugin supports orders 1..4")
    return _sample(model, x, sigmas, params, extra_args, callback, disable, max_order=order, **opts)


def _sample(model, x, sigmas, params, extra_args, callback, disable, max_order, afs=None, max_batch=None,
            sequential=False, strict=False, evaluate=None, own_schedule=None, model_sampling=None):
    if not isinstance(params, EPDParams):
        raise EPDSamplingError(f"params must be an EPDParams table, got {type(params).__name__}")
    v = params.variant
    if v.table_rows is not table_rows:  # rows other than r, w, c, a: its own loop runs them
        raise EPDSamplingError(f"this table is for {v.title} ({params.describe()}): sample it with {v.name} "
                               f"(KSampler's {v.name}, or EPD Sampler with solver auto / {v.name})")
    if len(sigmas) < 2:
        return x
    ms = model_sampling if model_sampling is not None else model_sampling_of(model)
    p = table_plan(params, sigmas, model_sampling=ms, own_schedule=own_schedule, strict=strict)
    if p.own:
        callback = _rescaled_progress(callback, len(sigmas) - 1, len(p.sigmas) - 1)
    # rows in >= fp32 (0-dim sigma tensors do not take part in type promotion, so the rows set the precision)
    rows = p.rows(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    extra_args = extra_args or {}
    evaluate = evaluate or PointEvaluator(model, extra_args, max_batch=max_batch, sequential=sequential)
    return integrate(model, x, p.sigmas, rows, extra_args, callback, disable, max_order=max_order,
                     afs=params.afs if afs is None else bool(afs), evaluate=evaluate, to_zero=p.to_zero)


def plan(params: EPDParams, sigmas, model_sampling=None, own_schedule=None, strict: bool = False) -> Plan:
    """The paper variants' part of plan.plan: the table's own schedule where plan.own_schedule gives one, then its
    rows for the list (`table_for_sigmas`: exact, by index, or resampled to the step count; logged, `strict`: an
    error where not exact); a "to_zero" table's last row steps to 0 only on its own sigmas."""
    sigma_max = sigma_max_of(model_sampling)
    own = None
    if own_schedule is not False and not strict:
        own = table_schedule_for(params, sigmas, sigma_max)
        if own is not None:
            warn_once((id(params), len(sigmas), "own"), "EPD: this table samples on its own schedule (%s); the "
                      "scheduler's sigmas are replaced (%s)", params.describe(),
                      ", ".join(f"{float(v):.4g}" for v in own))
            sigmas = own
    table, mode = table_for_sigmas(params, _as_own(params, sigmas) if own is not None else sigmas)
    if mode != "exact" and (params.schedule or mode == "resampled"):
        if strict:
            raise EPDSamplingError(f"the sigma list ({len(sigmas) - 1} steps) is not the schedule this table was "
                                   f"trained for ({params.describe()}); use EPD Sigmas for its exact schedule")
        warn_once((id(params), len(sigmas), mode), "EPD: sigmas differ from the table's training schedule; "
                  "using rows %s (%s)", mode, params.describe())
    # a to_zero table's last row steps to sigma 0, but only on its own sigmas (which end at its anchor)
    to_zero = params.to_zero and mode == "exact" and float(sigmas[-1]) > 0
    return Plan(torch.as_tensor(sigmas), table, mode, to_zero, own is not None)


def _as_own(params: EPDParams, sigmas):
    """`sigmas` with the table's own first sigma where the rest is its own schedule (plan.starting_at gave the list
    the noise level x is at): its rows are the exact ones."""
    table = params.schedule_sigmas
    pos = sigmas[sigmas > 0]
    if len(pos) < 2 or len(pos) > len(table) or float(pos[0]) == float(table[0]) or not torch.allclose(
            pos[1:].double().cpu(), table[1:len(pos)].double(), rtol=1e-6, atol=0):
        return sigmas
    out = sigmas.clone()
    out[0] = table[0]
    return out


def _rescaled_progress(callback, total: int, steps: int):
    """The caller's progress bar counts the steps of the sigma list it gave (ComfyUI: `i + 1` of `total`); when
    the table's own list has another number of steps, report step i as its share of `total`, so the bar still
    ends at 100 %."""
    if callback is None or total == steps or steps < 1:
        return callback

    def rescaled(info):
        callback({**info, "i": (info["i"] + 1) * total // steps - 1})
    return rescaled


# ---- the paper's variants: their table and training (registry.SOLVERS["epd"], ["epd_plugin"]) ----------------------
def table_rows(tensors, scales, fix_last_dir_scale: bool = False) -> dict:
    """r, w, c, a (N, K): the logits activated within the scale bounds (params.activate). Differentiable."""
    return activate(*tensors, *scales, fix_last_dir_scale)


def check_table(params: EPDParams, fail) -> None:
    """Nothing beyond the file format: any K, scale bounds and schedule."""


def untrained_table(sigmas, num_points: int = 2, builtin=None, spread: float = 1.0, scale_dir: float = 0.0,
                    scale_time: float = 0.0, afs: bool = False, **metadata) -> EPDParams:
    """A row per step of `sigmas` to a positive sigma: EPDParams.neutral's K points spread around the geometric
    midpoint with equal weights (`builtin`: none, the paper's tables start from no ComfyUI sampler)."""
    return EPDParams.neutral(positive_steps(sigmas), num_points, spread, scale_dir=scale_dir, scale_time=scale_time,
                             afs=afs, **metadata)


def train_loop(model, x, sigmas, rows, extra_args, callback=None, **options):
    """Distillation's student: the rows over the list's positive sigmas (`options`: epd.integrate's), then the
    plain Euler step to 0 when the list ends there."""
    x_last = integrate(model, x, positive_part(sigmas), rows, extra_args, callback, **options)
    return final_euler_step(model, x_last, sigmas, extra_args)


def trained_table(leaves, scales, cfg, metadata: dict) -> EPDParams:
    return EPDParams(*(t.detach().to("cpu", torch.float32) for t in leaves), scales[0], scales[1], metadata)


def check_config(cfg, need) -> None:
    """Every run DistillConfig.validate accepts."""


def trainer_fields(scheduler_list, steps: int, num_points: int, **_recipe) -> dict:
    """The EPD Trainer's run: `steps` table rows on the chosen schedule (KSampler then takes steps + 1 steps)."""
    sigmas, spec = scheduler_list(steps)
    return {"sigmas": sigmas, "schedule": spec, "num_points": num_points}


def picture(params: EPDParams, sigmas=None) -> PointsPicture:
    """Per step the K points t_k = t_next^r * t_cur^(1-r): dot area ~ weight w, colour = direction scale c."""
    act = {k: v.detach().double() for k, v in params.activated().items()}
    colour = ((act["c"] - 1) / params.scale_dir).clamp(-1, 1) if params.scale_dir else None

    def labels(i: int) -> list[str]:
        return [f"r{r:.2f} w{w:.2f} c{c:.3f} a{a:.3f}" for r, w, c, a in zip(*(act[k][i].tolist() for k in "rwca"))]
    return PointsPicture("EPD", "dot: point t_k = t_next^r * t_cur^(1-r) on a log-sigma axis; dot area ~ weight w; "
                         "colour = direction scale c (blue < 1 < red)", act["r"], act["w"].clamp(min=0).sqrt(),
                         colour, labels)
