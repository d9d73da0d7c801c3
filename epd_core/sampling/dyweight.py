"""DyWeight (arXiv 2603.11607; docs/method.md, "DyWeight"), in the k-diffusion / ComfyUI model convention
`model(x, sigma * s_in, **extra_args) -> denoised`. One sequential model call per step on a fixed grid
t_0 > ... > t_N, with tau_0 = t_0:

    d_i      = (x_i - D(x_i, a_i tau_i)) / n_i         n_i = tau_i (EDM / SD tables), or a_i tau_i (FLUX: the raw
                                                       velocity at the evaluation time, ComfyUI's CONST convention)
    x_{i+1}  = x_i + (t_{i+1} - tau_i) * sum_{j<=i} W_ij d_j
    tau_{i+1} = tau_i + (sum_j W_ij) (t_{i+1} - tau_i)

W is lower triangular and unconstrained (a band: the current and a few past directions), a_i a learned
evaluation-time scale. tau does not depend on x, so every step is fixed coefficients C_ij = (t_{i+1} - tau_i) W_ij
applied to the stored directions. Tables trained with AFS take d_0 = x_0 / sqrt(1 + t_0^2) without a call.
There is no final denoise: the last step lands on the grid end (0 for FLUX, sigma_min for EDM), and where the
rows do not sum to 1 the true tau_N is not the grid end, by design.

A table (EPDParams, solver "dyweight") stores W as theta_w (N, N), a on theta_a's diagonal and its grid as the
schedule's sigmas: N + 1 positive sigmas, or (schedule "to_zero") the first N grid points and an unused anchor,
the grid then ending in 0. W = I, a = 1 is ComfyUI's euler on any sigma list; the Adams-Bashforth rows of
`dyweight_table(start="ipndm", window=w)` are ComfyUI's ipndm with max_order w. The functions at the end are what
its registry entry (registry.SOLVERS["dyweight"]) refers to.
"""
from __future__ import annotations

import math

import torch

from epd_core.sampling.epd import AB_COEFFS, EPDSamplingError, check_finite, check_sigmas, run_steps
from epd_core.tables.params import MAX_MS_COEFFICIENT, EPDParams
from epd_core.sampling.plan import Plan, full_denoise, model_sampling_of, sigma_max_of, starting_at
from epd_core.sampling.picture import MatrixPicture
from epd_core.sampling.plan import sampler_plan
from epd_core.runtime import warn_once
from epd_core.sampling.schedules import sigmas_for

ANCHOR_RATIO = 0.5  # the unused last sigma a "to_zero" table records after its last positive grid point
STARTS = ("euler", "ipndm")
TRAIN_WINDOW = 3  # directions a trained row combines: the current and 2 past (DyWeight's EDM / SD tables)
# Published tables have |W| < 2.5 and a in [0.5, 1.5]; these bounds only refuse what no training produces (and what
# would overflow): a table's W within MAX_MS_COEFFICIENT, its scales within SCALE_RANGE.
SCALE_RANGE = (0.1, 10.0)
NORMS = ("tau", "eval")  # d_i divided by tau_i (EDM / SD tables) or by the evaluation time (FLUX)


# ---- grids ------------------------------------------------------------------------------------------------
def flux_mu(width: int, height: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's shift mu for an image size: linear in the packed sequence length (width/16 * height/16 tokens)
    between 256 tokens (base_shift) and 4096 (max_shift); 0.63 at 512 x 512, where DyWeight's tables were trained."""
    seq = (width // 16) * (height // 16)
    return base_shift + (max_shift - base_shift) * (seq - 256) / (4096 - 256)


def flux_grid(steps: int, mu: float) -> torch.Tensor:
    """DyWeight's FLUX grid: time_shift(mu, linspace(1, 0, steps + 1)), ending in 0 (float64)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    inner = math.exp(mu) / (math.exp(mu) + (1 / t[:-1] - 1))
    return torch.cat([inner, t.new_zeros(1)])


def table_grid(params: EPDParams) -> list[float] | None:
    """The N + 1 grid points a table was trained on (ending in 0 for a "to_zero" table), or None."""
    sig = params.schedule.get("sigmas")
    if sig is None:
        return None
    return [float(s) for s in sig[:-1]] + [0.0] if params.to_zero else [float(s) for s in sig]


def own_grid(params: EPDParams, model=None, model_sampling=None) -> list[float] | None:
    """The table's grid: recorded, else its schedule rebuilt (for tables whose sigma range or discrete sigmas
    are the model's, from the model's noise schedule: `model_sampling`, else the one `model` carries); None when
    neither is possible."""
    grid = table_grid(params)
    spec = params.schedule
    ms = model_sampling if model_sampling is not None else model_sampling_of(model)
    if grid is not None and spec.get("grid") == "flux_time_shift":
        return _flux_grid_for(params, grid, ms)
    if grid is not None or spec.get("type") in (None, "explicit"):
        return grid
    try:
        return sigmas_for(params.schedule, params.num_steps, ms).tolist()
    except (ValueError, AttributeError, TypeError, RuntimeError):
        return None


def _flux_grid_for(params: EPDParams, grid: list[float], model_sampling) -> list[float]:
    """A FLUX table's grid for the connected model: its shift mu follows the image size (ComfyUI's
    ModelSamplingFlux holds it as `shift`), and DyWeight's grid is time_shift(mu, ...) at the sampled size. Another
    mu than the table's gets the grid of that mu, and a log line that the table was trained at another size."""
    mu = getattr(model_sampling, "shift", None) if "flux" in type(model_sampling).__name__.lower() else None
    trained = params.schedule.get("mu")
    if type(mu) not in (int, float) or type(trained) not in (int, float) or abs(mu - trained) < 1e-4:
        return grid
    size = params.schedule.get("trained_size") or "?"
    warn_once((id(params), "dyweight-mu", round(mu, 4)), "DyWeight: this table was trained at %s (mu %.3g); this "
              "model samples with mu %.3g (another image size), so its grid is rebuilt for that mu",
              "x".join(str(v) for v in size) if isinstance(size, list) else size, trained, mu)
    return flux_grid(params.num_steps, float(mu)).tolist()


def taus(W: torch.Tensor, grid) -> torch.Tensor:
    """tau_0 .. tau_N: tau_0 = t_0, tau_{i+1} = tau_i + (sum_j W_ij)(t_{i+1} - tau_i). Differentiable in W."""
    t = torch.as_tensor(grid, dtype=W.dtype, device=W.device)
    out = [t[0]]
    for i, row_sum in enumerate(W.sum(1)):
        out.append(out[-1] + row_sum * (t[i + 1] - out[-1]))
    return torch.stack(out)


# ---- the loop ---------------------------------------------------------------------------------------------
def integrate_dyweight(model, x, grid, W: torch.Tensor, a: torch.Tensor, extra_args=None, callback=None,
                       disable=None, afs: bool = False, norm: str = "tau", detach_steps: bool = False,
                       checkpoint_steps: bool = False):
    """Run DyWeight over `grid` (N + 1 descending sigmas, the last may be 0) with W (N, N) and a (N,).
    `norm`: "tau" divides d_i by tau_i, "eval" by the evaluation time a_i tau_i. `callback` gets k-diffusion's
    keys (sigma: the grid point) plus x_next."""
    extra_args = extra_args or {}
    sig = check_sigmas(grid)
    steps = len(sig) - 1
    if tuple(W.shape) != (steps, steps) or tuple(a.shape) != (steps,):
        raise EPDSamplingError(f"a dyweight table of {W.shape[0]} steps cannot run {steps} steps")
    if norm not in NORMS:
        raise EPDSamplingError(f"unknown dyweight normalisation {norm!r}: use 'tau' or 'eval'")
    acc = torch.promote_types(x.dtype, torch.float32)  # combine in >= fp32 for fp16/bf16 models
    # tau and the coefficients in float64 on the host (a few numbers; MPS has no float64), on the device only
    # where a trainer needs their gradient
    W_host, a_host = W.detach().double().cpu(), a.detach().double().cpu()
    tau_host = taus(W_host, sig)
    evals_host = a_host * tau_host[:-1]
    bad = [i for i in range(steps) if not (float(tau_host[i]) > 0 and float(evals_host[i]) > 0)]
    if bad:
        raise EPDSamplingError(f"this dyweight table's weights move the normalisation time tau_{bad[0]} to "
                               f"{float(tau_host[bad[0]]):.4g} (evaluation time {float(evals_host[bad[0]]):.4g}), not "
                               "above 0: its rows do not fit this sigma list. Use the table's own schedule (EPD "
                               "Sigmas) or re-import / re-train it")
    grid_host = torch.tensor(sig, dtype=torch.float64)
    if W.requires_grad or a.requires_grad:
        W, a = W.to(device=x.device, dtype=acc), a.to(device=x.device, dtype=acc)
        tau = taus(W, sig)
        evals = a * tau[:-1]
        coeffs = (grid_host[1:].to(W) - tau[:-1])[:, None] * W
    else:
        tau, evals = tau_host.to(device=x.device, dtype=acc), evals_host.to(device=x.device, dtype=acc)
        coeffs = ((grid_host[1:] - tau_host[:-1])[:, None] * W_host).to(device=x.device, dtype=acc)
    grid_t = grid_host.to(device=x.device, dtype=acc)  # C_ij = (t_{i+1} - tau_i) W_ij above
    nz = [i - j for i in range(steps) for j in range(i + 1) if float(W_host[i, j]) != 0.0]
    window = max(nz, default=0)  # past directions any row uses
    s_in = x.new_ones([x.shape[0]])

    def step(i, x, *history):
        """(x_{i+1}, d_i, denoised) from x_i and the past directions (oldest first)."""
        if afs and i == 0:
            d = x.to(acc) / torch.sqrt(1 + tau[0] ** 2)  # analytic first direction: no model call
            denoised = (x.to(acc) - tau[0] * d).to(x.dtype)
        else:
            denoised = model(x, evals[i].to(x.dtype) * s_in, **extra_args)
            d = (x.to(acc) - denoised.to(acc)) / (tau[i] if norm == "tau" else evals[i])
        mix = coeffs[i, i] * d
        for back, h in enumerate(reversed(history), 1):
            mix = mix + coeffs[i, i - back] * h
        return (x.to(acc) + mix).to(x.dtype), d, denoised

    def keep(history, d, _):
        return (list(history) + [d])[-window:] if window else []

    x, bad_steps = run_steps(step, x, grid_t, steps, keep, callback, disable, detach_steps, checkpoint_steps)
    check_finite(bad_steps, sig)
    return x


# ---- tables -----------------------------------------------------------------------------------------------
def start_rows(start: str, steps: int, window: int = 4, last_to_zero: bool = False) -> torch.Tensor:
    """W (steps, steps) of an untrained table: euler (identity), or ipndm (Adams-Bashforth of order
    min(i + 1, window), the step to 0 a plain Euler step, as ComfyUI's ipndm with max_order = window)."""
    if start not in STARTS:
        raise EPDSamplingError(f"a dyweight table starts from one of {STARTS}, not {start!r}")
    W = torch.eye(steps, dtype=torch.float64)
    if start == "ipndm":
        if not 1 <= window <= 4:
            raise EPDSamplingError(f"ipndm uses 1..4 directions, not window {window}")
        for i in range(steps - int(last_to_zero)):
            coeffs = AB_COEFFS[min(window, i + 1)]  # newest first
            for back, c in enumerate(coeffs):
                W[i, i - back] = c
    return W


def dyweight_table(sigmas, start: str = "euler", window: int = 4, scales=None, norm: str = "tau",
                   afs: bool = False, **metadata) -> EPDParams:
    """An untrained dyweight table on `sigmas` (a list ending in 0, as ComfyUI's schedulers give, or N + 1
    positive sigmas): `start`'s rows (`start_rows`), evaluation-time scales `scales` (default 1). On its own
    sigmas it samples exactly as that ComfyUI sampler."""
    sig = check_sigmas(sigmas)
    if len(sig) < 2 or sig[-2] == 0:
        raise EPDSamplingError("a dyweight table needs at least one step to a sigma below the first")
    to_zero = sig[-1] == 0
    steps = len(sig) - 1
    W = start_rows(start, steps, window, last_to_zero=to_zero)
    a = torch.ones(steps, dtype=torch.float64) if scales is None else torch.as_tensor(scales, dtype=torch.float64)
    window_used = 1 if start == "euler" else window
    return from_weights(W, a, sig, norm=norm, afs=afs, window=window_used,
                        provenance=metadata.pop("provenance", None) or {"source": f"untrained: {start}"}, **metadata)


def from_weights(W, a, grid, norm: str = "tau", afs: bool = False, window: int | None = None,
                 schedule: dict | None = None, **metadata) -> EPDParams:
    """A dyweight table from W (N, N), a (N,) and its grid (N + 1 sigmas; a final 0 is stored as "to_zero")."""
    W = torch.as_tensor(W, dtype=torch.float64)
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    sig = [float(s) for s in grid]
    steps = W.shape[0]
    if len(sig) != steps + 1:
        raise EPDSamplingError(f"{steps} dyweight steps need {steps + 1} grid points, got {len(sig)}")
    to_zero = sig[-1] == 0
    stored = sig[:-1] + [sig[-2] * ANCHOR_RATIO] if to_zero else sig
    spec = dict(schedule or {})
    spec.setdefault("type", "explicit")
    spec.update(sigmas=stored, to_zero=to_zero, final_zero=False, override_sigmas=True)
    zeros = torch.zeros(steps, steps, dtype=torch.float64)
    meta = {"solver": "dyweight", "afs": bool(afs), "schedule": spec, "latency_nfe": steps - int(bool(afs)),
            "dyweight": {"norm": norm, "window": int(window if window is not None else steps)}, **metadata}
    return EPDParams(zeros, W, zeros.clone(), torch.diag(a), 0.0, 0.0, meta)


# ---- the sampler ------------------------------------------------------------------------------------------
def sample_dyweight(model, x, sigmas, params: EPDParams | None = None, extra_args=None, callback=None,
                    disable=None, strict: bool = False, own_schedule=None, model_sampling=None, **_ignored):
    """DyWeight with the k-diffusion signature. With a table: on its own grid when `sigmas` is a full denoise of
    its step count (`plan`), else row i for step i when the step counts agree. Without a table, or when they do
    not agree (logged; `strict`: an error), W = I and a = 1 on the given sigmas: exactly ComfyUI's euler.
    `model_sampling`: the model's noise schedule where `model` does not carry it."""
    if len(sigmas) < 2:
        return x
    p = sampler_plan("dyweight", model, sigmas, params, model_sampling, "python -m epd_core.import_official",
                     own_schedule=own_schedule, strict=strict, model=model)
    steps = len(p.sigmas) - 1
    if p.table is None:
        W, a = torch.eye(steps, dtype=torch.float64), torch.ones(steps, dtype=torch.float64)
        afs, norm = False, "tau"
    else:
        rows = p.table.activated()
        W, a = rows["W"].double(), rows["a"].double()
        afs, norm = p.table.afs, p.table.metadata["dyweight"]["norm"]
    return integrate_dyweight(model, x, p.sigmas, W, a, extra_args, callback, disable, afs=afs, norm=norm)


def plan(params: EPDParams | None, sigmas, model_sampling=None, own_schedule=None, strict: bool = False,
         model=None) -> Plan:
    """DyWeight's part of plan.plan: a full denoise of the table's step count (plan.full_denoise) runs on its own
    grid (`own_grid`, for the model: `model` or `model_sampling`; its first point the list's, plan.starting_at),
    another list of its step count row i for step i; any other list (and no table) as euler (mode 'builtin',
    logged; `strict`: an error). The grid's end is its own end point: no final denoise."""
    sigma_max = sigma_max_of(model_sampling)
    steps = len(sigmas) - 1
    grid, mode = sigmas, "by_index"
    if params is not None:
        own = own_grid(params, model, model_sampling)
        full = own is not None and full_denoise(float(sigmas[0]), own, sigma_max,
                                                [float(s) for s in sigmas if float(s) > 0])
        if own is not None and own_schedule is not False and not strict and full and params.num_steps == steps:
            own = starting_at(params, own, float(sigmas[0]))
            if not all(math.isclose(float(s), g, rel_tol=1e-4, abs_tol=1e-8) for s, g in zip(sigmas, own)):
                warn_once((id(params), steps, "dyweight-own"), "DyWeight: this table samples on its own grid "
                          "(%s); the scheduler's sigmas are replaced (%s)", params.describe(),
                          ", ".join(f"{g:.4g}" for g in own))
            grid, mode = torch.tensor(own, dtype=torch.float64), "exact"
        elif params.num_steps != steps:
            if strict:
                raise EPDSamplingError(f"the sigma list has {steps} steps, this dyweight table {params.num_steps}; "
                                       "use its own schedule (EPD Sigmas) or a table for this step count")
            warn_once((id(params), steps, "dyweight"), "DyWeight: no table row for each of the %d steps (%s); "
                      "sampling as euler instead", steps, params.describe())
            params = None
    if params is None:
        return Plan(torch.as_tensor(sigmas), None, "builtin", False)
    return Plan(torch.as_tensor(grid), params, mode, False, mode == "exact")


# ---- its registry entry's table and training (registry.SOLVERS["dyweight"]) --------------------------------------
def table_rows(tensors, scales=None, fix_last_dir_scale: bool = False) -> dict:
    """W (N, N) and the evaluation-time scales a (N,), as they are."""
    return {"W": tensors[1], "a": torch.diagonal(tensors[3])}


def train_rows(tensors, scales=None) -> dict:
    """The rows a trainer runs: the band of TRAIN_WINDOW directions and the diagonal are free, the rest 0."""
    n = tensors[1].shape[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = ((i - j >= 0) & (i - j < TRAIN_WINDOW)).to(tensors[1])
    return {"W": tensors[1] * band, "a": torch.diagonal(tensors[3])}


def check_table(p: EPDParams, fail) -> None:
    """Square, lower-triangular W within MAX_MS_COEFFICIENT, scales on theta_a's diagonal within SCALE_RANGE, the
    rest zero, and the normalisation its loop divides by."""
    n, k = p.theta_r.shape
    if n != k:
        fail(f"a dyweight table is square (steps x steps), got {n} x {k}", "Re-import or re-export the table.")
    if bool(p.theta_r.any()) or bool(p.theta_c.any()) or p.scale_dir != 0 or p.scale_time != 0:
        fail("a dyweight table has no point positions, direction scales or scale bounds (theta_r, theta_c and the "
             "bounds must be 0)", "Build it with dyweight.dyweight_table or the importer.")
    w, a = p.theta_w.detach(), p.theta_a.detach()
    if bool(torch.triu(w, 1).any()):
        fail("dyweight weights above the diagonal (a step would use a direction not computed yet)",
             "The file is corrupt or crafted: re-import the table.")
    big = float(w.abs().max())
    if big > MAX_MS_COEFFICIENT:
        fail(f"'theta_w' has a weight of magnitude {big:.3g}, beyond the limit {MAX_MS_COEFFICIENT:g} (no trained "
             "table comes near it; sampling it would overflow)", "The file is corrupt or crafted: re-import it.")
    scales = torch.diagonal(a)
    lo, hi = SCALE_RANGE
    if bool((a - torch.diag(scales)).any()) or not bool(((scales >= lo) & (scales <= hi)).all()):
        fail(f"dyweight evaluation-time scales must lie on theta_a's diagonal, within [{lo:g}, {hi:g}]",
             "The file is corrupt or crafted: re-import the table.")
    spec = p.metadata.get("dyweight")
    norm = spec.get("norm") if isinstance(spec, dict) else None
    if norm not in NORMS:
        fail(f"metadata 'dyweight' must give 'norm' as one of {NORMS}, got {repr(norm)[:40]}",
             "Re-import the table (python -m epd_core.import_official).")


def untrained_table(sigmas, num_points: int = 1, builtin: str = "euler", afs: bool = False, **_unused) -> EPDParams:
    """A training run's start: euler or ipndm (`builtin`) on the student's grid, exactly, in the band a trainer
    learns (TRAIN_WINDOW directions); a row per step, the step to 0 included (no final denoise)."""
    return dyweight_table(sigmas, start=builtin, window=TRAIN_WINDOW, afs=afs)


def train_loop(model, x, sigmas, rows, extra_args, callback=None, disable=None, afs=False, detach_steps=False,
               checkpoint_steps=False, **_unused):
    """Distillation's student: the grid ends where its last step lands (0 or sigma_min), with no final denoise."""
    return integrate_dyweight(model, x, sigmas, rows["W"], rows["a"], extra_args, callback, disable, afs=afs,
                              detach_steps=detach_steps, checkpoint_steps=checkpoint_steps)


def trained_table(leaves, scales, cfg, metadata: dict) -> EPDParams:
    """W (its band) and a on the student's grid (from_weights), with the generic metadata a table of it keeps."""
    rows = {k: v.detach().cpu() for k, v in train_rows(leaves, scales).items()}
    metadata["provenance"].update(grad_clip=cfg.grad_clip, start=cfg.builtin)
    keep = {k: metadata[k] for k in ("guidance_scale", "model_family", "provenance", "cfg_range") if k in metadata}
    return from_weights(rows["W"], rows["a"], cfg.sigmas, afs=cfg.afs, window=TRAIN_WINDOW,
                        schedule={k: v for k, v in metadata["schedule"].items() if k == "type"}, **keep)


def check_config(cfg, need) -> None:
    need(cfg.builtin in STARTS, f"unknown starting sampler {cfg.builtin!r} for dyweight", f"Use one of {STARTS}.")
    need(cfg.num_points == 1 and not cfg.to_zero and not cfg.learn_schedule,
         "dyweight makes one call per step on a fixed grid that ends where its last step lands",
         "Use K = 1, to_zero=False and learn_schedule=False (a sigma list ending in 0 lands on 0).")


def trainer_fields(scheduler_list, steps: int, **_recipe) -> dict:
    """The EPD Trainer's run: steps = KSampler steps = model calls, the scheduler's list with `steps` steps to 0,
    K = 1."""
    sigmas, spec = scheduler_list(steps - 1)
    return {"sigmas": sigmas, "schedule": spec, "num_points": 1}


def picture(params: EPDParams, sigmas=None) -> MatrixPicture:
    """W as a lower-triangular grid (|W_ij| = 1.5 at full colour), per row the evaluation-time scale a_i, the row
    sum, the grid point t_i and the time tau_i x_i is at."""
    act = {k: v.detach().double() for k, v in params.activated().items()}
    total = params.num_steps
    grid = [float(s) for s in sigmas] if sigmas is not None else own_grid(params)
    tau = taus(act["W"], grid).tolist() if grid is not None and len(grid) == total + 1 else None

    def labels(i: int) -> str:
        text = f"a {float(act['a'][i]):.3f}  sum {float(act['W'][i].sum()):.3f}"
        if grid is not None and i < len(grid):
            text += f"  t {grid[i]:.4g}" + (f"  tau {tau[i]:.4g}" if tau is not None else "")
        return text
    return MatrixPicture("DyWeight", "row i: the weights W_ij of the directions d_j (red > 0 > blue); a: "
                         "evaluation-time scale; tau: the time x_i is at", act["W"], 1.5, labels)
