"""The residual Dirichlet policy over EPD tables (docs/method.md, "RL fine-tuning").

Per step i a learned embedding e_i goes through a small residual MLP (blocks h <- h + Linear(SiLU(LayerNorm(h))))
and a zero-initialised output layer that gives RESIDUALS around a cold-start base computed from a table:

    positions: segments s ~ Dirichlet(kappa * s0 * exp(res_r)),  K+1 segments, r_k = s_1 + ... + s_k  (monotone)
    weights:   w ~ Dirichlet(kappa * w0 * exp(res_w))
    c, a:      log c ~ Normal(log c0 + res_mu, sigma0 * exp(res_logsigma))  (log-normal, median c0), only when
               the table's scale bound is > 0; values are clamped into the bound when used / exported.

s0 are the gaps of the table's positions sorted per step (points are sorted by r, with w, c, a permuted
alongside; the sampler's sum over points does not depend on their order). At initialisation the residuals are
exactly 0, so the policy MEAN (Dirichlet means, log-normal medians) is the table itself.
"""
from __future__ import annotations

import copy
import datetime
import math

import torch
from torch import nn

from epd_core.tables.params import EPDParams

SEGMENT_FLOOR = 1e-6    # smallest target gap / sampled component (keeps log-probs finite)
BOUND_MARGIN = 0.999    # exported scales stay strictly inside (1 - bound, 1 + bound)


def dirichlet_log_prob(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log Dir(x; alpha) summed over the last dim."""
    return ((alpha - 1) * x.log()).sum(-1) + torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1)


def dirichlet_entropy(alpha: torch.Tensor) -> torch.Tensor:
    a0 = alpha.sum(-1)
    k = alpha.shape[-1]
    log_b = torch.lgamma(alpha).sum(-1) - torch.lgamma(a0)
    return log_b + (a0 - k) * torch.digamma(a0) - ((alpha - 1) * torch.digamma(alpha)).sum(-1)


def lognormal_log_prob(v: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    lv = v.log()
    return -lv - sigma.log() - 0.5 * math.log(2 * math.pi) - 0.5 * ((lv - mu) / sigma) ** 2


def lognormal_entropy(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return mu + 0.5 + sigma.log() + 0.5 * math.log(2 * math.pi)


class _Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)

    def forward(self, h):
        return h + self.lin(nn.functional.silu(self.norm(h)))


class ResidualDirichletPolicy(nn.Module):
    """Stochastic policy over tables of shape (steps N, points K); float64 on the CPU (it is tiny)."""

    def __init__(self, table: EPDParams, kappa: float = 15.0, hidden: int = 32, blocks: int = 2,
                 scale_sigma: float = 0.3, seed: int = 0):
        super().__init__()
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be > 0, got {kappa}")
        self.table = table.clone()
        self.kappa = float(kappa)
        rows = {k: v.detach().double() for k, v in table.activated().items()}
        order = rows["r"].argsort(dim=-1)
        rows = {k: v.gather(-1, order) for k, v in rows.items()}
        n, k = rows["r"].shape
        self.num_steps, self.num_points = n, k
        self.fix_last = bool(table.metadata.get("fix_last_dir_scale"))
        self.scale_dir, self.scale_time = float(table.scale_dir), float(table.scale_time)
        self.use_c, self.use_a = self.scale_dir > 0, self.scale_time > 0
        r = rows["r"]
        seg = torch.cat([r[:, :1], r[:, 1:] - r[:, :-1], 1 - r[:, -1:]], dim=-1).clamp_min(SEGMENT_FLOOR)
        seg = seg / seg.sum(-1, keepdim=True)
        w = rows["w"].clamp_min(SEGMENT_FLOOR)
        w = w / w.sum(-1, keepdim=True)
        self.register_buffer("base_log_alpha_r", (self.kappa * seg).log())
        self.register_buffer("base_log_alpha_w", (self.kappa * w).log())
        self.register_buffer("base_mu_c", rows["c"].log())
        self.register_buffer("base_mu_a", rows["a"].log())
        # log-std of log c / log a: a fraction of the bound (the log of a scale within 1 +- b is about +- b)
        self.register_buffer("base_log_sigma_c", torch.full((n, k), math.log(max(scale_sigma * self.scale_dir, 1e-12))))
        log_sigma_a = math.log(max(scale_sigma * self.scale_time, 1e-12))
        self.register_buffer("base_log_sigma_a", torch.full((n, k), log_sigma_a))
        self.out_sizes = [k + 1, k] + [k, k] * self.use_c + [k, k] * self.use_a
        g = torch.Generator().manual_seed(int(seed))
        self.embed = nn.Parameter(torch.randn(n, hidden, generator=g, dtype=torch.float64))
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(blocks)).double()
        for blk in self.blocks:  # deterministic init independent of the global RNG
            with torch.no_grad():
                bound = 1 / math.sqrt(hidden)
                blk.lin.weight.copy_((torch.rand(hidden, hidden, generator=g, dtype=torch.float64) * 2 - 1) * bound)
                blk.lin.bias.copy_((torch.rand(hidden, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        self.out_norm = nn.LayerNorm(hidden).double()
        self.head = nn.Linear(hidden, sum(self.out_sizes)).double()
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # ---- distribution parameters ---------------------------------------------------------------------
    def _residuals(self):
        h = self.embed
        for blk in self.blocks:
            h = blk(h)
        return torch.split(self.head(nn.functional.silu(self.out_norm(h))), self.out_sizes, dim=-1)

    def dist_params(self) -> dict:
        """alpha_r (N, K+1), alpha_w (N, K) and (mu, sigma) of log c / log a when learned."""
        res = list(self._residuals())
        p = {"alpha_r": (self.base_log_alpha_r + res.pop(0)).exp(),
             "alpha_w": (self.base_log_alpha_w + res.pop(0)).exp()}
        if self.use_c:
            p["mu_c"] = self.base_mu_c + res.pop(0)
            p["sigma_c"] = (self.base_log_sigma_c + res.pop(0)).exp()
        if self.use_a:
            p["mu_a"] = self.base_mu_a + res.pop(0)
            p["sigma_a"] = (self.base_log_sigma_a + res.pop(0)).exp()
        return p

    def reference_params(self) -> dict:
        """The cold-start policy (all residuals 0), for the optional KL penalty."""
        p = {"alpha_r": self.base_log_alpha_r.exp(), "alpha_w": self.base_log_alpha_w.exp()}
        if self.use_c:
            p["mu_c"], p["sigma_c"] = self.base_mu_c, self.base_log_sigma_c.exp()
        if self.use_a:
            p["mu_a"], p["sigma_a"] = self.base_mu_a, self.base_log_sigma_a.exp()
        return p

    # ---- sampling and densities -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """n tables. Returns (sample, rows, log_prob): `sample` holds the raw draws (segments, weights, c, a:
        (n, N, K[+1])), `rows` the tables for the sampler {'r','w','c','a'} of shape (n, N, K) and `log_prob`
        (n,) the sum of the per-step log-probs. Seeded through `generator` (CPU)."""
        p = self.dist_params()
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator)) if generator is not None else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            s = {"seg": self._draw_dirichlet(p["alpha_r"], n), "w": self._draw_dirichlet(p["alpha_w"], n)}
            for name in "ca":
                if f"mu_{name}" in p:
                    eps = torch.randn((n,) + p[f"mu_{name}"].shape, dtype=torch.float64)
                    s[name] = (p[f"mu_{name}"] + p[f"sigma_{name}"] * eps).exp()
        return s, self.rows(s), self.log_prob(s, p)

    @staticmethod
    def _draw_dirichlet(alpha, n):
        x = torch.distributions.Dirichlet(alpha.expand((n,) + alpha.shape)).sample()
        x = x.clamp_min(SEGMENT_FLOOR)
        return x / x.sum(-1, keepdim=True)

    def log_prob(self, sample: dict, params: dict | None = None) -> torch.Tensor:
        """Sum over steps and components of the log-density of each table in `sample`: (n,)."""
        p = params if params is not None else self.dist_params()
        lp = dirichlet_log_prob(sample["seg"], p["alpha_r"]) + dirichlet_log_prob(sample["w"], p["alpha_w"])
        for name in "ca":
            if f"mu_{name}" in p:
                lp = lp + lognormal_log_prob(sample[name], p[f"mu_{name}"], p[f"sigma_{name}"]).sum(-1)
        return lp.sum(-1)

    def entropy(self, params: dict | None = None) -> torch.Tensor:
        """Differential entropy of the whole policy (sum over steps and components)."""
        p = params if params is not None else self.dist_params()
        h = dirichlet_entropy(p["alpha_r"]).sum() + dirichlet_entropy(p["alpha_w"]).sum()
        for name in "ca":
            if f"mu_{name}" in p:
                h = h + lognormal_entropy(p[f"mu_{name}"], p[f"sigma_{name}"]).sum()
        return h

    def kl_to_reference(self, params: dict | None = None) -> torch.Tensor:
        """KL(policy || cold-start policy), analytic."""
        p = params if params is not None else self.dist_params()
        q = self.reference_params()
        D, N = torch.distributions.Dirichlet, torch.distributions.Normal
        kl = (torch.distributions.kl_divergence(D(p["alpha_r"]), D(q["alpha_r"])).sum()
              + torch.distributions.kl_divergence(D(p["alpha_w"]), D(q["alpha_w"])).sum())
        for name in "ca":
            if f"mu_{name}" in p:
                kl = kl + torch.distributions.kl_divergence(N(p[f"mu_{name}"], p[f"sigma_{name}"]),
                                                            N(q[f"mu_{name}"], q[f"sigma_{name}"])).sum()
        return kl

    # ---- tables -----------------------------------------------------------------------------------------
    def rows(self, sample: dict) -> dict:
        """Raw draws -> sampler rows {'r','w','c','a'} of shape (n, N, K), float64."""
        seg, w = sample["seg"], sample["w"]
        r = seg.cumsum(-1)[..., :-1].clamp(SEGMENT_FLOOR, 1 - SEGMENT_FLOOR)
        ones = torch.ones_like(w)
        c = self._clamp(sample["c"], self.scale_dir) if "c" in sample else ones * self._const("c")
        a = self._clamp(sample["a"], self.scale_time) if "a" in sample else ones * self._const("a")
        if self.fix_last:
            c = torch.cat([c[..., :-1, :], torch.ones_like(c[..., -1:, :])], dim=-2)
        return {"r": r, "w": w, "c": c, "a": a}

    def _const(self, name):
        return (self.base_mu_c if name == "c" else self.base_mu_a).exp()

    @staticmethod
    def _clamp(v, bound):
        return v.clamp(1 - BOUND_MARGIN * bound, 1 + BOUND_MARGIN * bound)

    @torch.no_grad()
    def mean_rows(self) -> dict:
        """The policy mean as rows (N, K): Dirichlet means -> r, w; log-normal medians -> c, a."""
        p = self.dist_params()
        s = {"seg": p["alpha_r"] / p["alpha_r"].sum(-1, keepdim=True),
             "w": p["alpha_w"] / p["alpha_w"].sum(-1, keepdim=True)}
        for name in "ca":
            if f"mu_{name}" in p:
                s[name] = p[f"mu_{name}"].exp()
        return self.rows(s)

    def mean_table(self, provenance: dict | None = None) -> EPDParams:
        """The policy mean as a normal table, with the original metadata and an RL provenance entry."""
        rows = self.mean_rows()
        meta = copy.deepcopy(self.table.metadata)
        old = meta.get("provenance") or {}
        prov = {"trainer": "epd_core.training.rl.rdpo", "method": "RDPO", "kappa": self.kappa, "base_provenance": old,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        prov.update(provenance or {})
        meta["provenance"] = prov
        c = rows["c"] if self.use_c else None
        a = rows["a"] if self.use_a else None
        return EPDParams.from_values(rows["r"], rows["w"], c, a, scale_dir=self.scale_dir, scale_time=self.scale_time,
                                     **meta)
