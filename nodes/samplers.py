"""The ComfyUI-facing sampler functions: the KSampler dropdown entries `epd` / `epd_plugin` and the
function behind the EPD Sampler node. Both pick the execution path (batched / sequential) and delegate
the math to epd_core.solver."""
from __future__ import annotations

import logging

import comfy.k_diffusion.sampling
import comfy.samplers

from epd_core.solver import sample_epd, sample_epd_plugin

from .compat import log_path_once, sequential_reasons
from .tables import find_preset, model_family, neutral_table

log = logging.getLogger("epd")
SAMPLER_NAMES = ("epd", "epd_plugin")
_SAMPLE_FNS = {"epd": sample_epd, "epd_plugin": sample_epd_plugin}


def run_epd(solver: str, model, x, sigmas, params, extra_args=None, callback=None, disable=None,
            execution: str = "auto", **opts):
    """Run EPD / EPD-Plugin with `params` on a ComfyUI model, choosing the batched or sequential path."""
    extra_args = extra_args or {}
    reasons = sequential_reasons(model, extra_args) if execution == "auto" else []
    sequential = execution == "sequential" or bool(reasons)
    path = ("sequential (" + ", ".join(reasons) + ")") if reasons else ("sequential" if sequential else "batched")
    log_path_once((solver, path), f"EPD: {solver} runs the {params.num_points} points of each step {path}"
                  + ("" if sequential else " in one model call"))
    return _SAMPLE_FNS[solver](model, x, sigmas, params, extra_args=extra_args, callback=callback,
                               disable=disable, sequential=sequential, **opts)


def _dropdown_sampler(solver: str):
    """KSampler entry: the best table for the connected model and step count, else the neutral one."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
        steps = int((sigmas[1:] > 0).sum())
        calls = len(sigmas) - 1  # KSampler's step count: the latency NFE asked of "to_zero" tables
        patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
        family = model_family(patcher) if patcher is not None else "unknown"
        found = find_preset(family, solver, steps, calls)
        if found is None:
            params, source = neutral_table(solver, steps), "neutral table (no trained table for this model)"
        else:
            params, source = found
        log_path_once((solver, family, steps, source), f"EPD: {solver} on {family} with {steps} steps uses {source}")
        return run_epd(solver, model, x, sigmas, params, extra_args, callback, disable, **opts)
    sample.__name__ = f"sample_{solver}"
    return sample


def register_dropdown_samplers() -> None:
    """Add `epd` / `epd_plugin` to KSampler and KSamplerSelect. The name lists are shared objects (KSampler.SAMPLERS
    IS comfy.samplers.SAMPLER_NAMES), so append in place, once, and never reload modules."""
    for name in SAMPLER_NAMES:
        setattr(comfy.k_diffusion.sampling, f"sample_{name}", _dropdown_sampler(name))
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)
