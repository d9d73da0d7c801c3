"""EPD-MS, this pack's one-call-per-step variant of EPD (docs/method.md, "EPD-MS"), in the k-diffusion / ComfyUI
model convention. The paper's step spends two sequential calls (d_cur, then the K points); here the current point
joins the K points' call, so latency NFE = steps:

    d_ext = h_1, the previous step's d_cur (first step: the analytic x / sqrt(1 + t_cur^2))  - needs no d_cur
    t_k   = t_next^r_k * t_cur^(1 - r_k),   x_k = x + (t_k - t_cur) * d_ext           k = 1..K-1 look-ahead points
    D_0, D_k = D(x, t_cur), D(x_k, t_k)                                                ONE batched call of K points
    d_cur = (x - D_0) / t_cur,   d_k = (x_k - D_k) / t_k
    e_j   = (x - D_{i-j}) / t_cur                                 the direction from x to step i-j's denoised output
    x'    = x + (t_end - t_cur) * (w_0 d_cur + sum_k w_k d_k + sum_j g_j h_j + sum_j u_j e_j)
                                                                  h_j: d_cur of step i - j (j = 1..HISTORY)

w, g and u are free learned coefficients (no softmax), learned with the schedule. With the look-ahead weights at 0
and (w_0, g, u) at a multistep method's values the step IS that method: the directions h_j give the
Adams-Bashforth family (ComfyUI's gradient_estimation, ipndm, ipndm_v, euler), the past denoised outputs e_j the
data-prediction exponential integrators (dpmpp_2m, res_multistep), so an untrained table reproduces each exactly and
training starts from the strongest built-in at the user's CFG.
The last row steps to sigma 0 (t_end = 0): its t_next, the table's last (positive) sigma, only anchors the
look-ahead points. A sigma list that ends in 0 gets the anchor ANCHOR_RATIO * its last positive sigma.
A table stores (g, u) as theta_h of shape (steps, 2 * HISTORY); tables written before u existed have (steps, HISTORY)
and u = 0. The functions at the end are what its registry entry (registry.SOLVERS["epd_ms"]) refers to.
"""
from __future__ import annotations

import math

import torch

from epd_core.sampling.epd import (AB_COEFFS, EPDSamplingError, check_finite, check_sigmas, final_euler_step,
                                   positive_part, run_steps)
from epd_core.tables.params import HISTORY_TENSOR, MAX_MS_COEFFICIENT, EPDParams
from epd_core.sampling.picture import PointsPicture
from epd_core.sampling.points import PointEvaluator
from epd_core.runtime import warn_once
from epd_core.sampling.plan import Plan, sigma_max_of
from epd_core.sampling.plan import own_schedule as own_schedule_for
from epd_core.sampling.plan import sampler_plan

HISTORY = 3                # past directions a row combines
HISTORY_WIDTHS = (HISTORY, 2 * HISTORY)  # theta_h: g, then u (tables written before u existed: g only)
ANCHOR_RATIO = 0.5         # look-ahead anchor of a step to 0 on a list that has none
# the ComfyUI samplers an untrained table is, exactly
BUILTINS = ("gradient_estimation", "ipndm", "ipndm_v", "euler", "dpmpp_2m", "res_multistep")


def ms_step(evaluate, x, history, t_cur, t_next, r, w, g, u, t_end):
    """(x at t_end, d_cur, denoised at x) for one row: r (K-1,) look-ahead positions, w (K,) coefficients of
    d_cur and the look-ahead directions, g (HISTORY,) of the past directions and u (HISTORY,) of the past denoised
    outputs; `history` is [h_1, .., h_n, D_1, .., D_n], newest first."""
    acc = torch.promote_types(x.dtype, torch.float32)  # combine in >= fp32 for fp16/bf16 models
    n = len(history) // 2
    past_d, past_denoised = history[:n], history[n:]
    ts = t_cur.reshape(1)
    xs = x.unsqueeze(0)
    if r.numel():
        d_ext = past_d[0] if past_d else x / torch.sqrt(1 + t_cur ** 2)
        t_k = t_next ** r * t_cur ** (1 - r)
        ts = torch.cat([ts, t_k.to(ts.dtype)])
        shift = (t_k - t_cur).reshape(-1, *([1] * x.dim())).to(x.dtype)
        xs = torch.cat([xs, x.unsqueeze(0) + shift * d_ext.unsqueeze(0)])
    denoised = evaluate(xs, ts)
    d = (xs.to(acc) - denoised.to(acc)) / ts.reshape(-1, *([1] * x.dim())).to(acc)
    mix = (w.reshape(-1, *([1] * x.dim())).to(acc) * d).sum(0)
    for coeff, h in zip(g, past_d):
        mix = mix + coeff.to(acc) * h.to(acc)
    for coeff, den in zip(u, past_denoised):
        mix = mix + coeff.to(acc) * (x.to(acc) - den.to(acc)) / t_cur.to(acc)
    return (x.to(acc) + (t_end - t_cur).to(acc) * mix).to(x.dtype), d[0], denoised[0]


def integrate_ms(model, x, sigmas, rows, extra_args=None, callback=None, disable=None, evaluate=None,
                 detach_steps: bool = False, checkpoint_steps: bool = False, to_zero: bool = False):
    """Run EPD-MS over `sigmas` with rows {'r': (N, K-1), 'w': (N, K), 'g': (N, HISTORY), 'u': (N, HISTORY)}, one
    row per step ('u' may be left out: 0). A list ending in 0 steps to 0 on its last row; `to_zero` does the same on
    a list of positive sigmas (the last one is the anchor). Same callback / detach_steps / checkpoint_steps as
    epd.integrate."""
    extra_args = extra_args or {}
    sig = check_sigmas(sigmas)
    sigmas = torch.as_tensor(sigmas)
    if sig[-1] == 0:
        if len(sig) < 2 or sig[-2] == 0:
            raise EPDSamplingError("EPD-MS needs a sigma list with at least one positive sigma before the 0")
        sigmas = torch.cat([sigmas[:-1], sigmas[-2:-1] * ANCHOR_RATIO])
        to_zero = True
    steps = len(sigmas) - 1
    if rows["w"].shape[0] != steps:
        raise EPDSamplingError(f"table has {rows['w'].shape[0]} rows for {steps} steps")
    u = rows.get("u")
    u = rows["g"].new_zeros(rows["g"].shape) if u is None else u
    evaluate = evaluate or PointEvaluator(model, extra_args)

    def step(i, x, *history):
        t_end = sigmas.new_zeros(()) if to_zero and i == steps - 1 else sigmas[i + 1]
        return ms_step(evaluate, x, history, sigmas[i], sigmas[i + 1], rows["r"][i], rows["w"][i], rows["g"][i],
                       u[i], t_end)

    def keep(history, d_cur, denoised):  # the last HISTORY directions, then the last HISTORY denoised, newest first
        n = len(history) // 2
        return [d_cur, *history[:n]][:HISTORY] + [denoised, *history[n:]][:HISTORY]

    x, bad_steps = run_steps(step, x, sigmas, steps, keep, callback, disable, detach_steps, checkpoint_steps)
    check_finite(bad_steps, [float(s) for s in sigmas.detach()] + ([0.0] if to_zero else []))
    return x


# ---- tables ---------------------------------------------------------------------------------------------------
def variable_ab_coefficients(h: list[float]) -> list[float]:
    """Adams-Bashforth coefficients on unequal steps (ComfyUI's ipndm_v), newest first, for the next step of size
    h[0] after steps h[1], h[2], ... (order len(h), at most 4; h in sigma units, any sign)."""
    order = len(h)
    if order == 1:
        return [1.0]
    a = h[0] / h[1]
    c = [(2 + a) / 2, -a / 2]
    if order == 2:
        return c
    b = h[1] / h[2]
    t1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
    if order == 3:
        return [c[0] + t1, c[1] - (1 + b) * t1, t1 * b]
    e = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    t2 = (((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * (h[0] + h[1] + h[2])))
          * (h[0] * (h[0] + h[1]) * (h[0] + h[1] + h[2])) / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])))
    return [c[0] + t1 + t2, c[1] - (1 + b) * t1 - (1 + b + e) * t2, t1 * b + (b + e * (1 + h[2] / h[3])) * t2,
            -t2 * e * b]


def builtin_coefficients(builtin: str, steps: int, last_to_zero: bool = True,
                         sigmas=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_0 (steps,), history coefficients (steps, 2 * HISTORY): g of the past directions, then u of the past
    denoised outputs) with which EPD-MS is exactly ComfyUI's `builtin` sampler (its step to 0 being x = denoised,
    as in ComfyUI). ipndm_v, dpmpp_2m and res_multistep depend on the step sizes: they need `sigmas`."""
    if builtin not in BUILTINS:
        raise EPDSamplingError(f"EPD-MS starts from one of {BUILTINS}, not {builtin!r}")
    if builtin in ("ipndm_v", "dpmpp_2m", "res_multistep") and (sigmas is None or len(sigmas) < steps + 1):
        raise EPDSamplingError(f"{builtin}'s coefficients need the table's sigmas")
    w0, gu = torch.ones(steps, dtype=torch.float64), torch.zeros(steps, 2 * HISTORY, dtype=torch.float64)
    for i in range(steps):
        if last_to_zero and i == steps - 1:
            continue  # plain denoised output
        if builtin == "gradient_estimation" and i > 0:  # 2 d_cur - d_prev (ComfyUI's ge_gamma = 2)
            w0[i], gu[i, 0] = 2.0, -1.0
        elif builtin in ("ipndm", "ipndm_v"):  # Adams-Bashforth of order min(4, i + 1), as in ComfyUI
            if builtin == "ipndm":  # fixed (equal-step) coefficients
                coeffs = AB_COEFFS[min(4, i + 1)]
            else:  # on the actual step sizes, newest first
                coeffs = variable_ab_coefficients([float(sigmas[j + 1]) - float(sigmas[j])
                                                   for j in range(i, max(-1, i - 4), -1)])
            w0[i] = coeffs[0]
            gu[i, :len(coeffs) - 1] = torch.tensor(coeffs[1:], dtype=torch.float64)
        elif builtin in ("dpmpp_2m", "res_multistep") and i > 0:
            w0[i], gu[i, HISTORY] = _exponential_two_step(builtin, *(float(sigmas[j]) for j in (i - 1, i, i + 1)))
    return w0, gu


def _exponential_two_step(builtin: str, s_prev: float, s_cur: float, s_next: float) -> tuple[float, float]:
    """(w_0, u_1) of a second-order data-prediction step from s_cur to s_next that also uses the denoised output
    at s_prev. Both ComfyUI samplers step x' = (s_next / s_cur) x + (1 - s_next / s_cur) (a D_cur + b D_prev) with
    a + b = 1, which is x + (s_next - s_cur) (a d_cur + b e_1): w_0 = a, u_1 = b."""
    h, h_last = math.log(s_cur / s_next), math.log(s_prev / s_cur)  # log-SNR step lengths (lambda = -log sigma)
    if builtin == "dpmpp_2m":  # D_d = (1 + 1 / 2r) D_cur - (1 / 2r) D_prev, r = h_last / h
        b = -h / (2 * h_last)
    else:  # res_multistep (eta 0): x' = e^-h x + h (b1 D_cur + b2 D_prev), b2 = phi2(-h) / c2, c2 = -h_last / h
        phi1 = math.expm1(-h) / -h
        phi2 = (phi1 - 1) / -h
        b = h * (phi2 / (-h_last / h)) / -math.expm1(-h)
    return 1.0 - b, b


def anchored(sigmas, anchor: float | None = None) -> list[float]:
    """A scheduler's list ending in 0 as the N + 1 positive sigmas an EPD-MS table and its distillation take: the
    0 replaced by the last step's anchor, `anchor` (default ANCHOR_RATIO) times the last positive sigma."""
    sig = [float(s) for s in sigmas]
    return sig[:-1] + [sig[-2] * (ANCHOR_RATIO if anchor is None else anchor)]


def ms_table(sigmas, builtin: str = "gradient_estimation", num_points: int = 1, spread: float = 1.0,
             anchor: float | None = None, **metadata) -> EPDParams:
    """An untrained EPD-MS table on `sigmas`, a list ending in 0 as ComfyUI's schedulers give (the last step's
    anchor: `anchor` (default ANCHOR_RATIO) times the last positive sigma), or N + 1 positive sigmas whose last
    one is that anchor. `builtin`'s coefficients, look-ahead points spread around the geometric midpoint with
    weight 0: it samples exactly as the built-in does on that list."""
    sig = check_sigmas(sigmas)
    if len(sig) < 3 or sig[-2] == 0:
        raise EPDSamplingError("an EPD-MS table needs at least 2 steps (3 sigmas)")
    if sig[-1] == 0:
        sig = anchored(sig, anchor)
    steps, k = len(sig) - 1, num_points
    if not 1 <= k <= 8:
        raise EPDSamplingError(f"EPD-MS uses K = 1..8 points per call (the current point included), got {k}")
    w0, gu = builtin_coefficients(builtin, steps, sigmas=sig)
    theta_w = torch.zeros(steps, k, dtype=torch.float64)
    theta_w[:, 0] = w0
    theta_r = torch.zeros(steps, k)
    if k > 1:
        theta_r[:, 1:] = torch.linspace(-spread, spread, k - 1) if k > 2 else 0.0
    positive = sig
    schedule = dict(metadata.pop("schedule", {}) or {})
    schedule.setdefault("type", "explicit")
    schedule.update(sigmas=positive, to_zero=True, final_zero=False, override_sigmas=True)
    provenance = metadata.pop("provenance", None) or {"source": f"untrained: {builtin}'s coefficients"}
    meta = {"solver": "epd_ms", "schedule": schedule, "latency_nfe": steps, "initial_builtin": builtin,
            "provenance": provenance, **metadata}
    # float64 in memory: exactly the built-in's coefficients (a file stores float32)
    return EPDParams(theta_r.double(), theta_w, torch.zeros(steps, k, dtype=torch.float64),
                     torch.zeros(steps, k, dtype=torch.float64), 0.0, 0.0, meta, theta_h=gu)


def ms_rows(params: EPDParams, device=None, dtype=torch.float32) -> dict:
    return {k: v.to(device=device, dtype=dtype) for k, v in params.activated().items()}


def sample_epd_ms(model, x, sigmas, params: EPDParams | None = None, extra_args=None, callback=None, disable=None,
                  builtin: str = "gradient_estimation", max_batch=None, sequential=False, strict=False, evaluate=None,
                  own_schedule=None, model_sampling=None, **_ignored):
    """EPD-MS. With a table: on its own schedule when the list is a full denoise (the table was trained with its
    schedule), else row i for step i when the step counts agree (`plan`). Without a table, or when they do not
    agree, the untrained table of `builtin` on the given sigmas: exactly that ComfyUI sampler. `model_sampling`:
    the model's noise schedule where `model` does not carry it (marks a full denoise by its sigma_max)."""
    if len(sigmas) < 2:
        return x
    p = sampler_plan("epd_ms", model, sigmas, params, model_sampling, "train one with solver epd_ms",
                     own_schedule=own_schedule, strict=strict, builtin=builtin)
    table = p.table
    if table is None:
        if float(p.sigmas[-1]) != 0:
            raise EPDSamplingError("EPD-MS without a table needs a sigma list ending in 0")
        table = ms_table(p.sigmas, builtin)
    rows = ms_rows(table, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    evaluate = evaluate or PointEvaluator(model, extra_args or {}, max_batch=max_batch, sequential=sequential)
    return integrate_ms(model, x, p.sigmas, rows, extra_args, callback, disable, evaluate=evaluate,
                        to_zero=p.to_zero)


def plan(params: EPDParams | None, sigmas, model_sampling=None, own_schedule=None, strict: bool = False,
         builtin: str = "gradient_estimation") -> Plan:
    """EPD-MS's part of plan.plan: a full denoise of the table's step count runs on its own (learned) sigmas
    (plan.own_schedule), a positive list on its rows with its last sigma as the anchor, another list of its step
    count row i for step i; any other list (and no table) as the untrained `builtin` (mode 'builtin', logged;
    `strict`: an error)."""
    sigma_max = sigma_max_of(model_sampling)
    to_zero = params is not None and float(sigmas[-1]) > 0  # a positive list: its last sigma is the anchor
    own = None
    if params is not None and own_schedule is not False and not strict and len(sigmas) - 1 == params.num_steps:
        own = own_schedule_for(params, sigmas, sigma_max)  # its own learned sigmas for a full denoise of its steps
        if own is not None:
            sigmas, to_zero = own, True
    steps = len(sigmas) - 1
    if params is not None and not to_zero and params.num_steps != steps:
        if strict:
            raise EPDSamplingError(f"the sigma list has {steps} steps, this EPD-MS table {params.num_steps}; use "
                                   "its own schedule (EPD Sigmas) or a table for this step count")
        warn_once((id(params), steps, "ms"), "EPD-MS: no table row for each of the %d steps (%s); sampling as the "
                  "untrained %s instead", steps, params.describe(), builtin)
        params = None
    if params is None:
        return Plan(torch.as_tensor(sigmas), None, "builtin", False)
    return Plan(torch.as_tensor(sigmas), params, "exact" if own is not None else "by_index", to_zero, own is not None)


# ---- its registry entry's table and training (registry.SOLVERS["epd_ms"]) ----------------------------------------
def table_rows(tensors, scales=None, fix_last_dir_scale: bool = False) -> dict:
    """Logits -> rows: r (N, K-1) look-ahead positions (column 0 of theta_r, the current point at r = 0, carries
    nothing), w (N, K), g (N, 3) of the past directions and u (N, 3) of the past denoised outputs as they are (free
    coefficients; u = 0 for a 3-column theta_h). No scale bounds. Differentiable."""
    theta_r, theta_w, theta_h = tensors[0], tensors[1], tensors[4]
    g, u = theta_h[:, :HISTORY], theta_h[:, HISTORY:]
    return {"r": torch.sigmoid(theta_r[:, 1:]), "w": theta_w, "g": g, "u": u if u.shape[1] else torch.zeros_like(g)}


def check_table(p: EPDParams, fail) -> None:
    """theta_h of its shape, coefficients below MAX_MS_COEFFICIENT, no scale bounds, a last row that steps to 0."""
    n = p.num_steps
    if p.theta_h is None or tuple(p.theta_h.shape) not in ((n, w) for w in HISTORY_WIDTHS):
        shape = None if p.theta_h is None else tuple(p.theta_h.shape)
        fail(f"an epd_ms table needs '{HISTORY_TENSOR}' of shape ({n}, 6) (or ({n}, 3) from older versions), got "
             f"{shape}", "Re-export the table with EPDParams.save() or re-run the trainer.")
    for name, t in (("theta_w", p.theta_w), (HISTORY_TENSOR, p.theta_h)):
        big = float(t.detach().abs().max())
        if big > MAX_MS_COEFFICIENT:
            fail(f"'{name}' has a coefficient of magnitude {big:.3g}, beyond the limit {MAX_MS_COEFFICIENT:g} for "
                 "EPD-MS coefficients (no trained table comes near it; sampling it would overflow)",
                 "The file is corrupt or crafted: re-train or re-download the table.")
    if not (p.scale_dir == 0 and p.scale_time == 0 and p.to_zero):
        fail("an epd_ms table has no direction / time scales and steps to 0 on its last row",
             "Build it with multistep.ms_table or the trainer (scale bounds 0, schedule to_zero).")


def untrained_table(sigmas, num_points: int = 1, builtin: str = "gradient_estimation", spread: float = 1.0,
                    **_unused) -> EPDParams:
    """A training run's start: `builtin` on the student's sigmas, exactly (ms_table)."""
    return ms_table(sigmas, builtin, num_points, spread=spread)


def train_loop(model, x, sigmas, rows, extra_args, callback=None, disable=None, max_order=1, afs=False, **options):
    """Distillation's student: the rows over the list's positive sigmas (`options`: integrate_ms's; no predictor
    order, no analytic first step), then the plain Euler step to 0 when the list ends there."""
    x_last = integrate_ms(model, x, positive_part(sigmas), rows, extra_args, callback, disable, **options)
    return final_euler_step(model, x_last, sigmas, extra_args)


def trained_table(leaves, scales, cfg, metadata: dict) -> EPDParams:
    """The trained table samples on its own (learned) sigmas and records the built-in it started from."""
    t = [p.detach().to("cpu", torch.float32) for p in leaves]
    metadata["schedule"]["override_sigmas"] = True
    return EPDParams(*t[:4], scales[0], scales[1], dict(metadata, initial_builtin=cfg.builtin), theta_h=t[4])


def check_config(cfg, need) -> None:
    need(cfg.builtin in BUILTINS, f"unknown starting built-in {cfg.builtin!r}", f"Use one of {BUILTINS}.")
    need(cfg.to_zero and not cfg.afs, "epd_ms steps to 0 on its last row and has its first call anyway",
         "Use to_zero=True (positive sigmas, the last one anchoring the step to 0) and afs=False.")


def recipe(positive, sigma_min: float, lr: float) -> dict:
    """EPD-MS's training recipe over DistillConfig's defaults, on `positive` (a list's positive sigmas, the last one
    the anchor): the last row steps to 0, end to end, the schedule learned with the table at twice its learning
    rate and down to a floor of at most 0.005 and half the anchor, the teacher stopping at the model's sigma_min.
    The shipped tables (scripts/make_ms_tables.py), the EPD Trainer and `python -m epd_core.train distill --solver
    epd_ms` all train with it; the run's size, teacher and starting built-in are the caller's."""
    return dict(sigmas=list(positive), to_zero=True, objective="end_to_end", learn_schedule=True,
                schedule_floor=min(0.005, positive[-1] / 2), lr=lr, schedule_lr=2 * lr, teacher_sigma_min=sigma_min)


def trainer_fields(scheduler_list, steps: int, num_points: int, cfg_scale: float, lr: float,
                   sigma_min: float) -> dict:
    """The EPD Trainer's run: `steps` model calls on the scheduler's list (KSampler's `steps`), its positive sigmas
    plus the last step's anchor, trained with `recipe` from the coefficients of the built-in that is strongest at
    the CFG it trains for (starting_builtin)."""
    sigmas, spec = scheduler_list(steps - 1)
    return dict(recipe(anchored(sigmas), sigma_min, lr), schedule=spec, num_points=num_points,
                builtin=starting_builtin(cfg_scale))


def starting_builtin(cfg: float) -> str:
    """Where an EPD-MS table starts: at low CFG gradient_estimation, from CFG 4 up dpmpp_2m, the best built-ins
    there on both demo models (docs/results.md, "Across CFG"; at CFG 6 gradient_estimation is nearly twice as
    wrong as dpmpp_2m on MNIST at 4 steps)."""
    return "dpmpp_2m" if cfg >= 4.0 else "gradient_estimation"


def picture(params: EPDParams, sigmas=None) -> PointsPicture:
    """Per step the current point (r = 0) and the look-ahead points, dot area ~ |coefficient w|, and the
    coefficients g of the last 3 directions."""
    act = {k: v.detach().double() for k, v in params.activated().items()}
    r = torch.cat([torch.zeros_like(act["w"][:, :1]), act["r"]], 1)

    def labels(i: int) -> list[str]:
        return ([f"r{ri:.2f} w{wi:+.3f}" for ri, wi in zip(r[i].tolist(), act["w"][i].tolist())]
                + ["g " + " ".join(f"{float(v):+.3f}" for v in act["g"][i])])
    return PointsPicture("EPD", "EPD-MS: the current point (r = 0) and look-ahead points t_k in one call; dot area ~ "
                         "|coefficient w|; g: coefficients of the last 3 directions", r,
                         (act["w"].abs() / 2).clamp(max=1).sqrt(), None, labels)
