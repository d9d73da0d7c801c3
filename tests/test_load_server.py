"""Load on a real ComfyUI server (main.py --cpu, its own process so its memory figures are its own): 20 queued
prompts on the demo model mixing KSampler `epd` / `epd_plugin`, the EPD Sampler node and built-in samplers,
different seeds and batch sizes, with POST /interrupt sent to some of them while they run.

Every prompt must either complete with the right images (count, size, and the same pixels as an uninterrupted
run of the same settings before the load) or report `execution_interrupted` and save nothing; afterwards the
server must still answer and sample correctly, and its resident memory must come back to its level after the
warm-up: RSS after <= RSS after warm-up + 50 MB (about 5 % of the ~950 MB server; measured growth is ~1 MB, and
a leak of the latents/activations of every prompt, or a second copy of the model and torch state, would exceed
it)."""
import json
import random
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from bench.comfyui_server import ComfyServer, error_message
from epd_core.demo.models import DEFAULT_WEIGHTS

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason=f"demo weights missing: {DEFAULT_WEIGHTS}")]
CFG = 2.0
RSS_SLACK_BYTES = 50e6
TABLE = "demo_digits_epd_s4.safetensors"

# name: (kind, sampler, steps, seed, batch, decode scale). Short ones finish in well under a second; the long
# ones (80-150 steps, batch 6-8) run for 1-3 s, long enough to be interrupted in the middle.
CONFIGS = {
    "ks_epd": ("ksampler", "epd", 6, 101, 2, 8),
    "ks_plugin": ("ksampler", "epd_plugin", 5, 102, 3, 4),
    "node_epd": ("node", "epd_sigmas", 0, 103, 4, 8),
    "euler": ("ksampler", "euler", 8, 104, 1, 4),
    "dpmpp_2m": ("ksampler", "dpmpp_2m", 8, 105, 5, 8),
    "heun": ("ksampler", "heun", 6, 106, 2, 4),
    "long_epd": ("ksampler", "epd", 80, 201, 8, 4),
    "long_euler": ("ksampler", "euler", 150, 202, 8, 4),
    "long_node": ("node", "karras", 80, 203, 6, 4),
    "long_heun": ("ksampler", "heun", 80, 204, 6, 4),
    "long_plugin": ("ksampler", "epd_plugin", 80, 205, 8, 4),
}
# 20 prompts: every short config twice, every long one once or twice. `True`: interrupt it once its sampler
# has made progress (a short one may well finish before the interrupt lands: it must then be complete).
LOAD = ([(name, False) for name in ("ks_epd", "ks_plugin", "node_epd", "euler", "dpmpp_2m", "heun")] * 2
        + [("long_epd", True), ("long_euler", True), ("long_node", True), ("long_heun", False),
           ("long_plugin", True), ("long_epd", False), ("long_node", True), ("ks_plugin", True)])
SAMPLER_NODE = "sampler"


def prompt(name, tag):
    """The API graph of config `name`; `tag` goes into the call-logging MODEL patch (so no two prompts share a
    cache key and every one really samples) and into the SaveImage prefix."""
    kind, sampler, steps, seed, batch, scale = CONFIGS[name]
    g = {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "logged": {"class_type": "EPDTestCallLogger", "inputs": {"model": ["model", 0], "tag": tag}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": seed % 10}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "decode": {"class_type": "EPDDemoDecode", "inputs": {"samples": [SAMPLER_NODE, 0], "scale": scale}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"load/{tag}"}},
    }
    if kind == "ksampler":
        g[SAMPLER_NODE] = {"class_type": "KSampler", "inputs": {
            "model": ["logged", 0], "seed": seed, "steps": steps, "cfg": CFG, "sampler_name": sampler,
            "scheduler": "karras", "positive": ["cond", 0], "negative": ["cond", 1], "latent_image": ["empty", 0],
            "denoise": 1.0}}
        return g
    g.update({
        "params": {"class_type": "LoadEPDParams", "inputs": {"name": TABLE}},
        "epd": {"class_type": "EPDSampler", "inputs": {"params": ["params", 0], "solver": "auto", "max_order": 0,
                                                       "afs": "auto", "execution": "auto",
                                                       "max_batch": batch if seed % 2 else 0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["logged", 0], "positive": ["cond", 0],
                                                         "negative": ["cond", 1], "cfg": CFG}},
        SAMPLER_NODE: {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["epd", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
    })
    if sampler == "epd_sigmas":  # the table's own schedule
        g["sigmas"] = {"class_type": "EPDSigmas", "inputs": {"model": ["logged", 0], "params": ["params", 0],
                                                             "append_zero": True}}
    else:  # a long karras list: the table's rows are interpolated over it
        g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["logged", 0], "scheduler": sampler,
                                                                  "steps": steps, "denoise": 1.0}}
    return g


def images(server, entry):
    """The saved images of a finished prompt as uint8 arrays."""
    return [np.asarray(Image.open(server.output_path(info))) for info in entry["outputs"]["save"]["images"]]


def statuses(entry):
    return [kind for kind, _ in entry["status"].get("messages", [])]


@pytest.fixture
def server(tmp_path, monkeypatch):
    # a server of its own (memory figures not shared with other tests); one thread as in the other server tests
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    srv = ComfyServer(tmp_path / "load_base").start()
    yield srv
    srv.stop()


def test_twenty_mixed_prompts_with_interrupts(server):
    import websocket  # websocket-client
    t_start = time.time()
    proc = psutil.Process(server.proc.pid)
    rng = random.Random(2026)

    # ---- warm-up: every config once, uninterrupted: the reference pixels ---------------------------------
    reference = {}
    for name in CONFIGS:
        entry = server.run(prompt(name, f"ref_{name}"))
        assert entry["status"]["status_str"] == "success", f"{name}: {error_message(entry)}\n{server.log_tail()}"
        reference[name] = images(server, entry)
        kind, _, _, _, batch, scale = CONFIGS[name]
        assert len(reference[name]) == batch and reference[name][0].shape == (8 * scale, 8 * scale, 3)
        assert any(img.std() > 0 for img in reference[name]), f"{name}: blank images"
    rss_warm = proc.memory_info().rss
    t_warm = time.time() - t_start

    # ---- load: 20 prompts queued at once, some interrupted mid-run ----------------------------------------
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=120)
    try:
        jobs = {}  # prompt_id -> (config name, tag, interrupt at this progress value or None)
        for i, (name, interrupt) in enumerate(LOAD):
            steps = CONFIGS[name][2] or 4
            at = max(1, int(steps * rng.uniform(0.1, 0.6))) if interrupt else None
            tag = f"load{i:02d}_{name}"
            jobs[server.queue(prompt(name, tag))] = (name, tag, at)
        ended, interrupts_sent, rss_peak, after_interrupt = {}, {}, rss_warm, {}
        deadline = time.time() + 600
        while len(ended) < len(jobs):
            assert time.time() < deadline, f"load did not finish; ended: {ended}\n{server.log_tail()}"
            raw = ws.recv()
            rss_peak = max(rss_peak, proc.memory_info().rss)
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            data = msg.get("data", {})
            pid = data.get("prompt_id")
            if pid not in jobs:
                continue
            at = jobs[pid][2]
            if msg["type"] == "progress" and pid in interrupts_sent:  # sampler steps run after the interrupt
                after_interrupt[pid] = after_interrupt.get(pid, 0) + 1
            if (msg["type"] == "progress" and data.get("node") == SAMPLER_NODE and at is not None
                    and pid not in interrupts_sent and data["value"] >= at):
                server.post("/interrupt", {"prompt_id": pid})  # targeted: only if it is the running prompt
                interrupts_sent[pid] = data["value"]
            if msg["type"] in ("execution_success", "execution_interrupted", "execution_error"):
                ended[pid] = msg["type"]
    finally:
        ws.close()
    t_load = time.time() - t_start - t_warm

    # ---- every prompt: complete and correct, or interrupted with nothing saved -----------------------------
    completed, interrupted = [], []
    for pid, (name, tag, at) in jobs.items():
        entry = server.wait(pid, timeout=60)
        if entry["status"]["status_str"] == "success":
            got = images(server, entry)
            assert len(got) == len(reference[name]), f"{tag}: {len(got)} images"
            for a, b in zip(got, reference[name]):
                assert a.shape == b.shape, f"{tag}: image size {a.shape} != {b.shape}"
                assert np.array_equal(a, b), f"{tag}: pixels differ from the uninterrupted run"
            completed.append(tag)
        else:
            assert "execution_interrupted" in statuses(entry) and ended[pid] == "execution_interrupted", \
                f"{tag} failed instead of completing or being interrupted: {error_message(entry)}"
            assert pid in interrupts_sent, f"{tag} was interrupted although no interrupt was sent for it"
            assert not list((server.base / "output" / "load").glob(f"{tag}_*")), f"{tag}: partial output saved"
            interrupted.append(tag)
    targeted = sum(1 for _, _, at in jobs.values() if at is not None)
    assert len(completed) + len(interrupted) == len(LOAD) == 20
    assert len(interrupted) >= 3, f"only {len(interrupted)} of {targeted} targeted prompts were interrupted"

    # ---- afterwards: still serving, still correct, memory back ---------------------------------------------
    assert server.get("/system_stats")["system"]
    entry = server.run(prompt("ks_epd", "after_load"))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert all(np.array_equal(a, b) for a, b in zip(images(server, entry), reference["ks_epd"]))
    assert server.proc.poll() is None
    time.sleep(1.0)  # let the executor finish its post-prompt cleanup
    rss_after = proc.memory_info().rss
    limit = rss_warm + RSS_SLACK_BYTES
    mb = 1e6
    print(f"\nload test: {len(LOAD)} prompts ({len(CONFIGS)} configs: KSampler epd/epd_plugin, EPD Sampler node, "
          f"euler/dpmpp_2m/heun; batch 1-8), {len(interrupts_sent)} interrupts sent ({targeted} targeted): "
          f"{len(completed)} completed with reference pixels, {len(interrupted)} interrupted (sent at steps "
          f"{sorted(interrupts_sent.values())}, at most {max(after_interrupt.values(), default=0)} more steps "
          f"reported after one) | server RSS after "
          f"warm-up {rss_warm / mb:.0f} MB, peak during load {rss_peak / mb:.0f} MB, after {rss_after / mb:.0f} MB "
          f"(limit {limit / mb:.0f} MB = +50 MB) | warm-up {t_warm:.1f}s, load {t_load:.1f}s")
    assert rss_after <= limit, f"server RSS grew from {rss_warm / mb:.0f} MB to {rss_after / mb:.0f} MB"
