"""EPD-Solver and EPD-Plugin (docs/method.md, "A step") as samplers in the k-diffusion / ComfyUI convention:
`model(x, sigma * s_in, **extra_args)` returns the denoised prediction D(x, sigma).

One step from t_cur to t_next > 0:
    d_cur = (x - D(x, t_cur)) / t_cur                          (or the AFS estimate on step 0)
    t_k   = t_next^r_k * t_cur^(1 - r_k)                       (geometric interpolation)
    x_k   = x + (t_k - t_cur) * d_pred                         (d_pred = d_cur, or Adams-Bashforth for Plugin)
    d_k   = (x_k - D(x_k, a_k t_k)) / t_k                      (all K points in ONE batched model call)
    x'    = x + (t_next - t_cur) * sum_k w_k c_k d_k
The step to sigma = 0 is a plain Euler step, x' = D(x, t_cur), like ComfyUI's own samplers.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import trange

from .params import EPDParams

log = logging.getLogger("epd")

# Adams-Bashforth coefficients for equal steps, newest direction first (docs/method.md).
AB_COEFFS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class EPDSamplingError(RuntimeError):
    """Sampling cannot produce a correct image (bad sigmas, NaN from the model, mismatched table)."""


def adams_bashforth(d_cur: torch.Tensor, history: list[torch.Tensor], max_order: int) -> torch.Tensor:
    """iPNDM predictor direction of order min(max_order, 1 + len(history)); history is oldest first."""
    coeffs = AB_COEFFS[min(max_order, 1 + len(history))]
    d = coeffs[0] * d_cur
    for c, d_old in zip(coeffs[1:], reversed(history)):
        d = d + c * d_old
    return d


def epd_step(evaluate, x, d_pred, t_cur, t_next, r, w, c, a, t_end=None):
    """x at t_next from x at t_cur, given the predictor direction and one row (K,) of the table.
    `evaluate(xs, sigmas)` denoises the stacked points xs (K, B, ...) at per-point sigmas (K,).
    With `t_end` (a table's step to zero, t_end = 0) the points still lie between t_cur and t_next, which is
    then only their anchor, and the combined direction carries x all the way to t_end."""
    shape = (-1,) + (1,) * x.dim()
    t_k = t_next ** r * t_cur ** (1 - r)
    x_k = x.unsqueeze(0) + (t_k - t_cur).view(shape).to(x.dtype) * d_pred.unsqueeze(0)
    denoised_k = evaluate(x_k, a * t_k)
    acc = torch.promote_types(x.dtype, torch.float32)  # combine in >= fp32 for fp16/bf16 models
    # x_k upcast before subtracting (a no-op for fp32/fp64 x): x_k - D(x_k) rounded to bf16 costs ~10 ulps of x'
    d_k = (x_k.to(acc) - denoised_k).to(acc) / t_k.view(shape).to(acc)  # divide by t_k, not a_k t_k (spec §2)
    d_mix = ((w * c).view(shape).to(acc) * d_k).sum(0)
    t_end = t_next if t_end is None else t_end
    return (x.to(acc) + (t_end - t_cur).to(acc) * d_mix).to(x.dtype)


class PointEvaluator:
    """Denoises K stacked points in one call of batch K*B, point-major (all B samples of point 1, then point 2,
    ...), which is how ComfyUI tiles conditioning. Falls back to chunks of whole points when `max_batch` asks
    for it or the device runs out of memory (remembered for the rest of the run), and to one call per point
    (uniform sigma) in `sequential` mode."""

    def __init__(self, model, extra_args=None, max_batch: int | None = None, sequential: bool = False):
        self.model = model
        self.extra_args = extra_args or {}
        self.max_batch = max_batch
        self.sequential = sequential
        self.points_per_call: int | None = 1 if sequential else None
        self.calls = 0

    def __call__(self, xs: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        num_points, batch = xs.shape[:2]
        per_call = self.points_per_call or num_points
        if self.max_batch:
            per_call = min(per_call, max(1, self.max_batch // batch))
        while True:
            try:
                return self._run(xs, sigmas, per_call)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
                if not _is_oom(e) or per_call == 1:
                    raise
                per_call = max(1, per_call // 2)
                self.points_per_call = per_call
                _free_cache(xs.device)
                log.warning("EPD: out of memory on the batch of %d points; retrying %d point(s) per call for "
                            "the rest of this run", num_points, per_call)

    def _run(self, xs, sigmas, per_call):
        num_points, batch = xs.shape[:2]
        outs = []
        for start in range(0, num_points, per_call):
            chunk = xs[start:start + per_call]
            n = chunk.shape[0]
            sig = sigmas[start:start + n].to(xs.dtype).repeat_interleave(batch)
            out = self.model(chunk.reshape(n * batch, *xs.shape[2:]), sig, **self.extra_args)
            self.calls += 1
            outs.append(out.reshape(chunk.shape))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """Sigmas must be finite, >= 0 and strictly descending (a final 0 allowed). Returns them as floats."""
    if sigmas.dim() != 1:
        raise EPDSamplingError(f"sigmas must be a 1-D list, got shape {tuple(sigmas.shape)}")
    sig = sigmas.detach().double().cpu().tolist()  # one host sync per run
    if not all(np.isfinite(sig)):
        raise EPDSamplingError(f"sigmas contain NaN or inf: {sig}. Check the scheduler / SIGMAS input.")
    if any(s < 0 for s in sig) or any(b >= a for a, b in zip(sig, sig[1:])):
        raise EPDSamplingError(f"sigmas must be >= 0 and strictly descending, got {sig}. "
                               "Check the scheduler / SIGMAS input (e.g. a flipped or repeated list).")
    return sig


def integrate(model, x, sigmas, rows, extra_args=None, callback=None, disable=None, max_order: int = 1,
              afs: bool = False, evaluate=None, detach_steps: bool = False, states: list | None = None,
              to_zero: bool = False):
    """Run EPD (max_order 1) or EPD-Plugin (max_order > 1) over `sigmas` with table rows
    {'r','w','c','a'}: tensors (steps, K), one row per step to a positive sigma.
    `detach_steps` cuts the graph between steps (per-step distillation); `states` collects x at every sigma.
    `to_zero` (positive sigmas only): the last row steps to sigma 0, its points anchored at the last sigma
    (`epd_step`'s t_end), so the result is denoised without a final model call."""
    extra_args = extra_args or {}
    sig = check_sigmas(sigmas)
    n_pos = sum(1 for s in sig[1:] if s > 0)
    if rows["r"].shape[0] != n_pos:
        raise EPDSamplingError(f"table has {rows['r'].shape[0]} rows for {n_pos} steps")
    if to_zero and sig[-1] == 0:
        raise EPDSamplingError("to_zero needs a list of positive sigmas (the last one is the final step's anchor)")
    evaluate = evaluate or PointEvaluator(model, extra_args)
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []
    last = len(sig) - 2
    bad_steps = [~torch.isfinite(x).all()]  # entry 0: the input itself (e.g. a NaN latent from upstream)
    if states is not None:
        states.append(x)
    for i in trange(len(sig) - 1, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        if detach_steps:
            x, history = x.detach(), [h.detach() for h in history]
        if afs and i == 0 and sig[1] > 0:
            d_cur = x / torch.sqrt(1 + t_cur ** 2)  # analytic first step: no model call
            denoised = x - t_cur * d_cur
        else:
            denoised = model(x, t_cur * s_in, **extra_args)
            d_cur = (x - denoised) / t_cur
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sig[i + 1] == 0:
            x = denoised  # Euler step to sigma 0
        else:
            d_pred = adams_bashforth(d_cur, history, max_order) if max_order > 1 else d_cur
            t_end = t_next.new_zeros(()) if to_zero and i == last else None
            x = epd_step(evaluate, x, d_pred, t_cur, t_next, *(rows[n][i] for n in "rwca"), t_end=t_end)
            if max_order > 1:
                history = (history + [d_cur])[-(max_order - 1):]
        bad_steps.append(~torch.isfinite(x).all())  # checked once at the end: no per-step host sync
        if states is not None:
            states.append(x)
    bad = torch.stack(bad_steps)
    if bool(bad.any()):
        first = int(bad.float().argmax()) - 1
        if first < 0:
            raise EPDSamplingError("the input latent already contains NaN/inf before the first step; check the "
                                   "node that produced it (VAE Encode, a latent upscale, a previous sampler)")
        raise EPDSamplingError(f"the model produced NaN/inf at step {first} (sigma {sig[first]:.4g} -> "
                               f"{sig[first + 1]:.4g}). Check the model, its precision (try fp32/bf16) and the CFG "
                               "scale; the result would be a black image.")
    return x


def rows_for_sigmas(params: EPDParams, sigmas, device=None, dtype=torch.float32) -> tuple[dict, str]:
    """The table rows to use for a sigma list, and how they were chosen:
    'exact'    - the sigmas are the table's own training schedule;
    'by_index' - same number of steps, schedule unknown or different: row i for step i;
    'resampled'- different number of steps: logits interpolated at each step's normalised log-sigma midpoint
                 within the table's schedule (or its step index when the schedule was not recorded).
    A table is only exact for its own schedule; the other two are documented approximations."""
    sig = check_sigmas(torch.as_tensor(sigmas))
    pos = [s for s in sig if s > 0]
    n_pos = sum(1 for s in sig[1:] if s > 0)
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
    resampled = EPDParams(*(p.float() for p in picked), params.scale_dir, params.scale_time,
                          {k: v for k, v in params.metadata.items() if k not in ("schedule", "num_steps")})
    rows = {k: v.to(device=device, dtype=dtype) for k, v in resampled.activated().items()}
    return rows, mode


_warned: set = set()
_REBUILDABLE = ("polynomial", "logsnr", "time_uniform")


def table_schedule_for(params: EPDParams, sigmas):
    """The table's own sigma list replacing `sigmas`, or None to use `sigmas` as given.

    Only for tables whose schedule says "override_sigmas": true (tables trained on a schedule that ComfyUI's
    schedulers do not produce, e.g. the shipped demo tables: polynomial rho 7 ending at a last sigma well above
    the model's sigma_min, so that the final Euler step's model call does useful work). Lists ending in 0 are
    replaced, keeping their first sigma (the noise level of x) and their number of steps:
      - full denoise, same step count: the table's training sigmas (rows 'exact');
      - otherwise (other step count, or img2img starting lower): the table's schedule type (polynomial /
        logsnr / time_uniform) rebuilt from the list's first sigma down to the table's last sigma.
    Lists without a final 0, schedules that need the model (discrete, flowmatch) and starts below the table's
    last sigma are used as given."""
    spec = params.schedule or {}
    table = params.schedule_sigmas
    if not spec.get("override_sigmas") or table is None:
        return None
    sig = check_sigmas(torch.as_tensor(sigmas))
    n_pos = len(sig) - 1
    if len(sig) < 3 or sig[-1] != 0:
        return None
    full_denoise = np.isclose(sig[0], float(table[0]), rtol=1e-3)
    if params.to_zero and full_denoise:  # positive sigmas only: its last row steps to 0 (any step count:
        ref = torch.as_tensor(sigmas)        # the table was picked for its model calls, see nodes/tables.py)
        return table.to(dtype=ref.dtype, device=ref.device)
    if n_pos == table.numel() and full_denoise:
        own = table
    elif spec.get("type") in _REBUILDABLE and n_pos >= 2 and sig[0] > 2 * float(table[-1]):
        from .schedules import schedule_sigmas
        rebuilt = {k: v for k, v in spec.items() if k != "sigmas"}
        rebuilt.update(sigma_min=float(table[-1]), sigma_max=sig[0])
        own = schedule_sigmas(rebuilt, n_pos)
    else:
        return None
    ref = torch.as_tensor(sigmas)
    own = torch.cat([own, own.new_zeros(1)])
    if np.allclose(own.numpy(), np.asarray(sig), rtol=1e-3, atol=0):
        return None  # already the table's own list
    return own.to(dtype=ref.dtype, device=ref.device)


def _warn_once(key, msg, *args):
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def sample_epd(model, x, sigmas, params: EPDParams, extra_args=None, callback=None, disable=None, **opts):
    """EPD-Solver. Options: afs (default: the table's), max_batch (max samples per model call for the
    K points), sequential (one call per point with a uniform sigma), strict (error instead of resampling
    the table when the sigma list is not its training schedule), own_schedule (False: never replace the
    sigmas by the table's own schedule, see `table_schedule_for`; default: when the table asks for it)."""
    return _sample(model, x, sigmas, params, extra_args, callback, disable, max_order=1, **opts)


def sample_epd_plugin(model, x, sigmas, params: EPDParams, extra_args=None, callback=None, disable=None, **opts):
    """EPD-Plugin: EPD with an Adams-Bashforth (iPNDM) predictor. Extra option: max_order (1..4, default:
    the table's own when it is an epd_plugin table, else 3)."""
    default_order = params.max_order if params.solver == "epd_plugin" else 3
    order = int(opts.pop("max_order", None) or default_order)
    if not 1 <= order <= 4:
        raise EPDSamplingError(f"max_order={order}: EPD-Plugin supports orders 1..4")
    return _sample(model, x, sigmas, params, extra_args, callback, disable, max_order=order, **opts)


def _sample(model, x, sigmas, params, extra_args, callback, disable, max_order, afs=None, max_batch=None,
            sequential=False, strict=False, evaluate=None, own_schedule=None):
    if not isinstance(params, EPDParams):
        raise EPDSamplingError(f"params must be an EPDParams table, got {type(params).__name__}")
    if len(sigmas) < 2:
        return x
    if own_schedule is not False and not strict:
        own = table_schedule_for(params, sigmas)
        if own is not None:
            _warn_once((id(params), len(sigmas), "own"), "EPD: this table samples on its own schedule (%s); the "
                       "scheduler's sigmas are replaced (%s)", params.describe(),
                       ", ".join(f"{float(v):.4g}" for v in own))
            callback = _rescaled_progress(callback, len(sigmas) - 1, len(own) - 1)
            sigmas = own
    # rows in >= fp32 (0-dim sigma tensors do not take part in type promotion, so the rows set the precision)
    rows, mode = rows_for_sigmas(params, sigmas, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if mode != "exact" and (params.schedule or mode == "resampled"):
        if strict:
            raise EPDSamplingError(f"the sigma list ({len(sigmas) - 1} steps) is not the schedule this table was "
                                   f"trained for ({params.describe()}); use EPD Sigmas for its exact schedule")
        _warn_once((id(params), len(sigmas), mode), "EPD: sigmas differ from the table's training schedule; "
                   "using rows %s (%s)", mode, params.describe())
    extra_args = extra_args or {}
    evaluate = evaluate or PointEvaluator(model, extra_args, max_batch=max_batch, sequential=sequential)
    # a to_zero table's last row steps to sigma 0, but only on its own sigmas (which end at its anchor)
    to_zero = params.to_zero and mode == "exact" and float(sigmas[-1]) > 0
    return integrate(model, x, sigmas, rows, extra_args, callback, disable, max_order=max_order,
                     afs=params.afs if afs is None else bool(afs), evaluate=evaluate, to_zero=to_zero)


def _rescaled_progress(callback, total: int, steps: int):
    """The caller's progress bar counts the steps of the sigma list it gave (ComfyUI: `i + 1` of `total`); when
    the table's own list has another number of steps, report step i as its share of `total`, so the bar still
    ends at 100 %."""
    if callback is None or total == steps or steps < 1:
        return callback

    def rescaled(info):
        callback({**info, "i": (info["i"] + 1) * total // steps - 1})
    return rescaled


def _is_oom(e: Exception) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom_type) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _free_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
