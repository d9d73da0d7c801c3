"""The ComfyUI-facing sampler functions: the KSampler dropdown entries `epd` / `epd_plugin` and the
function behind the EPD Sampler node. Both pick the execution path (batched / sequential) and delegate
the math to epd_core.solver."""
from __future__ import annotations

import logging

import comfy.k_diffusion.sampling
import comfy.samplers

from epd_core.runtime import log_once
from epd_core.epd import positive_steps
from epd_core.params import MAX_STEPS
from epd_core.solver import sample_epd, sample_epd_plugin

from .compat import sequential_reasons, sigma_list_reader
from .tables import find_preset, model_family, neutral_table

log = logging.getLogger("epd")
SAMPLER_NAMES = ("epd", "epd_plugin")
_SAMPLE_FNS = {"epd": sample_epd, "epd_plugin": sample_epd_plugin}


def solver_names() -> tuple[str, ...]:
    """The solvers a table can be sampled with (EPD Sampler's `solver` choices besides 'auto')."""
    return tuple(_SAMPLE_FNS)


def run_epd(solver: str, model, x, sigmas, params, extra_args=None, callback=None, disable=None,
            execution: str = "auto", **opts):
    """Run EPD / EPD-Plugin with `params` on a ComfyUI model, choosing the batched or sequential path."""
    extra_args = extra_args or {}
    problem = sigma_list_reader(model)
    if problem:
        raise RuntimeError(f"EPD: {problem}")
    reasons = sequential_reasons(model, extra_args) if execution == "auto" else []
    sequential = execution == "sequential" or bool(reasons)
    path = ("sequential (" + ", ".join(reasons) + ")") if reasons else ("sequential" if sequential else "batched")
    log_once((solver, path), logging.INFO, f"EPD: {solver} runs the {params.num_points} points of each step {path}"
             + ("" if sequential else " in one model call"))
    return _SAMPLE_FNS[solver](model, x, sigmas, params, extra_args=extra_args, callback=callback,
                               disable=disable, sequential=sequential, **opts)


def _dropdown_sampler(solver: str):
    """KSampler entry: the best table for the connected model and step count, else the neutral one."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
        steps = positive_steps(sigmas)
        calls = len(sigmas) - 1  # KSampler's step count: the latency NFE asked of "to_zero" tables
        patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
        family = model_family(patcher) if patcher is not None else "unknown"
        if steps > MAX_STEPS:  # no table, not even the neutral one, has more rows
            raise ValueError(f"EPD: KSampler '{solver}' takes at most {MAX_STEPS + 1} steps ({steps} steps to a "
                             f"positive sigma were asked); use fewer steps")
        found = find_preset(family, solver, steps, calls)
        if found is None:
            params, source = neutral_table(solver, steps), "neutral table (no trained table for this model)"
        else:
            params, source = found
        log_once((solver, family, steps, source), logging.INFO,
                 f"EPD: {solver} on {family} with {steps} steps uses {source}")
        return run_epd(solver, model, x, sigmas, params, extra_args, callback, disable, **opts)
    sample.__name__ = f"sample_{solver}"
    sample.epd_solver = solver  # marks our own function (re-registration keeps it)
    return sample


def sampler_name_lists() -> list[list]:
    """The name lists the sampler dropdowns are built from: KSAMPLER_NAMES, SAMPLER_NAMES (KSamplerSelect) and
    KSampler.SAMPLERS (KSampler, KSamplerAdvanced). In ComfyUI the last two are one object, but a pack that
    replaced one of them by a copy splits them, so each distinct list counts."""
    found = []
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES,
                  getattr(comfy.samplers.KSampler, "SAMPLERS", None)):
        if isinstance(names, list) and not any(names is f for f in found):
            found.append(names)
    return found


def register_dropdown_samplers() -> None:
    """Add `epd` / `epd_plugin` to KSampler and KSamplerSelect: the sampler functions ComfyUI finds by name
    (comfy.k_diffusion.sampling.sample_<name>) and the names, appended in place to every list the dropdowns read
    (never reloading modules). Idempotent: called again before each prompt (nodes/__init__.py), it puts the names
    back into lists another pack replaced after this pack loaded (custom nodes load in directory order)."""
    for name in SAMPLER_NAMES:
        fn = getattr(comfy.k_diffusion.sampling, f"sample_{name}", None)
        if getattr(fn, "epd_solver", None) != name:
            setattr(comfy.k_diffusion.sampling, f"sample_{name}", _dropdown_sampler(name))
        for names in sampler_name_lists():
            if name not in names:
                names.append(name)
