"""When may the K points of a step share ONE model call? Only when nothing in the graph reads a single
sigma for the whole batch or needs the batch to be the sample batch (docs/comfyui.md).
Otherwise the sampler runs each point as its own call with a uniform sigma, which is always correct."""
from __future__ import annotations

import logging

log = logging.getLogger("epd")

# transformer_options["patches"] entries known to read transformer_options["sigmas"][0] (PatchModelAddDownscale).
_SIGMA0_PATCHES = ("input_block_patch_after_skip", "input_block_patch")
# wrappers that cache or skip by step and compare against one sigma (EasyCache, LazyCache).
_STEP_CACHE_WORDS = ("easycache", "lazycache", "teacache", "firstblockcache")


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


_logged: set = set()


def log_path_once(key, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message)
