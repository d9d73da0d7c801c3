"""The command-line trainer for a ComfyUI checkpoint: `python -m epd_core.train` with --checkpoint support.

    python nodes/train_cli.py distill --checkpoint sd15.safetensors --comfyui /path/to/ComfyUI --prompt "a cat" ...
    torchrun --standalone --nproc_per_node 2 nodes/train_cli.py distill --checkpoint ...

Every option of `python -m epd_core.train distill` works here. The checkpoint is loaded with comfy.sd and trained
inside ComfyUI's CFGGuider, the same code path as the EPD Trainer node (epd_core itself never imports ComfyUI).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_epd_pack"  # the pack imported as a package, as ComfyUI does (ComfyUI has its own `nodes`)


def import_pack(comfy_path: str):
    """ComfyUI first on sys.path (its `nodes`, `comfy`, `folder_paths`), then the pack as a package."""
    import torch
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # must happen before comfy.model_management is imported
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.nodes.training")


def checkpoint_problem(args):
    """A ComfyUI checkpoint as an epd_core.training.cli Problem, conditioned on --prompt / --negative-prompt."""
    import torch
    from epd_core.demo.problems import Problem
    from epd_core.training.cli import TrainCLIError
    comfy_path = args.comfyui or os.environ.get("COMFYUI_PATH")
    if not comfy_path or not (Path(comfy_path) / "comfy" / "sd.py").is_file():
        raise TrainCLIError("--checkpoint needs a ComfyUI install: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH "
                            f"(got {comfy_path!r}). Supported without ComfyUI: --model gmm, --model demo.")
    trainer = import_pack(comfy_path)
    import comfy.model_sampling
    import comfy.sd
    if not Path(args.checkpoint).is_file():
        raise TrainCLIError(f"checkpoint {args.checkpoint} not found")
    with torch.inference_mode():  # as ComfyUI's executor loads it (the trainer handles inference tensors)
        patcher, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=True)
        if clip is None:
            raise TrainCLIError(f"{args.checkpoint} has no text encoder; the CLI needs a full checkpoint")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(args.prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(args.negative_prompt))
    ms = patcher.get_model_object("model_sampling")
    latent_format = patcher.get_model_object("latent_format")
    ratio = getattr(latent_format, "spacial_downscale_ratio", 8)
    shape = (1, latent_format.latent_channels, args.height // ratio, args.width // ratio)
    scale = 7.5 if args.guidance_scale is None else args.guidance_scale
    args.guidance_scale = scale

    def run(cfg, **kw):
        return trainer.distill_with_comfy_model(patcher, positive, negative, scale, shape, cfg, **kw)

    def sigmas_fn(a):  # the node's schedules: what EPD Sigmas rebuilds, or a KSampler scheduler's list
        flow = isinstance(ms, comfy.model_sampling.CONST)
        name = a.comfy_scheduler or {"discrete": "epd_discrete", "flowmatch": "epd_flowmatch",
                                     "polynomial": "epd_polynomial"}.get(a.schedule or "", None)
        if name is None and a.schedule:
            raise TrainCLIError(f"--schedule {a.schedule} is not available for a ComfyUI checkpoint; use discrete, "
                                "flowmatch, polynomial or --comfy-scheduler NAME")
        sig, spec = trainer.training_sigmas(patcher, name or ("epd_flowmatch" if flow else "epd_discrete"), a.steps)
        return (sig if a.final_zero else sig[:-1]), spec
    family = importlib.import_module(f"{PACKAGE}.nodes.tables").model_family(patcher)
    return Problem(None, None, None, float(ms.sigma_min), float(ms.sigma_max), family,
                   run=run, sigmas_fn=sigmas_fn)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # epd_core; after ComfyUI's folder, so `nodes` stays ComfyUI's module
    from epd_core.training.cli import main as train_main
    return train_main(argv, checkpoint_problem=checkpoint_problem)


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.exit(main())
