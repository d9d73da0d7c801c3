"""EPD Trainer: learns a parameter table inside the ComfyUI graph (EPD_SPEC.md §5).

The training runs inside ComfyUI's own CFGGuider, as the built-in LoRA trainer does: the guider loads the
model (load_models_gpu), applies patches and prepares the conditioning for the latent, then calls our
Sampler's `sample()`, where the guider itself is the k-diffusion model `D(x, sigma)` with CFG. Gradients flow
through it to the table's logits (epd_core.distill). Each mode ('distill' now, more later) is one function in
MODES taking the node's inputs.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import types
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from epd_core.distill import OBJECTIVES, TEACHERS, DistillConfig, DistillError, distill, load_checkpoint
from epd_core.params import EPDParams, EPDParamsError

from .compat import sequential_reasons
from .params_nodes import _SAFE_NAME, EPDParamsType, save_table, table_sigmas
from .plotting import line_chart, to_image_tensor
from .tables import FOLDER, model_family, output_dir

CATEGORY = "training/epd"
CHECKPOINT_FILE = "distill.distill-checkpoint"  # safetensors inside; the suffix keeps it out of table lists
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


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Weights loaded under the executor's inference_mode are 'inference tensors', which autograd refuses to
    save for backward. Swap them for normal copies (same values; harmless for later sampling). Returns how many."""
    swapped = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                swapped += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()
                swapped += 1
    return swapped


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


def distill_with_comfy_model(model_patcher, positive, negative, cfg_scale: float, latent_shape, config: DistillConfig,
                             progress=None, should_stop=None, init: EPDParams | None = None, history=None,
                             seed: int = 0) -> EPDParams:
    """Distill a table for a ComfyUI MODEL with CFG on (positive, negative). latent_shape (B, C, H, W) only sets
    the sample shape; noises come from `config.seed` and are scaled like KSampler's (noise_scaling)."""
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg_scale)
    sigmas = torch.tensor(config.sigmas, dtype=torch.float32)

    def train(guider_inner, extra_args):
        make_autograd_safe(guider_inner.inner_model)
        guider_inner.conds = fresh_tensors(guider_inner.conds)
        ms = guider_inner.inner_model.model_sampling
        device = model_patcher.load_device
        max_denoise = comfy.samplers.Sampler().max_denoise(guider_inner, sigmas)
        sigma0 = sigmas[0].to(device)

        def noise_fn(g, n):
            noise = torch.randn((n, *latent_shape[1:]), generator=g).to(device)
            return ms.noise_scaling(sigma0, noise, torch.zeros_like(noise), max_denoise)

        def model(x, sigma, **_):
            return guider_inner(x, sigma, **extra_args)
        reasons = sequential_reasons(types.SimpleNamespace(inner_model=guider_inner), extra_args)
        cfg = dataclasses.replace(config, sequential_points=config.sequential_points or bool(reasons))
        return distill(model, None, noise_fn, cfg, None, progress=progress, should_stop=should_stop, init=init,
                       history=history)

    runner = _TrainInsideGuider(train)
    with torch.inference_mode(False), torch.enable_grad():
        latent = torch.zeros(latent_shape)
        guider.sample(latent.clone(), latent, runner, sigmas, seed=seed)
    return runner.result


# ================================================================================================= sigmas

def student_sigmas(model_patcher, schedule: str, steps: int) -> tuple[list[float], dict]:
    """`steps` table rows -> steps+1 positive sigmas and a final 0, with the schedule's description.
    epd_* schedules are exactly what EPD Sigmas rebuilds for the table; a ComfyUI scheduler name gives the list
    KSampler uses with steps+1 steps (so use the table with KSampler at steps+1)."""
    ms = model_patcher.get_model_object("model_sampling")
    if schedule in EPD_SCHEDULES:
        spec = dict(EPD_SCHEDULES[schedule])
        if spec["type"] == "polynomial":
            spec.update(sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max))
        pos = table_sigmas(EPDParams.neutral(steps, 1, schedule=spec), ms).double()
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


# ================================================================================================== modes

def checkpoint_folder(name: str) -> Path:
    return output_dir() / "checkpoints" / name


def run_distill(node_id, model, positive, negative, latent, steps, num_points, solver, schedule, teacher,
                inserted_steps, iterations, learning_rate, batch, seed, cfg, objective, name, **_):
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    if not _SAFE_NAME.match(stem) or ".." in stem:
        raise EPDParamsError(f"'{name}' is not a plain file name; use letters, digits, '_', '-', '.' only")
    sigmas, spec = student_sigmas(model, schedule, steps)
    shape = tuple(comfy.sample.fix_empty_latent_channels(model, latent["samples"]).shape)
    folder = checkpoint_folder(stem)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / CHECKPOINT_FILE
    config = DistillConfig(
        sigmas=sigmas, schedule=spec, num_points=num_points, solver=solver, teacher=teacher,
        inserted_steps=inserted_steps, objective=objective, iterations=iterations, lr=learning_rate, batch=batch,
        seed=seed, checkpoint_path=str(ckpt), checkpoint_interval=max(1, min(50, iterations // 10)),
        resume="auto", guidance_scale=cfg, model_family=model_family(model))
    losses = _losses_so_far(ckpt)
    progress = _Progress(iterations, losses, node_id, stem)

    def should_stop():
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: raises, ComfyUI reports it
        return False

    history: list[float] = []
    try:
        table = distill_with_comfy_model(model, positive, negative, cfg, (1, *shape[1:]), config, progress=progress,
                                         should_stop=should_stop, history=history, seed=seed)
    except DistillError as e:
        raise RuntimeError(f"EPD Trainer: {e}") from None
    path = save_table(table, stem)
    shutil.rmtree(folder, ignore_errors=True)  # finished: the table is saved, the checkpoint is no longer needed
    folder_paths.filename_list_cache.pop(FOLDER, None)  # Load EPD Params lists it without a restart
    curve = to_image_tensor(_loss_chart(history, stem))
    text = f"saved {path.name}: {table.describe()}, final loss {history[-1]:.4g}"
    return io.NodeOutput(table, curve, ui={"text": [text]})


MODES = {"distill": run_distill}


def _losses_so_far(ckpt: Path) -> list[float]:
    try:
        return list(load_checkpoint(ckpt)["losses"]) if ckpt.exists() else []
    except DistillError:
        return []  # distill() reports an unreadable checkpoint with its own clear error


def _loss_chart(losses, title):
    return line_chart({"loss": list(losses)}, f"EPD distillation loss: {title}", log_y=True)


class _Progress:
    """Progress bar (value = iteration, with a live loss-curve preview) and a text line under the node."""

    def __init__(self, total, losses, node_id, title):
        self.total, self.losses, self.node_id, self.title = total, losses, node_id, title
        self.bar = comfy.utils.ProgressBar(total)
        self.every = max(1, total // 20)

    def __call__(self, it, loss):
        self.losses.append(loss)
        show = it % self.every == 0 or it == self.total
        preview = ("PNG", _loss_chart(self.losses, self.title), 512) if show else None
        self.bar.update_absolute(it, self.total, preview)
        if show:
            _progress_text(f"iteration {it}/{self.total}  loss {loss:.4g}", self.node_id)


def _progress_text(text, node_id):
    try:
        from server import PromptServer
        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass  # no server (e.g. the CLI): the progress bar is enough


# =================================================================================================== node

class EPDTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDTrainer", display_name="EPD Trainer", category=CATEGORY, is_output_node=True,
            description="Learns an EPD parameter table for the connected model inside the graph. 'distill': a "
                        "teacher solver on a finer grid shows the student where each step should land (EPD_SPEC "
                        "§5). Saves models/epd_params/<name>.safetensors (listed by Load EPD Params at once); "
                        "checkpoints let a cancelled or crashed run resume when queued again with the same "
                        "name and settings.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="distill", tooltip="Training method."),
                io.Model.Input("model", tooltip="The diffusion model the table is for."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning used while training."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for CFG."),
                io.Latent.Input("latent", tooltip="Only its size matters (e.g. Empty Latent Image): the shape of "
                                                  "the training samples."),
                io.Int.Input("steps", default=10, min=2, max=200,
                             tooltip="Table rows = student steps to a positive sigma. With a ComfyUI scheduler, "
                                     "use the table in KSampler with steps + 1 steps."),
                io.Int.Input("num_points", default=2, min=1, max=8, tooltip="K parallel points per step."),
                io.Combo.Input("solver", options=["epd", "epd_plugin"], default="epd"),
                io.Combo.Input("schedule", options=schedule_names(), default="epd_discrete",
                               tooltip="epd_discrete (SD1.5/SDXL), epd_flowmatch (SD3/Flux) are what EPD Sigmas "
                                       "rebuilds; a ComfyUI scheduler trains for its KSampler list."),
                io.Combo.Input("teacher", options=list(TEACHERS), default="heun"),
                io.Int.Input("inserted_steps", default=3, min=0, max=16,
                             tooltip="M teacher steps inserted between student sigmas (3 is near exact)."),
                io.Int.Input("iterations", default=DistillConfig.iterations, min=1, max=100000),
                io.Float.Input("learning_rate", default=DistillConfig.lr, min=1e-5, max=10.0, step=0.001),
                io.Int.Input("batch", default=DistillConfig.batch, min=1, max=1024,
                             tooltip="Noise samples per iteration (8 distinct batches are cycled)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale to train for."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default=DistillConfig.objective),
                io.String.Input("name", default="my_epd_table", tooltip="Output file name (no folder)."),
            ],
            outputs=[EPDParamsType.Output(display_name="EPD_PARAMS"),
                     io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, mode, **inputs) -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; available: {list(MODES)}")
        return MODES[mode](node_id=cls.hidden.unique_id if cls.hidden else None, **inputs)


TRAINER_NODES = [EPDTrainer]
