"""RDPO training loop (docs/method.md, "RL fine-tuning"): grouped rollouts, RLOO advantages, PPO-clipped updates of the
residual Dirichlet policy, export of the policy mean as a table.

Per iteration: for every prompt one noise x_p (drawn from a per-iteration seed) is shared by a group of G
trajectories, each sampling its OWN table from the policy; the diffusion model only runs forward
(torch.no_grad). Rewards -> leave-one-out baseline within each group -> advantages normalised over all
rollouts -> `epochs` Adam steps on the PPO clipped objective of the summed per-step log-probs (+ optional KL
to the cold-start policy). Atomic safetensors checkpoints (policy, Adam, iteration, history, config) resume
exactly; `should_stop()` cancels; under torch.distributed the groups are sharded over the ranks and
gradients / statistics averaged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from epd_core.sampling.epd import EPDSamplingError, check_sigmas, integrate, positive_steps
from epd_core.tables.fileio import adam_state_tensors, load_adam_state, read_checkpoint, write_checkpoint
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.sampling.plan import plan
from epd_core.runtime import batch_seed, rank_and_world, sum_over_ranks
from epd_core.sampling.registry import predictor_order, variant
from epd_core.training.loop import TrainingRun, check_same_settings, open_checkpoint, reduce_gradients
from epd_core.training.rl.policy import ResidualDirichletPolicy

log = logging.getLogger("epd")
CHECKPOINT_FORMAT = "epd-rdpo-checkpoint-v1"
_RESULT_FIELDS = ("iterations", "group_size", "prompts_per_iteration", "epochs", "lr", "clip_eps", "kl_coef", "kappa",
                  "hidden", "blocks", "scale_sigma", "max_grad_norm", "seed")


class RLError(RuntimeError):
    """RDPO cannot run or continue; the message names the problem and the fix."""


class RLCancelled(RLError):
    """`should_stop()` asked to stop; the last checkpoint is intact."""


@dataclass
class RLConfig:
    iterations: int = 100
    group_size: int = 4              # G trajectories (tables) per prompt, sharing one noise
    prompts_per_iteration: int = 0   # prompts (groups) per update, cycling through the list; 0 = all of them
    epochs: int = 2                  # PPO epochs per batch of rollouts
    # Defaults read by the EPD Trainer node and `train rl` alike. lr and kl_coef are measured on the demo model
    # (bench/rl_demo.py, docs/results.md): 1e-3 raises the reward within 40 updates where the paper's 7e-5 (for
    # runs of thousands of updates) barely moves it; KL 0.1 halves the drift from the ODE solution (paper: 0).
    lr: float = 1e-3                 # Adam
    clip_eps: float = 0.2
    kl_coef: float = 0.1             # KL(policy || cold start); 0 in published configs
    kappa: float = 15.0              # cold-start Dirichlet concentration: alpha = kappa * target mean
    hidden: int = 32
    blocks: int = 2
    scale_sigma: float = 0.3         # log-normal std of c / a as a fraction of the table's scale bound
    max_grad_norm: float = 1.0       # gradient clipping (0 disables)
    seed: int = 0
    checkpoint_path: str | None = None
    checkpoint_interval: int = 10
    resume: bool | str = False       # True: continue the checkpoint (must exist); 'auto': if present

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise RLError(msg)
        need(isinstance(self.iterations, int) and self.iterations >= 1, f"iterations={self.iterations!r}: use >= 1")
        need(isinstance(self.group_size, int) and self.group_size >= 2,
             f"group_size={self.group_size!r}: RLOO needs at least 2 trajectories per group (4 in the paper)")
        need(isinstance(self.prompts_per_iteration, int) and self.prompts_per_iteration >= 0,
             f"prompts_per_iteration={self.prompts_per_iteration!r}: use 0 (all prompts) or a positive count")
        need(self.epochs >= 1, f"epochs={self.epochs}: use >= 1")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr}: use a small positive rate like 7e-5")
        need(0 < self.clip_eps < 1, f"clip_eps={self.clip_eps}: use 0.2")
        need(self.kl_coef >= 0, f"kl_coef={self.kl_coef}: use >= 0")
        need(self.kappa > 0, f"kappa={self.kappa}: use 10..20")
        need(self.checkpoint_interval >= 1, f"checkpoint_interval={self.checkpoint_interval}: use >= 1")
        need(self.resume in (False, True, "auto"), f"resume={self.resume!r}: use False, True or 'auto'")


# ============================================================================================== advantages

def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantage within consecutive groups of `group_size`: R_i - mean_{j != i} R_j
    (not normalised)."""
    r = rewards.double().view(-1, group_size)
    baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).view(-1)


def ppo_loss(logp_new, logp_old, adv, clip_eps):
    ratio = (logp_new - logp_old).exp()
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    return -surr.sum(), ratio


# ============================================================================================== checkpoints

def save_checkpoint(path, policy, optimizer, iteration, history, cfg: RLConfig, base: EPDParams):
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    tensors.update(adam_state_tensors(optimizer))
    meta = {"format": CHECKPOINT_FORMAT, "iteration": str(iteration), "config": json.dumps(cfg.to_json()),
            "history": json.dumps(history), "base_table": base.to_bytes().hex(), "torch": torch.__version__}
    write_checkpoint(path, tensors, meta, RLError)


def load_checkpoint(path) -> dict:
    meta, tensors = read_checkpoint(path, CHECKPOINT_FORMAT, "RDPO", RLError)
    try:
        return {"iteration": int(meta["iteration"]), "config": json.loads(meta["config"]),
                "history": json.loads(meta["history"]), "base": bytes.fromhex(meta["base_table"]),
                "tensors": tensors}
    except Exception as e:  # noqa: BLE001 - missing fields: a damaged or foreign file
        raise RLError(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {e}). Delete it to start "
                      "over.") from None


def _prepare_checkpoint(cfg: RLConfig, base: EPDParams, rank: int):
    path = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    ck = open_checkpoint(path, cfg.resume, RLError, load_checkpoint, rank)
    if ck is None:
        return path, None
    check_same_settings(ck["config"], cfg.to_json(), _RESULT_FIELDS, path, RLError)
    try:
        saved_base = EPDParams.from_bytes(ck["base"], source=str(path))
    except EPDParamsError as e:
        raise RLError(f"checkpoint {path}: its starting table is unreadable ({e}); delete it to start over") from None
    same = (all(torch.equal(a, b.float()) for a, b in zip(saved_base.tensors(), base.tensors()))
            and (saved_base.scale_dir, saved_base.scale_time) == (float(base.scale_dir), float(base.scale_time)))
    if not same:
        raise RLError(f"checkpoint {path} was trained from a different starting table; pass the same --init table")
    return path, ck


# ============================================================================================== training

def _default_extra_args(prompts):
    if all(isinstance(p, int) or (torch.is_tensor(p) and p.dim() == 0) for p in prompts):
        return {"cond": torch.as_tensor([int(p) for p in prompts])}
    return {}


def rdpo(model, sigmas, base_table: EPDParams, reward, prompts, noise_fn=None, config: RLConfig | None = None,
         progress=None, should_stop=None, extra_args_fn=None, history: list | None = None) -> EPDParams:
    """Fine-tune `base_table` on `reward` with RDPO and return the policy mean as a table.

    model(x, sigma_vec, **extra) -> denoised (k-diffusion convention), or None for rewards that score tables only
    (reward.needs_tables). sigmas: the table's schedule (final 0 allowed). prompts: one entry per group (e.g. class
    labels for the demo model). noise_fn(generator, n) -> n starting states at sigmas[0]. extra_args_fn(prompts)
    -> model keyword arguments for a list of per-sample prompts (default: labels -> {'cond': tensor}).
    progress(iteration, stats) with stats {reward, reward_std, entropy, grad_norm, loss, kl, clip_frac}."""
    cfg = dataclasses.replace(config or RLConfig())
    cfg.validate()
    if not variant(base_table.solver).rl:
        raise RLError(f"RDPO fine-tunes the paper's solvers' softmax weights; this is an {base_table.solver} table "
                      "(free coefficients). Distill it instead, or fine-tune an epd / epd_plugin table")
    rank, world = rank_and_world()
    prompts = list(prompts)
    if not prompts:
        raise RLError("no prompts given")
    n_iter = cfg.prompts_per_iteration or len(prompts)
    if n_iter % world:
        raise RLError(f"{n_iter} prompts per iteration do not split over {world} ranks; use a multiple of {world}")
    if model is None and not getattr(reward, "needs_tables", False):
        raise RLError("model is None but the reward scores images; pass the diffusion model")
    if model is not None and noise_fn is None:
        raise RLError("noise_fn(generator, n) is required to sample images")
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    try:
        sig_list = check_sigmas(sig)
    except EPDSamplingError as e:
        raise RLError(f"bad sigmas: {e}") from None
    n_pos = positive_steps(sig_list)
    if n_pos != base_table.num_steps:
        raise RLError(f"the table has {base_table.num_steps} steps but the sigmas give {n_pos}; use the table's "
                      "own schedule")
    max_order = predictor_order(base_table.solver, base_table.max_order)
    # the end-point mode the table gets on these sigmas (plan.plan: a "to_zero" table's last row steps to 0 only
    # on its own sigmas), the rollouts' rows being the policy's
    to_zero = plan(base_table, sig, own_schedule=False).to_zero
    extra_args_fn = extra_args_fn or _default_extra_args

    ckpt_path, ckpt = _prepare_checkpoint(cfg, base_table, rank)
    policy = ResidualDirichletPolicy(base_table, cfg.kappa, cfg.hidden, cfg.blocks, cfg.scale_sigma, seed=cfg.seed)
    params = list(policy.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    start, hist = 0, []
    if ckpt is not None:
        policy.load_state_dict({k[len("policy."):]: v for k, v in ckpt["tensors"].items() if k.startswith("policy.")})
        load_adam_state(optimizer, ckpt["tensors"], params)
        start, hist = ckpt["iteration"], list(ckpt["history"])
        log.info("EPD RL: resuming %s at iteration %d/%d", ckpt_path, start, cfg.iterations)
    run = TrainingRun("RL", cfg.iterations, ckpt_path, cfg.checkpoint_interval, RLCancelled, start, ckpt is not None,
                      rank, world)
    G, P = cfg.group_size, n_iter

    def step(it: int) -> dict:
        sample, rows, logp_old, images, my_prompts = _rollouts(policy, model, sig, base_table, prompts, noise_fn,
                                                               extra_args_fn, it, P, G, rank, world, cfg.seed,
                                                               max_order, to_zero)
        with torch.no_grad():
            rewards = torch.as_tensor(reward(images, my_prompts, tables=rows), dtype=torch.float64).cpu().reshape(-1)
        if not torch.isfinite(rewards).all():
            raise RLError(f"the reward returned NaN/inf at iteration {it}; check the reward model")
        adv, total, r_mean, r_std = normalised_advantages(rewards, G, world)
        loss_v, grad_norm, clip_frac = _ppo_epochs(policy, optimizer, params, sample, logp_old, adv, total, cfg,
                                                   world, it)
        with torch.no_grad():
            entropy = float(policy.entropy())
            kl = float(policy.kl_to_reference())
        return {"iteration": it + 1, "reward": r_mean, "reward_std": r_std, "entropy": entropy,
                "grad_norm": grad_norm, "loss": loss_v, "kl": kl, "clip_frac": clip_frac}

    run.iterate(step, lambda done: save_checkpoint(ckpt_path, policy, optimizer, done, hist, cfg, base_table), hist,
                progress, should_stop)
    if history is not None:
        history[:] = hist
    prov = {"reward": getattr(reward, "name", type(reward).__name__), "iterations": cfg.iterations,
            "group_size": G, "num_prompts": len(prompts), "prompts_per_iteration": P, "epochs": cfg.epochs,
            "lr": cfg.lr, "clip_eps": cfg.clip_eps,
            "kl_coef": cfg.kl_coef, "seed": cfg.seed, "world_size": world,
            "final_mean_reward": hist[-1]["reward"] if hist else None}
    return policy.mean_table(prov)


def _rollouts(policy, model, sig, base_table, prompts, noise_fn, extra_args_fn, it, P, G, rank, world, seed,
              max_order, to_zero):
    """This rank's G trajectories for each of its prompts: (policy sample, rows, their log-probabilities, images
    (None for table-only rewards), the per-rollout prompts). Every rank draws ALL tables and noises (cheap) from
    the iteration's seed and keeps its groups: the same result for any world size."""
    g = torch.Generator().manual_seed(batch_seed(seed, it))
    chosen = [prompts[(it * P + j) % len(prompts)] for j in range(P)]  # cycles through the list
    per_rank = P // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    sample, rows, logp_old = policy.sample(P * G, generator=g)
    sel = slice(mine.start * G, mine.stop * G)
    sample = {k: v[sel] for k, v in sample.items()}
    rows = {k: v[sel] for k, v in rows.items()}
    my_prompts = [p for p in chosen[mine] for _ in range(G)]
    images = None
    if model is not None:
        x0 = noise_fn(g, P)[mine].repeat_interleave(G, dim=0)
        extra = {k: (v.to(x0.device) if torch.is_tensor(v) else v) for k, v in extra_args_fn(my_prompts).items()}
        acc = torch.promote_types(x0.dtype, torch.float32)
        own_rows = {k: v.to(x0.device, acc) for k, v in rows.items()}
        with torch.no_grad():
            try:  # every rollout has its own table: rows (B, steps, K), all K*B points in one model call
                images = integrate(model, x0, sig.to(x0.device, acc), own_rows, extra, disable=True,
                                   max_order=max_order, afs=base_table.afs, to_zero=to_zero)
            except EPDSamplingError as e:
                raise RLError(f"iteration {it}: {e}") from None
    return sample, rows, logp_old[sel], images, my_prompts


def normalised_advantages(rewards: torch.Tensor, group_size: int, world: int):
    """(RLOO advantages divided by their RMS over all ranks' rollouts, the number of rollouts, reward mean and
    standard deviation over all ranks)."""
    adv = rloo_advantages(rewards, group_size)
    sums = sum_over_ranks(torch.stack([rewards.sum(), rewards.square().sum(), adv.square().sum(),
                                       torch.tensor(float(rewards.numel()), dtype=torch.float64)]), world)
    total = sums[3]
    r_mean = float(sums[0] / total)
    r_std = math.sqrt(max(float(sums[1] / total) - r_mean ** 2, 0.0))
    return adv / (math.sqrt(float(sums[2] / total)) + 1e-8), total, r_mean, r_std


def _ppo_epochs(policy, optimizer, params, sample, logp_old, adv, total, cfg: RLConfig, world: int, it: int):
    """`cfg.epochs` Adam steps on the PPO clipped objective (+ KL to the cold-start policy), gradients summed over
    the ranks. Returns (last loss, gradient norm before clipping, fraction of clipped ratios)."""
    loss_v = grad_norm = clip_frac = 0.0
    for _ in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=False)
        p = policy.dist_params()
        logp = policy.log_prob(sample, p)
        loss, ratio = ppo_loss(logp, logp_old, adv, cfg.clip_eps)
        loss = loss / total  # mean over ALL rollouts once gradients are summed over ranks
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * policy.kl_to_reference(p) / world
        loss.backward()
        grad_norm = float(reduce_gradients(params, world, mean=False).norm())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not all(torch.isfinite(q.grad).all() for q in params):
            raise RLError(f"non-finite gradient at iteration {it}; lower the learning rate (now {cfg.lr})")
        optimizer.step()
        loss_v = float(loss.detach())
        clip_frac = float(((ratio - 1).abs() > cfg.clip_eps).double().mean())
    return loss_v, grad_norm, clip_frac
