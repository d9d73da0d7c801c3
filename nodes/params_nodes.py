"""Nodes over parameter tables: EPD Sampler (SAMPLER), EPD Sigmas (SIGMAS), Load / Save EPD Params."""
from __future__ import annotations

import logging
import re

import comfy.samplers
import torch
from comfy_api.latest import io

from epd_core import schedules
from epd_core.params import EPDParams, EPDParamsError

from .samplers import run_epd
from .tables import load_table, model_family, output_dir, table_files

log = logging.getLogger("epd")
EPDParamsType = io.Custom("EPD_PARAMS")
CATEGORY = "sampling/epd"


class EPDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDSampler", display_name="EPD Sampler", category=CATEGORY,
            description="EPD-Solver / EPD-Plugin as a SAMPLER for SamplerCustomAdvanced: each step evaluates the "
                        "model at K learned points in ONE batched call, so an image needs about half the "
                        "sequential model calls. Pair it with EPD Sigmas for the table's exact schedule.",
            inputs=[
                EPDParamsType.Input("params", tooltip="A parameter table (Load EPD Params, EPD Trainer, Import EPD Predictor)."),
                io.Combo.Input("solver", options=["auto", "epd", "epd_plugin"], default="auto",
                               tooltip="auto: the solver the table was trained for. epd_plugin adds an Adams-Bashforth predictor."),
                io.Int.Input("max_order", default=0, min=0, max=4,
                             tooltip="EPD-Plugin predictor order (1-4); 0 = the table's own."),
                io.Combo.Input("afs", options=["auto", "on", "off"], default="auto",
                               tooltip="Analytic first step (saves one model call); auto = as trained."),
                io.Combo.Input("execution", options=["auto", "batched", "sequential"], default="auto",
                               tooltip="auto: one batched call for the K points, sequential when the graph needs "
                                       "it (inpainting, timestep ranges, ControlNet ranges...)."),
                io.Int.Input("max_batch", default=0, min=0, max=4096,
                             tooltip="Max samples per model call for the K points (0 = no limit). Lower it to "
                                     "save memory; out-of-memory also splits automatically."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, params, solver, max_order, afs, execution, max_batch) -> io.NodeOutput:
        solver = params.solver if solver == "auto" else solver
        opts = {"execution": execution}
        if afs != "auto":
            opts["afs"] = afs == "on"
        if max_batch:
            opts["max_batch"] = max_batch
        if max_order and solver == "epd_plugin":
            opts["max_order"] = max_order

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
            return run_epd(solver, model, x, sigmas, params, extra_args, callback, disable, **{**opts, **kw})
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample))


def table_sigmas(params: EPDParams, model_sampling) -> torch.Tensor:
    """The N+1 positive sigmas a table was trained on, rebuilt for the connected model (EPD_SPEC.md §4)."""
    spec = dict(params.schedule)
    n = params.num_steps + 1
    kind = spec.get("type")
    if kind == "discrete":
        return schedules.discrete(n, model_sampling.sigmas, spec.get("rho") or 1.0)
    if kind == "flowmatch":
        shift = float(getattr(model_sampling, "shift", spec.get("shift", 3.0)))
        t_min = 1.0 / model_sampling.sigmas.numel()  # the model's first training timestep (1/1000 SD3, 1/10000 Flux)
        if "flux" in type(model_sampling).__name__.lower():
            return schedules.flowmatch(n, mu=shift, t_min=t_min)
        return schedules.flowmatch(n, shift=shift, t_min=t_min)
    if kind is None and params.schedule_sigmas is None:
        raise EPDParamsError(f"the table ({params.describe()}) records no schedule; use a scheduler node instead "
                             "of EPD Sigmas, or re-train the table")
    if spec.get("sigma_min") is None:
        spec.update(sigma_min=float(model_sampling.sigma_min), sigma_max=float(model_sampling.sigma_max))
    return schedules.schedule_sigmas(spec, n)


class EPDSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDSigmas", display_name="EPD Sigmas", category=CATEGORY,
            description="The exact sigma schedule a table was trained for, computed for the connected model "
                        "(discrete tables through the model's own sigma table, flow tables through its shift).",
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with."),
                EPDParamsType.Input("params", tooltip="The parameter table whose schedule to reproduce."),
                io.Boolean.Input("append_zero", default=True,
                                 tooltip="End with sigma 0 (a final Euler step, one more model call), as ComfyUI's schedulers do."),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS")],
        )

    @classmethod
    def execute(cls, model, params, append_zero) -> io.NodeOutput:
        family, trained = model_family(model), params.metadata.get("model_family")
        if trained and trained != family:
            log.warning("EPD: table trained for '%s' is used with a '%s' model; expect lower quality", trained, family)
        sigmas = table_sigmas(params, model.get_model_object("model_sampling")).float()
        return io.NodeOutput(schedules.with_final_zero(sigmas) if append_zero else sigmas)


class LoadEPDParams(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadEPDParams", display_name="Load EPD Params", category=CATEGORY,
            description="Load a parameter table (.safetensors) from models/epd_params/ or the pack's pretrained_params/.",
            inputs=[io.Combo.Input("name", options=table_files(), tooltip="Parameter file; press R to refresh the list.")],
            outputs=[EPDParamsType.Output(display_name="EPD_PARAMS")],
        )

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        params = load_table(name)
        return io.NodeOutput(params, ui={"text": [params.describe()]})


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,120}$")


def table_stem(name: str) -> str:
    """A table's file name without .safetensors, refused unless it is a plain name (no folders, no '..')."""
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    if not _SAFE_NAME.match(stem) or ".." in stem:
        raise EPDParamsError(f"'{name}' is not a plain file name; use letters, digits, '_', '-', '.' only")
    return stem


def save_table(params: EPDParams, name: str):
    """Save into models/epd_params/ under a plain file name (no folders: nothing outside it is touched)."""
    return params.save(output_dir() / f"{table_stem(name)}.safetensors")


class SaveEPDParams(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveEPDParams", display_name="Save EPD Params", category=CATEGORY, is_output_node=True,
            description="Save a parameter table to models/epd_params/<name>.safetensors (atomic write).",
            inputs=[EPDParamsType.Input("params", tooltip="The table to save."),
                    io.String.Input("name", default="my_epd_table", tooltip="File name, without folder.")],
            outputs=[],
        )

    @classmethod
    def execute(cls, params, name) -> io.NodeOutput:
        path = save_table(params, name)
        return io.NodeOutput(ui={"text": [f"saved {path.name}: {params.describe()}"]})


PARAMS_NODES = [EPDSampler, EPDSigmas, LoadEPDParams, SaveEPDParams]
