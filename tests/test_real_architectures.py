"""The pack on the real SD1.5 (and, once, SDXL) architectures inside a real ComfyUI server (main.py --cpu):
CheckpointLoaderSimple on a full-size random-weight checkpoint (bench/real_checkpoints.py: UNet + CLIP + VAE
exactly as ComfyUI saves them, seeded, built once and cached), CLIPTextEncode, VAE encode / decode, and

  * KSampler `epd` / `epd_plugin` with CFG > 1 and batch 2, with a K=3 table the operator listed for the
    model's family: every K-point call carries batch 2 x K x (cond + uncond), the conditioning tiled with it;
  * img2img (VAEEncode -> KSampler denoise 0.5) and inpainting (SetLatentNoiseMask: the sequential fallback,
    logged, one point per call, the unmasked latent kept);
  * SamplerCustomAdvanced with a table imported from an official-format predictor (Import EPD Predictor) and
    EPD Sigmas: the exact schedule, so no "sigmas differ" warning;
  * a flow model (ModelSamplingSD3 on top) with a flowmatch table and EPD Sigmas;
  * a one-iteration EPD Trainer run at 64x64, whose table then samples.

Then, once, SDXL: its ADM `y` conditioning tiled for the K points like the text conditioning (EPD_SDXL_TEST=0
turns that test off). A 64x64 image (an 8x8 latent) keeps an SD1.5 UNet call around 1.5 s on one CPU thread (the
servers run with one thread; EPD_REAL_THREADS=n changes that)."""
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.comfyui_server import ComfyServer, error_message
from epd_core.tables.params import EPDParams
from bench.official_pickle import official_pickle, random_tables, sd15_attrs
from bench.real_checkpoints import ensure_checkpoint

pytestmark = [pytest.mark.server, pytest.mark.slow]
B, K, CFG, STEPS = 2, 3, 4.0, 4  # KSampler steps 4 with karras = 3 steps to a positive sigma + a final Euler step
ROWS = STEPS - 1
SIZE = 64


# ---- servers ------------------------------------------------------------------------------------------------
def peak_rss_gib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2 ** 20


def start_server(base, arch: str, tables: dict[str, EPDParams], args=()) -> ComfyServer:
    """A server whose models/checkpoints/ holds the cached random checkpoint (linked, not copied) and whose
    models/epd_params/ holds `tables`, all listed in ksampler_presets.txt so KSampler may pick them."""
    t0 = time.time()
    ckpt = ensure_checkpoint(arch)
    built = time.time() - t0
    # One thread: on two cores shared with anything else (the test process, a CI neighbour) OpenMP threads that
    # spin-wait make every UNet call 5-7x slower (measured: 9 s instead of 1.4 s for a batch-2 call).
    server = ComfyServer(base, args=args, env={"OMP_NUM_THREADS": os.environ.get("EPD_REAL_THREADS", "1")})
    (server.base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (server.base / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    folder = server.base / "models" / "epd_params"
    for name, table in tables.items():
        table.save(folder / name)
    (folder / "ksampler_presets.txt").write_text("".join(f"{n}\n" for n in tables))
    server.ckpt_name = ckpt.name
    server.start()
    print(f"\n{arch}: checkpoint ready in {built:.1f}s ({ckpt.stat().st_size / 2 ** 30:.2f} GiB)")
    return server


def stop_server(server: ComfyServer, arch: str) -> None:
    try:
        print(f"\n{arch} server: peak RSS {peak_rss_gib(server.proc.pid):.2f} GiB")
    except (OSError, StopIteration):
        pass
    server.stop()


def ksampler_table(solver: str, family: str) -> EPDParams:
    """A K=3 table without a recorded schedule (so KSampler's own sigmas are used as they are)."""
    return EPDParams.neutral(ROWS, K, solver=solver, max_order=3 if solver == "epd_plugin" else 1, afs=False,
                             model_family=family, schedule={})


# ---- graphs -------------------------------------------------------------------------------------------------
def base_graph(server, tag, batch=B, model=("logged", 0)):
    """Checkpoint -> call-logging MODEL patch, prompt / negative prompt, an empty 64x64 latent."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.ckpt_name}},
        "logged": {"class_type": "EPDTestCallLogger", "inputs": {"model": ["ckpt", 0], "tag": tag}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube on a table", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch}},
    }


def ksampler(latent, sampler, seed, denoise=1.0, model=("logged", 0), steps=STEPS):
    return {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": steps, "cfg": CFG, "sampler_name": sampler,
        "scheduler": "karras", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": list(latent),
        "denoise": denoise}}


def outputs(g, node, prefix):
    """Decode and save `node`'s latent as images, and save the latent itself."""
    g[f"{node}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [node, 0], "vae": ["ckpt", 2]}}
    g[f"{node}_image"] = {"class_type": "SaveImage", "inputs": {"images": [f"{node}_decode", 0],
                                                                 "filename_prefix": prefix}}
    g[f"{node}_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0],
                                                                   "filename_prefix": f"latents/{prefix}"}}


def custom_sampling(g, params_node, model=("logged", 0), cfg=CFG, seed=5):
    """SamplerCustomAdvanced + EPD Sampler + EPD Sigmas (with the final step to 0) for the table `params_node`."""
    g.update({
        "sampler": {"class_type": "EPDSampler", "inputs": {"params": [params_node, 0], "solver": "auto",
                                                           "max_order": 0, "afs": "auto", "execution": "auto",
                                                           "max_batch": 0}},
        "sigmas": {"class_type": "EPDSigmas", "inputs": {"model": list(model), "params": [params_node, 0],
                                                         "append_zero": True}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": list(model), "positive": ["pos", 0],
                                                         "negative": ["neg", 0], "cfg": cfg}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
    })


class LogWatch:
    """The server log written while a block runs (the log is shared by every test on the server)."""

    def __init__(self, server):
        self.server, self.start = server, server.log_path.stat().st_size

    def new(self) -> str:
        with open(self.server.log_path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")


def run_ok(server, g, timeout=600):
    t0 = time.time()
    entry = server.run(g, timeout=timeout)
    assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail()
    print(f"  prompt ran in {time.time() - t0:.1f}s")
    return entry


# ---- checks -------------------------------------------------------------------------------------------------
def check_images(server, entry, node, count):
    """`count` decoded SIZE x SIZE images that are not flat, and distinct from each other."""
    files = entry["outputs"][f"{node}_image"]["images"]
    assert len(files) == count
    pixels = []
    for info in files:
        with Image.open(server.output_path(info)) as im:
            assert im.size == (SIZE, SIZE)
            pixels.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    assert all(p.std() > 1.0 for p in pixels), [p.std() for p in pixels]  # a random VAE still gives texture
    if count > 1:
        assert np.abs(pixels[0] - pixels[1]).mean() > 1.0  # different noise, different images
    return pixels


def read_latent(server, entry, node) -> torch.Tensor:
    latent = load_file(str(server.output_path(entry["outputs"][f"{node}_latent"]["latents"][0])))["latent_tensor"]
    assert torch.isfinite(latent).all()
    return latent


def check_k_calls(calls, batch, k):
    """The step pattern with the K points of a step in ONE call: d_cur (batch x cond/uncond), then the K points
    (batch x K x cond/uncond), per row; a final Euler call. Every tensor condition follows x's batch."""
    sizes = [c["batch"] for c in calls]
    assert sizes == [2 * batch] + [2 * batch * k] + [2 * batch, 2 * batch * k] * (ROWS - 1) + [2 * batch], sizes
    for call in calls:
        assert set(call["cond_or_uncond"]) == {0, 1}  # cond and uncond share every call (CFG batched)
        assert call["cond_batches"] and all(n == call["batch"] for n in call["cond_batches"].values()), call
        sig = call["sigmas"]
        # the d_cur call has one sigma for the batch; the K-point call k sigmas, each for a block of rows
        assert len({round(s, 5) for s in sig}) in (1, k), sig


# ---- SD1.5 --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="class")  # class scope: the server (~6.6 GiB) is gone before the SDXL test starts its own
def server(tmp_path_factory):
    tables = {f"real_sd15_{s}.safetensors": ksampler_table(s, "sd15") for s in ("epd", "epd_plugin")}
    flow = EPDParams.neutral(ROWS, 2, solver="epd", max_order=1, afs=False, model_family="sd15_flow",
                             schedule={"type": "flowmatch"})
    server = start_server(tmp_path_factory.mktemp("real_sd15"), "sd15", tables)
    flow.save(server.base / "models" / "epd_params" / "real_sd15_flow.safetensors")  # not a KSampler preset
    yield server
    stop_server(server, "sd15")


class TestSD15:
    @pytest.mark.parametrize("solver", ["epd", "epd_plugin"])
    def test_ksampler_batches_k_points_with_cfg(self, server, solver):
        tag = f"sd15_ks_{solver}"
        g = base_graph(server, tag)
        g["ks"] = ksampler(("empty", 0), solver, seed=11)
        outputs(g, "ks", tag)
        entry = run_ok(server, g)
        log = server.log_path.read_text(errors="replace")
        assert f"EPD: {solver} on sd15 with {ROWS} steps uses real_sd15_{solver}.safetensors" in log
        assert "unet missing" not in log and "clip missing" not in log  # the builder's layout is complete
        check_k_calls(server.call_log(tag), B, K)
        check_images(server, entry, "ks", B)
        assert read_latent(server, entry, "ks").shape == (B, 4, SIZE // 8, SIZE // 8)

    def test_img2img(self, server):
        tag = "sd15_img2img"
        Image.fromarray(picture()).save(server.base / "input" / "img2img.png")
        g = base_graph(server, tag)
        g["load"] = {"class_type": "LoadImage", "inputs": {"image": "img2img.png"}}
        g["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
        g["rep"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["enc", 0], "amount": B}}
        g["ks"] = ksampler(("rep", 0), "epd", seed=12, denoise=0.5)
        outputs(g, "ks", tag)
        entry = run_ok(server, g)
        calls = server.call_log(tag)
        check_k_calls(calls, B, K)
        assert calls[0]["sigmas"][0] < 0.5 * 14.6  # started part-way down: a real partial denoise
        check_images(server, entry, "ks", B)

    def test_inpainting_falls_back_to_sequential_and_keeps_the_unmasked_latent(self, server):
        tag = "sd15_inpaint"
        rgba = np.dstack([picture(), np.full((SIZE, SIZE), 255, np.uint8)])
        rgba[:, : SIZE // 2, 3] = 0  # transparent left half: LoadImage's mask is 1 (repaint) there
        Image.fromarray(rgba, "RGBA").save(server.base / "input" / "inpaint.png")
        g = base_graph(server, tag, batch=1)
        g["load"] = {"class_type": "LoadImage", "inputs": {"image": "inpaint.png"}}
        g["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
        g["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["enc", 0], "mask": ["load", 1]}}
        g["ks"] = ksampler(("masked", 0), "epd", seed=13)
        outputs(g, "ks", tag)
        outputs(g, "enc", f"{tag}_source")
        watch = LogWatch(server)
        entry = run_ok(server, g)
        assert "EPD: epd runs the 3 points of each step sequential (inpainting denoise mask)" in watch.new()
        # one point per call for the one sample (x cond/uncond): first d_cur, per row K points + d_cur, final
        sizes = [c["batch"] for c in server.call_log(tag)]
        assert sizes == [2] * (1 + ROWS * K + (ROWS - 1) + 1), sizes
        out, src = read_latent(server, entry, "ks"), read_latent(server, entry, "enc")
        keep = slice(SIZE // 16 + 1, None)  # latent columns well inside the opaque (kept) half
        torch.testing.assert_close(out[..., keep], src[..., keep], atol=1e-3, rtol=1e-3)
        assert (out[..., :2] - src[..., :2]).abs().mean() > 0.1  # the masked half was repainted

    def test_imported_official_table_with_epd_sigmas_is_exact(self, server, comfy_sampling):
        tag = "sd15_official"
        (server.base / "input" / "sd15_official.pkl").write_bytes(
            official_pickle(random_tables(5, 2, seed=3), sd15_attrs(num_steps=5)))  # 4 rows, K=2, discrete rho 1
        g = base_graph(server, tag)
        g["imp"] = {"class_type": "EPDImportPredictor", "inputs": {
            "predictor": "(no .pkl in models/epd_params)", "output_name": "real_sd15_official", "overwrite": True,
            "pkl_path": "sd15_official.pkl"}}
        custom_sampling(g, "imp", cfg=7.5)
        outputs(g, "sca", tag)
        watch = LogWatch(server)
        entry = run_ok(server, g)
        new = watch.new()
        assert "sigmas differ" not in new, new
        assert "trained for" not in new  # the table's family (sd15) is the model's
        calls = server.call_log(tag)
        assert [c["batch"] for c in calls] == [2 * B, 2 * B * 2] * 4 + [2 * B]
        # the d_cur calls are at the table's own schedule: 5 sigmas of SD1.5's discrete schedule (rho 1)
        expected = sd15_discrete_sigmas(comfy_sampling, 5)
        got = torch.tensor([c["sigmas"][0] for c in calls[0::2]])
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)
        check_images(server, entry, "sca", B)

    def test_flow_model_with_a_flowmatch_table(self, server):
        tag = "sd15_flow"
        g = base_graph(server, tag)
        g["flow"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["ckpt", 0], "shift": 3.0}}
        g["logged"]["inputs"]["model"] = ["flow", 0]
        g["table"] = {"class_type": "LoadEPDParams", "inputs": {"name": "real_sd15_flow.safetensors"}}
        custom_sampling(g, "table")
        outputs(g, "sca", tag)
        watch = LogWatch(server)
        entry = run_ok(server, g)
        new = watch.new()
        assert "sigmas differ" not in new and "trained for" not in new, new
        assert "patched to 'flow' prediction" in server.log_path.read_text()
        calls = server.call_log(tag)
        assert [c["batch"] for c in calls] == [2 * B, 2 * B * 2] * ROWS + [2 * B]
        sigmas = [s for c in calls for s in c["sigmas"]]
        assert max(sigmas) <= 1.0 and calls[0]["sigmas"][0] > 0.99  # flow sigmas: t in (0, 1], starting at ~1
        check_images(server, entry, "sca", B)

    def test_trainer_one_iteration_then_its_table_samples(self, server):
        tag = "sd15_trainer"
        g = base_graph(server, tag, batch=1)
        g["trainer"] = {"class_type": "EPDTrainer", "inputs": {
            "mode": "distill", "model": ["logged", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent": ["empty", 0], "steps": 2, "num_points": 2, "solver": "epd", "schedule": "epd_discrete",
            "teacher": "euler", "inserted_steps": 0, "iterations": 1, "learning_rate": 0.1, "batch": 1,
            "seed": 7, "cfg": CFG, "objective": "per_step", "name": "real_sd15_trained",
            "measure_minutes": 0.0}}
        t0 = time.time()
        run_ok(server, g, timeout=900)
        print(f"  EPD Trainer, 1 iteration at {SIZE}x{SIZE}: {time.time() - t0:.1f}s, "
              f"{len(server.call_log(tag))} model calls")
        table = EPDParams.load(server.base / "models" / "epd_params" / "real_sd15_trained.safetensors")
        assert (table.num_steps, table.num_points) == (2, 2) and table.metadata["model_family"] == "sd15"
        assert table.metadata["provenance"]["iterations"] == 1
        assert all(torch.isfinite(t).all() for t in table.tensors())
        sizes = [c["batch"] for c in server.call_log(tag)]
        # the teacher (one sample x cond/uncond per call) and the student's K points in one call
        assert sizes.count(2) >= 100 and 2 * 2 in sizes, sizes

        tag = "sd15_trained_sampling"
        g = base_graph(server, tag)
        g["table"] = {"class_type": "LoadEPDParams", "inputs": {"name": "real_sd15_trained.safetensors"}}
        custom_sampling(g, "table")
        outputs(g, "sca", tag)
        watch = LogWatch(server)
        entry = run_ok(server, g)
        assert "sigmas differ" not in watch.new()
        assert [c["batch"] for c in server.call_log(tag)] == [2 * B, 2 * B * 2] * 2 + [2 * B]
        check_images(server, entry, "sca", B)


def picture() -> np.ndarray:
    """A seeded 64x64 RGB picture with structure (gradients + noise), for img2img and inpainting."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 1 - x * y], -1) * 200 + rng.integers(0, 55, (SIZE, SIZE, 3))
    return rgb.clip(0, 255).astype(np.uint8)


def sd15_discrete_sigmas(comfy_sampling, n: int) -> torch.Tensor:
    """The n sigmas of the 'discrete' schedule (rho 1) through SD1.5's own sigma table, computed in-process."""
    import comfy.model_sampling

    from epd_core.sampling import schedules
    class Settings:
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}

    class SD15Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass
    return schedules.discrete(n, SD15Sampling(Settings()).sigmas, 1.0)


# ---- SDXL ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("EPD_SDXL_TEST") == "0", reason="EPD_SDXL_TEST=0: the SDXL-size test is off")
def test_sdxl_ksampler_tiles_adm_y_with_the_k_points(tmp_path):
    """SDXL's ADM vector `y` (pooled text + size embedding) must be tiled for the K points exactly like the
    text conditioning. The biggest test of the suite: a 6.5 GiB fp16 file (built in 40 s), a server that peaks at
    14 GiB resident (the mmapped file included) with --fp16-unet, about 3 minutes; EPD_SDXL_TEST=0 turns it off
    on machines with less than ~20 GB of memory."""
    tables = {f"real_sdxl_{s}.safetensors": ksampler_table(s, "sdxl") for s in ("epd", "epd_plugin")}
    # fp16 weights (cast per layer to fp32 on the CPU) halve the UNet's 10 GiB of fp32 weights
    server = start_server(tmp_path / "real_sdxl", "sdxl", tables, args=["--fp16-unet"])
    try:
        for solver in ("epd", "epd_plugin"):
            tag = f"sdxl_ks_{solver}"
            g = base_graph(server, tag)
            g["ks"] = ksampler(("empty", 0), solver, seed=21)
            outputs(g, "ks", tag)
            entry = run_ok(server, g, timeout=1800)
            log = server.log_path.read_text(errors="replace")
            assert f"EPD: {solver} on sdxl with {ROWS} steps uses real_sdxl_{solver}.safetensors" in log
            calls = server.call_log(tag)
            check_k_calls(calls, B, K)
            assert all(set(c["cond_batches"]) >= {"c_crossattn", "y"} for c in calls), calls[0]
            check_images(server, entry, "ks", B)
        assert "unet missing" not in log and "clip missing" not in log
    finally:
        stop_server(server, "sdxl")


def test_real_checkpoint_layout_is_what_comfyui_detects():
    """The cached file is recognised by ComfyUI's own model detection as SD1.5 with no key left over."""
    from bench.real_checkpoints import checkpoint_layout, checkpoint_path, import_comfy
    comfy = import_comfy()
    path = ensure_checkpoint("sd15")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        unet = {k: f.get_slice(k) for k in keys if k.startswith("model.diffusion_model.")}
    assert keys == set(checkpoint_layout("sd15"))
    shapes = {k: torch.empty(v.get_shape(), device="meta") for k, v in unet.items()}
    config = comfy.model_detection.model_config_from_unet(shapes, "model.diffusion_model.")
    assert type(config).__name__ == "SD15"
    assert re.fullmatch(r"epd-random-sd15-fp16-v\d+\.safetensors", checkpoint_path("sd15").name)


def test_command_line_trains_a_comfyui_checkpoint(tmp_path):
    """`python nodes/train_cli.py distill --checkpoint ...`: the checkpoint loaded by ComfyUI's loader, trained
    inside its CFGGuider (the node's code path), the table written with the model's family and schedule."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "cli.safetensors"
    cmd = [sys.executable, "nodes/train_cli.py", "distill", "--checkpoint", str(ensure_checkpoint("sd15")),
           "--comfyui", str(repo / ".comfyui"), "--prompt", "a cat", "--width", "64", "--height", "64",
           "--steps", "2", "-K", "2", "--iterations", "1", "--batch", "1", "--num-batches", "1",
           "--teacher", "euler", "--teacher-steps", "0", "-M", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = EPDParams.load(out)
    assert (table.num_steps, table.num_points, table.metadata["model_family"]) == (2, 2, "sd15")
    assert table.schedule["type"] == "discrete" and len(table.schedule["sigmas"]) == 3
    assert all(torch.isfinite(t).all() for t in table.tensors())


def test_a_checkpoint_short_of_disk_evicts_the_other_cached_checkpoints_oldest_first(tmp_path):
    """The cache never fills a small CI disk: another architecture's file goes before a build is refused."""
    from bench.real_checkpoints import make_room
    target = tmp_path / "epd-random-sdxl-fp16-v2.safetensors"
    older, newer = tmp_path / "epd-random-sd15-fp16-v0.safetensors", tmp_path / "epd-random-sd15-fp16-v1.safetensors"
    for i, p in enumerate((older, newer, target)):
        p.write_bytes(os.urandom(64 * 2 ** 20))  # real bytes, not holes
        os.utime(p, (1000 + i, 1000 + i))
    keep = tmp_path / "not-a-cache-file.safetensors"
    keep.write_bytes(b"x")
    make_room(target, shutil.disk_usage(tmp_path).free + 32 * 2 ** 20)  # one file's room short
    assert not older.exists() and newer.exists() and target.exists() and keep.exists()
    make_room(target, 0)  # enough room: nothing goes
    assert newer.exists()
