"""The ComfyUI-facing sampler functions: the KSampler dropdown entries (`epd`, `epd_plugin`, `epd_ms`: every
variant of epd_core.sampling.registry) and the function behind the EPD Sampler node. Both pick the execution path
(batched / sequential) and delegate the math to epd_core."""
from __future__ import annotations

import logging

import comfy.k_diffusion.sampling
import comfy.samplers
import torch

from epd_core.sampling import cfg_guard
from epd_core.runtime import log_once
from epd_core.sampling.epd import positive_steps
from epd_core.tables.params import MAX_STEPS
from epd_core.sampling.plan import model_sampling_of
from epd_core.sampling.registry import NAMES, variant

from .compat import few_step_hint, model_problem, send_progress_text, sequential_reasons
from .tables import ksampler_tables, model_family

SAMPLER_NAMES = NAMES


def run_epd(solver: str, model, x, sigmas, params, extra_args=None, callback=None, disable=None,
            execution: str = "auto", **opts):
    """Run a solver variant with `params` (epd_ms: None = its built-in) on a ComfyUI model, choosing the batched
    or sequential path."""
    extra_args = extra_args or {}
    problem = model_problem(model)
    if problem:
        raise RuntimeError(f"EPD: {problem}")
    hint = few_step_hint(model)
    if hint:
        log_once(("few-step", hint), logging.WARNING, f"EPD: {hint}")
    reasons = sequential_reasons(model, extra_args) if execution == "auto" else []
    sequential = execution == "sequential" or bool(reasons)
    path = ("sequential (" + ", ".join(reasons) + ")") if reasons else ("sequential" if sequential else "batched")
    # points batched in one call: a variant without parallel points (dyweight) evaluates only the current one
    points = params.num_points if params is not None and variant(solver).parallel_points else 1
    log_once((solver, path), logging.INFO, f"EPD: {solver} runs the {points} points of each step {path}"
             + ("" if sequential else " in one model call"))
    sample = variant(solver).sample_fn()
    return sample(model, x, sigmas, params, extra_args=extra_args, callback=callback, disable=disable,
                  sequential=sequential, **opts)


def patcher_of(model):
    """The ComfyUI ModelPatcher behind a sampler function's `model` (the CFG wrapper), or None."""
    return getattr(getattr(model, "inner_model", None), "model_patcher", None)


def guidance_of(model) -> float | None:
    """The CFG scale of the guider behind a sampler function's `model` (ComfyUI's CFGGuider.cfg), or None (a
    custom guider without one)."""
    cfg = getattr(getattr(model, "inner_model", None), "cfg", None)
    return float(cfg) if type(cfg) in (int, float) else None


def builtin_sigmas(model_sampling, sampler: str, scheduler: str, steps: int):
    """The sigma list KSampler gives `sampler` with `scheduler` (its discard-penultimate rule included), or the
    AlignYourSteps (ays_sd1 ...) / GITS (gits_<coeff>) scheduler node's list; None for a scheduler unknown here."""
    if scheduler.startswith("ays_"):
        from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
        return AlignYourStepsScheduler.execute(scheduler[4:].upper(), steps, 1.0).result[0]
    if scheduler.startswith("gits_"):
        from comfy_extras.nodes_gits import GITSScheduler
        return GITSScheduler.execute(float(scheduler[5:]), steps, 1.0).result[0]
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        return None
    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + int(discard))
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def run_builtin(builtin: dict, model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Sample exactly as a ComfyUI built-in ({"sampler", "scheduler", "steps"}, as a table's measured_cfg records
    it): on that scheduler's sigmas for a full denoise of the same step count, else on the given sigmas."""
    fn = comfy.samplers.sampler_object(builtin["sampler"]).sampler_function  # uni_pc is no k-diffusion function
    ms = model_sampling_of(model)
    full = ms is not None and abs(float(sigmas[0]) - float(ms.sigma_max)) <= 1e-3 * float(ms.sigma_max)
    if full and builtin.get("steps") == len(sigmas) - 1:
        own = builtin_sigmas(ms, builtin["sampler"], builtin["scheduler"], builtin["steps"])
        if own is not None and len(own) == len(sigmas):
            sigmas = own.to(sigmas)
    return fn(model, x, sigmas, extra_args=extra_args or {}, callback=callback, disable=disable)


def run_guarded(solver: str, tables: list, model, x, sigmas, extra_args=None, callback=None, disable=None,
                node_id=None, what: str | None = None, **opts):
    """Run `solver` with the table epd_core.sampling.cfg_guard chooses among `tables` ((table, name) pairs) at the
    model's
    CFG, or exactly as the best built-in recorded there when no table beats it; says which in the log (`what`:
    '<solver> on <family> with <n> steps') and under the node `node_id`."""
    cfg = guidance_of(model)
    choice = cfg_guard.choose([t for t, _ in tables], cfg)
    name = next((shown for t, shown in tables if t is choice.table), None)
    b = choice.builtin
    used = name if name else f"the built-in {b['sampler']} ({b['scheduler']})"
    if what:
        log_once((what, used), logging.INFO, f"EPD: {what} uses {used}")
    text = f"EPD: {solver} at CFG {'?' if cfg is None else f'{cfg:g}'}: {choice.reason}"
    log_once((solver, text), logging.INFO if choice.table is not None else logging.WARNING, text)
    send_progress_text(f"{used}: {choice.reason}", node_id)
    if choice.table is None:
        return run_builtin(b, model, x, sigmas, extra_args, callback, disable)
    return run_epd(solver, model, x, sigmas, choice.table, extra_args, callback, disable, **opts)


def _dropdown_sampler(solver: str):
    """KSampler entry: the tables for the connected model and step count (chosen at the model's CFG by
    epd_core.sampling.cfg_guard), else the neutral one / the variant's untrained built-in."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
        steps = positive_steps(sigmas)
        calls = len(sigmas) - 1  # KSampler's step count: the latency NFE asked of "to_zero" tables
        patcher = patcher_of(model)
        family = model_family(patcher) if patcher is not None else "unknown"
        if steps > MAX_STEPS:  # no table, not even the neutral one, has more rows
            raise ValueError(f"EPD: KSampler '{solver}' takes at most {MAX_STEPS + 1} steps ({steps} steps to a "
                             f"positive sigma were asked); use fewer steps")
        found = ksampler_tables(family, solver, steps, calls)
        untrained = variant(solver).untrained
        if found:
            return run_guarded(solver, found, model, x, sigmas, extra_args, callback, disable,
                               what=f"{solver} on {family} with {steps} steps", **opts)
        if untrained:
            params, source = None, f"no {solver} table of {calls} steps for this model: exactly {untrained}"
        else:
            params = variant(solver).untrained_table(sigmas, num_points=1, provenance={
                "source": "neutral fallback (no trained table for this model)"})  # dpm_2 (epd), or iPNDM-predicted
            source = "neutral table (no trained table for this model)"
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
    """Add every solver variant (`epd`, `epd_plugin`, `epd_ms`) to KSampler and KSamplerSelect: the sampler
    functions ComfyUI finds by name (comfy.k_diffusion.sampling.sample_<name>) and the names, appended in place to
    every list the dropdowns read (never reloading modules). Idempotent: called again before each prompt
    (nodes/__init__.py), it puts the names back into lists another pack replaced after this pack loaded (custom
    nodes load in directory order)."""
    for name in SAMPLER_NAMES:
        fn = getattr(comfy.k_diffusion.sampling, f"sample_{name}", None)
        if getattr(fn, "epd_solver", None) != name:
            setattr(comfy.k_diffusion.sampling, f"sample_{name}", _dropdown_sampler(name))
        for names in sampler_name_lists():
            if name not in names:
                names.append(name)
