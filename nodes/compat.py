"""What differs between the ComfyUI versions the pack runs on, decided by looking at the objects themselves
(never at a version string), and when the K points of a step may share ONE model call. docs/compatibility.md
lists what each check is for and which ComfyUI changed it.

Batching: only when nothing in the graph reads a single sigma for the whole batch or needs the batch to be the
sample batch (docs/comfyui.md). Otherwise the sampler runs each point as its own call with a uniform sigma,
which is always correct."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging

log = logging.getLogger("epd")

# ===================================================================================== comfy_api version
# v0_0_2 is the first numbered API: in ComfyUI 0.3.75 and in the newest ComfyUI (next to v0_0_3 there);
# `latest` is the one still being changed. The fallback keeps the pack loading on a ComfyUI without it.
PINNED_API, FALLBACK_API = "comfy_api.v0_0_2", "comfy_api.latest"


def load_comfy_api(preferred: str = PINNED_API, fallback: str = FALLBACK_API):
    """The module that provides `io` and `ComfyExtension`: the pinned API version, else `latest`."""
    try:
        api = importlib.import_module(preferred)
        if all(hasattr(api, name) for name in ("io", "ui", "ComfyExtension")):
            return api
        problem = "lacks io, ui or ComfyExtension"
    except ImportError as e:
        problem = f"is not importable ({e})"
    log.warning("EPD: %s %s; using %s", preferred, problem, fallback)
    return importlib.import_module(fallback)


_API = load_comfy_api()
io = _API.io
ui = _API.ui
ComfyExtension = _API.ComfyExtension


# ============================================================================================ batching

# transformer_options["patches"] entries known to read transformer_options["sigmas"][0] (PatchModelAddDownscale).
_SIGMA0_PATCHES = ("input_block_patch_after_skip", "input_block_patch")
# wrappers that cache or skip by step and compare against one sigma (EasyCache, LazyCache).
_STEP_CACHE_WORDS = ("easycache", "lazycache", "teacache", "firstblockcache", "magcache")


def sequential_reasons(model, extra_args: dict) -> list[str]:
    """Why the batched K-point call would be wrong for this run (empty list: batching is safe).
    `model` is the sampler's model (ComfyUI's KSamplerX0Inpaint around the CFGGuider)."""
    reasons = []
    if extra_args.get("denoise_mask") is not None:
        reasons.append("inpainting denoise mask")
    model_options = extra_args.get("model_options", {}) or {}
    topts = model_options.get("transformer_options", {}) or {}
    if model_options.get("context_handler") is not None or topts.get("context_handler") is not None:
        reasons.append("context windows")
    if model_options.get("sampler_post_cfg_function"):
        reasons.append("post-CFG functions (e.g. SkipLayerGuidance)")
    patches = topts.get("patches", {}) or {}
    if any(patches.get(p) for p in _SIGMA0_PATCHES):
        reasons.append("sigma-dependent block patches (e.g. PatchModelAddDownscale)")
    wrapper_keys = " ".join(str(k).lower() for group in (topts.get("wrappers", {}) or {}).values()
                            for k in (group or {}))
    if any(w in wrapper_keys for w in _STEP_CACHE_WORDS):
        reasons.append("step caches (e.g. EasyCache)")
    guider = getattr(model, "inner_model", None)
    for cond_list in (getattr(guider, "conds", None) or {}).values():
        for cond in cond_list or []:
            if "timestep_start" in cond or "timestep_end" in cond:
                reasons.append("conditioning timestep ranges")
            control = cond.get("control")
            while control is not None:
                if tuple(getattr(control, "timestep_percent_range", (0.0, 1.0))) != (0.0, 1.0):
                    reasons.append("ControlNet start/end percent")
                    break
                control = getattr(control, "previous_controlnet", None)
    return sorted(set(reasons))


# ==================================================================== models that read the sigma list
# HunyuanVideo 1.5's step-distilled ("meanflow") models embed a second time r, found by looking the call's sigma
# up in transformer_options["sample_sigmas"] and taking the NEXT entry. EPD evaluates between the entries, so
# the lookup finds nothing and the model silently runs without that embedding: a different network. Neither
# batching nor sequential calls can fix that, so EPD refuses such a model.

def _diffusion_model(model):
    """The torch diffusion model behind a sampler model / CFGGuider / BaseModel / ModelPatcher (or None)."""
    for _ in range(4):
        if model is None or hasattr(model, "diffusion_model"):
            break
        model = getattr(model, "inner_model", None) or getattr(model, "model", None)
    return getattr(model, "diffusion_model", None)


def sigma_list_reader(model) -> str | None:
    """A message when the model reads its step from the sampler's sigma list in a way EPD cannot serve."""
    net = _diffusion_model(model)
    if net is not None and getattr(net, "time_r_in", None) is not None:
        return (f"{type(net).__name__} is a step-distilled (meanflow) model: it reads the next sigma of the "
                "sampler's own list (transformer_options['sample_sigmas']) to embed a second time, and EPD "
                "evaluates between the list's sigmas, where that lookup finds nothing and the model would "
                "silently run without it. Sample this model with a sampler that steps on its sigma list "
                "(e.g. euler with the model's own step count); EPD tables cannot be used or trained for it.")
    return None


# ===================================================================================== prediction types
# ComfyUI's model_sampling mix-ins (comfy/model_sampling.py) by class name, subclasses before their bases (the
# first name found in the class's MRO wins). Newer ComfyUI added X0, V_PREDICTION_DDPM (CogVideoX), the
# image-to-image kinds and ModelSamplingAV (CONST with a separate audio shift); CONST gained a noise_scale.
PREDICTIONS = (("IMG_TO_IMG_FLOW", "img2img_flow"), ("IMG_TO_IMG_VELOCITY", "img2img_velocity"),
               ("IMG_TO_IMG", "img2img"), ("V_PREDICTION_DDPM", "v_ddpm"), ("COSMOS_RFLOW", "cosmos_rflow"),
               ("CONST", "flow"), ("EDM", "edm"), ("V_PREDICTION", "v"), ("X0", "x0"), ("EPS", "eps"))
# Image-to-image models (Marigold-style depth/normals, one-step editors) start from the input latent and add no
# noise (noise_scaling returns the latent): there is no noise-to-image ODE for a table to solve.
IMAGE_TO_IMAGE = ("img2img", "img2img_flow", "img2img_velocity")


def prediction_type(model_sampling) -> str | None:
    """The prediction kind of a model_sampling object ('eps', 'v', 'edm', 'x0', 'flow', 'v_ddpm', 'cosmos_rflow',
    or one of IMAGE_TO_IMAGE), None when it has none of ComfyUI's mix-ins."""
    names = {c.__name__ for c in type(model_sampling).__mro__}
    return next((kind for cls, kind in PREDICTIONS if cls in names), None)


def noise_scale(model_sampling) -> float:
    """CONST's absolute noise scale (ModelNoiseScale, HiDream-O1); 1.0 where the model has none."""
    return float(getattr(model_sampling, "noise_scale", 1.0) or 1.0)


def sampling_variant(active, own) -> str | None:
    """The family suffix for a model whose model_sampling was patched into another ODE than its own (None: the
    same): another prediction type ('flow' for SD1.5 behind ModelSamplingSD3), or another noise scale."""
    if active is None or own is None or active is own:
        return None
    kind, own_kind = prediction_type(active), prediction_type(own)
    if kind and kind != own_kind:
        return kind
    scale = noise_scale(active)
    if scale != noise_scale(own):
        return f"noise{scale:g}"
    return None


def _model_sampling(model):
    """The model_sampling in effect: a ModelPatcher's (patches included), else the one on the BaseModel behind
    a sampler model / CFGGuider (ComfyUI applies the object patches there while sampling)."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    for _ in range(4):
        if model is None or hasattr(model, "model_sampling"):
            break
        model = getattr(model, "inner_model", None) or getattr(model, "model", None)
    return getattr(model, "model_sampling", None)


def prediction_problem(model) -> str | None:
    """A message when the model's sampling is not a noise-to-data ODE an EPD table can step (image-to-image)."""
    ms = _model_sampling(model)
    kind = prediction_type(ms) if ms is not None else None
    if kind in IMAGE_TO_IMAGE:
        return (f"the model samples image-to-image ({type(ms).__name__}, prediction '{kind}'): it starts from the "
                "input image and adds no noise, so there is no noise-to-image ODE for an EPD table to solve. Sample "
                "it with the sampler and sigmas its workflow was made for (e.g. euler); EPD tables cannot be used "
                "or trained for it.")
    return None


def model_problem(model) -> str | None:
    """Why EPD cannot sample or train this model at all (None: it can)."""
    return prediction_problem(model) or sigma_list_reader(model)


# ============================================================================= few-step distilled models
# Step-distilled models are trained to land on their own few sigmas; a learned solver has nothing to add there.
# Recognisable: the model config of a step-distilled checkpoint, or a model_sampling whose sigma table was cut to
# the distillation's few timesteps (ComfyUI's ModelSamplingDiscrete "lcm": ModelSamplingDiscreteDistilled, 50).
# LoRA-distilled models (SDXL-Lightning, Qwen-Image-Lightning, Wan lightx2v) and checkpoints that share their
# base model's config (Z-Image Turbo, SDXL Turbo) cannot be told apart; docs/compatibility.md lists them.
_DISTILLED_CONFIGS = {"FluxSchnell": "FLUX.1 schnell"}
_FEW_SIGMAS = 100  # ComfyUI's own schedules keep 1000 (10000 for Flux); the LCM sampling keeps 50


def few_step_hint(model) -> str | None:
    """One line when the model looks like a few-step distilled model (EPD then gives it nothing), else None."""
    ms = _model_sampling(model)
    base = model
    for _ in range(4):
        if base is None or hasattr(base, "model_config"):
            break
        base = getattr(base, "inner_model", None) or getattr(base, "model", None)
    config = type(getattr(base, "model_config", None)).__name__
    why = None
    if config in _DISTILLED_CONFIGS:
        why = f"{_DISTILLED_CONFIGS[config]} is step-distilled"
    elif ms is not None and "LCM" in {c.__name__ for c in type(ms).__mro__}:
        why = "its sampling is LCM (a consistency-distilled model)"
    else:
        sigmas = getattr(ms, "sigmas", None)
        if sigmas is not None and getattr(sigmas, "ndim", 0) == 1 and 1 < len(sigmas) < _FEW_SIGMAS:
            why = f"its sampling keeps only {len(sigmas)} sigmas (a distilled timestep table)"
    if why is None:
        return None
    return (f"this model looks like a few-step distilled model ({why}); it was trained for its own few sigmas and "
            "EPD cannot make it faster or better: use the sampler and step count it was distilled for.")


# ============================================================================================ training

def is_dynamic(model_patcher) -> bool:
    """Dynamic VRAM (ModelPatcherDynamic, the default on NVIDIA in new ComfyUI): weights are streamed to the
    device per call and the patcher keeps per-weight state (pins, cast buffers, the weight's model dtype)."""
    check = getattr(model_patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def multigpu_problem(model_patcher, model_options: dict | None = None) -> str | None:
    """A message when the model is set up to split sampling over GPUs: ComfyUI computes the conds of that path
    under torch.no_grad, so distillation would get no gradient. Sampling and RL rollouts are not affected."""
    options = model_options if model_options is not None else getattr(model_patcher, "model_options", {}) or {}
    extra = getattr(model_patcher, "get_additional_models_with_key", None)
    if "multigpu_clones" in options or (callable(extra) and extra("multigpu")):
        return ("the model is set up for multi-GPU sampling (MultiGPU CFG Split), whose model calls run without "
                "gradients, so distillation cannot learn from them. Connect the model to the EPD Trainer without "
                "the MultiGPU CFG Split node (the table it saves works with the multi-GPU model afterwards).")
    return None


@contextlib.contextmanager
def training_mode():
    """comfy.model_management.in_training = True for the block, restored afterwards (also on errors and Cancel).
    New model code picks in-place fused kernels (no backward) unless it is set; ComfyUI without the flag: no-op."""
    import comfy.model_management as mm
    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def fix_empty_latent(model_patcher, latent: dict):
    """The latent KSampler samples for `latent`: comfy.sample.fix_empty_latent_channels, passing the latent's
    downscale ratios where this ComfyUI's function takes them (newer ComfyUI resizes an empty latent made for
    another spatial ratio to the model's own)."""
    import comfy.sample
    fix = comfy.sample.fix_empty_latent_channels
    params = inspect.signature(fix).parameters
    kwargs = {k: latent[k] for k in ("downscale_ratio_spacial", "downscale_ratio_temporal")
              if k in params and latent.get(k) is not None}
    return fix(model_patcher, latent["samples"], **kwargs)


def send_progress_text(text: str, node_id) -> None:
    """The text under a node in the UI (ComfyUI's progress text); nothing without a server (e.g. the CLI), where
    the progress bar is enough."""
    if node_id is None:
        return
    try:
        from server import PromptServer
        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass
