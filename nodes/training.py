"""Training inside ComfyUI (docs/method.md, "Training"): the glue between a ComfyUI MODEL and epd_core's trainers.

The training runs inside ComfyUI's own CFGGuider, as the built-in LoRA trainer does: the guider loads the
model (load_models_gpu), applies patches and prepares the conditioning for the latent, then calls our
Sampler's `sample()`, where the guider itself is the k-diffusion model `D(x, sigma)` with CFG. Gradients flow
through it to the table's logits (epd_core.training.distill); RL only samples through it (epd_core.training.rl). The
EPD Trainer node (trainer_nodes.py) and the command line for checkpoints (train_cli.py) both train through here.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import types

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from epd_core.sampling import schedules
from epd_core.training.distill import DistillConfig, distill
from epd_core.tables.params import EPDParams
from epd_core.training.rl import RLConfig, rdpo
from epd_core.runtime import is_oom

from .compat import few_step_hint, is_dynamic, model_problem, multigpu_problem, sequential_reasons, training_mode

log = logging.getLogger("epd")
RL_MAX_ROWS_PER_CALL = 64  # samples per model call in RL rollouts (halved on out-of-memory)
CHECKPOINT_FILE = "distill.distill-checkpoint"  # safetensors inside; the suffix keeps it out of table lists
RL_CHECKPOINT_FILE = "rl.rl-checkpoint"
# The pack's own schedules (what EPD Sigmas reproduces for a table) and then every ComfyUI scheduler.
EPD_SCHEDULES = {"epd_discrete": {"type": "discrete", "rho": 1.0}, "epd_flowmatch": {"type": "flowmatch"},
                 "epd_polynomial": {"type": "polynomial", "rho": 7.0}}


# ============================================================================================ ComfyUI glue

class _TrainInsideGuider(comfy.samplers.Sampler):
    """ComfyUI calls sample(guider, ...) with the model loaded and the conds prepared: train there."""

    def __init__(self, train_fn):
        self.train_fn = train_fn
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.train_fn(model_wrap, extra_args)
        return noise  # the guider wants a latent back; it is discarded


def make_autograd_safe(module: torch.nn.Module, keep=frozenset()) -> int:
    """Weights loaded under the executor's inference_mode are 'inference tensors', which autograd refuses to
    save for backward. Swap them for normal copies (same values; harmless for later sampling), except the
    qualified names in `keep`. Returns how many."""
    swapped = 0
    for prefix, sub in module.named_modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference() and f"{prefix}.{name}".lstrip(".") not in keep:
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                swapped += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()
                swapped += 1
    return swapped


# Dynamic VRAM (what upstream's LoRA trainer does on that path: it never replaces the base weights and hooks its
# trainable parts in through the patcher). The patcher streams each comfy.ops weight to the device per call and
# keeps state on the weight objects (pins, cast buffers, the weight's model dtype), so those Parameters must not
# be swapped; instead a weight wrapper hands each op a normal copy when the streamed weight is an inference tensor.

def _autograd_copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.clone() if weight.is_inference() else weight


def _streamed_weights(model_patcher) -> set[str]:
    """Qualified names of the weights a dynamic patcher streams per call: comfy.ops layers (they take weight
    functions) whose weight the patcher did not replace by a resident copy of its own (those sit in `backup`)."""
    backup = getattr(model_patcher, "backup", {}) or {}
    return {f"{n}.{p}".lstrip(".") for n, m in model_patcher.model.named_modules() if hasattr(m, "weight_function")
            for p in ("weight", "bias") if getattr(m, p, None) is not None and f"{n}.{p}".lstrip(".") not in backup}


def with_autograd_safe_weights(model_patcher):
    """A clone of a dynamic patcher whose comfy.ops layers get each weight as a tensor autograd can save."""
    patcher = model_patcher.clone()
    for n, m in patcher.model.named_modules():
        if hasattr(m, "weight_function"):
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    patcher.add_weight_wrapper(f"{n}.{p}".lstrip("."), _autograd_copy)
    return patcher


def fresh_tensors(obj):
    """Copy of conditioning structures with inference tensors cloned (dicts, lists, CONDRegular-like .cond)."""
    if torch.is_tensor(obj):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return {k: fresh_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(fresh_tensors(v) for v in obj)
    if torch.is_tensor(getattr(obj, "cond", None)):
        new = copy.copy(obj)
        new.cond = fresh_tensors(obj.cond)
        return new
    return obj


def inside_guider(model_patcher, positive, negative, cfg_scale: float, latent_shape, sigmas, seed: int, train,
                  needs_gradient: bool = True):
    """Run `train(ctx)` inside ComfyUI's CFGGuider.sample, i.e. with the model loaded, patches applied and the
    conditioning prepared, with autograd allowed and comfy.model_management.in_training set. ctx: guider (the
    k-diffusion model D(x, sigma) with CFG), extra_args (pass to every guider call), noise_fn(generator, n)
    (starting noises scaled like KSampler's), sequential (reasons the K points must not share one call).
    needs_gradient: back-propagates through the model (distillation; RL only samples). Returns what `train` does."""
    problem = model_problem(model_patcher) or (needs_gradient and multigpu_problem(model_patcher))
    if problem:
        raise RuntimeError(f"EPD Trainer: {problem}")
    hint = few_step_hint(model_patcher)
    if hint:
        log.warning("EPD Trainer: %s", hint)
    dynamic = is_dynamic(model_patcher)
    if dynamic:
        model_patcher = with_autograd_safe_weights(model_patcher)
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg_scale)
    sigmas = torch.tensor(sigmas, dtype=torch.float32)

    def run(guider_inner, extra_args):
        problem = needs_gradient and multigpu_problem(None, extra_args.get("model_options"))
        if problem:  # set up by the guider itself in ComfyUI versions that split conds over GPUs
            raise RuntimeError(f"EPD Trainer: {problem}")
        make_autograd_safe(guider_inner.inner_model, _streamed_weights(model_patcher) if dynamic else ())
        guider_inner.conds = fresh_tensors(guider_inner.conds)
        ms = guider_inner.inner_model.model_sampling
        device = model_patcher.load_device
        max_denoise = comfy.samplers.Sampler().max_denoise(guider_inner, sigmas)
        sigma0 = sigmas[0].to(device)

        def noise_fn(g, n):
            noise = torch.randn((n, *latent_shape[1:]), generator=g).to(device)
            return ms.noise_scaling(sigma0, noise, torch.zeros_like(noise), max_denoise)
        reasons = sequential_reasons(types.SimpleNamespace(inner_model=guider_inner), extra_args)
        return train(types.SimpleNamespace(guider=guider_inner, extra_args=extra_args, noise_fn=noise_fn,
                                           sequential=reasons, device=device))

    runner = _TrainInsideGuider(run)
    with training_mode(), torch.inference_mode(False), torch.enable_grad():
        latent = torch.zeros(latent_shape)
        guider.sample(latent.clone(), latent, runner, sigmas, seed=seed)
    return runner.result


def distill_with_comfy_model(model_patcher, positive, negative, cfg_scale: float, latent_shape, config: DistillConfig,
                             progress=None, should_stop=None, init: EPDParams | None = None, history=None,
                             seed: int = 0, on_teacher=None) -> EPDParams:
    """Distill a table for a ComfyUI MODEL with CFG on (positive, negative). latent_shape (B, C, H, W) only sets
    the sample shape; noises come from `config.seed` and are scaled like KSampler's (noise_scaling).
    on_teacher(batch, num_batches): just before the teacher solves a batch (epd_core.training.distill)."""
    def train(ctx):
        def model(x, sigma, cfg=None, **_):
            if cfg is not None:  # config.cfg_range: this batch's CFG scale (the guider reads .cfg on every call)
                ctx.guider.cfg = float(cfg)
            return ctx.guider(x, sigma, **ctx.extra_args)
        cfg = dataclasses.replace(config, sequential_points=config.sequential_points or bool(ctx.sequential))
        return distill(model, None, ctx.noise_fn, cfg, None, progress=progress, should_stop=should_stop, init=init,
                       history=history, on_teacher=on_teacher)
    return inside_guider(model_patcher, positive, negative, cfg_scale, latent_shape, config.sigmas, seed, train)


def rl_with_comfy_model(model_patcher, prompts: list[str], conds: list[tuple], cfg_scale: float, latent_shape,
                        sigmas, table: EPDParams, reward, config: RLConfig, progress=None, should_stop=None,
                        history=None, seed: int = 0, on_rollouts=None) -> EPDParams:
    """RDPO for a ComfyUI MODEL: prompts[i] (the text the reward sees) is sampled with conds[i] = (positive,
    negative). The rollouts of one step are one batch; each prompt's rows go through the guider with that
    prompt's prepared conditioning (one guider call per distinct prompt in the batch). on_rollouts(): at the first
    model call of each update (its rollouts start; the policy update after them calls no model)."""
    rolling = [False]

    def report(it, stats):
        rolling[0] = False
        if progress is not None:
            progress(it, stats)

    def train(ctx):
        if ctx.sequential:
            raise RuntimeError(f"EPD Trainer rl: cannot train with {', '.join(ctx.sequential)} in the model; "
                               "remove it for training (the table works with it afterwards)")
        noise = torch.zeros(latent_shape, device=ctx.device)
        prepared = []
        for pos, neg in conds:  # what CFGGuider.sample + inner_sample do to its own conds, once per prompt
            raw = {"positive": comfy.sampler_helpers.convert_cond(pos),  # fresh dicts: the inputs stay untouched
                   "negative": comfy.sampler_helpers.convert_cond(neg)}
            prepared.append(fresh_tensors(comfy.samplers.process_conds(ctx.guider.inner_model, noise, raw,
                                                                       ctx.device, None, None, seed)))

        chunk = _Chunks(RL_MAX_ROWS_PER_CALL)

        def model(x, sigma, prompt_index):
            if not rolling[0]:
                rolling[0] = True
                if on_rollouts is not None:
                    on_rollouts()
            index = prompt_index.to(x.device).repeat(x.shape[0] // prompt_index.shape[0])  # point-major tiling
            out = torch.empty_like(x)
            for p in index.unique().tolist():
                sel = (index == p).nonzero().squeeze(1)
                ctx.guider.conds = prepared[p]
                out[sel] = chunk(lambda xs, ss: ctx.guider(xs, ss, **ctx.extra_args), x[sel], sigma[sel]).to(out.dtype)
            return out
        lookup = {p: i for i, p in reversed(list(enumerate(prompts)))}

        def extra_args_fn(batch_prompts):
            return {"prompt_index": torch.tensor([lookup[p] for p in batch_prompts])}
        return rdpo(model, sigmas, table, reward.for_model(ctx.guider.inner_model), prompts, ctx.noise_fn, config,
                    progress=report, should_stop=should_stop, extra_args_fn=extra_args_fn, history=history)
    pos, neg = conds[0]
    return inside_guider(model_patcher, pos, neg, cfg_scale, latent_shape, sigmas, seed, train, needs_gradient=False)


class _Chunks:
    """Calls fn(x, sigma) on row chunks of at most `rows` samples; on out-of-memory halves the chunk (remembered
    for the rest of the run), like the sampler's K-point batches. RL rollouts are P x G x K rows per call."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, fn, x, sigma):
        while True:
            try:
                if x.shape[0] <= self.rows:
                    return fn(x, sigma)
                return torch.cat([fn(x[i:i + self.rows], sigma[i:i + self.rows])
                                  for i in range(0, x.shape[0], self.rows)])
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, below
                if not is_oom(e) or self.rows == 1:
                    raise
                self.rows = max(1, min(self.rows, x.shape[0]) // 2)
                comfy.model_management.soft_empty_cache(True)
                log.warning("EPD Trainer: out of memory in an RL rollout; retrying with %d samples per model call",
                            self.rows)


def check_memory(device, what: str, needed: int, fix: str) -> None:
    """Refuse before allocating when `needed` bytes would not fit in half of the device's free memory."""
    try:
        free = int(comfy.model_management.get_free_memory(device))
    except Exception:  # noqa: BLE001 - no estimate available: do not block training
        return
    if needed > free // 2:
        raise ValueError(f"EPD Trainer: {what} would need about {needed / 2 ** 30:.1f} GiB, but only "
                         f"{free / 2 ** 30:.1f} GiB of memory is free on {getattr(device, 'type', device)}. {fix}")


def teacher_pool_bytes(batch: int, steps: int, latent_shape) -> int:
    """Distillation caches the teacher's state at every student sigma for DistillConfig.num_batches batches."""
    return DistillConfig.num_batches * batch * (steps + 2) * math.prod(latent_shape[1:]) * 4


def rollout_bytes(trajectories: int, num_points: int, latent_shape) -> int:
    """An RL update holds each trajectory's state, its K points, their denoised values and directions."""
    return trajectories * (3 * num_points + 3) * math.prod(latent_shape[1:]) * 4


# ================================================================================================= sigmas

def training_sigmas(model_patcher, schedule: str, steps: int) -> tuple[list[float], dict]:
    """`steps` table rows -> steps+1 positive sigmas and a final 0, with the schedule's description.
    epd_* schedules are exactly what EPD Sigmas rebuilds for the table; a ComfyUI scheduler name gives the list
    KSampler uses with steps+1 steps (so use the table with KSampler at steps+1)."""
    ms = model_patcher.get_model_object("model_sampling")
    if schedule in EPD_SCHEDULES:
        spec = dict(EPD_SCHEDULES[schedule])
        if spec["type"] == "polynomial":  # recorded in the table: EPD Sigmas rebuilds it without the model
            spec.update(sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max))
        pos = schedules.sigmas_for(spec, steps, ms)
    elif schedule in comfy.samplers.SCHEDULER_NAMES:
        full = comfy.samplers.calculate_sigmas(ms, schedule, steps + 1).double()
        pos = full[full > 0]
        spec = {"type": "explicit", "comfy_scheduler": schedule}
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {schedule_names()}")
    if len(pos) != steps + 1:
        raise ValueError(f"schedule {schedule!r} gives {len(pos)} positive sigmas for {steps} steps (expected "
                         f"{steps + 1}); pick another schedule")
    return pos.tolist() + [0.0], spec


def schedule_names() -> list[str]:
    return list(EPD_SCHEDULES) + [s for s in comfy.samplers.SCHEDULER_NAMES if s not in EPD_SCHEDULES]
