"""ComfyUI nodes for the pack's embedded demo diffusion models (epd_core/demo/models.py): 28x28 MNIST digits
(the default) and 8x8 digits, 1-channel "latents", SD1.5's discrete schedule. With them a complete workflow
(loader -> class conditioning -> EmptyLatentImage 224x224 (64x64 for 8x8) -> KSampler / SamplerCustomAdvanced ->
decode -> preview) runs on a CPU in seconds, with no checkpoint to download, which is what the example workflows
and the end-to-end tests use.

The model is a genuine ComfyUI model: a ModelPatcher around a BaseModel (EPS, ModelSamplingDiscrete with
SD1.5's betas), so every built-in sampler, scheduler, CFG, denoise < 1, inpainting and model patch applies.
"""
from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
from .compat import io

from epd_core.demo.models import (DEMO_MODELS, LINEAR_END, LINEAR_START, NULL_LABEL, NUM_CLASSES, NUM_TIMESTEPS,
                                  label_context, load_demo_model)

CATEGORY = "sampling/epd/demo"


class DemoLatentFormat(comfy.latent_formats.LatentFormat):
    """1 channel, no scaling: the latent is the digit image in [-1, 1]. EmptyLatentImage makes 4 zero
    channels; comfy.sample.fix_empty_latent_channels cuts an all-zero latent to latent_channels."""
    latent_channels = 1
    scale_factor = 1.0

    def __init__(self):
        # grey live previews: Latent2RGB maps the channel to R=G=B, preview_to_image maps [-1, 1] to 0..255
        self.latent_rgb_factors = [[1.0, 1.0, 1.0]]


# the loader's choices -> DEMO_MODELS keys
MODEL_CHOICES = {"MNIST 28x28": "mnist", "digits 8x8": "digits"}


class DemoDigitsConfig(comfy.supported_models_base.BASE):
    epd_family = "epd_demo_digits"  # the model_family its tables carry (set per instance for MNIST)
    # BaseModel must not build a UNet from this config: the loaded DemoUNet is assigned afterwards
    unet_config = {"disable_unet_model_creation": True, "in_channels": 1}
    unet_extra_config = {}
    # ModelSamplingDiscrete reads these: SD1.5's scaled_linear betas, so all schedulers apply unchanged
    sampling_settings = {"beta_schedule": "linear", "linear_start": LINEAR_START, "linear_end": LINEAR_END,
                         "timesteps": NUM_TIMESTEPS}
    latent_format = DemoLatentFormat
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0


class DemoDigitsModel(comfy.model_base.BaseModel):
    """BaseModel (EPS prediction) whose diffusion_model is the demo DemoUNet. BaseModel.apply_model passes
    the CONDITIONING tensor as `context=` (tiled to the batch by repeat_to_batch_size)."""

    def __init__(self, net: torch.nn.Module, device=None, family: str = "epd_demo_digits"):
        config = DemoDigitsConfig(DemoDigitsConfig.unet_config)
        config.epd_family = family
        super().__init__(config, model_type=comfy.model_base.ModelType.EPS, device=device)
        self.diffusion_model = net


def build_demo_model_patcher(path=None, which: str = "digits") -> comfy.model_patcher.ModelPatcher:
    """The MODEL output of the loader: the shipped weights of `which` ("mnist" / "digits", or the file `path`)
    in a ModelPatcher, kept on the offload device until a sampler loads it (comfy.model_management moves it to
    the torch device)."""
    spec = DEMO_MODELS[which]
    model = DemoDigitsModel(load_demo_model(path or spec["weights"]), family=spec["family"])
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def demo_conditioning(label: int) -> list:
    """CONDITIONING for one label (0..9 digit, 10 = null): [[context (1, 1, 16), {}]]."""
    return [[label_context([label]), {}]]


class EPDDemoModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDDemoModelLoader",
            display_name="EPD Demo Model Loader",
            category=CATEGORY,
            description="Loads a small class-conditional digits diffusion model embedded in the EPD pack (SD1.5's "
                        "discrete noise schedule, eps prediction, the latent is the grey-scale image itself). "
                        "MNIST 28x28 (750K parameters): use an EmptyLatentImage of 224x224 (a 28x28 latent). "
                        "digits 8x8 (450K parameters, fast tests): EmptyLatentImage 64x64. Then EPD Demo Class "
                        "Conditioning for positive/negative and EPD Demo Decode to see the result. Runs on a CPU in "
                        "seconds.",
            inputs=[io.Combo.Input("model", options=list(MODEL_CHOICES), default="MNIST 28x28",
                                   tooltip="MNIST 28x28 (the default demo) or the tiny 8x8 digits model.")],
            outputs=[io.Model.Output(tooltip="The demo diffusion model, usable by every sampler node.")],
        )

    @classmethod
    def execute(cls, model="MNIST 28x28") -> io.NodeOutput:
        if model not in MODEL_CHOICES:
            raise ValueError(f"unknown demo model {model!r}; choose one of {list(MODEL_CHOICES)}")
        return io.NodeOutput(build_demo_model_patcher(which=MODEL_CHOICES[model]))


class EPDDemoConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDDemoConditioning",
            display_name="EPD Demo Class Conditioning",
            category=CATEGORY,
            description="Conditioning for the EPD demo model: 'positive' asks for the chosen digit, 'negative' "
                        "is the model's unconditional (null) class, the usual negative for "
                        "classifier-free guidance (CFG about 2 works well).",
            inputs=[
                io.Int.Input("digit", default=3, min=0, max=NUM_CLASSES - 1,
                             tooltip="The digit (0-9) to generate."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive",
                                       tooltip="Conditioning on the chosen digit."),
                io.Conditioning.Output("negative", display_name="negative",
                                       tooltip="Unconditional (null class) conditioning, for CFG's negative."),
            ],
        )

    @classmethod
    def execute(cls, digit: int) -> io.NodeOutput:
        if not 0 <= digit < NUM_CLASSES:
            raise ValueError(f"digit must be 0..{NUM_CLASSES - 1}, got {digit}")
        return io.NodeOutput(demo_conditioning(digit), demo_conditioning(NULL_LABEL))


class EPDDemoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDDemoDecode",
            display_name="EPD Demo Decode",
            category=CATEGORY,
            description="Turns EPD demo model latents (1x28x28 or 1x8x8, the digit itself in [-1, 1]) into a "
                        "visible image: white digit on black, enlarged with nearest-neighbour upscaling.",
            inputs=[
                io.Latent.Input("samples", tooltip="Latents sampled with the EPD demo model."),
                io.Int.Input("scale", default=4, min=1, max=64,
                             tooltip="Integer upscale factor (4 turns a 28x28 digit into 112x112 pixels, 8 an 8x8 "
                                     "digit into 64x64)."),
            ],
            outputs=[io.Image.Output(tooltip="Images (batch, height, width, 3) in [0, 1].")],
        )

    @classmethod
    def execute(cls, samples, scale: int) -> io.NodeOutput:
        x = samples["samples"]
        if x.dim() != 4:
            raise ValueError(f"expected image latents (batch, channels, height, width), got shape {tuple(x.shape)}")
        # the demo latent has one channel; an unsampled EmptyLatentImage still has 4 identical zero channels
        img = ((x[:, :1].float() + 1) / 2).clamp(0, 1)
        img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest")
        return io.NodeOutput(img.movedim(1, -1).expand(-1, -1, -1, 3).contiguous().cpu())


DEMO_NODES = [EPDDemoModelLoader, EPDDemoConditioning, EPDDemoDecode]
