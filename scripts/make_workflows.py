"""Generate workflows/: API-format graphs (workflows/api/, for POST /prompt, the demo and the tests) and their
UI-format twins (workflows/, what ComfyUI's template browser and the web UI load). The UI files are derived
from the node definitions of a real server (/object_info), so widget order always matches.

    .venv/bin/python scripts/make_workflows.py        # starts a headless ComfyUI to read /object_info
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and scripts
from scripts.workflow_format import api_to_ui, validate_api  # noqa: E402

# The demo compares samplers at equal latency NFE (sequential model calls per image) on the MNIST model. For the
# shipped MNIST tables KSampler's steps ARE the model calls per image (their last row steps to 0 itself).
DEMO_NFE = 6
DEMO_DIGIT, DEMO_BATCH, DEMO_CFG = 7, 8, 1.0   # the MNIST tables are trained without CFG
MNIST = {"model": "MNIST 28x28", "size": 224, "scale": 4}   # a 224x224 EmptyLatentImage is a 28x28 latent
DIGITS = {"model": "digits 8x8", "size": 64, "scale": 8}    # the tiny model: the trainer workflows stay fast
TRAINER_CFG = 2.0


def node(class_type, title=None, **inputs):
    n = {"class_type": class_type, "inputs": inputs}
    if title:
        n["_meta"] = {"title": title}
    return n


def demo_head(batch=DEMO_BATCH, spec=MNIST):
    return {"1": node("EPDDemoModelLoader", f"Demo model ({spec['model']})", model=spec["model"]),
            "2": node("EPDDemoConditioning", "Which digit", digit=DEMO_DIGIT),
            "3": node("EmptyLatentImage", width=spec["size"], height=spec["size"], batch_size=batch)}


def demo_sampler(sampler, steps, seed=2026, title=None, cfg=DEMO_CFG):
    return node("KSampler", title, model=["1", 0], seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                scheduler="karras", positive=["2", 0], negative=["2", 1], latent_image=["3", 0], denoise=1.0)


def demo_txt2img():
    g = demo_head()
    g["4"] = demo_sampler("epd", DEMO_NFE, title=f"KSampler (epd, {DEMO_NFE} steps = {DEMO_NFE} model calls)")
    g["5"] = node("EPDDemoDecode", samples=["4", 0], scale=MNIST["scale"])
    g["6"] = node("SaveImage", images=["5", 0], filename_prefix="epd_demo/epd")
    return g


SIDE_BY_SIDE_CFGS = (DEMO_CFG, 5.0)  # the tables' own CFG, then one users pick (they were not trained there)
REFERENCE_STEPS = 100  # the reference row: DPM++ 2M with this many steps, near the exact ODE solution


def demo_side_by_side():
    """Equal latency NFE, one block per CFG in SIDE_BY_SIDE_CFGS: epd_ms, epd, gradient_estimation on
    AlignYourSteps (the best built-in on the MNIST model at this NFE and CFG 1, bench/results/quality_vs_nfe_mnist.md;
    through SamplerCustom, since AYS is a scheduler node), euler / dpmpp_2m on karras as what most users run, and
    a reference row (many steps) from the same seed: the closer a row is to it, the better it solved the ODE. Every
    title and Save Image node names the sampler, its NFE and CFG (scripts/demo.py labels its rows with them)."""
    g = demo_head()
    ids = iter(range(4, 1000))

    def row(block, key, label, sampler_id):
        decode, save = str(next(ids)), str(next(ids))
        g[decode] = node("EPDDemoDecode", samples=[sampler_id, 0], scale=MNIST["scale"])
        g[save] = node("SaveImage", label, images=[decode, 0], filename_prefix=f"epd_demo/side_by_side_{block}_{key}")

    for cfg in SIDE_BY_SIDE_CFGS:
        block, tail = f"cfg{cfg:g}", f"NFE {DEMO_NFE}, CFG {cfg:g}"
        for sampler in ("epd_ms", "epd"):
            sid = str(next(ids))
            g[sid] = demo_sampler(sampler, DEMO_NFE, title=f"{sampler}: {tail}", cfg=cfg)
            row(block, sampler, f"{sampler}: {tail}", sid)
        select, ays, custom = str(next(ids)), str(next(ids)), str(next(ids))
        g[select] = node("KSamplerSelect", sampler_name="gradient_estimation")
        g[ays] = node("AlignYourStepsScheduler", model_type="SD1", steps=DEMO_NFE, denoise=1.0)
        label = f"gradient_estimation + AlignYourSteps (best built-in at CFG 1): {tail}"
        g[custom] = node("SamplerCustom", label, model=["1", 0], add_noise=True, noise_seed=2026, cfg=cfg,
                         positive=["2", 0], negative=["2", 1], sampler=[select, 0], sigmas=[ays, 0],
                         latent_image=["3", 0])
        row(block, "gradient_estimation_ays", label, custom)
        for sampler in ("euler", "dpmpp_2m"):
            sid = str(next(ids))
            g[sid] = demo_sampler(sampler, DEMO_NFE, title=f"{sampler} (karras): {tail}", cfg=cfg)
            row(block, sampler, f"{sampler} (karras): {tail}", sid)
        sid = str(next(ids))
        label = f"reference: dpmpp_2m (karras), NFE {REFERENCE_STEPS}, CFG {cfg:g}"
        g[sid] = demo_sampler("dpmpp_2m", REFERENCE_STEPS, title=label, cfg=cfg)
        row(block, "reference", label, sid)
    return g


def sd15_ksampler_epd():
    """SD1.5 with the plain KSampler: import the authors' SD1.5 table once (Import EPD Predictor or
    python -m epd_core.import_official) and `epd` picks it for 11 steps (10 EPD steps + final step)."""
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors"),
        "2": node("CLIPTextEncode", "Positive", clip=["1", 1], text="a photo of a red fox in the snow, detailed"),
        "3": node("CLIPTextEncode", "Negative", clip=["1", 1], text=""),
        "4": node("EmptyLatentImage", width=512, height=512, batch_size=1),
        "5": node("KSampler", "KSampler (epd, 11 steps = 21 model calls)", model=["1", 0], seed=0, steps=11, cfg=7.5,
                  sampler_name="epd", scheduler="normal", positive=["2", 0], negative=["3", 0],
                  latent_image=["4", 0], denoise=1.0),
        "6": node("VAEDecode", samples=["5", 0], vae=["1", 2]),
        "7": node("SaveImage", images=["6", 0], filename_prefix="epd_sd15"),
    }


def custom_advanced(model, latent, table, guider_nodes, vae, prefix):
    g = dict(guider_nodes)
    g.update({
        "20": node("LoadEPDParams", "EPD table (train one with EPD Trainer)", name=table),
        "21": node("EPDSampler", params=["20", 0], solver="auto", max_order=0, afs="auto", execution="auto",
                   max_batch=0),
        "22": node("EPDSigmas", model=model, params=["20", 0], append_zero=True),
        "23": node("RandomNoise", noise_seed=0),
        "24": node("SamplerCustomAdvanced", noise=["23", 0], guider=["30", 0], sampler=["21", 0], sigmas=["22", 0],
                   latent_image=latent),
        "25": node("VAEDecode", samples=["24", 0], vae=vae),
        "26": node("SaveImage", images=["25", 0], filename_prefix=prefix),
    })
    return g


def sdxl_custom():
    g = {"1": node("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors"),
         "2": node("CLIPTextEncode", "Positive", clip=["1", 1], text="a lighthouse on a cliff at sunset, oil painting"),
         "3": node("CLIPTextEncode", "Negative", clip=["1", 1], text="blurry"),
         "4": node("EmptyLatentImage", width=1024, height=1024, batch_size=1),
         "30": node("CFGGuider", model=["1", 0], positive=["2", 0], negative=["3", 0], cfg=6.0)}
    return custom_advanced(["1", 0], ["4", 0], "sdxl_epd.safetensors", g, ["1", 2], "epd_sdxl")


def flux_head() -> dict:
    """FLUX.1-dev's loaders and its prompt with guidance 3.5 (nodes 1, 2, 3, 5, 6)."""
    return {"1": node("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
            "2": node("DualCLIPLoader", clip_name1="t5xxl_fp16.safetensors", clip_name2="clip_l.safetensors",
                      type="flux", device="default"),
            "3": node("VAELoader", vae_name="ae.safetensors"),
            "5": node("CLIPTextEncode", "Prompt", clip=["2", 0], text="a cozy reading nook with plants, soft light"),
            "6": node("FluxGuidance", conditioning=["5", 0], guidance=3.5)}


def flux_custom():
    g = {**flux_head(),
         "4": node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1),
         "30": node("BasicGuider", model=["1", 0], conditioning=["6", 0])}
    return custom_advanced(["1", 0], ["4", 0], "flux_epd.safetensors", g, ["3", 0], "epd_flux")


def flux_dyweight():
    """FLUX.1-dev with DyWeight's published 5-call table, fetched by name (SHA-256 pinned) and converted by Import
    EPD Predictor; at 512 x 512, where it was trained (ModelSamplingFlux: mu 0.63), EPD Sigmas gives its own grid.
    Another size works too: the sampler rebuilds the grid for that size's mu and says so in the log."""
    g = {**flux_head(),
         "7": node("ModelSamplingFlux", model=["1", 0], max_shift=1.15, base_shift=0.5, width=512, height=512),
         "4": node("EmptySD3LatentImage", width=512, height=512, batch_size=1),
         "30": node("BasicGuider", model=["7", 0], conditioning=["6", 0])}
    g = custom_advanced(["7", 0], ["4", 0], "unused", g, ["3", 0], "epd_flux_dyweight")
    g["20"] = node("EPDImportPredictor", "DyWeight FLUX table (5 calls), downloaded by name",
                   predictor="official: dyweight-flux-nfe5", output_name="", overwrite=False, pkl_path="")
    return g


def demo_trainer():
    """Train a table for the demo model inside the graph, look at it, and sample with it at once."""
    g = demo_head(batch=8, spec=DIGITS)
    g["4"] = node("EPDTrainer", "EPD Trainer (distill)", mode="distill", model=["1", 0], positive=["2", 0],
                  negative=["2", 1], latent=["3", 0], steps=4, num_points=2, solver="epd", schedule="karras",
                  teacher="heun", inserted_steps=3, iterations=100, learning_rate=0.1, batch=8, seed=0, cfg=TRAINER_CFG,
                  objective="per_step+end_to_end", name="my_demo_table", cfg_max=0.0, measure_minutes=10.0)
    g["5"] = node("PreviewImage", "Loss curve", images=["4", 1])
    g["6"] = node("PreviewEPDParams", params=["4", 0])
    g["7"] = node("EPDSampler", params=["4", 0], solver="auto", max_order=0, afs="auto", execution="auto", max_batch=0)
    g["8"] = node("EPDSigmas", model=["1", 0], params=["4", 0], append_zero=True)
    g["9"] = node("RandomNoise", noise_seed=1)
    g["10"] = node("CFGGuider", model=["1", 0], positive=["2", 0], negative=["2", 1], cfg=TRAINER_CFG)
    g["11"] = node("SamplerCustomAdvanced", noise=["9", 0], guider=["10", 0], sampler=["7", 0], sigmas=["8", 0],
                   latent_image=["3", 0])
    g["12"] = node("EPDDemoDecode", samples=["11", 0], scale=DIGITS["scale"])
    g["13"] = node("SaveImage", images=["12", 0], filename_prefix="epd_demo/trained")
    return g


def demo_rl_trainer():
    """Fine-tune the shipped demo table with RDPO against the digit-classifier reward, then sample with it."""
    g = demo_trainer()
    g["4"]["_meta"]["title"] = "EPD Trainer (rl)"
    g["4"]["inputs"].update(mode="rl", iterations=40, name="my_demo_rl_table", reward=["14", 0],
                            rl_settings=["15", 0], init_params=["16", 0])
    g["5"]["_meta"]["title"] = "Mean reward per update"
    g["13"]["inputs"]["filename_prefix"] = "epd_demo/rl_trained"
    g["14"] = node("EPDRewardDemoClassifier", "Reward: is it the right digit?")
    g["15"] = node("EPDRLSettings", prompts="\n".join(str(d) for d in range(10)), group_size=4, prompts_per_update=2,
                   ppo_epochs=2, learning_rate=1e-3, clip=0.2, kl_coef=0.1, kappa=15.0, distill_iterations=200)
    g["16"] = node("LoadEPDParams", "Starting table", name="demo_digits_epd_s4.safetensors")
    return g


def compare_demo():
    """EPD Compare on the MNIST model: the pack's tables against ComfyUI's strongest deterministic samplers (each
    with the scheduler it does best with on seeds 0-1), RMSE to a 100-step DPM++ 2M reference on seeds 2-3, at
    4, 6 and 8 model calls per image, each candidate timed on the device. 353 s and 446 s (server start excluded)
    on a shared 2-core CPU at a load average of 5-7 on 2026-12-06; max_minutes 60 because the estimate follows
    the load (10 were refused there)."""
    g = demo_head(batch=4)
    g["4"] = node("EPDCompare", "EPD Compare: is the table better than the best built-in?", model=["1", 0],
                  positive=["2", 0], negative=["2", 1], latent=["3", 0], cfg=DEMO_CFG, seeds="0,1,2,3", fit_seeds=2,
                  nfe="4,6,8", pack_pick="all", builtins="ipndm,ipndm_v,dpmpp_2m,deis,uni_pc,gradient_estimation",
                  schedulers="karras,exponential,sgm_uniform,beta,ays", reference_sampler="dpmpp_2m",
                  reference_scheduler="karras", reference_steps=100, max_minutes=60.0, timing_repeats=3)
    g["5"] = node("SaveImage", "Quality vs NFE", images=["4", 0], filename_prefix="epd_demo/compare_plot")
    g["6"] = node("SaveImage", "Same seed: tables, best built-in, reference", images=["4", 2],
                  filename_prefix="epd_demo/compare_grid")
    return g


WORKFLOWS = {
    "epd_demo_txt2img": demo_txt2img,
    "epd_demo_side_by_side": demo_side_by_side,
    "epd_sd15_ksampler": sd15_ksampler_epd,
    "epd_sdxl_custom_sampler": sdxl_custom,
    "epd_flux_custom_sampler": flux_custom,
    "epd_flux_dyweight": flux_dyweight,
    "epd_demo_trainer": demo_trainer,
    "epd_demo_rl_trainer": demo_rl_trainer,
    "epd_compare_demo": compare_demo,
}


def main():
    from bench.comfyui_server import ComfyServer
    out_api, out_ui = REPO / "workflows" / "api", REPO / "workflows"
    out_api.mkdir(parents=True, exist_ok=True)
    with ComfyServer(Path(tempfile.mkdtemp()), with_test_nodes=False) as server:
        info = server.object_info()
    for name, build in WORKFLOWS.items():
        api = build()
        problems = validate_api(api, info)
        if problems:
            raise SystemExit(f"{name}: {problems}")
        (out_api / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        (out_ui / f"{name}.json").write_text(json.dumps(api_to_ui(api, info), indent=2) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
