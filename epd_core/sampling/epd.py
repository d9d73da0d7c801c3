"""The EPD step and the loop over a sigma list (docs/method.md, "A step"), in the k-diffusion / ComfyUI convention:
`model(x, sigma * s_in, **extra_args)` returns the denoised prediction D(x, sigma). Sampling, distillation and RL
all run this one loop.

One step from t_cur to t_next > 0:
    d_cur = (x - D(x, t_cur)) / t_cur                          (or the AFS estimate on step 0)
    t_k   = t_next^r_k * t_cur^(1 - r_k)                       (geometric interpolation)
    x_k   = x + (t_k - t_cur) * d_pred                         (d_pred = d_cur, or Adams-Bashforth for Plugin)
    d_k   = (x_k - D(x_k, a_k t_k)) / t_k                      (all K points in ONE batched model call)
    x'    = x + (t_next - t_cur) * sum_k w_k c_k d_k
The step to sigma = 0 is a plain Euler step, x' = D(x, t_cur), like ComfyUI's own samplers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint
from tqdm.auto import trange

from epd_core.sampling.points import PointEvaluator

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
    """x at t_next from x at t_cur, given the predictor direction and one row of the table: r, w, c, a of shape
    (K,), or (K, B) when every sample has its own table (RL rollouts).
    `evaluate(xs, sigmas)` denoises the stacked points xs (K, B, ...) at their sigmas (K,) or (K, B).
    With `t_end` (a table's step to zero, t_end = 0) the points still lie between t_cur and t_next, which is
    then only their anchor, and the combined direction carries x all the way to t_end."""
    def per_point(v):  # (K,) or (K, B) -> broadcastable against the stacked points (K, B, ...)
        return v.reshape(v.shape + (1,) * (x.dim() + 1 - v.dim()))
    t_k = t_next ** r * t_cur ** (1 - r)
    x_k = x.unsqueeze(0) + per_point(t_k - t_cur).to(x.dtype) * d_pred.unsqueeze(0)
    denoised_k = evaluate(x_k, a * t_k)
    acc = torch.promote_types(x.dtype, torch.float32)  # combine in >= fp32 for fp16/bf16 models
    # x_k upcast before subtracting (a no-op for fp32/fp64 x): x_k - D(x_k) rounded to bf16 costs ~10 ulps of x'
    d_k = (x_k.to(acc) - denoised_k).to(acc) / per_point(t_k).to(acc)  # t_k, not a_k t_k (docs/method.md)
    d_mix = (per_point(w * c).to(acc) * d_k).sum(0)
    t_end = t_next if t_end is None else t_end
    return (x.to(acc) + (t_end - t_cur).to(acc) * d_mix).to(x.dtype)


def integrate(model, x, sigmas, rows, extra_args=None, callback=None, disable=None, max_order: int = 1,
              afs: bool = False, evaluate=None, detach_steps: bool = False, checkpoint_steps: bool = False,
              to_zero: bool = False):
    """Run EPD (max_order 1) or EPD-Plugin (max_order > 1) over `sigmas` with table rows {'r','w','c','a'}:
    tensors (steps, K), one row per step to a positive sigma, or (B, steps, K) for one table per sample.
    `detach_steps` cuts the graph between steps (per-step distillation); `checkpoint_steps` recomputes each step
    in backward (memory of one step instead of all, for big models). `callback` gets k-diffusion's keys and the
    step's result `x_next` after every step.
    `to_zero` (positive sigmas only): the last row steps to sigma 0, its points anchored at the last sigma
    (`epd_step`'s t_end), so the result is denoised without a final model call."""
    extra_args = extra_args or {}
    sig = check_sigmas(sigmas)
    steps = positive_steps(sig)
    if rows["r"].shape[-2] != steps:
        raise EPDSamplingError(f"table has {rows['r'].shape[-2]} rows for {steps} steps")
    if to_zero and sig[-1] == 0:
        raise EPDSamplingError("to_zero needs a list of positive sigmas (the last one is the final step's anchor)")
    evaluate = evaluate or PointEvaluator(model, extra_args)
    s_in = x.new_ones([x.shape[0]])

    def step(i, x, *history):
        """(x at sigma i+1, d_cur, denoised) from x at sigma i and the older directions."""
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        if afs and i == 0 and sig[1] > 0:
            d_cur = x / torch.sqrt(1 + t_cur ** 2)  # analytic first step: no model call
            denoised = x - t_cur * d_cur
        else:
            denoised = model(x, t_cur * s_in, **extra_args)
            d_cur = (x - denoised) / t_cur
        if sig[i + 1] == 0:
            return denoised, d_cur, denoised  # Euler step to sigma 0
        d_pred = adams_bashforth(d_cur, list(history), max_order) if max_order > 1 else d_cur
        t_end = t_next.new_zeros(()) if to_zero and i == len(sig) - 2 else None
        row = (rows[n][..., i, :] for n in "rwca")  # (K,), or (B, K) -> (K, B)
        return epd_step(evaluate, x, d_pred, t_cur, t_next, *(v if v.dim() == 1 else v.T for v in row),
                        t_end=t_end), d_cur, denoised

    keep = (lambda history, d_cur, _: (history + [d_cur])[-(max_order - 1):]) if max_order > 1 else \
        (lambda history, d_cur, _: history)  # oldest first, as adams_bashforth reads it
    x, bad_steps = run_steps(step, x, sigmas, len(sig) - 1, keep, callback, disable, detach_steps, checkpoint_steps)
    check_finite(bad_steps, sig)
    return x


def positive_part(sigmas):
    """A sigma list without its final 0 (the rows of a table cover the steps to a positive sigma)."""
    return sigmas[:-1] if float(sigmas[-1].detach()) == 0.0 else sigmas


def final_euler_step(model, x, sigmas, extra_args):
    """x after `positive_part(sigmas)`, finished with the plain Euler step x = D(x, sigma_N) (no table row) when the
    list ends in 0."""
    if float(sigmas[-1].detach()) != 0.0:
        return x
    return model(x, sigmas[-2] * x.new_ones([x.shape[0]]), **extra_args)


def run_steps(step, x, sigmas, steps: int, keep, callback=None, disable=None, detach_steps: bool = False,
              checkpoint_steps: bool = False):
    """The loop every solver variant shares: `step(i, x, *history) -> (x_next, d_cur, denoised)` for i < steps,
    with the tensors `keep(history, d_cur, denoised)` returns after each step. `detach_steps` cuts the graph between
    steps (per-step distillation); `checkpoint_steps` recomputes each step in backward; `callback` gets
    k-diffusion's keys plus the step's result `x_next`. Returns x and the non-finite flags of the input and of
    every step, for check_finite (one check at the end: no per-step host sync)."""
    history: list[torch.Tensor] = []
    bad_steps = [~torch.isfinite(x).all()]  # entry 0: the input itself (e.g. a NaN latent from upstream)
    for i in trange(steps, disable=disable):
        if detach_steps:
            x, history = x.detach(), [h.detach() for h in history]
        if checkpoint_steps:
            x_next, d_cur, denoised = grad_checkpoint(step, i, x, *history, use_reentrant=False)
        else:
            x_next, d_cur, denoised = step(i, x, *history)
        if callback is not None:  # k-diffusion's keys, plus the step's result for trainers
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised,
                      "x_next": x_next})
        x = x_next
        history = keep(history, d_cur, denoised)
        bad_steps.append(~torch.isfinite(x).all())
    return x, torch.stack(bad_steps)


def check_finite(bad: torch.Tensor, sig: list[float]) -> None:
    if bool(bad.any()):
        first = int(bad.float().argmax()) - 1
        if first < 0:
            raise EPDSamplingError("the input latent already contains NaN/inf before the first step; check the "
                                   "node that produced it (VAE Encode, a latent upscale, a previous sampler)")
        raise EPDSamplingError(f"the model produced NaN/inf at step {first} (sigma {sig[first]:.4g} -> "
                               f"{sig[first + 1]:.4g}). Check the model, its precision (try fp32/bf16) and the CFG "
                               "scale; the result would be a black image.")


def check_sigmas(sigmas) -> list[float]:
    """Sigmas must be finite, >= 0 and strictly descending (a final 0 allowed). Returns them as floats."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1:
        raise EPDSamplingError(f"sigmas must be a 1-D list, got shape {tuple(sigmas.shape)}")
    sig = sigmas.detach().double().cpu().tolist()  # one host sync per run
    if not all(np.isfinite(sig)):
        raise EPDSamplingError(f"sigmas contain NaN or inf: {sig}. Check the scheduler / SIGMAS input.")
    if any(s < 0 for s in sig) or any(b >= a for a, b in zip(sig, sig[1:])):
        raise EPDSamplingError(f"sigmas must be >= 0 and strictly descending, got {sig}. "
                               "Check the scheduler / SIGMAS input (e.g. a flipped or repeated list).")
    return sig


def positive_steps(sigmas) -> int:
    """The number of steps that end at a positive sigma: the rows a table needs for this list."""
    sig = sigmas if isinstance(sigmas, list) else torch.as_tensor(sigmas).detach().cpu().tolist()
    return sum(1 for s in sig[1:] if s > 0)
