"""The pack inside a real ComfyUI server (main.py --cpu): KSampler `epd` / `epd_plugin`, SamplerCustomAdvanced
with EPD Sampler + EPD Sigmas, Load / Save EPD Params. Every output is compared with what epd_core computes
directly for the same noise, sigmas and table, and every model call is counted by a logging MODEL patch."""
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from bench.comfyui_server import PromptRejected, error_message
from epd_core.tables.params import EPDParams
from epd_core.sampling.registry import variant

pytestmark = pytest.mark.server
BATCH, DIGIT, CFG = 2, 3, 2.0


def base_graph(tag, batch=BATCH, digit=DIGIT):
    return {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "logged": {"class_type": "EPDTestCallLogger", "inputs": {"model": ["model", 0], "tag": tag}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": digit}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }


def ksampler(latent, sampler, steps, seed, scheduler="karras", denoise=1.0, model=("logged", 0), cfg=CFG):
    return {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
        "scheduler": scheduler, "positive": ["cond", 0], "negative": ["cond", 1], "latent_image": list(latent),
        "denoise": denoise}}


def save_latent(node, prefix):
    return {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": f"latents/{prefix}"}}


def read_latent(server, entry, node):
    return load_file(str(server.output_path(entry["outputs"][node]["latents"][0])))["latent_tensor"]


# ---- in-process reference (the `comfy_ref` fixture in conftest.py) ----------------------------------------
def reference(ref, solver, params, steps, seed, scheduler="karras", denoise=1.0, latent=None, sigmas=None, **opts):
    ms = ref["ms"]
    if sigmas is None:
        sigmas = ref["samplers"].KSampler(ref["stub"], steps, "cpu", solver, scheduler, denoise).sigmas
    latent = torch.zeros(BATCH, 1, 8, 8) if latent is None else latent
    noise = ref["sample"].prepare_noise(latent, seed)
    max_denoise = (math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5)
                   or float(sigmas[0]) > float(ms.sigma_max))
    x = ms.noise_scaling(sigmas[0], noise, latent, max_denoise)
    fn = variant(solver).sample_fn()
    with torch.no_grad():
        out = fn(ref["denoiser"], x, sigmas, params, extra_args={"cond": [DIGIT]}, disable=True, **opts)
    return ms.inverse_noise_scaling(sigmas[-1], out), sigmas


def chosen_table(server, solver, steps):
    log = server.log_path.read_text(errors="replace")
    m = re.findall(rf"EPD: {solver} on (\S+) with {steps} steps uses (.+)", log)
    assert m, f"no table choice logged for {solver} / {steps} steps:\n{server.log_tail()}"
    family, source = m[-1]
    if source.startswith("neutral table"):
        from epd_core.tables.params import EPDParams as P
        return family, P.from_values(torch.full((steps, 1), 0.5), torch.ones(steps, 1), solver=solver,
                                     max_order=3 if solver == "epd_plugin" else 1)
    for folder in (server.base / "models" / "epd_params", server.repo / "pretrained_params"):
        if (folder / source).exists():
            return family, EPDParams.load(folder / source)
    raise AssertionError(f"logged table {source} not found")


def batches(server, tag):
    return [c["batch"] for c in server.call_log(tag)]


@pytest.mark.parametrize("solver", ["epd", "epd_plugin"])
def test_ksampler_dropdown_matches_epd_core_and_batches_k_points(comfy_server, comfy_ref, solver):
    steps, seed, tag = 6, 1234, f"ks_{solver}"
    g = base_graph(tag)
    g["ks"] = ksampler(("empty", 0), solver, steps, seed)
    g["save"] = save_latent("ks", tag)
    messages = []
    entry = comfy_server.run(g, messages=messages)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    got = read_latent(comfy_server, entry, "save")
    family, params = chosen_table(comfy_server, solver, steps - 1)
    assert family == "epd_demo_digits"
    expected, sigmas = reference(comfy_ref, solver, params, steps, seed)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # One call per step for d_cur and ONE call for all K points: batch = BATCH x K x (cond + uncond). A to_zero
    # table (its own sigmas, last row to 0) makes exactly `steps` calls and no final Euler call.
    k = params.num_points
    rows = params.num_steps
    first = [] if params.afs else [2 * BATCH]
    final = [] if params.to_zero else [2 * BATCH]
    calls = batches(comfy_server, tag)
    assert calls == first + [2 * BATCH * k] + [2 * BATCH, 2 * BATCH * k] * (rows - 1) + final
    if params.to_zero:
        assert len(calls) == steps
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "ks"]
    assert [p["value"] for p in progress][-1] == steps and all(p["max"] == steps for p in progress)


def test_img2img_denoise_chain(comfy_server, comfy_ref):
    """A generated latent fed to a second KSampler with denoise 0.6 (the img2img path)."""
    tag = "img2img"
    g = base_graph(tag)
    g["first"] = ksampler(("empty", 0), "euler", 8, 7, model=("model", 0))
    g["second"] = ksampler(("first", 0), "epd", 5, 99, denoise=0.6)
    g["save_first"] = save_latent("first", "first")
    g["save"] = save_latent("second", tag)
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    start = read_latent(comfy_server, entry, "save_first")
    _, params = chosen_table(comfy_server, "epd", 4)
    expected, sigmas = reference(comfy_ref, "epd", params, 5, 99, denoise=0.6, latent=start)
    assert float(sigmas[0]) < float(comfy_ref["ms"].sigma_max) * 0.5  # really a partial denoise
    torch.testing.assert_close(read_latent(comfy_server, entry, "save"), expected, rtol=1e-4, atol=1e-4)


def test_sampler_custom_advanced_with_epd_sampler_and_sigmas(comfy_server, comfy_ref):
    tag = "custom"
    name = "demo_digits_epd_nfe10.safetensors"  # a paper table with its own learned sigmas (test_server_multistep.py:
    g = base_graph(tag)                         # epd_ms through the same nodes)
    g.update({
        "params": {"class_type": "LoadEPDParams", "inputs": {"name": name}},
        "sampler": {"class_type": "EPDSampler", "inputs": {"params": ["params", 0], "solver": "auto", "max_order": 0,
                                                           "afs": "auto", "execution": "auto", "max_batch": 0}},
        "sigmas": {"class_type": "EPDSigmas", "inputs": {"model": ["logged", 0], "params": ["params", 0],
                                                         "append_zero": True}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["logged", 0], "positive": ["cond", 0],
                                                         "negative": ["cond", 1], "cfg": CFG}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                                                  "latent_image": ["empty", 0]}},
        "save": save_latent("sca", tag),
    })
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    params = EPDParams.load(comfy_server.repo / "pretrained_params" / name)
    sigmas = torch.cat([params.schedule_sigmas.float(), torch.zeros(1)])
    expected, _ = reference(comfy_ref, params.solver, params, None, 5, sigmas=sigmas)
    # RandomNoise draws like prepare_noise; SamplerCustomAdvanced output 0 is the sampled latent
    torch.testing.assert_close(read_latent(comfy_server, entry, "save"), expected, rtol=1e-4, atol=1e-4)
    k = params.num_points
    assert max(batches(comfy_server, tag)) == 2 * BATCH * k


def test_save_params_round_trip_and_load_lists_it_without_restart(comfy_server):
    name = sorted(p.name for p in (comfy_server.repo / "pretrained_params").glob("*.safetensors"))[0]
    g = {"params": {"class_type": "LoadEPDParams", "inputs": {"name": name}},
         "save": {"class_type": "SaveEPDParams", "inputs": {"params": ["params", 0], "name": "copied_table"}}}
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    saved = comfy_server.base / "models" / "epd_params" / "copied_table.safetensors"
    original = EPDParams.load(comfy_server.repo / "pretrained_params" / name)
    for a, b in zip(EPDParams.load(saved).tensors(), original.tensors()):
        assert torch.equal(a, b)
    options = comfy_server.object_info()["LoadEPDParams"]["input"]["required"]["name"]
    listed = options[1]["options"] if options[0] == "COMBO" else options[0]
    assert "copied_table.safetensors" in listed


@pytest.mark.parametrize("content,expected", [
    (b"garbage" * 3, "truncated"),
    (b"", "truncated"),
])
def test_broken_file_fails_the_prompt_readably_and_server_keeps_serving(comfy_server, content, expected):
    path = comfy_server.base / "models" / "epd_params" / "broken.safetensors"
    path.write_bytes(content)
    g = {"params": {"class_type": "LoadEPDParams", "inputs": {"name": "broken.safetensors"}},
         "preview": {"class_type": "PreviewEPDParams", "inputs": {"params": ["params", 0]}}}
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "error"
    msg = error_message(entry)
    assert "EPDParamsError" in msg and "broken.safetensors" in msg and expected in msg
    assert comfy_server.get("/system_stats")["system"]  # still serving
    name = sorted(p.name for p in (comfy_server.repo / "pretrained_params").glob("*.safetensors"))[0]
    ok = comfy_server.run({"params": {"class_type": "LoadEPDParams", "inputs": {"name": name}},
                           "preview": {"class_type": "PreviewEPDParams", "inputs": {"params": ["params", 0]}}})
    assert ok["status"]["status_str"] == "success"


def test_unknown_sampler_name_is_rejected_before_running(comfy_server):
    g = base_graph("rejected")
    g["ks"] = ksampler(("empty", 0), "epd_nonexistent", 4, 1)
    g["save"] = save_latent("ks", "rejected")
    with pytest.raises(PromptRejected) as err:
        comfy_server.queue(g)
    assert "sampler_name" in str(err.value)


def test_inpainting_mask_falls_back_to_sequential_calls(comfy_server):
    tag = "inpaint"
    g = base_graph(tag)
    g["first"] = ksampler(("empty", 0), "euler", 6, 3, model=("model", 0))
    g["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}}
    g["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["first", 0], "mask": ["mask", 0]}}
    g["ks"] = ksampler(("masked", 0), "epd", 5, 11, denoise=0.7)
    g["save"] = save_latent("ks", tag)
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert max(batches(comfy_server, tag)) == 2 * BATCH  # every call is one point for the sample batch
    assert "sequential (inpainting denoise mask)" in comfy_server.log_path.read_text()
