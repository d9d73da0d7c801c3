"""EPD Trainer and EPD RL Settings: learn a parameter table inside the ComfyUI graph (docs/method.md, "Training").

Each mode ('distill', 'rl') is one function in MODES taking the node's inputs; the ComfyUI glue they train
through is in training.py. Progress shows the stage (teacher / training, rollouts / update) and the time left.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from epd_core.training.distill import OBJECTIVES, TEACHERS, DistillConfig, DistillError
from epd_core.tables.params import EPDParams
from epd_core.training.rl import RewardUnavailableError, RLConfig, RLError
from epd_core.runtime import is_oom
from epd_core.sampling.plan import sampler_sigmas
from epd_core.sampling.registry import NAMES as SOLVER_NAMES
from epd_core.sampling.registry import SOLVERS, variant

from .compare_nodes import MEASURE_MINUTES, record_measurement
from .compat import fix_empty_latent, io, send_progress_text
from .progress import TrainingProgress, loss_chart, losses_so_far, reward_chart, rewards_so_far
from .plotting import to_image_tensor
from .privacy import private_errors
from .sockets import TRAINING_CATEGORY as CATEGORY
from .sockets import EPDParamsType, EPDRewardType, EPDRLSettingsType
from .tables import FOLDER, model_family, output_dir, save_table, table_stem
from .training import (CHECKPOINT_FILE, EPD_SCHEDULES, RL_CHECKPOINT_FILE, check_memory, distill_with_comfy_model,
                       rl_with_comfy_model, rollout_bytes, schedule_names, teacher_pool_bytes, training_sigmas)



# ================================================================================================== modes

def checkpoint_folder(name: str) -> Path:
    return output_dir() / "checkpoints" / name


def _should_stop():
    comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: raises, ComfyUI reports it
    return False


def cfg_range_of(cfg: float, cfg_max: float) -> list[float] | None:
    """The trainer's CFG range: [cfg, cfg_max] when cfg_max is above cfg (one scale per noise batch), else None
    (all batches at cfg)."""
    return [float(cfg), float(cfg_max)] if cfg_max and cfg_max > cfg else None


def _distill_config(model, steps, num_points, solver, schedule, teacher, inserted_steps, iterations, learning_rate,
                    batch, seed, cfg, objective, ckpt: Path, cfg_max: float = 0.0) -> DistillConfig:
    """The node's inputs as a run: what `steps`, K and the schedule mean for the solver (its registry entry's
    trainer_fields, e.g. epd_ms: model calls on a learned schedule) over what every solver shares."""
    v = variant(solver)
    if v.from_scheduler and schedule in EPD_SCHEDULES:
        raise ValueError(f"EPD Trainer: {solver} starts from a ComfyUI scheduler's list (e.g. sgm_uniform, karras, "
                         f"beta), not {schedule!r}; pick one in 'schedule'")
    cfg_range = cfg_range_of(cfg, cfg_max)
    sigma_min = float(model.get_model_object("model_sampling").sigma_min)
    lr = learning_rate * v.lr_scale
    own = v.trainer_fields(lambda rows: training_sigmas(model, schedule, rows), steps=steps, num_points=num_points,
                           cfg_scale=sum(cfg_range) / 2 if cfg_range else cfg, lr=lr, sigma_min=sigma_min)
    shared = dict(
        solver=solver, teacher=teacher, inserted_steps=inserted_steps, objective=objective, iterations=iterations,
        lr=lr, batch=batch, seed=seed, checkpoint_path=str(ckpt),
        checkpoint_interval=max(1, min(50, iterations // 10)), resume="auto", guidance_scale=cfg,
        model_family=model_family(model), cfg_range=cfg_range,
        teacher_sigma_min=sigma_min,  # not below what the model knows
        # end-to-end: one step's activations alive at a time, not all (the per-step stage already works that way):
        # 0.18x the peak memory on the MNIST demo model (bench/train_memory.py)
        grad_checkpointing=True)
    return DistillConfig(**{**shared, **own})  # the solver's own fields win (epd_ms: end_to_end)


def solver_tooltip() -> str:
    """Each solver as its registry entry describes it, and what the trainer's inputs mean for it."""
    return " ".join(f"{v.name} ({v.title}{'' if v.rl else ', distill only'}): {v.description}; {v.trainer_note}"
                    + (f", learning rate x{v.lr_scale:g}" if v.lr_scale != 1 else "") + "." for v in SOLVERS.values())


def refuse_existing_table(stem: str) -> None:
    """Before any training: the trainer never replaces a table (as Save EPD Params without overwrite)."""
    if (output_dir() / f"{stem}.safetensors").exists():
        raise ValueError(f"EPD Trainer: '{stem}.safetensors' already exists in models/epd_params/; nothing was "
                         "trained. Choose another name, or delete or rename the existing table first.")


def _finish(table: EPDParams, stem: str, folder: Path, chart, text: str) -> io.NodeOutput:
    path = save_table(table, stem, overwrite=False)
    shutil.rmtree(folder, ignore_errors=True)  # finished: the table is saved, the checkpoints are no longer needed
    folder_paths.filename_list_cache.pop(FOLDER, None)  # Load EPD Params lists it without a restart
    return io.NodeOutput(table, to_image_tensor(chart), ui={"text": [f"saved {path.name}: {table.describe()}, {text}"]})


def run_distill(node_id, model, positive, negative, latent, steps, num_points, solver, schedule, teacher,
                inserted_steps, iterations, learning_rate, batch, seed, cfg, objective, name,
                measure_minutes=MEASURE_MINUTES, cfg_max=0.0, **_):
    stem = table_stem(name)
    refuse_existing_table(stem)
    shape = tuple(fix_empty_latent(model, latent).shape)  # the shape KSampler samples for this latent
    check_memory(model.load_device, f"the teacher pool ({DistillConfig.num_batches} batches x {batch} samples x "
                 f"{steps + 2} states of shape {list(shape[1:])})", teacher_pool_bytes(batch, steps, shape),
                 "Lower batch or steps, or train on a smaller latent (the table works at any size).")
    folder = checkpoint_folder(stem)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / CHECKPOINT_FILE
    config = _distill_config(model, steps, num_points, solver, schedule, teacher, inserted_steps, iterations,
                             learning_rate, batch, seed, cfg, objective, ckpt, cfg_max or 0.0)
    progress = TrainingProgress(iterations, losses_so_far(ckpt), node_id, stem)
    history: list[float] = []
    try:
        table = distill_with_comfy_model(model, positive, negative, cfg, (1, *shape[1:]), config, progress=progress,
                                         should_stop=_should_stop, history=history, seed=seed,
                                         on_teacher=progress.on_teacher)
    except DistillError as e:
        raise RuntimeError(f"EPD Trainer: {e}") from None
    except Exception as e:  # noqa: BLE001 - only out-of-memory is translated, everything else re-raised
        if not is_oom(e):
            raise
        comfy.model_management.soft_empty_cache(True)
        kept = (f"its checkpoint (iteration {len(losses_so_far(ckpt))}) is kept for a run with the same settings"
                if ckpt.exists() else "no checkpoint had been written")
        raise RuntimeError(f"EPD Trainer: out of memory while training {steps} steps at batch {batch} on latents of "
                           f"shape {list(shape[1:])}. Lower batch or the latent size (a table trained on a small "
                           f"latent works at any size; training keeps one step's activations at a time, so batch "
                           f"and latent size are what count), and use a new name: '{stem}' {kept}.") from None
    measured = record_measurement(table, model, positive, negative, cfg, latent, seed, measure_minutes * 60)
    return _finish(table, stem, folder, loss_chart(history, stem), f"final loss {history[-1]:.4g}; {measured}")


def rl_prompt_lines(text: str) -> list[str]:
    """The non-empty lines of the RL prompts, refused (before any is split or encoded) beyond RL_MAX_PROMPTS
    lines or RL_MAX_PROMPT_CHARS characters."""
    if not isinstance(text, str):
        raise ValueError("EPD RL Settings: 'prompts' must be text, one prompt per line")
    if len(text) > RL_MAX_PROMPT_CHARS or text.count("\n") >= 4 * RL_MAX_PROMPTS:
        raise ValueError(f"EPD RL Settings: the prompts are {len(text)} characters in {text.count(chr(10)) + 1} "
                         f"lines; at most {RL_MAX_PROMPTS} prompts and {RL_MAX_PROMPT_CHARS} characters are "
                         "accepted. Use a shorter list (prompts_per_update cycles through it).")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > RL_MAX_PROMPTS:
        raise ValueError(f"EPD RL Settings: {len(lines)} prompts; at most {RL_MAX_PROMPTS} prompts are accepted. "
                         "Use a shorter list (prompts_per_update cycles through it).")
    return lines


def conditioning_bytes(cond) -> int:
    """Bytes of the tensors in one CONDITIONING ([[tensor, {name: tensor or value}], ...])."""
    total = 0
    for item in cond if isinstance(cond, list) else []:
        for part in item if isinstance(item, (list, tuple)) else []:
            values = part.values() if isinstance(part, dict) else [part]
            total += sum(v.numel() * v.element_size() for v in values if hasattr(v, "element_size"))
    return total


def _encode_all(lines: list[str], encode, negative) -> list[tuple]:
    """Encode the first prompt, refuse when all of them would not fit in memory, then encode the rest."""
    first = encode(lines[0])
    check_memory(torch.device("cpu"), f"the conditioning of {len(lines)} RL prompts",
                 conditioning_bytes(first) * len(lines), "Use fewer prompt lines in EPD RL Settings.")
    return [(first, negative)] + [(encode(t), negative) for t in lines[1:]]


def prompt_conditioning(model, settings: dict, positive, negative, clip) -> tuple[list[str], list[tuple]]:
    """The RL prompts (text the reward sees) and their (positive, negative) conditioning."""
    lines = rl_prompt_lines(settings["prompts"])
    if not lines:
        return [""], [(positive, negative)]
    if clip is not None:
        return lines, _encode_all(lines, lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t)), negative)
    if model_family(model) == "epd_demo_digits":
        from .demo_nodes import demo_conditioning
        bad = [t for t in lines if not (t.isdigit() and int(t) < 10)]
        if bad:
            raise ValueError(f"the demo model's RL prompts are digits 0-9, one per line; got {len(bad)} other "
                             f"line(s), e.g. {bad[0][:40]!r}")
        return lines, _encode_all(lines, lambda t: demo_conditioning(int(t)), negative)
    if len(lines) == 1:
        return lines, [(positive, negative)]
    raise ValueError(f"{len(lines)} RL prompts need the trainer's 'clip' input to encode them: connect your "
                     "checkpoint's CLIP (or give a single prompt, which uses the 'positive' input)")


def run_rl(node_id, model, positive, negative, latent, steps, num_points, solver, schedule, teacher, inserted_steps,
           iterations, learning_rate, batch, seed, cfg, objective, name, reward=None, rl_settings=None,
           init_params=None, clip=None, measure_minutes=MEASURE_MINUTES, **_):
    """RDPO (docs/method.md, "RL fine-tuning") from `init_params`, or from a table distilled first."""
    table_solver = init_params.solver if init_params is not None else solver
    if not variant(table_solver).rl:
        tunable = ", ".join(v.name for v in SOLVERS.values() if v.rl)
        raise ValueError(f"EPD Trainer mode 'rl' fine-tunes the paper's solvers ({tunable}); {table_solver} "
                         "tables have free coefficients, not the weights RDPO's Dirichlet policy samples. Use "
                         f"mode 'distill' for {table_solver}")
    if reward is None:
        raise ValueError("EPD Trainer mode 'rl' needs a reward: connect an EPD Reward node to the 'reward' input")
    settings = dict(RL_DEFAULTS, **(rl_settings or {}))
    stem = table_stem(name)
    refuse_existing_table(stem)
    shape = tuple(fix_empty_latent(model, latent).shape)
    prompts, conds = prompt_conditioning(model, settings, positive, negative, clip)
    per_update = (settings["prompts_per_update"] or len(prompts)) * settings["group_size"]
    k = init_params.num_points if init_params is not None else num_points
    check_memory(model.load_device, f"one RL update ({per_update} trajectories x K={k} points of shape "
                 f"{list(shape[1:])})", rollout_bytes(per_update, k, shape),
                 "Lower prompts_per_update or group_size in EPD RL Settings, or use a smaller latent.")
    if init_params is None:
        check_memory(model.load_device, "the teacher pool of the starting table",
                     teacher_pool_bytes(batch, steps, shape), "Lower batch or steps, or connect init_params.")
    folder = checkpoint_folder(stem)
    folder.mkdir(parents=True, exist_ok=True)
    if init_params is not None:
        table = init_params
        sigmas = sampler_sigmas(table, model.get_model_object("model_sampling")).double().tolist()
    else:  # distill the cold start first; its checkpoint makes a re-queued run skip straight to RL
        d_iter = settings["distill_iterations"]
        dcfg = _distill_config(model, steps, num_points, solver, schedule, teacher, inserted_steps, d_iter,
                               learning_rate, batch, seed, cfg, objective, folder / CHECKPOINT_FILE)
        send_progress_text(f"cold-start distillation: the starting table ({d_iter} iterations), then {iterations} RL "
                       "updates", node_id)
        cold = TrainingProgress(d_iter, [], node_id, f"{stem} (cold start)", prefix="cold-start distillation, ")
        try:
            table = distill_with_comfy_model(model, positive, negative, cfg, (1, *shape[1:]), dcfg, progress=cold,
                                             should_stop=_should_stop, seed=seed, on_teacher=cold.on_teacher)
        except DistillError as e:
            raise RuntimeError(f"EPD Trainer: {e}") from None
        sigmas = dcfg.sigmas
    ckpt = folder / RL_CHECKPOINT_FILE
    config = RLConfig(iterations=iterations, group_size=settings["group_size"],
                      prompts_per_iteration=settings["prompts_per_update"], epochs=settings["ppo_epochs"],
                      lr=settings["learning_rate"], clip_eps=settings["clip"], kl_coef=settings["kl_coef"],
                      kappa=settings["kappa"], seed=seed, checkpoint_path=str(ckpt),
                      checkpoint_interval=max(1, min(50, iterations // 10)), resume="auto")
    progress = TrainingProgress(iterations, rewards_so_far(ckpt), node_id, stem, label="mean reward", rl=True)
    history: list[dict] = []
    try:
        result = rl_with_comfy_model(model, prompts, conds, cfg, (1, *shape[1:]), sigmas, table, reward, config,
                                     progress=lambda it, st: progress(it, st["reward"]), should_stop=_should_stop,
                                     history=history, seed=seed, on_rollouts=progress.on_rollouts)
    except (RLError, RewardUnavailableError) as e:
        raise RuntimeError(f"EPD Trainer: {e}") from None
    result.metadata["guidance_scale"] = float(cfg)
    rewards = [h["reward"] for h in history]
    measured = record_measurement(result, model, positive, negative, cfg, latent, seed, measure_minutes * 60)
    return _finish(result, stem, folder, reward_chart(rewards, stem),
                   f"mean reward {rewards[0]:.4g} -> {rewards[-1]:.4g}; {measured}")


MODES = {"distill": run_distill, "rl": run_rl}
RL_MAX_PROMPTS, RL_MAX_PROMPT_CHARS = 1024, 256 * 1024  # prompt lines and characters of EPD RL Settings
RL_DEFAULTS = {"prompts": "", "group_size": RLConfig.group_size, "prompts_per_update": RLConfig.prompts_per_iteration,
               "ppo_epochs": RLConfig.epochs, "learning_rate": RLConfig.lr, "clip": RLConfig.clip_eps,
               "kl_coef": RLConfig.kl_coef, "kappa": RLConfig.kappa, "distill_iterations": DistillConfig.iterations}


# =================================================================================================== node

class EPDTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDTrainer", display_name="EPD Trainer", category=CATEGORY, is_output_node=True,
            description="Learns an EPD parameter table for the connected model inside the graph. 'distill': a "
                        "teacher solver on a finer grid shows the student where each step should land (see "
                        "docs/method.md in the ComfyUI-EPD folder). 'rl': RDPO fine-tunes a table (init_params, "
                        "or one distilled first) to raise a reward (connect an EPD Reward node; settings from EPD "
                        "RL Settings). Saves models/epd_params/<name>.safetensors (listed by Load EPD Params at "
                        "once); "
                        "checkpoints let a cancelled or crashed run resume when queued again with the same "
                        "name and settings.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default="distill",
                               tooltip="distill: match a teacher solver. rl: raise a reward with RDPO (needs the "
                                       "reward input)."),
                io.Model.Input("model", tooltip="The diffusion model the table is for."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning used while training."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for CFG."),
                io.Latent.Input("latent", tooltip="Only its size matters (e.g. Empty Latent Image): the shape of "
                                                  "the training samples."),
                io.Int.Input("steps", default=10, min=2, max=200,
                             tooltip="Table rows = student steps to a positive sigma. With a ComfyUI scheduler, "
                                     "use the table in KSampler with steps + 1 steps."),
                io.Int.Input("num_points", default=2, min=1, max=8, tooltip="K parallel points per step."),
                io.Combo.Input("solver", options=list(SOLVER_NAMES), default="epd", tooltip=solver_tooltip()),
                io.Combo.Input("schedule", options=schedule_names(), default="epd_discrete",
                               tooltip="epd_discrete (SD1.5/SDXL), epd_flowmatch (SD3/Flux) are what EPD Sigmas "
                                       "rebuilds; a ComfyUI scheduler trains for its KSampler list."),
                io.Combo.Input("teacher", options=list(TEACHERS), default=DistillConfig.teacher,
                               tooltip="The accurate solver the student learns to imitate on a finer grid (100 "
                                       "steps). dpmpp (DPM++ 2M) takes one model call per step, half of heun's, "
                                       "and trained tables as good (docs/method.md, 'Distillation')."),
                io.Int.Input("inserted_steps", default=DistillConfig.inserted_steps, min=0, max=16,
                             tooltip="M teacher steps inserted between student sigmas (3 is near exact)."),
                io.Int.Input("iterations", default=DistillConfig.iterations, min=1, max=100000,
                             tooltip="Optimisation steps (distill) or RL updates (rl)."),
                io.Float.Input("learning_rate", default=DistillConfig.lr, min=1e-5, max=10.0, step=0.001,
                               tooltip="Adam rate of distillation (RL has its own in EPD RL Settings)."),
                io.Int.Input("batch", default=DistillConfig.batch, min=1, max=256,
                             tooltip="Noise samples per iteration (8 distinct batches are cycled)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the training noises and the RL policy: same seed, same table."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale to train for."),
                io.Float.Input("cfg_max", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Above cfg: train one table for the range cfg..cfg_max (each noise batch "
                                       "gets its own scale), so it holds wherever you sample in it. 0: cfg only."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default=DistillConfig.objective,
                               tooltip="per_step: each step from the student's own state (the paper). "
                                       "end_to_end: the final image. Both: per-step, then end-to-end fine-tuning."),
                io.String.Input("name", default="my_epd_table", tooltip="Output file name (no folder)."),
                EPDRewardType.Input("reward", optional=True, tooltip="rl mode: what to maximise (EPD Reward node)."),
                EPDRLSettingsType.Input("rl_settings", optional=True,
                                        tooltip="rl mode: prompts, group size, PPO settings (EPD RL Settings); "
                                                "defaults when absent."),
                EPDParamsType.Input("init_params", optional=True,
                                    tooltip="rl mode: the table to fine-tune (its steps and schedule are used). "
                                            "Absent: a table is distilled first with the inputs above."),
                io.Clip.Input("clip", optional=True,
                              tooltip="rl mode: encodes each line of the RL prompts (needed for several prompts)."),
                io.Float.Input("measure_minutes", default=MEASURE_MINUTES, min=0.0, max=1440.0, step=0.5,
                               optional=True,
                               tooltip="After training, the new table is measured against the best built-in "
                                       "(held-out noises, at equal calls and at equal time) when the estimate fits "
                                       "in this many minutes; otherwise, or at 0, the table says 'skipped' and EPD "
                                       "Compare can measure it."),
            ],
            outputs=[EPDParamsType.Output(display_name="EPD_PARAMS", tooltip="The trained table (also saved)."),
                     io.Image.Output(display_name="loss_curve",
                                     tooltip="Loss per iteration (distill) or mean reward per update (rl).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @private_errors
    def execute(cls, mode, **inputs) -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; available: {list(MODES)}")
        return MODES[mode](node_id=cls.hidden.unique_id if cls.hidden else None, **inputs)


class EPDRLSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = RL_DEFAULTS
        return io.Schema(
            node_id="EPDRLSettings", display_name="EPD RL Settings", category=CATEGORY,
            description="Settings of the EPD Trainer's 'rl' mode (RDPO, docs/method.md): each update samples "
                        "prompts_per_update x group_size trajectories, each with its own table drawn from the "
                        "policy; a group shares one noise, so rewards are compared within the group.",
            inputs=[
                io.String.Input("prompts", default=d["prompts"], multiline=True,
                                tooltip="One prompt per line (the demo model: digits 0-9). Empty: the trainer's "
                                        "positive conditioning, with an empty prompt for the reward."),
                io.Int.Input("group_size", default=d["group_size"], min=2, max=16,
                             tooltip="Trajectories per prompt sharing one noise (leave-one-out baseline)."),
                io.Int.Input("prompts_per_update", default=d["prompts_per_update"], min=0, max=256,
                             tooltip="Prompts per update, cycling through the list; 0 = all. Rollouts per update "
                                     "= this x group_size."),
                io.Int.Input("ppo_epochs", default=d["ppo_epochs"], min=1, max=32,
                             tooltip="Policy updates on each batch of rollouts."),
                io.Float.Input("learning_rate", default=d["learning_rate"], min=1e-7, max=1.0, step=1e-5,
                               tooltip="Adam rate of the policy (the paper uses 7e-5 for long runs)."),
                io.Float.Input("clip", default=d["clip"], min=0.01, max=0.99, step=0.01,
                               tooltip="PPO ratio clipping."),
                io.Float.Input("kl_coef", default=d["kl_coef"], min=0.0, max=100.0, step=0.001,
                               tooltip="Pull towards the starting table (0: none, as in the paper; 0.1 halved the "
                                       "drift from the ODE solution on the demo model for ~70 % of the reward gain)."),
                io.Float.Input("kappa", default=d["kappa"], min=0.1, max=1000.0, step=0.5,
                               tooltip="Dirichlet concentration: larger = sampled tables closer to the mean."),
                io.Int.Input("distill_iterations", default=d["distill_iterations"], min=1, max=100000,
                             tooltip="Distillation iterations of the starting table when no init_params is given."),
            ],
            outputs=[EPDRLSettingsType.Output(display_name="rl_settings",
                                              tooltip="Connect to EPD Trainer's rl_settings input.")],
        )

    @classmethod
    def execute(cls, **settings) -> io.NodeOutput:
        return io.NodeOutput(settings)


TRAINER_NODES = [EPDTrainer, EPDRLSettings]
