"""The embedded demo diffusion model (epd_core/demo/models.py) and its ComfyUI nodes (nodes/demo_nodes.py).

- the shipped weights load (and broken files fail clearly),
- samples of the stand-alone DemoDenoiser look like the requested digits (a classifier fitted on the real
  digits recognises them),
- DemoDenoiser gives exactly what ComfyUI computes with the loader node's MODEL: one apply_model call, and
  whole KSampler runs with CFG, a batch larger than the conditioning batch, EmptyLatentImage's 4 channels,
  denoise < 1 and an inpainting mask.
"""
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_dtype

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from epd_core.demo.models import (DEFAULT_WEIGHTS, NULL_LABEL, DemoDenoiser, DemoModelError,  # noqa: E402
                                  DemoUNet, demo_sigmas, karras_sigmas, label_context, load_demo_model,
                                  sample_heun, to_digit_pixels)



@pytest.fixture(autouse=True)
def float32_default():
    """Other test modules switch the default dtype to float64; these tests mirror ComfyUI's float32 run."""
    with default_dtype(torch.float32):
        yield


@pytest.fixture(scope="module")
def net():
    return load_demo_model()


@pytest.fixture(scope="module")
def digit_classifier():
    """5-nearest-neighbour classifier of the real digits (96% cross-validated accuracy; fits instantly)."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier
    d = load_digits()
    return KNeighborsClassifier(n_neighbors=5).fit(d.data / 16, d.target)


@pytest.fixture(scope="module")
def comfyui():
    """ComfyUI's modules (CPU) and the pack's demo node module, imported in-process."""
    from conftest import import_pack_nodes
    nodes = import_pack_nodes("demo_nodes")["demo_nodes"]
    import comfy.sample
    import comfy.samplers
    return types.SimpleNamespace(sample=comfy.sample, samplers=comfy.samplers, nodes=nodes)


@pytest.fixture(scope="module")
def patcher(comfyui):
    return comfyui.nodes.EPDDemoModelLoader.execute("digits 8x8").result[0]


def classify(clf, x):
    return clf.predict(to_digit_pixels(x).numpy() / 16)


# ------------------------------------------------------------------------------------------- weights

def test_shipped_weights_load_and_are_small(net):
    assert isinstance(net, DemoUNet) and not net.training
    params = sum(p.numel() for p in net.parameters())
    assert 100_000 < params < 600_000
    assert DEFAULT_WEIGHTS.stat().st_size < 3_000_000
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    out = net(torch.zeros(2, 1, 8, 8), torch.tensor([10.0, 900.0]), label_context([3, NULL_LABEL]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_missing_or_corrupt_weights_fail_clearly(tmp_path):
    with pytest.raises(DemoModelError, match="not found"):
        load_demo_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(DemoModelError, match="corrupt"):
        load_demo_model(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(DEFAULT_WEIGHTS.read_bytes()[:5000])
    with pytest.raises(DemoModelError):
        load_demo_model(truncated)


def test_label_context_and_schedule():
    ctx = label_context([0, 9, NULL_LABEL, -1])
    assert ctx.shape == (4, 1, 16)
    assert ctx[:, 0].argmax(1).tolist() == [0, 9, NULL_LABEL, NULL_LABEL] and (ctx.sum(-1) == 1).all()
    with pytest.raises(ValueError):
        label_context([11])
    s = demo_sigmas()
    assert s.shape == (1000,) and (s[1:] > s[:-1]).all()
    assert s[0].item() == pytest.approx(0.029168, rel=1e-4) and s[-1].item() == pytest.approx(14.6146, rel=1e-4)


# ----------------------------------------------------------------------------------------- quality

def test_guided_samples_are_the_requested_digits(net, digit_classifier):
    den = DemoDenoiser(net, cfg=2.0)
    labels = torch.arange(10).repeat_interleave(6)
    sigmas = karras_sigmas(30, den.sigma_min, den.sigma_max)
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(123))
    x = sample_heun(den, noise * sigmas[0], sigmas, cond=labels)
    assert x.abs().max() < 1.5  # in the data range, not blown up
    acc = (classify(digit_classifier, x) == labels.numpy()).mean()
    assert acc >= 0.8, f"only {acc:.2f} of the samples are recognised as the requested digit"


def test_unconditional_samples_are_digits_of_many_classes(net, digit_classifier):
    """The null label (CFG's negative) was trained too: unguided samples cover the classes."""
    den = DemoDenoiser(net)
    sigmas = karras_sigmas(20, den.sigma_min, den.sigma_max)
    noise = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    x = sample_heun(den, noise * sigmas[0], sigmas, cond=NULL_LABEL)
    probs = digit_classifier.predict_proba(to_digit_pixels(x).numpy() / 16)
    assert len(set(probs.argmax(1).tolist())) >= 7
    assert np.median(probs.max(1)) >= 0.8  # most neighbours agree: each looks like some digit


def test_stacked_points_tile_conditioning_point_major(net):
    """x with K x the cond batch: cond is repeated (all B samples of point 1, then point 2), like ComfyUI."""
    den = DemoDenoiser(net, cfg=2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g) * 3
    labels = torch.tensor([1, 5, 8])
    sig = torch.tensor([2.0, 2.0, 2.0])
    one = den(x, sig, cond=labels)
    stacked = den(torch.cat([x, x]), torch.cat([sig, sig * 0.5]), cond=labels)
    torch.testing.assert_close(stacked[:3], one, rtol=0, atol=1e-5)
    torch.testing.assert_close(stacked[3:], den(x, sig * 0.5, cond=labels), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        den(torch.cat([x, x[:1]]), torch.full((4,), 2.0), cond=labels)


# ------------------------------------------------------------------------------- ComfyUI equivalence

def test_sigmas_equal_comfyui_model_sampling(patcher):
    ms = patcher.get_model_object("model_sampling")
    assert torch.equal(ms.sigmas.cpu(), demo_sigmas())


def test_denoiser_equals_comfyui_apply_model(patcher, net):
    """Sigmas on, between and beyond the table's entries, a different label per sample."""
    model = patcher.model
    labels = torch.tensor([0, 3, 7, NULL_LABEL, 9, 2])
    sigma = torch.tensor([14.6146, 7.3, 1.0, 0.25, 0.0301, 0.02917])
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * sigma.view(-1, 1, 1, 1).clamp(min=1)
    with torch.no_grad():
        ref = model.apply_model(x, sigma, c_crossattn=label_context(labels))
    ours = DemoDenoiser(net)(x, sigma, cond=labels)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert torch.equal(DemoDenoiser(net).timestep(sigma), model.model_sampling.timestep(sigma))


def test_ksampler_cfg_run_equals_denoiser_with_batch_larger_than_conditioning(comfyui, patcher, net):
    """comfy.sample.sample (what KSampler runs): heun / karras, CFG 2, latent batch 4 against positive and
    negative conditioning of batch 2 (tiled by repeat_to_batch_size), EmptyLatentImage's 4 zero channels."""
    steps, cfg = 8, 2.0
    cond_labels = torch.tensor([4, 6])
    positive = [[label_context(cond_labels), {}]]
    negative = comfyui.nodes.EPDDemoConditioning.execute(digit=0).result[1]
    empty = torch.zeros(4, 4, 8, 8)  # EmptyLatentImage(64, 64, batch 4)
    latent = comfyui.sample.fix_empty_latent_channels(patcher, empty)
    assert latent.shape == (4, 1, 8, 8)
    noise = comfyui.sample.prepare_noise(latent, 42)
    out = comfyui.sample.sample(patcher, noise, steps, cfg, "heun", "karras", positive, negative, latent,
                                disable_pbar=True, seed=42)

    sigmas = comfyui.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "karras", steps).cpu()
    x = noise * (1 + sigmas[0] ** 2) ** 0.5  # EPS.noise_scaling at full denoise ("max_denoise")
    ref = sample_heun(DemoDenoiser(net, cfg=cfg), x, sigmas, cond=cond_labels)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_partial_denoise_and_inpaint_mask_run(comfyui, patcher, digit_classifier):
    """denoise < 1 starts from the given latent (KSamplerX0Inpaint path with a mask): the masked-out half
    stays the input, and the result is still a clean digit of the input's class."""
    from sklearn.datasets import load_digits
    d = load_digits()
    idx = [int(np.flatnonzero(d.target == c)[0]) for c in (2, 5)]
    latent = torch.tensor(d.images[idx], dtype=torch.float32).unsqueeze(1) / 8 - 1
    negative = comfyui.nodes.EPDDemoConditioning.execute(digit=2).result[1]
    positive = [[label_context([2, 5]), {}]]  # one label per sample
    noise = comfyui.sample.prepare_noise(latent, 0)
    out = comfyui.sample.sample(patcher, noise, 10, 2.0, "euler", "normal", positive, negative, latent,
                                denoise=0.5, disable_pbar=True, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert (classify(digit_classifier, out) == np.array([2, 5])).all()

    mask = torch.ones(2, 8, 8)
    mask[:, :, :4] = 0  # keep the left half
    out = comfyui.sample.sample(patcher, noise, 10, 2.0, "euler", "normal", positive, negative, latent,
                                denoise=0.7, noise_mask=mask, disable_pbar=True, seed=0)
    torch.testing.assert_close(out[..., :4], latent[..., :4], rtol=0, atol=1e-5)
    assert not torch.allclose(out[..., 4:], latent[..., 4:], atol=1e-3)


# ---------------------------------------------------------------------------------------------- nodes

def test_node_schemas(comfyui):
    assert [n.GET_SCHEMA().node_id for n in comfyui.nodes.DEMO_NODES] == [
        "EPDDemoModelLoader", "EPDDemoConditioning", "EPDDemoDecode"]
    for node in comfyui.nodes.DEMO_NODES:
        schema = node.GET_SCHEMA()
        assert schema.category == "sampling/epd/demo" and schema.description and schema.display_name
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"


def test_nodes_end_to_end(comfyui, digit_classifier):
    """Loader -> class conditioning -> EmptyLatentImage (4 channels) -> KSampler -> decode, as in a graph."""
    model = comfyui.nodes.EPDDemoModelLoader.execute("digits 8x8").result[0]
    assert isinstance(model, sys.modules["comfy.model_patcher"].ModelPatcher)
    positive, negative = comfyui.nodes.EPDDemoConditioning.execute(digit=7).result
    with pytest.raises(ValueError):
        comfyui.nodes.EPDDemoConditioning.execute(digit=10)
    latent = comfyui.sample.fix_empty_latent_channels(model, torch.zeros(3, 4, 8, 8))
    noise = comfyui.sample.prepare_noise(latent, 5)
    samples = comfyui.sample.sample(model, noise, 12, 2.0, "dpmpp_2m", "karras", positive, negative, latent,
                                    disable_pbar=True, seed=5)
    assert (classify(digit_classifier, samples) == 7).all()
    image = comfyui.nodes.EPDDemoDecode.execute(samples={"samples": samples}, scale=8).result[0]
    assert image.shape == (3, 64, 64, 3) and image.min() >= 0 and image.max() <= 1
    # nearest upscale of (x + 1) / 2, grey (R = G = B)
    torch.testing.assert_close(image[:, ::8, ::8, 1], ((samples[:, 0] + 1) / 2).clamp(0, 1))
    assert torch.equal(image[..., 0], image[..., 2])
