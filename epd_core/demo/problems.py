"""Training problems: a model in k-diffusion convention plus how to draw its starting states and conditioning.
The analytic mixture and the embedded demo models, with plain keyword arguments (the command line, tests and
benchmarks build them the same way)."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Problem:
    """A model in k-diffusion convention plus how to draw its starting states and conditioning."""
    model: object
    unit_noise: object                         # (generator, n) -> n standard-normal latents
    extra_args_fn: object
    sigma_min: float
    sigma_max: float
    family: str
    model_sampling: object = None              # the model's noise schedule (.sigmas, .sigma_min, .sigma_max)
    default_schedule: str = "polynomial"
    start_scale: object = None                 # sigma_0 -> factor from unit noise to the starting state
    run: object = None                         # runs distill itself (ComfyUI models train inside a sampler)
    sigmas_fn: object = None                   # (args) -> (sigmas, spec): a ComfyUI model's own schedules

    def noise_fn(self, sigma0: float):
        scale = self.start_scale(sigma0) if self.start_scale else sigma0
        return lambda g, n: self.unit_noise(g, n) * scale


def gmm_problem(dim: int = 64, components: int = 8, seed: int = 0, guidance_scale: float | None = None,
                device="cpu") -> Problem:
    """The analytic Gaussian mixture (exact denoiser); with a guidance scale, class-conditional with CFG."""
    from epd_core.demo.gmm import GaussianMixtureDenoiser, cfg_model
    gmm = GaussianMixtureDenoiser(dim=dim, num_components=components, seed=seed)
    model, extra_fn = gmm, None
    if guidance_scale is not None:  # class-conditional with CFG: labels drawn with the noise
        model = cfg_model(gmm, guidance_scale)
        extra_fn = lambda g, n: {"cond": torch.randint(0, components, (n,), generator=g).to(device)}  # noqa: E731
    unit_noise = lambda g, n: torch.randn(n, dim, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    return Problem(model, unit_noise, extra_fn, gmm.sigma_min, gmm.sigma_max, "gmm")


def demo_problem(model: str = "digits", weights=None, device="cpu", guidance_scale: float | None = None) -> Problem:
    """An embedded demo model with gradients for training: 'mnist' (28x28) or 'digits' / 'demo' (8x8), random
    class labels as conditioning, noise scaled like ComfyUI's."""
    from epd_core.demo import models as demo_model
    which = demo_model.DEMO_MODELS["mnist" if model == "mnist" else "digits"]
    net = demo_model.load_demo_model(weights or which["weights"], device=device)
    size = which["size"]

    class GradDemoDenoiser(demo_model.DemoDenoiser):
        # eps_denoise may be wrapped in torch.no_grad for sampling; distillation needs its gradients
        eps_denoise = getattr(demo_model.DemoDenoiser.eps_denoise, "__wrapped__", demo_model.DemoDenoiser.eps_denoise)

        def timestep(self, sigma):
            """The rounded index ComfyUI uses (forward), with the gradient of the fractional index (backward):
            without it a learned schedule or time scale never sees how the network's output moves with its
            time input, only the explicit sigma terms (straight-through estimator)."""
            rounded = super().timestep(sigma).to(sigma.dtype)
            if not sigma.requires_grad:
                return rounded
            log_table = self.log_sigmas.to(sigma.device, sigma.dtype)
            s = sigma.log().clamp(float(log_table[0]), float(log_table[-1]))
            hi = torch.searchsorted(log_table, s.detach()).clamp(1, len(log_table) - 1)
            lo = hi - 1
            frac = lo.to(s.dtype) + (s - log_table[lo]) / (log_table[hi] - log_table[lo])
            return frac + (rounded - frac).detach()

    den = GradDemoDenoiser(net, cfg=1.0 if guidance_scale is None else guidance_scale)

    def extra_fn(g, n):
        return {"cond": torch.randint(0, demo_model.NUM_CLASSES, (n,), generator=g).to(device)}
    return Problem(den, lambda g, n: torch.randn(n, 1, size, size, generator=g).to(device), extra_fn, den.sigma_min,
                   den.sigma_max, which["family"], den, "discrete",
                   start_scale=lambda s0: vp_start_scale(s0, den.sigma_max))


def vp_start_scale(sigma0: float, sigma_max: float) -> float:
    """ComfyUI's EPS noise_scaling: noise * sqrt(1 + sigma^2) when starting at the model's sigma_max."""
    return (1 + sigma0 ** 2) ** 0.5 if sigma0 >= sigma_max * (1 - 1e-5) else sigma0
