"""Teacher solvers for distillation (docs/method.md, "Training"): a more accurate solver on a fine sigma grid,
run without gradients; its states at the student's sigmas are the targets. Pure torch.

    fine grid: >= `fine_steps` steps overall and >= M inserted between student sigmas, continuing below the last
               student sigma to `sigma_end` so the final target is the ODE's end point. (With only M = 3
               insertions the teacher itself was worse than ComfyUI's best sampler at 4-6 NFE on the 64-d
               mixture, and every student matched the teacher's error.)
"""
from __future__ import annotations

import math

import torch

from epd_core.sampling.epd import adams_bashforth

TEACHERS = ("heun", "dpm2", "dpmpp", "ipndm", "euler")


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



def denoiser(model, extra_args):
    """D(x, sigma) for a scalar sigma: the model called with one sigma per sample."""
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
    (`teacher_grid`: fine_steps = 0 is the plain M-insertion grid). `poll()` runs after every fine step (Cancel)."""
    if teacher not in _TEACHER_FNS:
        raise ValueError(f"unknown teacher {teacher!r}; use one of {TEACHERS}")
    fine, index = teacher_grid(sigmas, inserted, fine_steps, sigma_end)
    fine = fine.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    keep = set(index)
    states = [x]
    for j, x_j in enumerate(_TEACHER_FNS[teacher](denoiser(model, extra_args or {}), x, fine), start=1):
        if j in keep:
            states.append(x_j)
        if poll is not None:
            poll()
    return states


CALLS_PER_STEP = {"heun": 2, "dpm2": 2, "dpmpp": 1, "ipndm": 1, "euler": 1}  # the step into sigma 0 takes one


def teacher_calls(sigmas, teacher: str = "heun", inserted: int = 3, fine_steps: int = 0,
                  sigma_end: float | None = None) -> int:
    """Model calls of one teacher trajectory (each of batch B, CFG inside the model) on its fine grid."""
    fine, _ = teacher_grid(sigmas, inserted, fine_steps, sigma_end)
    positive = int((fine[1:] > 0).sum())
    return CALLS_PER_STEP[teacher] * positive + (len(fine) - 1 - positive)
