"""EPD-MS inside a real ComfyUI server (main.py --cpu) on the 8x8 demo model: KSampler `epd_ms` picks the shipped
table of its step count and matches epd_core, spends exactly one model call per step; without a table of that
step count it IS gradient_estimation; the EPD Trainer trains an epd_ms table that EPD Sampler then uses."""
import math

import pytest
import torch

from bench.comfyui_server import error_message
from epd_core.sampling.multistep import sample_epd_ms
from epd_core.tables.params import EPDParams
from test_server_sampling import (BATCH, DIGIT, base_graph, batches, chosen_table, ksampler, read_latent, save_latent)

pytestmark = pytest.mark.server


def ms_reference(ref, params, steps, seed):
    """What epd_core computes for KSampler's noise and karras sigmas (ComfyUI's own code for both)."""
    ms = ref["ms"]
    sigmas = ref["samplers"].KSampler(ref["stub"], steps, "cpu", "epd_ms", "karras", 1.0).sigmas
    noise = ref["sample"].prepare_noise(torch.zeros(BATCH, 1, 8, 8), seed)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros(BATCH, 1, 8, 8),
                         math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5))
    with torch.no_grad():
        out = sample_epd_ms(ref["denoiser"], x, sigmas, params, extra_args={"cond": [DIGIT]}, disable=True)
    return ms.inverse_noise_scaling(sigmas[-1], out)


def test_ksampler_epd_ms_uses_its_table_with_one_call_per_step(comfy_server, comfy_ref):
    steps, seed, tag = 6, 99, "ks_epd_ms"
    g = base_graph(tag)
    g["ks"] = ksampler(("empty", 0), "epd_ms", steps, seed)
    g["save"] = save_latent("ks", tag)
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    family, params = chosen_table(comfy_server, "epd_ms", steps - 1)  # logged: steps to a positive sigma
    assert family == "epd_demo_digits" and params.solver == "epd_ms" and params.num_steps == steps
    torch.testing.assert_close(read_latent(comfy_server, entry, "save"), ms_reference(comfy_ref, params, steps, seed),
                               rtol=1e-4, atol=1e-4)
    # one call per step: the current point and K - 1 look-ahead points, cond + uncond, all in one batch
    assert batches(comfy_server, tag) == [2 * BATCH * params.num_points] * steps


def test_ksampler_epd_ms_without_a_table_of_that_step_count_is_gradient_estimation(comfy_server):
    steps, seed = 13, 5  # the shipped 8x8 tables cover 3..10 steps
    g = base_graph("ks_ms_fallback")
    g["ms"] = ksampler(("empty", 0), "epd_ms", steps, seed)
    g["ge"] = ksampler(("empty", 0), "gradient_estimation", steps, seed)
    g["save_ms"], g["save_ge"] = save_latent("ms", "ms_fallback"), save_latent("ge", "ge_fallback")
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    torch.testing.assert_close(read_latent(comfy_server, entry, "save_ms"), read_latent(comfy_server, entry, "save_ge"),
                               rtol=0, atol=1e-5)
    assert f"no epd_ms table of {steps} steps" in comfy_server.log_path.read_text(errors="replace")


@pytest.mark.slow
def test_trainer_trains_an_epd_ms_table_that_epd_sampler_uses(comfy_server):
    steps, name = 4, "srv_epd_ms"
    g = base_graph("trained_ms")
    g["trainer"] = {"class_type": "EPDTrainer", "inputs": {
        "mode": "distill", "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
        "latent": ["empty", 0], "steps": steps, "num_points": 2, "solver": "epd_ms", "schedule": "sgm_uniform",
        "teacher": "dpmpp", "inserted_steps": 1, "iterations": 30, "learning_rate": 0.1, "batch": 4, "seed": 3,
        "cfg": 2.0, "cfg_max": 7.0, "objective": "end_to_end", "name": name, "measure_minutes": 0.0}}
    g["sampler"] = {"class_type": "EPDSampler", "inputs": {"params": ["trainer", 0], "solver": "auto", "max_order": 0,
                                                           "afs": "auto", "execution": "auto", "max_batch": 0}}
    g["sigmas"] = {"class_type": "EPDSigmas", "inputs": {"model": ["logged", 0], "params": ["trainer", 0],
                                                         "append_zero": True}}
    g["custom"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["logged", 0], "add_noise": True, "noise_seed": 1, "cfg": 2.0, "positive": ["cond", 0],
        "negative": ["cond", 1], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["empty", 0]}}
    g["save"] = save_latent("custom", "trained_ms")
    entry = comfy_server.run(g, timeout=600)
    assert entry["status"]["status_str"] == "success", error_message(entry) + comfy_server.log_tail()
    table = EPDParams.load(comfy_server.base / "models" / "epd_params" / f"{name}.safetensors")
    assert table.solver == "epd_ms" and table.num_steps == steps and table.metadata["latency_nfe"] == steps
    # one table for CFG 2..7, from the built-in strongest at its middle scale (4.5: dpmpp_2m)
    assert table.metadata["cfg_range"] == [2.0, 7.0] and table.metadata["initial_builtin"] == "dpmpp_2m"
    assert table.schedule["learned"]
    assert table.metadata["provenance"]["loss"] == "rmse"  # the registry's loss for epd_ms (docs/method.md)
    # EPD Sigmas gives its N learned sigmas and 0; it samples on them: still one call of K points per step
    assert batches(comfy_server, "trained_ms") == [2 * BATCH * 2] * steps


def test_ksampler_epd_ms_at_a_cfg_where_its_table_lost_samples_exactly_as_the_recorded_builtin(comfy_server):
    """A table carries what was measured at other CFG scales (bench/quality_vs_nfe.py --record): where it lost to
    the best built-in, KSampler's epd_ms samples as that built-in, and says so; where it won, the table runs."""
    from epd_core.sampling.multistep import ms_table
    steps, seed, folder = 13, 8, comfy_server.base / "models" / "epd_params"
    sigmas = comfy_server_sigmas(steps)
    measured = [{"cfg": 2.0, "fit_ratio": 0.8, "ratio": 0.8, "best_builtin": {"sampler": "ipndm", "scheduler":
                                                                                   "karras", "steps": steps}},
                {"cfg": 5.0, "fit_ratio": 1.6, "ratio": 1.7, "best_builtin": {"sampler": "uni_pc", "scheduler":
                                                                                   "normal", "steps": steps}},
                # a win within the noise of its measurement (0.9 +- 0.1): no win, the built-in runs
                {"cfg": 7.5, "fit_ratio": 0.9, "fit_ratio_se": 0.1, "ratio": 0.9,
                 "best_builtin": {"sampler": "ipndm", "scheduler": "karras", "steps": steps}}]
    ms_table(sigmas, "ipndm", model_family="epd_demo_digits", guidance_scale=2.0,
             measured_cfg=measured).save(folder / "cfg_guarded.safetensors")
    (folder / "ksampler_presets.txt").write_text("cfg_guarded\n")
    try:
        g = base_graph("cfg_guard")
        runs = (("ms2", "epd_ms", "karras", 2.0), ("ms5", "epd_ms", "karras", 5.0), ("ipndm", "ipndm", "karras", 2.0),
                ("unipc", "uni_pc", "normal", 5.0), ("ms75", "epd_ms", "karras", 7.5))
        for name, sampler, scheduler, cfg in runs:
            g[name] = ksampler(("empty", 0), sampler, steps, seed, scheduler=scheduler, cfg=cfg)
            g[f"save_{name}"] = save_latent(name, f"guard_{name}")
        entry = comfy_server.run(g)
        assert entry["status"]["status_str"] == "success", error_message(entry)
        latent = lambda node: read_latent(comfy_server, entry, node)  # noqa: E731
        # CFG 2: the table (an untrained ipndm table on karras sigmas is ipndm itself); CFG 5: uni_pc (no k-diffusion
        # function, and KSampler drops its penultimate sigma) on its own scheduler's sigmas, not the table's or karras
        torch.testing.assert_close(latent("save_ms2"), latent("save_ipndm"), rtol=0, atol=1e-5)
        torch.testing.assert_close(latent("save_ms5"), latent("save_unipc"), rtol=0, atol=1e-5)
        assert not torch.allclose(latent("save_ms5"), latent("save_ms2"), atol=1e-3)  # CFG 5 is another image
        log = comfy_server.log_path.read_text(errors="replace")
        assert f"epd_ms on epd_demo_digits with {steps - 1} steps uses cfg_guarded.safetensors" in log
        assert "EPD: epd_ms at CFG 5: no table beats the best built-in at CFG 5 (best table: 1.60" in log
        assert f"epd_ms on epd_demo_digits with {steps - 1} steps uses the built-in uni_pc (normal)" in log
        assert ("no table beats the best built-in at CFG 7.5 (best table: 0.90 of its error, up to 1.10 within 2 "
                "standard errors") in log
    finally:
        (folder / "ksampler_presets.txt").unlink(missing_ok=True)
        (folder / "cfg_guarded.safetensors").unlink(missing_ok=True)


def comfy_server_sigmas(steps):
    """KSampler's karras list for the 8x8 demo model (SD1.5's discrete sigmas), from ComfyUI's own code."""
    from conftest import import_comfy_sampling
    import_comfy_sampling()
    import comfy.model_sampling as cms
    import comfy.samplers

    class Settings:
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}

    class Discrete(cms.ModelSamplingDiscrete, cms.EPS):
        pass
    return comfy.samplers.calculate_sigmas(Discrete(Settings()), "karras", steps).double()
