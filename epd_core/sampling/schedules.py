"""Sigma schedules an EPD table can be trained for (docs/method.md, "The table").

Each function returns `num_points` positive, strictly descending sigmas (float64); samplers in ComfyUI
usually append a final 0, which `with_final_zero` does. `sigmas_for(spec, steps, model_sampling)` is the one
entry point that turns a table's schedule description (and, where the schedule is defined through the model,
the model's sigmas) into sigmas.
"""
from __future__ import annotations

import math

import torch


def polynomial(num_points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM / Karras: uniform in sigma^(1/rho)."""
    _check(num_points, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, num_points, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def logsnr(num_points: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma (= uniform in log-SNR)."""
    _check(num_points, sigma_min, sigma_max)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_points, dtype=torch.float64).exp()


def time_uniform(num_points: int, sigma_min: float, sigma_max: float, beta_d: float = 19.9,
                 beta_min: float = 0.1) -> torch.Tensor:
    """Uniform in the time t of the VP-SDE, sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    _check(num_points, sigma_min, sigma_max)

    def t_of(sigma):  # inverse of sigma(t): solve beta_d/2 t^2 + beta_min t - log(1 + sigma^2) = 0
        c = math.log1p(sigma ** 2)
        return (math.sqrt(beta_min ** 2 + 2 * beta_d * c) - beta_min) / beta_d

    t = torch.linspace(t_of(sigma_max), t_of(sigma_min), num_points, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def discrete(num_points: int, model_sigmas, rho: float = 1.0, sigma_min: float | None = None,
             sigma_max: float | None = None) -> torch.Tensor:
    """Uniform (with rho) in the discrete timestep index of a model's own sigma table (ascending, e.g. the
    1000 sigmas of SD1.5). Indices are rounded, so every sigma is one the model was trained at."""
    table = torch.as_tensor(model_sigmas, dtype=torch.float64).flatten()
    if table.numel() < 2 or not (table[1:] > table[:-1]).all():
        raise ValueError("model_sigmas must be the model's ascending sigma table")
    lo = 0 if sigma_min is None else int(torch.argmin((table - sigma_min).abs()))
    hi = table.numel() - 1 if sigma_max is None else int(torch.argmin((table - sigma_max).abs()))
    if num_points > hi - lo + 1:
        raise ValueError(f"{num_points} points do not fit in {hi - lo + 1} discrete timesteps")
    ramp = torch.linspace(0, 1, num_points, dtype=torch.float64)
    idx = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    idx = idx.round().long()
    for i in range(1, num_points):  # rounding may merge neighbours; keep strictly descending
        idx[i] = min(int(idx[i]), int(idx[i - 1]) - 1)
    if idx[-1] < 0:
        raise ValueError(f"{num_points} points do not fit in the discrete table")
    return table[idx]


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style time shift: sigma = shift t / (1 + (shift - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def flux_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux-style exponential shift: sigma = e^mu / (e^mu + 1/t - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flowmatch(num_points: int, shift: float = 3.0, mu: float | None = None, t_min: float = 1e-3,
              multiplier: float = 1000.0) -> torch.Tensor:
    """A flow model's own shifted schedule: t uniform in [t_min, 1], sigma = shift(t). With `mu` the Flux
    exponential shift is used, else the SD3 rational shift. `t_min` is 1/multiplier as in ComfyUI."""
    if num_points < 2:
        raise ValueError("a schedule needs at least 2 points")
    t = torch.linspace(1.0, t_min, num_points, dtype=torch.float64)
    return flux_shift(t, mu) if mu is not None else flow_shift(t, shift)


def explicit(sigmas) -> torch.Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if s.numel() < 2 or not torch.isfinite(s).all() or not (s > 0).all() or not (s[1:] < s[:-1]).all():
        raise ValueError("an explicit schedule must be at least 2 positive, strictly descending sigmas")
    return s


MODEL_DEFINED = ("discrete", "flowmatch")            # rebuilt from the model's own sigmas / shift when it is known
REBUILDABLE = ("polynomial", "logsnr", "time_uniform")  # rebuilt from a range alone


def sigmas_for(spec: dict, steps: int, model_sampling=None) -> torch.Tensor:
    """The steps + 1 positive sigmas of the schedule `spec` (a table's schedule metadata: "type" and its numbers).

    `model_sampling` is the model's noise schedule (ComfyUI's model_sampling object: `.sigmas`, `.sigma_min`,
    `.sigma_max`, `.shift` for flow models), or None. A model-defined schedule (discrete, flowmatch) is rebuilt
    for the model when it is given; otherwise sigmas recorded in `spec` are used when their count fits, else the
    schedule is rebuilt from its numbers, a missing sigma range taken from the model."""
    n = steps + 1
    kind = spec.get("type")
    recorded = spec.get("sigmas")
    if recorded is not None and len(recorded) == n and not (kind in MODEL_DEFINED and model_sampling is not None):
        return explicit(recorded)
    smin, smax, rho = spec.get("sigma_min"), spec.get("sigma_max"), spec.get("rho")
    if kind in REBUILDABLE and smin is None and model_sampling is not None:
        smin, smax = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if kind == "polynomial":
        return polynomial(n, smin, smax, rho or 7.0)
    if kind == "logsnr":
        return logsnr(n, smin, smax)
    if kind == "time_uniform":
        return time_uniform(n, smin, smax)
    if kind == "discrete":
        if model_sampling is None:
            raise ValueError("a 'discrete' schedule needs the model's sigma table (connect the MODEL)")
        return discrete(n, model_sampling.sigmas, rho or 1.0, smin, smax)
    if kind == "flowmatch":
        if model_sampling is None:
            return flowmatch(n, spec.get("shift", 3.0), spec.get("mu"), spec.get("t_min", 1e-3))
        shift = float(getattr(model_sampling, "shift", spec.get("shift", 3.0)))
        t_min = 1.0 / model_sampling.sigmas.numel()  # the model's first training timestep (1/1000 SD3, 1/10000 Flux)
        if "flux" in type(model_sampling).__name__.lower():  # Flux's exponential shift: `shift` holds mu
            return flowmatch(n, mu=shift, t_min=t_min)
        return flowmatch(n, shift=shift, t_min=t_min)
    if kind == "explicit":
        if recorded is None:
            raise ValueError("an 'explicit' schedule records no sigmas")
        raise ValueError(f"the recorded schedule has {len(recorded) - 1} steps, not {steps}")
    raise ValueError(f"unknown or missing schedule type {kind!r}")


def with_final_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check(num_points, sigma_min, sigma_max):
    if num_points < 2:
        raise ValueError("a schedule needs at least 2 points")
    if not (sigma_min is not None and sigma_max is not None and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


# ------------------------------------------------------------------------------------- learned schedules
# A learned schedule keeps sigma_0 (the noise level of x) fixed and splits the log-sigma range from sigma_0
# down to a floor into N + 1 shares, softmax(logits): step i takes share i, the last share is what is left
# above the floor. Any logits give positive, strictly descending sigmas above the floor (a monotone
# parametrisation), so the optimiser can move every step, the last sigma included, without constraints.

def schedule_logits(positive_sigmas, floor: float) -> torch.Tensor:
    """Logits (N + 1,) that reproduce the given N + 1 positive descending sigmas exactly."""
    s = torch.as_tensor(positive_sigmas, dtype=torch.float64).flatten()
    if not 0 < floor < float(s[-1]):
        raise ValueError(f"the floor {floor} must lie in (0, last sigma {float(s[-1]):.4g})")
    gaps = torch.cat([s[:-1].log() - s[1:].log(), (s[-1] / floor).log().reshape(1)])
    return gaps.log()


def sigmas_from_logits(sigma_0, floor: float, logits: torch.Tensor) -> torch.Tensor:
    """The N + 1 positive sigmas (sigma_0 first) given by `schedule_logits`; differentiable in the logits."""
    sigma_0 = torch.as_tensor(sigma_0, dtype=logits.dtype, device=logits.device).reshape(1)
    share = torch.softmax(logits, dim=0)
    log_sigmas = sigma_0.log() - torch.log(sigma_0 / floor) * torch.cumsum(share, dim=0)[:-1]
    return torch.cat([sigma_0, log_sigmas.exp()])
