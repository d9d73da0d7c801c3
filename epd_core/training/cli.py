"""Command-line trainers for EPD tables.

    python -m epd_core.train distill --model gmm --steps 4 --out gmm_4.safetensors
    python -m epd_core.train distill --model demo --steps 10 --out demo_10.safetensors --checkpoint-dir ckpt/
    torchrun --standalone --nproc_per_node 2 -m epd_core.train distill ...   (gloo on CPU, nccl on CUDA)

Every DistillConfig field has an option (see --help). The analytic mixture ('gmm') and the demo models need
nothing but torch. A ComfyUI checkpoint is trained through the pack's ComfyUI adapter, with the same options:
    python nodes/train_cli.py distill --checkpoint sd15.safetensors --comfyui /path/to/ComfyUI --prompt "a cat" ...
Under torchrun each rank trains on its slice of every batch and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch

from epd_core.demo import problems
from epd_core.sampling import schedules
from epd_core.training.distill_config import LOSSES
from epd_core.training.distill import OBJECTIVES, TEACHERS, DistillConfig, DistillError, distill
from epd_core.tables.fileio import folder_problem
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.demo.problems import Problem, vp_start_scale  # noqa: F401 - re-exported for existing imports
from epd_core.sampling.plan import sampler_sigmas
from epd_core.sampling.registry import NAMES as SOLVER_NAMES, SOLVERS, variant

CHECKPOINT_SUFFIX = ".distill-checkpoint"  # safetensors inside; not '.safetensors' so table lists skip it

# DistillConfig fields with their own handling below (schedule/sigmas from the model, paths from --out...).
_SPECIAL = {"sigmas", "schedule", "checkpoint_path", "resume", "guidance_scale", "model_family", "cfg_range"}
_HELP = {
    "num_points": "K, parallel points per step (1-3 in the paper)",
    "solver": "the solver variant: " + "; ".join(f"{v.name} ({v.title}: {v.description})" for v in SOLVERS.values())
              + ". A variant's training recipe (the EPD Trainer's) sets the options left at their defaults",
    "builtin": "epd_ms / dyweight: the ComfyUI sampler its untrained table reproduces, where training starts",
    "grad_clip": "gradient-norm clip (0: none)",
    "max_order": "EPD-Plugin predictor order 1..4",
    "afs": "analytic first step (saves one model call)",
    "teacher": f"teacher solver: {', '.join(TEACHERS)}",
    "teacher_sigma_min": "where the teacher's fine grid ends before its final step to 0 (default: the model's "
                         "sigma_min)",
    "inserted_steps": "M, teacher steps inserted between student sigmas",
    "objective": f"training loss: {', '.join(OBJECTIVES)}",
    "loss": "distance to the teacher: mse (batch mean squared error) or rmse (mean of per-sample RMSEs)",
    "per_step_fraction": "share of iterations for the per-step stage of per_step+end_to_end",
    "iterations": "Adam steps",
    "lr": "Adam learning rate on the logits",
    "lr_schedule": "cosine or constant",
    "batch": "noise samples per iteration, over all ranks",
    "num_batches": "distinct noise batches (teacher trajectories cached per batch)",
    "seed": "seed of the noise batches",
    "spread": "initial position logits in [-spread, spread]",
    "scale_dir": "bound of the direction scale c (0 disables)",
    "scale_time": "bound of the time scale a (0 disables)",
    "grad_checkpointing": "recompute each student step in backward (end-to-end on big models)",
    "sequential_points": "one model call per point instead of one batched call",
    "checkpoint_interval": "iterations between checkpoints",
    "learn_schedule": "learn the student's sigmas with the table (end-to-end stage)",
    "schedule_floor": "lowest sigma a learned schedule may reach",
    "schedule_lr": "Adam learning rate of the learned schedule",
    "to_zero": "the last row steps to sigma 0 (no final model call; implies --no-final-zero)",
}
_CHOICES = {"solver": SOLVER_NAMES, "teacher": TEACHERS, "objective": OBJECTIVES, "loss": LOSSES,
            "lr_schedule": ("cosine", "constant")}


class TrainCLIError(RuntimeError):
    pass


# ===================================================================================================== models

def gmm_problem(args) -> Problem:
    return problems.gmm_problem(dim=args.gmm_dim, components=args.gmm_components, seed=args.gmm_seed,
                                guidance_scale=args.guidance_scale, device=args.device or "cpu")


def demo_problem(args) -> Problem:
    """--model mnist (28x28) or demo (8x8 digits)."""
    return problems.demo_problem(args.model, weights=args.demo_weights, device=args.device or "cpu",
                                 guidance_scale=args.guidance_scale)


# ===================================================================================================== sigmas

def student_sigmas(args, problem: Problem) -> tuple[list[float], dict]:
    """N+1 positive sigmas for N = --steps table rows (+ a final 0 unless --no-final-zero) and the schedule
    description stored in the table."""
    if problem.sigmas_fn is not None and not args.sigmas:
        return problem.sigmas_fn(args)
    if args.sigmas:
        pos = schedules.explicit([float(s) for s in args.sigmas.split(",") if float(s) > 0])
        spec = {"type": "explicit"}
    else:
        kind = args.schedule or problem.default_schedule
        if kind in schedules.REBUILDABLE:
            spec = {"type": kind, "sigma_min": args.sigma_min or problem.sigma_min,
                    "sigma_max": args.sigma_max or problem.sigma_max}
            if kind == "polynomial":
                spec["rho"] = 7.0 if args.rho is None else args.rho
        elif kind == "discrete":
            if problem.model_sampling is None:
                raise TrainCLIError("--schedule discrete needs a discrete model (demo or an SD-style checkpoint)")
            spec = {"type": kind, "rho": 1.0 if args.rho is None else args.rho}
        elif kind == "flowmatch":
            spec = {"type": kind, "shift": args.shift}
        else:
            raise TrainCLIError(f"unknown schedule {kind!r}")
        model_sampling = problem.model_sampling if kind == "discrete" else None
        pos = schedules.sigmas_for(spec, args.steps, model_sampling)
    sig = [float(s) for s in pos]
    return (sig + [0.0] if args.final_zero else sig), spec


# ======================================================================================================= CLI

def build_parser() -> argparse.ArgumentParser:
    from epd_core.training.rl.rdpo import RLConfig  # its defaults are the rl command's
    parser = argparse.ArgumentParser(prog="python -m epd_core.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="distill a table from a teacher solver (docs/method.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = d.add_mutually_exclusive_group()
    src.add_argument("--model", choices=("gmm", "demo", "mnist"), default=None,
                     help="built-in model: gmm (default), demo (8x8 digits) or mnist (28x28 demo model)")
    src.add_argument("--checkpoint", help="a ComfyUI checkpoint (.safetensors) to train for")
    d.add_argument("--comfyui", help="ComfyUI folder for --checkpoint (default $COMFYUI_PATH)")
    d.add_argument("--prompt", default="", help="positive prompt (--checkpoint)")
    d.add_argument("--negative-prompt", default="", help="negative prompt (--checkpoint)")
    d.add_argument("--width", type=int, default=512, help="image width (--checkpoint)")
    d.add_argument("--height", type=int, default=512, help="image height (--checkpoint)")
    d.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale (gmm: class-conditional with CFG; demo default 1; checkpoint default 7.5)")
    d.add_argument("--cfg-range", type=_cfg_range, default=None, metavar="LO,HI",
                   help="train one table for a range of CFG scales: each noise batch gets its own scale drawn from "
                        "[LO, HI] (demo / mnist / --checkpoint); KSampler then trusts it across that range")
    d.add_argument("--gmm-dim", type=int, default=64)
    d.add_argument("--gmm-components", type=int, default=8)
    d.add_argument("--gmm-seed", type=int, default=0)
    d.add_argument("--demo-weights", default=None, help="demo weights (default: the shipped file)")
    d.add_argument("--device", default=None, help="cpu / cuda (gmm and demo)")
    # the student's sigmas
    d.add_argument("--steps", type=int, default=10, help="table rows = student steps to a positive sigma")
    d.add_argument("--schedule", choices=("polynomial", "logsnr", "time_uniform", "discrete", "flowmatch"),
                   default=None, help="default: discrete for discrete models, else polynomial")
    d.add_argument("--comfy-scheduler", default=None, help="--checkpoint: train for this KSampler scheduler's list "
                   "(e.g. karras; use the table in KSampler with steps + 1 steps)")
    d.add_argument("--sigmas", default=None, help="explicit comma-separated positive sigmas (overrides --steps)")
    d.add_argument("--sigma-min", type=float, default=None)
    d.add_argument("--sigma-max", type=float, default=None)
    d.add_argument("--rho", type=float, default=None, help="polynomial rho (default 7; discrete default 1)")
    d.add_argument("--shift", type=float, default=3.0, help="flowmatch shift")
    d.add_argument("--final-zero", action=argparse.BooleanOptionalAction, default=True,
                   help="end with sigma 0 (a final Euler step), as ComfyUI's schedulers do")
    # every DistillConfig field
    for f in dataclasses.fields(DistillConfig):
        if f.name in _SPECIAL:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "teacher_sigma_min":  # the model's own sigma_min unless given
            d.add_argument(flag, type=float, default=None, help=_HELP.get(f.name))
        elif f.name == "loss":  # None: the solver's own (DistillConfig)
            d.add_argument(flag, default=None, choices=_CHOICES["loss"],
                           help=_HELP["loss"] + "; default: the solver's (" +
                           ", ".join(f"{v.name}: {v.loss}" for v in SOLVERS.values()) + ")")
        elif f.name in ("builtin", "grad_clip"):  # None: the solver's own (DistillConfig)
            d.add_argument(flag, type=str if f.name == "builtin" else float, default=None,
                           help=_HELP[f.name] + "; default: the solver's")
        elif isinstance(f.default, bool):
            d.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP.get(f.name))
        else:
            d.add_argument(flag, type=type(f.default), default=f.default, choices=_CHOICES.get(f.name),
                           help=_HELP.get(f.name))
    d.add_argument("-K", dest="num_points", type=int, help="same as --num-points")
    d.add_argument("-M", dest="inserted_steps", type=int, help="same as --inserted-steps")
    d.add_argument("--init", default=None, help="start from this table instead of the neutral spread")
    d.add_argument("--out", required=True, help="output table (.safetensors)")
    d.add_argument("--checkpoint-dir", default=None, help="folder for the periodic (atomic) training checkpoint")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    d.add_argument("--quiet", action="store_true")
    r = sub.add_parser("rl", help="RDPO reinforcement-learning fine-tuning of a table on a reward (docs/method.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--model", choices=("demo", "mnist"), default="demo",
                   help="built-in model to sample with: demo (8x8 digits) or mnist (28x28)")
    r.add_argument("--demo-weights", default=None, help="demo weights (default: the shipped file)")
    r.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale of the demo model")
    r.add_argument("--device", default=None, help="cpu / cuda")
    r.add_argument("--init", default=None, help="starting table; without it one is distilled first (--steps, -K)")
    r.add_argument("--steps", type=int, default=4, help="table rows when distilling the starting table")
    r.add_argument("-K", "--num-points", dest="num_points", type=int, default=2)
    r.add_argument("--distill-iterations", type=int, default=100)
    r.add_argument("--reward", default="demo_classifier",
                   help="demo_classifier, or hpsv2/pickscore/imagereward/clip/aesthetic with --reward-path")
    r.add_argument("--reward-path", default=None, help="local reward weights (ComfyUI models/epd_rewards/...)")
    r.add_argument("--prompts", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated labels, one group each")
    r.add_argument("--iterations", type=int, default=100)
    r.add_argument("--group-size", type=int, default=RLConfig.group_size)
    r.add_argument("--prompts-per-update", type=int, default=0,
                   help="groups per update, cycling through --prompts (0: all)")
    r.add_argument("--epochs", type=int, default=RLConfig.epochs)
    r.add_argument("--lr", type=float, default=RLConfig.lr)
    r.add_argument("--kappa", type=float, default=RLConfig.kappa)
    r.add_argument("--kl-coef", type=float, default=RLConfig.kl_coef,
                   help="KL(policy || start): 0.1 halved the drift from the ODE solution on the demo (paper: 0)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True, help="output table (.safetensors)")
    r.add_argument("--checkpoint-dir", default=None, help="folder for the periodic (atomic) RL checkpoint")
    r.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    r.add_argument("--quiet", action="store_true")
    return parser


def run_rl(args) -> EPDParams:
    """RDPO on the demo digits model: start from --init (or distil one), fine-tune on the reward, save the mean."""
    from epd_core.training.rl import DemoClassifierReward, LocalModelReward, RLConfig, rdpo
    rank, world = init_distributed()
    out = Path(args.out)
    if rank == 0:
        check_output_folder(out)
    if args.reward == "demo_classifier":
        reward = DemoClassifierReward()
    else:
        reward = LocalModelReward(args.reward, args.reward_path, device=args.device or "cpu")
    problem = demo_problem(args)
    if args.init:
        table = EPDParams.load(args.init)
        try:  # RL rolls out on the table's own list (plan.sampler_sigmas, the same as the node's)
            sigmas = sampler_sigmas(table, problem.model_sampling).double().tolist()
        except (EPDParamsError, ValueError) as e:
            raise TrainCLIError(f"{args.init}: RL needs the table's own schedule: {e}") from e
    else:
        pos = schedules.sigmas_for({"type": "discrete", "rho": 1.0}, args.steps, problem.model_sampling)
        sigmas = [float(s) for s in pos] + [0.0]
        cfg_d = DistillConfig(sigmas=sigmas, schedule={"type": "discrete", "rho": 1.0}, num_points=args.num_points,
                              iterations=args.distill_iterations, seed=args.seed, guidance_scale=args.guidance_scale,
                              model_family=problem.family)
        if not args.quiet and rank == 0:
            print(f"distilling a starting table ({args.steps} steps, K={args.num_points})", flush=True)
        table = distill(problem.model, None, problem.noise_fn(sigmas[0]), cfg_d, problem.extra_args_fn)
    try:
        prompts = [int(p) for p in args.prompts.split(",") if p.strip()]
    except ValueError:
        raise TrainCLIError(f"--prompts must be comma-separated digit labels 0..9, got {args.prompts!r}") from None
    ckpt = None
    if args.checkpoint_dir:
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt = str(Path(args.checkpoint_dir) / (out.name.removesuffix(".safetensors") + ".rl-checkpoint"))
    cfg = RLConfig(iterations=args.iterations, group_size=args.group_size,
                   prompts_per_iteration=args.prompts_per_update, epochs=args.epochs, lr=args.lr,
                   kappa=args.kappa, kl_coef=args.kl_coef, seed=args.seed, checkpoint_path=ckpt,
                   resume=bool(args.resume))
    from epd_core.demo.models import DemoDenoiser
    model = DemoDenoiser(problem.model.net, cfg=args.guidance_scale)
    t0 = time.time()
    every = max(1, cfg.iterations // 20)

    def progress(it, st):
        if rank == 0 and not args.quiet and (it % every == 0 or it == cfg.iterations):
            print(f"iteration {it}/{cfg.iterations}  reward {st['reward']:.4f}  entropy {st['entropy']:.2f}  "
                  f"grad_norm {st['grad_norm']:.3g}  kl {st['kl']:.3g}  ({time.time() - t0:.1f}s)", flush=True)
    params = rdpo(model, torch.tensor(sigmas), table, reward, prompts, problem.noise_fn(sigmas[0]), cfg,
                  progress=progress)
    if rank == 0:
        params.save(out)
        if not args.quiet:
            print(f"wrote {out}: {params.describe()} in {time.time() - t0:.1f}s", flush=True)
    return params


def config_from_args(args, sigmas, spec, problem) -> DistillConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if f.name not in _SPECIAL}
    if values["teacher_sigma_min"] is None:
        values["teacher_sigma_min"] = float(problem.sigma_min)
    ckpt = None
    if args.checkpoint_dir:
        ckpt = str(Path(args.checkpoint_dir) / (Path(args.out).name.removesuffix(".safetensors") + CHECKPOINT_SUFFIX))
    cfg = DistillConfig(sigmas=sigmas, schedule=spec, checkpoint_path=ckpt, resume=bool(args.resume),
                        guidance_scale=args.guidance_scale, model_family=problem.family, cfg_range=args.cfg_range,
                        **values)
    recipe = variant(cfg.solver).recipe
    if recipe is None:
        return cfg
    # the variant's recipe (the EPD Trainer's and the shipped tables'), for what the options left at the defaults
    default = DistillConfig()
    fields = recipe([s for s in cfg.sigmas if s > 0], cfg.teacher_sigma_min, cfg.lr)
    return dataclasses.replace(cfg, **{k: v for k, v in fields.items()
                                       if k != "sigmas" and getattr(cfg, k) == getattr(default, k)})


def _cfg_range(text: str) -> list[float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two CFG scales LO,HI such as 1,7.5, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"the CFG range {text!r} needs 0 <= LO <= HI")
    return [lo, hi]


def check_output_folder(out: Path) -> None:
    """Before any training: --out's folder exists and really takes a file (permissions, read-only mounts)."""
    problem = folder_problem(out.parent)
    if problem is None:
        return
    if out.parent.is_dir():  # it exists but does not take a file
        raise TrainCLIError(f"output folder {out.parent} {problem}; fix its permissions or choose another --out "
                            "(nothing was trained yet)")
    raise TrainCLIError(f"output folder {out.parent} {problem}; create it or choose another --out")


def init_distributed() -> tuple[int, int]:
    """torchrun sets WORLD_SIZE/RANK: gloo on CPU, nccl on CUDA. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world


def run_distill(args, checkpoint_problem=None) -> EPDParams:
    """`checkpoint_problem(args) -> Problem` loads --checkpoint; the ComfyUI adapter (nodes/train_cli.py) gives it."""
    rank, world = init_distributed()
    if args.checkpoint:
        if checkpoint_problem is None:
            raise TrainCLIError("--checkpoint trains a ComfyUI model through the pack's ComfyUI adapter: run "
                                "`python nodes/train_cli.py distill --checkpoint ...` from the pack's folder, with "
                                "the same options (and --comfyui /path/to/ComfyUI)")
        problem = checkpoint_problem(args)
    elif (args.model or "gmm") in ("demo", "mnist"):
        problem = demo_problem(args)
    else:
        problem = gmm_problem(args)
    for option, value in variant(args.solver).implies:  # epd_ms: its last row always steps to 0, no analytic first step
        setattr(args, option, value)
    if args.to_zero:  # the last row steps to 0 itself: no final Euler step
        args.final_zero = False
    sigmas, spec = student_sigmas(args, problem)
    cfg = config_from_args(args, sigmas, spec, problem)
    out = Path(args.out)
    if rank == 0:
        check_output_folder(out)
    if cfg.checkpoint_path and rank == 0:
        try:
            Path(cfg.checkpoint_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainCLIError(f"cannot create --checkpoint-dir {args.checkpoint_dir} ({e.strerror}); choose a "
                                "writable folder") from None
    init = EPDParams.load(args.init) if args.init else None
    t0 = time.time()
    report_every = max(1, cfg.iterations // 20)

    def progress(it, loss):
        if rank == 0 and not args.quiet and (it % report_every == 0 or it == cfg.iterations):
            print(f"iteration {it}/{cfg.iterations}  loss {loss:.6g}  ({time.time() - t0:.1f}s)", flush=True)

    if problem.run is not None:
        params = problem.run(cfg, progress=progress, init=init)
    else:
        params = distill(problem.model, None, problem.noise_fn(sigmas[0]), cfg, problem.extra_args_fn,
                         progress=progress, init=init)
    if rank == 0:
        params.save(out)
        if not args.quiet:
            print(f"wrote {out}: {params.describe()} in {time.time() - t0:.1f}s (world size {world})", flush=True)
    return params


def main(argv=None, checkpoint_problem=None) -> int:
    """The command line; `checkpoint_problem` (from the ComfyUI adapter) adds --checkpoint support."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from epd_core.training.rl import RLError, RewardUnavailableError
    try:
        run_rl(args) if args.command == "rl" else run_distill(args, checkpoint_problem)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # ranks leave together: a rank tearing gloo down while rank 0 still writes the file can abort the
            # process ("terminate called without an active exception")
            torch.distributed.barrier()
    except (DistillError, TrainCLIError, EPDParamsError, ValueError, RLError, RewardUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
