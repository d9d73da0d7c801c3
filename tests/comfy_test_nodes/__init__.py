"""Test-only ComfyUI nodes (never shipped to users): a MODEL patch that logs every diffusion-model call
(batch size, sigmas, and the batch of each tensor condition) to $EPD_TEST_LOG_DIR/<tag>.jsonl, so tests can
count calls through a real server."""
import json
import os

from comfy_api.latest import ComfyExtension, io


class EPDTestCallLogger(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="EPDTestCallLogger", category="testing/epd",
                         inputs=[io.Model.Input("model"), io.String.Input("tag", default="calls")],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, tag) -> io.NodeOutput:
        folder = os.environ.get("EPD_TEST_LOG_DIR", "epd_test_calls")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{tag}.jsonl")

        def wrapper(apply_model, args):
            x, t = args["input"], args["timestep"]
            with open(path, "a") as f:
                # cond_batches: the batch of every tensor condition (c_crossattn, SDXL's y, ...), which must
                # follow x when the K points share one call
                cond_batches = {k: int(v.shape[0]) for k, v in args["c"].items() if hasattr(v, "shape") and v.ndim}
                f.write(json.dumps({"batch": int(x.shape[0]), "sigmas": [float(s) for s in t.flatten()],
                                    "cond_or_uncond": list(args.get("cond_or_uncond", [])),
                                    "cond_batches": cond_batches}) + "\n")
            return apply_model(x, t, **args["c"])

        patched = model.clone()
        patched.set_model_unet_function_wrapper(wrapper)
        return io.NodeOutput(patched)


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [EPDTestCallLogger]


async def comfy_entrypoint():
    return _Extension()
