"""Distillation of an EPD table from a teacher solver (docs/method.md, "Training"). Pure torch; never imports ComfyUI.

    teacher:  a more accurate solver on a fine grid (teachers.py), run once per noise batch without gradients;
              its states at the student's sigmas are cached.
    student:  the table's differentiable rows (the variant's train_rows: EPD / EPD-Plugin r, w, c, a; EPD-MS r, w
              and the history coefficients; DyWeight W (a band) and a), run by its train_loop; each variant's
              start table, rows, loop and result are its registry entry's (sampling/registry.py).
    per_step:   sum_i |x_{i+1}(row i; x_i detached) - T_{i+1}|^2   (the paper: each step from the student's
                own previous state; gradients reach only row i)
    end_to_end: |x_final(all rows) - T_final|^2                     (through the whole student trajectory)
    optimiser:  Adam on the table's tensors (and the schedule logits when learned), cosine learning-rate decay,
                the gradient norm clipped where the solver's recipe says (DyWeight).

Works with any callable `model(x, sigma_vector, **extra_args) -> denoised` (k-diffusion convention, CFG included
through extra_args). Fault tolerant: periodic atomic checkpoints (logits, Adam state, iteration, config) that
resume bit-for-bit, Cancel through `should_stop`, clear errors. Under torch.distributed each rank trains on its
slice of the same full batch and gradients are averaged, so N ranks x batch b == one process with batch N*b.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
from pathlib import Path

import torch

from epd_core.training.distill_config import OBJECTIVES, RESULT_FIELDS, DistillCancelled, DistillConfig, DistillError
from epd_core.sampling.epd import EPDSamplingError, positive_steps
from epd_core.tables.fileio import (adam_state_tensors, load_adam_state, read_checkpoint, write_checkpoint)
from epd_core.tables.params import EPDParams
from epd_core.sampling.points import PointEvaluator
from epd_core.runtime import batch_seed, rank_and_world
from epd_core.sampling.schedules import schedule_logits, sigmas_from_logits
from epd_core.sampling.registry import variant
from epd_core.training.teachers import TEACHERS, refine_sigmas, teacher_grid, teacher_states
from epd_core.training.loop import TrainingRun, check_same_settings, open_checkpoint, reduce_gradients

# the run's settings and the teachers, re-exported: `from epd_core.training.distill import DistillConfig,
# teacher_states`
__all__ = ["distill", "DistillConfig", "DistillError", "DistillCancelled", "OBJECTIVES", "TEACHERS",
           "teacher_states", "teacher_grid", "refine_sigmas", "per_step_losses", "end_to_end_loss",
           "save_checkpoint", "load_checkpoint", "make_batch", "initial_logits", "learned_sigmas"]

log = logging.getLogger("epd")
CHECKPOINT_FORMAT = "epd-distill-checkpoint-v1"


# ================================================================================================ objectives

def mse(a, b):
    return (a - b).square().mean()


def per_step_losses(model, x, sigmas, rows, targets, extra_args=None, max_order=1, afs=False, evaluate=None,
                    feature_fn=None, to_zero=False, backward=None, solver="epd", loss="mse"):
    """One loss per table row: step i starts from the student's OWN previous state, detached, so row i's
    loss reaches only row i. The last row's loss is on the final output (through the final Euler step to 0
    when the list ends in 0), with `feature_fn` distances if given.
    `backward(loss)` is called on each row's loss as soon as it exists, and the losses come back detached: then
    the activations of one step at a time are alive instead of all N (what lets a big model train)."""
    extra_args = extra_args or {}
    last_row = rows["r"].shape[-2] - 1
    losses = []

    distance = DISTANCES[loss]

    def done(value):
        if backward is not None:
            backward(value)
            value = value.detach()
        losses.append(value)

    def on_step(info):
        if info["i"] < last_row:  # the last row's loss is on the final output, below
            done(distance(info["x_next"], targets[info["i"] + 1]))
    final = variant(solver).train_loop(model, x, sigmas, rows, extra_args, on_step, disable=True, max_order=max_order,
                                       afs=afs, evaluate=evaluate, detach_steps=True, to_zero=to_zero)
    done(_final_loss(final, targets[-1], feature_fn, loss))
    return losses


def end_to_end_loss(model, x, sigmas, rows, target, extra_args=None, max_order=1, afs=False, evaluate=None,
                    feature_fn=None, checkpointed=False, to_zero=False, solver="epd", loss="mse"):
    """Error of the final state through the whole student trajectory: every row gets gradient. `checkpointed`
    recomputes each step in backward (activations of one step at a time: big models)."""
    extra_args = extra_args or {}
    final = variant(solver).train_loop(model, x, sigmas, rows, extra_args, disable=True, max_order=max_order, afs=afs,
                                       evaluate=evaluate, checkpoint_steps=checkpointed, to_zero=to_zero)
    return _final_loss(final, target, feature_fn, loss)


def per_sample_rmse(a, b):
    """The mean over samples of each sample's RMSE (the benchmark's metric)."""
    return (a - b).square().flatten(1).mean(1).sqrt().mean()


DISTANCES = {"mse": mse, "rmse": per_sample_rmse}  # DistillConfig.loss -> distance to the teacher


def _final_loss(final, target, feature_fn, loss="mse"):
    distance = DISTANCES[loss]
    return distance(final, target) if feature_fn is None else distance(feature_fn(final), feature_fn(target))


# ================================================================================================= batches

def _shard(value, n: int, rank: int, world: int):
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        size = n // world
        return value[rank * size:(rank + 1) * size]
    return value


def make_batch(index: int, cfg: DistillConfig, noise_fn, extra_args_fn, rank: int = 0, world: int = 1):
    """The FULL batch drawn from its seed, then this rank's slice: the union of all ranks' slices is
    exactly the single-process batch (N ranks x b == 1 process x N*b)."""
    g = torch.Generator().manual_seed(batch_seed(cfg.seed, index))
    x = noise_fn(g, cfg.batch)
    extra = extra_args_fn(g, cfg.batch) if extra_args_fn is not None else {}
    if cfg.cfg_range is not None:  # one CFG scale per batch (the same on every rank: drawn from the batch's seed)
        lo, hi = cfg.cfg_range
        extra = dict(extra, cfg=lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64)))
    return _shard(x, cfg.batch, rank, world), {k: _shard(v, cfg.batch, rank, world) for k, v in extra.items()}


# ============================================================================================= checkpoints

def save_checkpoint(path, theta, optimizer, iteration: int, losses: list, cfg: DistillConfig, scales) -> None:
    """Logits, Adam moments and steps, loss history, iteration and config in one safetensors file, written
    atomically (temp + fsync + rename): a crash or a full disk leaves the previous checkpoint untouched.
    Noise needs no RNG state: batch j is always drawn from batch_seed(seed, j)."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in zip(_leaf_names(cfg), theta)}
    tensors.update(adam_state_tensors(optimizer))
    tensors["loss_history"] = torch.tensor(losses, dtype=torch.float64)
    meta = {"format": CHECKPOINT_FORMAT, "iteration": str(iteration), "config": json.dumps(cfg.to_json()),
            "scales": json.dumps(list(scales)), "rng": json.dumps({"seed": cfg.seed, "scheme": "batch_seed(seed, j)"}),
            "torch": torch.__version__}
    write_checkpoint(path, tensors, meta, DistillError)


def load_checkpoint(path) -> dict:
    meta, tensors = read_checkpoint(path, CHECKPOINT_FORMAT, "EPD distillation", DistillError,
                                    ", or point to the right file")
    try:
        return {"iteration": int(meta["iteration"]), "config": json.loads(meta["config"]),
                "scales": tuple(json.loads(meta["scales"])), "tensors": tensors,
                "losses": tensors["loss_history"].tolist()}
    except Exception as e:  # noqa: BLE001 - missing fields: a damaged or foreign file
        raise DistillError(f"checkpoint {path} is unreadable ({e.__class__.__name__}: {e}). Delete it to start over, "
                           "or point to the right file.") from None


# ================================================================================================= training

def _lr_factor(cfg: DistillConfig, it: int, start: int, end: int) -> float:
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (it - start) / max(end - start, 1)))


def _stages(cfg: DistillConfig) -> list[tuple[str, int, int]]:
    if cfg.objective != "per_step+end_to_end":
        return [(cfg.objective, 0, cfg.iterations)]
    split = min(max(1, round(cfg.iterations * cfg.per_step_fraction)), cfg.iterations - 1) if cfg.iterations > 1 else 1
    return [("per_step", 0, split), ("end_to_end", split, cfg.iterations)]


def _stage_at(cfg, it):
    return next(s for s in _stages(cfg) if s[1] <= it < s[2])


def initial_logits(cfg: DistillConfig, init: EPDParams | None, device):
    """Logits (float64 leaves) and scale bounds of `init`, or of the variant's untrained table on the student's
    sigmas (the shape a given table must have; its own bounds are kept: the logits mean nothing without them)."""
    if init is not None and init.solver != cfg.solver:
        raise DistillError(f"the initial table is an {init.solver} table, the run trains {cfg.solver}. Use a table "
                           "of the same solver or none.")
    start = variant(cfg.solver).untrained_table(cfg.sigmas, cfg.num_points, cfg.builtin, spread=cfg.spread,
                                                scale_dir=cfg.scale_dir, scale_time=cfg.scale_time, afs=cfg.afs)
    init = start if init is None else init
    if (init.num_steps, init.num_points) != (start.num_steps, start.num_points):
        raise DistillError(f"the initial table has {init.num_steps} steps x K={init.num_points}, the run needs "
                           f"{start.num_steps} x K={cfg.num_points}. Use a matching table or none.")
    theta = [t.detach().to(device=device, dtype=torch.float64).clone().requires_grad_(True) for t in init.tensors()]
    return theta, (float(init.scale_dir), float(init.scale_time))


def _check_model_gradient(model, x, sigma, extra_args):
    """A model run under no_grad / inference_mode (or detaching) gives silently useless tables."""
    probe = x[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(probe, sigma * probe.new_ones([1]), **_shard_first(extra_args, x.shape[0]))
    if not out.requires_grad:
        raise DistillError("the model's output carries no gradient w.r.t. its input (it runs under torch.no_grad / "
                           "inference_mode, or detaches). Distillation back-propagates through the model: call it "
                           "with gradients enabled (torch.inference_mode(False), torch.enable_grad()).")


def _shard_first(extra_args, n):
    return {k: (v[:1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v) for k, v in extra_args.items()}


def distill(model, sigmas=None, noise_fn=None, config: DistillConfig | None = None, extra_args_fn=None,
            progress=None, should_stop=None, init: EPDParams | None = None, feature_fn=None,
            history: list | None = None, on_teacher=None) -> EPDParams:
    """Train an EPD table for `model` on the student `sigmas` (default: config.sigmas).

    noise_fn(generator, n) -> the n starting states x at sigmas[0] (e.g. sigma_0 * randn, or ComfyUI's noise
        scaling); extra_args_fn(generator, n) -> model keyword arguments for those samples (e.g. class labels),
        tensors with first dimension n are sliced per rank. progress(iteration, loss) after every iteration;
        should_stop() before every iteration (True -> DistillCancelled, nothing new written). feature_fn(x) ->
        features for the last step's loss (default plain L2). `history` receives the loss of every iteration
        (including those before a resume). on_teacher(batch, num_batches) just before the teacher solves a
        batch (the slow first pass over the batches: a caller can show it as its own stage)."""
    cfg = dataclasses.replace(config or DistillConfig())
    if sigmas is not None:
        cfg.sigmas = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).tolist()]
    rank, world = rank_and_world()
    cfg.validate(world)
    if noise_fn is None:
        raise DistillError("noise_fn is required: noise_fn(generator, n) -> n starting states at sigmas[0]")
    ckpt_path = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    ckpt = _prepare_checkpoint(cfg, ckpt_path, rank)

    x_probe, extra_probe = make_batch(0, cfg, noise_fn, extra_args_fn, rank, world)
    device, dtype = x_probe.device, torch.promote_types(x_probe.dtype, torch.float32)
    sig = torch.tensor(cfg.sigmas, dtype=dtype, device=device)
    steps = positive_steps(cfg.sigmas)
    # a learned schedule's target is the ODE's end point at sigma 0, whatever the student's last sigma becomes
    end_target = (cfg.learn_schedule or cfg.to_zero) and float(sig[-1]) > 0
    teacher_sig = torch.cat([sig, sig.new_zeros(1)]) if end_target else sig
    # A step to 0's anchor is no state the student is compared at. Below the teacher's end sigma (the model's
    # sigma_min, where ComfyUI's schedulers end) the teacher would integrate on to it and make the target
    # D(x(anchor)) instead of D(x(sigma_min)): on the 8x8 demo model at NFE 8 those differ by 0.005 RMSE, 28 % of
    # the best built-in's error, a floor no table could beat. The teacher stops at its end sigma instead.
    anchor_below_end = cfg.to_zero and end_target and len(sig) > 2 and float(sig[-1]) < cfg.teacher_sigma_min
    if anchor_below_end:
        teacher_sig = torch.cat([sig[:-1], sig.new_zeros(1)])
    theta, scales, optimizer, start, losses = _starting_state(cfg, init, ckpt, device)
    _check_model_gradient(model, x_probe, sig[0], extra_probe)
    teacher_cache: dict[int, tuple] = {}
    poll = _poller(should_stop) if world == 1 else None
    run = TrainingRun("distillation", cfg.iterations, ckpt_path, cfg.checkpoint_interval, DistillCancelled, start,
                      ckpt is not None, rank, world)

    def step(it: int) -> float:
        nonlocal optimizer
        name, s0, s1 = _stage_at(cfg, it)
        if it == s0 and s0 > 0:
            optimizer = _adam(theta, cfg)  # fresh moments for the end-to-end fine-tuning stage
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(cfg, it, s0, s1)

        j = it % cfg.num_batches
        if j not in teacher_cache:  # (x0, extra_args, teacher states): the teacher runs once per batch
            if on_teacher is not None:
                on_teacher(j, cfg.num_batches)
            x0, extra = make_batch(j, cfg, noise_fn, extra_args_fn, rank, world)
            states = teacher_states(model, x0, teacher_sig, cfg.teacher, cfg.inserted_steps, extra, poll,
                                    cfg.teacher_steps, cfg.teacher_sigma_min)
            if anchor_below_end:  # keep one state per student sigma: the anchor's (never a target) repeats
                states = states[:-1] + [states[-2], states[-1]]
            teacher_cache[j] = (x0, extra, states)

        try:
            loss_value = _loss_and_gradients(name, model, teacher_cache[j], sig, theta, scales, cfg, feature_fn,
                                             world)
        except EPDSamplingError as e:
            raise DistillError(f"iteration {it}: {e} {run.kept()}") from None
        if not math.isfinite(loss_value) or not all(torch.isfinite(t.grad).all() for t in theta):
            raise DistillError(f"the loss became {loss_value} at iteration {it} (training diverged). Lower the "
                               f"learning rate (now {cfg.lr}) or check the model and its precision. {run.kept()}")
        optimizer.step()
        return loss_value

    run.iterate(step, lambda done: save_checkpoint(ckpt_path, theta, optimizer, done, losses, cfg, scales), losses,
                progress, should_stop)
    if history is not None:
        history[:] = losses
    if cfg.learn_schedule:  # the learned schedule becomes the table's own
        with torch.no_grad():
            cfg.sigmas = learned_sigmas(theta, sig.double(), cfg).tolist()
    return _result_table(_table_leaves(theta, cfg), scales, cfg, losses, steps, world)


def _starting_state(cfg, init, ckpt, device):
    """Logits, scale bounds, Adam, first iteration and loss history: fresh, or exactly as checkpointed."""
    theta, scales = initial_logits(cfg, init, device)
    if cfg.learn_schedule:
        positive = [s for s in cfg.sigmas if s > 0]
        theta.append(schedule_logits(positive, cfg.schedule_floor).to(device).requires_grad_(True))
    optimizer = _adam(theta, cfg)
    if ckpt is None:
        return theta, scales, optimizer, 0, []
    with torch.no_grad():
        for name, t in zip(_leaf_names(cfg), theta):
            t.copy_(ckpt["tensors"][name])
    load_adam_state(optimizer, ckpt["tensors"], theta)
    return theta, tuple(ckpt["scales"]), optimizer, ckpt["iteration"], list(ckpt["losses"])


def _leaf_names(cfg: DistillConfig) -> tuple[str, ...]:
    """The trained leaves in order: the table's tensors, then the schedule logits when the schedule is learned."""
    return variant(cfg.solver).tensors + (("schedule_logits",) if cfg.learn_schedule else ())


def _table_leaves(theta, cfg: DistillConfig):
    return theta[:-1] if cfg.learn_schedule else theta


def _rows(theta, scales, cfg: DistillConfig) -> dict:
    return variant(cfg.solver).train_rows(_table_leaves(theta, cfg), scales)


def _adam(theta, cfg: DistillConfig):
    """Adam over the table logits (lr) and, when learned, the schedule logits (schedule_lr)."""
    groups = [{"params": list(_table_leaves(theta, cfg)), "base_lr": cfg.lr}] if cfg.learn_table else []
    if cfg.learn_schedule:
        groups.append({"params": theta[-1:], "base_lr": cfg.schedule_lr})
    return torch.optim.Adam([{**g, "lr": g["base_lr"]} for g in groups])


def learned_sigmas(theta, sig, cfg: DistillConfig, train_schedule: bool = True):
    """The student's sigma list: fixed, or built from the learned schedule logits (theta[-1])."""
    if not cfg.learn_schedule:
        return sig
    logits = theta[-1] if train_schedule else theta[-1].detach()
    pos = sigmas_from_logits(sig[0], cfg.schedule_floor, logits).to(sig.dtype)
    return torch.cat([pos, sig.new_zeros(1)]) if float(sig[-1]) == 0 else pos


def _loss_and_gradients(name, model, batch, sig, theta, scales, cfg, feature_fn, world) -> float:
    """Loss of this rank's batch and its gradient in theta[*].grad, both averaged over the ranks (equal shards,
    so the average of the means is the mean over the full batch). Returns the loss. A learned schedule is
    trained by the end-to-end objective only: the per-step targets sit at the initial student sigmas."""
    x0, extra, targets = batch
    sig = learned_sigmas(theta, sig, cfg, train_schedule=name != "per_step")
    rows = {k: v.to(sig.dtype) for k, v in _rows(theta, scales, cfg).items()}
    evaluate = PointEvaluator(model, extra, sequential=cfg.sequential_points)
    kw = dict(extra_args=extra, max_order=cfg.effective_order, afs=cfg.afs, evaluate=evaluate, feature_fn=feature_fn,
              to_zero=cfg.to_zero, solver=cfg.solver, loss=cfg.loss)
    if name == "per_step":  # each row's loss back-propagated at once into the rows, then the rows into theta
        leaves = {k: v.detach().requires_grad_(True) for k, v in rows.items()}
        loss = torch.stack(per_step_losses(model, x0, sig, leaves, targets, **kw,
                                           backward=lambda row_loss: row_loss.backward(inputs=list(leaves.values())))
                           ).sum()
        grads = torch.autograd.grad(list(rows.values()), theta, allow_unused=True,
                                    grad_outputs=[_grad_or_zero(leaves[k]) for k in rows])
    else:
        loss = end_to_end_loss(model, x0, sig, rows, targets[-1], checkpointed=cfg.grad_checkpointing, **kw)
        grads = torch.autograd.grad(loss, theta, allow_unused=True)
    for t, g in zip(theta, grads):
        t.grad = g
    value = float(reduce_gradients(theta, world, extra=loss.detach())[-1])
    if cfg.grad_clip:  # after the all-reduce: every rank clips the same averaged gradient
        torch.nn.utils.clip_grad_norm_(theta, cfg.grad_clip)
    return value


def _grad_or_zero(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _prepare_checkpoint(cfg: DistillConfig, path: Path | None, rank: int) -> dict | None:
    """Check the folder (before any work) and load the checkpoint to resume, if any."""
    ckpt = open_checkpoint(path, cfg.resume, DistillError, load_checkpoint, rank)
    if ckpt is not None:
        check_same_settings(ckpt["config"], cfg.to_json(), RESULT_FIELDS, path, DistillError,
                            DistillConfig().to_json())  # a field newer than the checkpoint had its default then
        log.info("EPD distill: resuming %s at iteration %d/%d", path, ckpt["iteration"], cfg.iterations)
    return ckpt


def _poller(should_stop):
    if should_stop is None:
        return None

    def poll():
        if should_stop():
            raise DistillCancelled("cancelled while computing the teacher trajectories; nothing new was written")
    return poll


def _result_table(theta, scales, cfg: DistillConfig, losses, steps, world) -> EPDParams:
    positive = [s for s in cfg.sigmas if s > 0]
    schedule = dict(cfg.schedule)
    schedule.setdefault("type", "explicit")
    schedule["sigmas"] = positive
    schedule["final_zero"] = cfg.sigmas[-1] == 0
    if cfg.override_sigmas or cfg.learn_schedule:
        schedule["override_sigmas"] = True
    if cfg.learn_schedule:
        schedule.update(type="explicit", learned=True, floor=cfg.schedule_floor)
    if cfg.to_zero:
        schedule["to_zero"] = True
    provenance = {"trainer": "epd_core.training.distill", "teacher": cfg.teacher, "M": cfg.inserted_steps,
                  "teacher_steps": cfg.teacher_steps, "teacher_sigma_min": cfg.teacher_sigma_min,
                  "objective": cfg.objective, "loss": cfg.loss, "iterations": cfg.iterations, "lr": cfg.lr,
                  "batch": cfg.batch, "num_batches": cfg.num_batches, "seed": cfg.seed, "world_size": world,
                  "final_loss": losses[-1] if losses else None,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    meta = {"solver": cfg.solver, "max_order": cfg.effective_order, "afs": cfg.afs, "schedule": schedule,
            "guidance_scale": cfg.guidance_scale, "model_family": cfg.model_family, "provenance": provenance,
            "num_points": cfg.num_points,  # to_zero: no final call
            "latency_nfe": cfg.calls_per_step * steps - int(cfg.afs) + int(cfg.sigmas[-1] == 0)}
    if cfg.cfg_range is not None:  # what epd_core.sampling.cfg_guard reads as the scales the table was trained on
        meta["cfg_range"] = [float(v) for v in cfg.cfg_range]
    return variant(cfg.solver).trained_table(theta, scales, cfg, meta)
