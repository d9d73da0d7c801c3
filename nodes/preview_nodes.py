"""Preview EPD Params: a picture of what a table learned."""
from __future__ import annotations


from epd_core.sampling.plan import own_sigmas
from .compat import io, ui
from .sockets import EPDParamsType
from .plotting import table_picture, to_image_tensor


class PreviewEPDParams(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PreviewEPDParams", display_name="Preview EPD Params", category="sampling/epd",
            is_output_node=True,
            description="Draws a parameter table: for every step, where its K points sit between sigma_i and "
                        "sigma_(i+1) on a log-sigma axis, with their weights and scales.",
            inputs=[EPDParamsType.Input("params", tooltip="The table to draw."),
                    io.Model.Input("model", optional=True,
                                   tooltip="Optional: draw on this model's sigmas (needed for 'discrete' tables "
                                           "that did not record their sigmas).")],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, params, model=None) -> io.NodeOutput:
        sigmas = params.schedule_sigmas
        if sigmas is None and model is not None and params.schedule.get("type"):
            sigmas = own_sigmas(params, model.get_model_object("model_sampling"))
        image = to_image_tensor(table_picture(params, sigmas))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


PREVIEW_NODES = [PreviewEPDParams]
