"""Nodes over parameter tables: EPD Sampler (SAMPLER), EPD Sigmas (SIGMAS), Load / Save EPD Params."""
from __future__ import annotations

import logging

import comfy.samplers

from epd_core.tables.params import EPDParams
from epd_core.runtime import log_once
from epd_core.sampling.plan import sampler_sigmas
from epd_core.sampling.registry import NAMES as SOLVER_NAMES
from epd_core.sampling.registry import SOLVERS, variant

from .compat import io
from .privacy import private_errors
from .sockets import CATEGORY, EPDParamsType
from .samplers import patcher_of, run_guarded
from .tables import load_table, model_family, save_table, table_files

AFS_CHOICES, EXECUTION_CHOICES = ("auto", "on", "off"), ("auto", "batched", "sequential")


class EPDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDSampler", display_name="EPD Sampler", category=CATEGORY,
            description="EPD-Solver / EPD-Plugin as a SAMPLER for SamplerCustomAdvanced: each step evaluates the "
                        "model at K learned points in ONE batched call, so an image needs about half the "
                        "sequential model calls. Pair it with EPD Sigmas for the table's exact schedule.",
            inputs=[
                EPDParamsType.Input("params", tooltip="A parameter table (Load EPD Params, EPD Trainer, Import EPD "
                                                      "Predictor)."),
                io.Combo.Input("solver", options=["auto", *SOLVER_NAMES], default="auto",
                               tooltip="auto: the solver the table was trained for (another one runs only a "
                                       "table of the same kind). " + " ".join(
                                           f"{v.name} ({v.title}): {v.description}." for v in SOLVERS.values())),
                io.Int.Input("max_order", default=0, min=0, max=4,
                             tooltip="EPD-Plugin predictor order (1-4); 0 = the table's own."),
                io.Combo.Input("afs", options=list(AFS_CHOICES), default="auto",
                               tooltip="Analytic first step (saves one model call); auto = as trained."),
                io.Combo.Input("execution", options=list(EXECUTION_CHOICES), default="auto",
                               tooltip="auto: one batched call for the K points, sequential when the graph needs "
                                       "it (inpainting, timestep ranges, ControlNet ranges...)."),
                io.Int.Input("max_batch", default=0, min=0, max=4096,
                             tooltip="Max samples per model call for the K points (0 = no limit). Lower it to "
                                     "save memory; out-of-memory also splits automatically."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, params, solver, max_order, afs, execution, max_batch) -> io.NodeOutput:
        # ComfyUI 0.3.75 does not check V3 dropdown values: a queued graph can send any string
        for name, value, options in (("solver", solver, ("auto", *SOLVER_NAMES)), ("afs", afs, AFS_CHOICES),
                                     ("execution", execution, EXECUTION_CHOICES)):
            if value not in options:
                raise ValueError(f"EPD Sampler: {name} {str(value)[:40]!r} is not one of {', '.join(options)}")
        solver = params.solver if solver == "auto" else solver
        opts = {"execution": execution}
        if afs != "auto":
            opts["afs"] = afs == "on"
        if max_batch:
            opts["max_batch"] = max_batch
        if max_order and variant(solver).default_order > 1:  # a variant with a multistep predictor
            opts["max_order"] = max_order

        node_id = cls.hidden.unique_id if cls.hidden else None

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
            warn_other_family(params, patcher_of(model))
            # at a CFG where the table was measured to lose to the best built-in: that built-in, said on the node
            return run_guarded(solver, [(params, "the connected table")], model, x, sigmas, extra_args, callback,
                               disable, node_id=node_id, **{**opts, **kw})
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample))


def warn_other_family(params: EPDParams, patcher, node: str = "EPD Sampler") -> None:
    """Log once when a table trained for one model family is used with another (e.g. an eps table on a model
    patched to flow prediction): allowed, as the user connected it, but rarely what was meant."""
    trained = params.metadata.get("model_family")
    if not trained or patcher is None:
        return
    family = model_family(patcher)
    if family != trained:
        log_once(("other family", node, trained, family), logging.WARNING,
                 f"{node}: the table was trained for the model family '{trained}', but the model is "
                 f"'{family}'; its rows may not fit this model (use a table trained for '{family}')")


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
                                 tooltip="End with sigma 0 (a final Euler step, one more model call), as "
                                         "ComfyUI's schedulers do."),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS")],
        )

    @classmethod
    def execute(cls, model, params, append_zero) -> io.NodeOutput:
        warn_other_family(params, model, "EPD Sigmas")
        return io.NodeOutput(sampler_sigmas(params, model.get_model_object("model_sampling"), append_zero).float())


class LoadEPDParams(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadEPDParams", display_name="Load EPD Params", category=CATEGORY,
            description="Load a parameter table (.safetensors) from models/epd_params/ or the pack's "
                        "pretrained_params/.",
            inputs=[io.Combo.Input("name", options=table_files(),
                                   tooltip="Parameter file; press R to refresh the list.")],
            outputs=[EPDParamsType.Output(display_name="EPD_PARAMS")],
        )

    @classmethod
    def execute(cls, name) -> io.NodeOutput:
        params = load_table(name)
        return io.NodeOutput(params, ui={"text": [params.describe()]})


class SaveEPDParams(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveEPDParams", display_name="Save EPD Params", category=CATEGORY, is_output_node=True,
            description="Save a parameter table to models/epd_params/<name>.safetensors (atomic write). An "
                        "existing table is replaced only with overwrite on; the pack's own table names and tables "
                        "the operator protected are never replaced.",
            inputs=[EPDParamsType.Input("params", tooltip="The table to save."),
                    io.String.Input("name", default="my_epd_table", tooltip="File name, without folder."),
                    io.Boolean.Input("overwrite", default=False, optional=True,
                                     tooltip="Replace an existing table of that name (off: an existing name is an "
                                             "error).")],
            outputs=[],
        )

    @classmethod
    @private_errors
    def execute(cls, params, name, overwrite=False) -> io.NodeOutput:
        path = save_table(params, name, overwrite=overwrite)
        return io.NodeOutput(ui={"text": [f"saved {path.name}: {params.describe()}"]})


PARAMS_NODES = [EPDSampler, EPDSigmas, LoadEPDParams, SaveEPDParams]
