"""Every prediction type of the newest comfy/model_sampling.py (docs/compatibility.md, "Prediction types"), on the
installed ComfyUI 0.3.75: its real classes and nodes where 0.3.75 has them (EPS, V_PREDICTION, EDM, CONST, X0,
IMG_TO_IMG, COSMOS_RFLOW, LCM), minimal stand-ins with the newest behaviour where it does not (V_PREDICTION_DDPM,
IMG_TO_IMG_FLOW, IMG_TO_IMG_VELOCITY, ModelSamplingAV, CONST's noise_scale).

Supported kinds are checked through ComfyUI's own denoised wrapper: the demo EPS network is re-parameterized to
output what the kind expects, so EPD on the re-parameterized model must give the EPS model's image. Image-to-image
kinds must be refused with a message, and few-step distilled models get one warning line."""
import importlib
import logging

import pytest
import torch

from epd_core.params import EPDParams

import test_newest_comfyui as newest
from test_newest_comfyui import conds, demo_patcher, distill_small, run_epd_sampler

pack, one_thread = newest.pack, newest.one_thread  # the same fixtures: ComfyUI and the pack, in-process


@pytest.fixture(scope="module")
def tables(pack):
    return importlib.import_module(pack.compat.__name__.rsplit(".", 1)[0] + ".tables")


# ---------------------------------------------- stand-ins for what the newest comfy/model_sampling.py adds
def newest_kinds():
    """The newest ComfyUI's prediction mix-ins 0.3.75 lacks, written from their definitions (class names as
    upstream, since the pack recognises a kind by its class name)."""
    import comfy.model_sampling as ms

    def column(sigma, like):
        return sigma.view(sigma.shape[:1] + (1,) * (like.ndim - 1)) if sigma.nelement() > 1 else sigma.view(())

    class V_PREDICTION_DDPM:  # CogVideoX: the network sees the raw x and predicts v
        def calculate_input(self, sigma, noise):
            return noise

        def calculate_denoised(self, sigma, model_output, model_input):
            s = column(sigma, model_output)
            return (model_input - model_output * s) / (s * s + 1.0) ** 0.5

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            s = column(sigma, noise)
            return latent_image + noise * ((1.0 + s * s) ** 0.5 if max_denoise else s)

        def inverse_noise_scaling(self, sigma, latent):
            return latent

    class IMG_TO_IMG_FLOW(ms.CONST):  # predicts the result directly from the input latent, no noise added
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_output

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return latent_image

    class IMG_TO_IMG_VELOCITY(ms.CONST):  # Marigold v2: result = input - velocity, no noise added
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_input - model_output

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return latent_image

    class ModelSamplingAV(ms.ModelSamplingDiscreteFlow):  # audio-video latents: the audio part has its own shift
        def __init__(self, model_config=None):
            super().__init__(model_config)
            self.audio_shift = None

        def set_parameters(self, shift=1.0, audio_shift=None, timesteps=1000, multiplier=1000):
            self.audio_shift = audio_shift
            super().set_parameters(shift=shift, timesteps=timesteps, multiplier=multiplier)

    return V_PREDICTION_DDPM, IMG_TO_IMG_FLOW, IMG_TO_IMG_VELOCITY, ModelSamplingAV


def newest_const_noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
    """The newest CONST.noise_scaling: the noise is multiplied by the model's noise_scale (default 1)."""
    s = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1)) if sigma.nelement() > 1 else sigma.view(())
    return s * (getattr(self, "noise_scale", 1.0) * noise) + (1.0 - s) * latent_image


def patched(patcher, base, kind, **params):
    """The patcher with model_sampling replaced as ComfyUI's ModelSampling* nodes do it (an object patch of a
    class mixing the schedule `base` with the prediction `kind`)."""
    cls = type("ModelSamplingAdvanced", (base, kind), {})
    ms = cls(patcher.model.model_config)
    for name, value in params.items():
        if name == "noise_scale":
            ms.noise_scale = float(value)
        else:
            ms.set_parameters(**{name: value})
    m = patcher.clone()
    m.add_object_patch("model_sampling", ms)
    return m


def reparameterized(patcher, kind):
    """The demo EPS network made to output what prediction `kind` expects ('x0': the clean image; 'v_ddpm': the
    DDPM velocity from the raw input), so that ComfyUI's calculate_denoised gives the EPS model's denoised."""
    eps_net = patcher.model.diffusion_model

    class AsKind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = eps_net

        @property
        def dtype(self):
            return self.net.dtype

        def forward(self, xc, timestep, transformer_options={}, **kw):
            sig = transformer_options["sigmas"].to(xc)
            sig = sig.repeat(xc.shape[0] // sig.shape[0]).view(-1, *([1] * (xc.ndim - 1)))  # cond/uncond chunks
            root = (sig * sig + 1.0) ** 0.5
            x = xc * root if kind == "x0" else xc  # X0 scales the input like EPS; V_PREDICTION_DDPM does not
            eps = self.net(x / root, timestep, transformer_options=transformer_options, **kw)
            x0 = x - eps * sig
            return x0 if kind == "x0" else (x / root - x0) * root / sig
    m = patcher.clone()
    m.add_object_patch("diffusion_model", AsKind())
    return m


# =================================================================================================== tests

def test_every_prediction_kind_is_named(pack):
    import comfy.model_sampling as ms
    from comfy_extras.nodes_model_advanced import LCM
    ddpm, i2i_flow, i2i_velocity, av = newest_kinds()
    expected = [(ms.EPS, ms.ModelSamplingDiscrete, "eps"), (ms.V_PREDICTION, ms.ModelSamplingDiscrete, "v"),
                (ms.EDM, ms.ModelSamplingContinuousEDM, "edm"), (ms.CONST, ms.ModelSamplingDiscreteFlow, "flow"),
                (ms.CONST, ms.ModelSamplingFlux, "flow"), (ms.X0, ms.ModelSamplingDiscrete, "x0"),
                (ms.IMG_TO_IMG, ms.ModelSamplingDiscrete, "img2img"),
                (ms.COSMOS_RFLOW, ms.ModelSamplingCosmosRFlow, "cosmos_rflow"), (LCM, ms.ModelSamplingDiscrete, "eps"),
                (ddpm, ms.ModelSamplingDiscrete, "v_ddpm"), (i2i_flow, ms.ModelSamplingDiscreteFlow, "img2img_flow"),
                (i2i_velocity, ms.ModelSamplingDiscreteFlow, "img2img_velocity"), (ms.CONST, av, "flow")]
    for kind, base, name in expected:
        obj = type("ModelSampling", (base, kind), {})()
        assert pack.compat.prediction_type(obj) == name, (kind.__name__, base.__name__)
    assert pack.compat.prediction_type(object()) is None


@pytest.mark.parametrize("kind", ["x0", "v_ddpm"])
def test_x0_and_ddpm_v_models_sample_through_comfyuis_denoised(pack, tables, one_thread, kind):
    """X0 (ComfyUI's real class) and V_PREDICTION_DDPM (stand-in): EPD gets the denoised from ComfyUI's own
    wrapper, so a model re-parameterized to the kind samples exactly the EPS model's image."""
    import comfy.model_sampling as ms
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    patcher = demo_patcher(pack)
    reference = run_epd_sampler(pack, patcher)
    if kind == "x0":
        model = reparameterized(ModelSamplingDiscrete().patch(patcher, "x0", False)[0], "x0")
    else:
        model = reparameterized(patched(patcher, ms.ModelSamplingDiscrete, newest_kinds()[0]), "v_ddpm")
    assert pack.compat.prediction_problem(model) is None
    assert tables.model_family(model) == f"epd_demo_digits_{kind}"
    out = run_epd_sampler(pack, model)
    assert torch.allclose(out, reference, atol=2e-4), (out - reference).abs().max()


def test_av_sampling_is_single_schedule_flow(pack, tables, one_thread):
    """ModelSamplingAV is flow whose audio part has its own shift, carried on the video schedule: EPD treats it as
    the plain flow model of the same shift (same family, same image)."""
    import comfy.model_sampling as ms
    av = newest_kinds()[3]
    patcher = demo_patcher(pack)
    flow = patched(patcher, ms.ModelSamplingDiscreteFlow, ms.CONST, shift=3.0)
    audio_video = patched(patcher, av, ms.CONST, shift=3.0)
    audio_video.get_model_object("model_sampling").set_parameters(shift=3.0, audio_shift=1.5)
    assert tables.model_family(audio_video) == tables.model_family(flow) == "epd_demo_digits_flow"
    assert pack.compat.model_problem(audio_video) is None
    assert torch.equal(run_epd_sampler(pack, audio_video), run_epd_sampler(pack, flow))


def test_noise_scale_goes_through_comfyuis_noise_scaling(pack, tables, one_thread, monkeypatch):
    """CONST with the newest noise_scale: KSampler's starting latent is sigma * (scale * noise), and EPD must not
    redo that scaling itself, so a scale-2 model from noise n samples what the scale-1 model does from 2n. A
    patched noise scale is another family (a table for scale 1 is not picked silently)."""
    import comfy.model_sampling as ms
    monkeypatch.setattr(ms.CONST, "noise_scaling", newest_const_noise_scaling)
    patcher = demo_patcher(pack)
    one = patched(patcher, ms.ModelSamplingDiscreteFlow, ms.CONST, shift=3.0)
    two = patched(patcher, ms.ModelSamplingDiscreteFlow, ms.CONST, shift=3.0, noise_scale=2.0)
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    out_two = run_epd_sampler(pack, two)
    scaled = pack.compat.noise_scale(two.get_model_object("model_sampling"))
    assert scaled == 2.0 and pack.compat.noise_scale(one.get_model_object("model_sampling")) == 1.0
    # run_epd_sampler draws its noise from seed 5 (as `noise`); scale 1 with twice that noise
    import comfy.samplers
    pos, neg = conds(pack)
    guider = comfy.samplers.CFGGuider(one)
    guider.set_conds(pos, neg)
    guider.set_cfg(2.0)
    table = EPDParams.from_values(torch.full((4, 1), 0.5), torch.ones(4, 1))  # one midpoint: dpm_2
    sampler = comfy.samplers.KSAMPLER(lambda model, x, sigmas, extra_args=None, callback=None, disable=None:
                                      pack.samplers.run_epd("epd", model, x, sigmas, table, extra_args, callback,
                                                            disable))
    sigmas = comfy.samplers.calculate_sigmas(one.get_model_object("model_sampling"), "karras", 4)
    out_one = guider.sample(noise * 2.0, torch.zeros_like(noise), sampler, sigmas, seed=5)
    assert torch.allclose(out_two, out_one, atol=1e-5)
    assert not torch.allclose(out_two, run_epd_sampler(pack, one), atol=1e-3)  # the scale does change the image
    # family: a model whose own sampling is flow, patched to another noise scale
    base = demo_patcher(pack)
    base.model.model_sampling = one.get_model_object("model_sampling")
    rescaled = base.clone()
    rescaled.add_object_patch("model_sampling", two.get_model_object("model_sampling"))
    assert tables.model_family(base) == "epd_demo_digits"
    assert tables.model_family(rescaled) == "epd_demo_digits_noise2"


@pytest.mark.parametrize("which", ["img2img", "img2img_flow", "img2img_velocity"])
def test_image_to_image_models_are_refused_with_the_reason(pack, one_thread, which):
    import comfy.model_sampling as ms
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    patcher = demo_patcher(pack)
    if which == "img2img":  # ComfyUI 0.3.75's own node and class
        model = ModelSamplingDiscrete().patch(patcher, "img_to_img", False)[0]
    else:
        _, i2i_flow, i2i_velocity, _ = newest_kinds()
        model = patched(patcher, ms.ModelSamplingDiscreteFlow, i2i_flow if which == "img2img_flow" else i2i_velocity,
                        shift=1.0)
    problem = pack.compat.model_problem(model)
    assert problem and "image-to-image" in problem and f"'{which}'" in problem
    with pytest.raises(RuntimeError, match=r"EPD: the model samples image-to-image .*euler"):
        run_epd_sampler(pack, model)
    with pytest.raises(RuntimeError, match=r"EPD Trainer: the model samples image-to-image"):
        distill_small(pack, model)


def few_step_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "few-step" in r.getMessage()]


def test_few_step_distilled_models_get_one_warning_line(pack, one_thread, monkeypatch, caplog):
    import epd_core.runtime
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    monkeypatch.setattr(epd_core.runtime, "_logged", set())
    caplog.set_level(logging.INFO, logger="epd")
    patcher = demo_patcher(pack)
    assert pack.compat.few_step_hint(patcher) is None
    run_epd_sampler(pack, patcher)
    assert few_step_warnings(caplog) == []
    # LCM through ComfyUI's own ModelSamplingDiscrete node: a 50-entry timestep table and the LCM parameterization
    lcm = ModelSamplingDiscrete().patch(patcher, "lcm", False)[0]
    run_epd_sampler(pack, lcm)
    run_epd_sampler(pack, lcm)  # one line, not one per image
    lines = few_step_warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0] and "LCM" in lines[0], lines
    # FLUX.1 schnell is recognised by its model config
    schnell = demo_patcher(pack)
    config = schnell.model.model_config
    config.__class__ = type("FluxSchnell", (type(config),), {})
    assert "schnell" in pack.compat.few_step_hint(schnell)
    # a sampling whose sigma table was cut to a distillation's few timesteps
    cut = demo_patcher(pack)
    ms = cut.model.model_sampling
    ms.set_sigmas(ms.sigmas[::40].clone())
    assert "25 sigmas" in pack.compat.few_step_hint(cut)
    caplog.clear()
    distill_small(pack, cut)  # the trainer says it too, and still trains
    assert any(line.startswith("EPD Trainer: this model looks like a few-step") for line in few_step_warnings(caplog))


# ===================================================== docs/compatibility.md says what the code does

def test_compatibility_doc_matches_the_code(pack):
    """Sections 7 to 9 of docs/compatibility.md name every kind the pack recognises, every model config it warns
    about, the API version it pins and the ComfyUI version it declares; a change to one must change the other."""
    import tomllib
    doc = (newest.REPO / "docs" / "compatibility.md").read_text()
    section = lambda n: doc.split(f"### {n}.", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]  # noqa: E731
    kinds, distilled, api = section(7), section(8), section(9)
    for cls, _ in pack.compat.PREDICTIONS:
        assert f"`{cls}`" in kinds, cls
    for kind in pack.compat.IMAGE_TO_IMAGE:
        assert kind.replace("img2img", "IMG_TO_IMG").upper() in kinds.replace("`", "")
    assert "**refused**" in kinds
    for config in pack.compat._DISTILLED_CONFIGS:
        assert f"`{config}`" in distilled
    assert f"fewer than {pack.compat._FEW_SIGMAS} sigmas" in distilled
    pinned = pack.compat.PINNED_API.removeprefix("comfy_api.")
    assert f"The nodes stay on `comfy_api.{pinned}`" in api and "`custom_sampler`" in api
    for capability in ("denoise", "noise_like", "preview", "schedule_parameters"):
        assert f"`{capability}`" in api
    declared = tomllib.loads((newest.REPO / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    assert f"today {declared.removeprefix('>=')}" in api
