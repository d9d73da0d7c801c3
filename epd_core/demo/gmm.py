"""An analytic test problem: data from an isotropic Gaussian mixture, so D(x, sigma) = E[x0 | x] is exact.

With x = x0 + sigma * n and component j ~ N(mu_j, s^2 I):
    p(j | x) ∝ pi_j N(x; mu_j, (s^2 + sigma^2) I),   E[x0 | x, j] = mu_j + s^2 / (s^2 + sigma^2) (x - mu_j).
Used by the tests (reductions to ComfyUI's samplers), the distillation tests and the benchmark.
Optional class conditioning (`cond=` a component index per sample, -1 = unconditional) makes CFG meaningful.
"""
from __future__ import annotations

import math

import torch


class GaussianMixtureDenoiser:
    def __init__(self, dim: int = 64, num_components: int = 8, std: float = 0.3, spread: float = 2.0,
                 seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, dim, generator=g, dtype=dtype)
        self.means = spread * means / means.norm(dim=1, keepdim=True)
        self.std = std
        self.log_weights = torch.full((num_components,), -math.log(num_components), dtype=dtype)
        self.dim = dim
        self.calls = 0

    @property
    def sigma_max(self) -> float:
        return 80.0

    @property
    def sigma_min(self) -> float:
        return 0.002

    def posterior(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """p(j | x) for x (B, dim) at per-sample sigma (B,)."""
        mu = self.means.to(x)
        var = self.std ** 2 + sigma.to(x)[:, None] ** 2  # (B, 1)
        sq = torch.cdist(x, mu) ** 2  # (B, J)
        logp = self.log_weights.to(x) - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
        if cond is not None:
            cond = torch.as_tensor(cond, device=x.device).long().flatten()
            if cond.numel() not in (1, x.shape[0]):  # K stacked points: tile like ComfyUI (point-major)
                cond = cond.repeat(x.shape[0] // cond.numel())
            cond = cond.expand(x.shape[0])
            onehot = torch.nn.functional.one_hot(cond.clamp_min(0), mu.shape[0]).bool()
            mask = onehot | (cond < 0)[:, None]
            logp = logp.masked_fill(~mask, float("-inf"))
        return torch.softmax(logp, dim=1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, **_) -> torch.Tensor:
        self.calls += 1
        shape = x.shape
        x = x.reshape(shape[0], -1)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(shape[0])
        post = self.posterior(x, sigma, cond)
        mu = self.means.to(x)
        shrink = (self.std ** 2 / (self.std ** 2 + sigma ** 2))[:, None, None]
        cond_means = mu[None] + shrink * (x[:, None, :] - mu[None])  # (B, J, dim)
        return (post[:, :, None] * cond_means).sum(1).reshape(shape)

    def mode_of(self, x0: torch.Tensor) -> torch.Tensor:
        """Nearest component of clean samples (to count samples that land in the wrong mode)."""
        return torch.cdist(x0.reshape(x0.shape[0], -1).to(self.means), self.means).argmin(1)


def cfg_model(model, scale: float):
    """Classifier-free guidance around a conditional model: D = D_u + s (D_c - D_u)."""
    def guided(x, sigma, cond=None, **kw):
        if cond is None or scale == 1.0:
            return model(x, sigma, cond=cond, **kw)
        uncond = torch.full_like(torch.as_tensor(cond), -1)
        d_c = model(x, sigma, cond=cond, **kw)
        d_u = model(x, sigma, cond=uncond, **kw)
        return d_u + scale * (d_c - d_u)
    return guided
