"""EPD Trainer inside a real ComfyUI server (main.py --cpu) on the embedded demo model: progress events on the
websocket, the table written to models/epd_params/ and listed without a restart, Cancel (POST /interrupt)
within an iteration leaving the last checkpoint intact, and re-queueing resuming from it to the same table
as an uninterrupted run."""
import json
import time

import pytest

from bench.comfyui_server import ComfyServer, error_message
from epd_core.demo.models import DEFAULT_WEIGHTS
from epd_core.training.distill import load_checkpoint
from epd_core.tables.params import EPDParams

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason=f"demo weights missing: {DEFAULT_WEIGHTS}")]
STEPS, ITERATIONS = 3, 60  # checkpoints every max(1, min(50, 60 // 10)) = 6 iterations


@pytest.fixture(scope="module")
def server(tmp_path_factory, monkeypatch_module):
    # tiny models on a shared 2-core machine: one thread avoids OpenMP spin-waits that are 10-50x slower
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")
    srv = ComfyServer(tmp_path_factory.mktemp("trainer_base")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def graph(name, iterations=ITERATIONS):
    return {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 3}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "trainer": {"class_type": "EPDTrainer", "inputs": {
            "mode": "distill", "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
            "latent": ["empty", 0], "steps": STEPS, "num_points": 2, "solver": "epd", "schedule": "epd_discrete",
            "teacher": "heun", "inserted_steps": 1, "iterations": iterations, "learning_rate": 0.1, "batch": 4,
            "seed": 7, "cfg": 2.0, "objective": "per_step+end_to_end", "name": name,
            # no held-out report here (tests/test_compare.py tests it with a budget of its own): it would only add
            # minutes on a slow machine, and the cancel / resume tests time their interrupts against training
            "measure_minutes": 0.0}},
        "curve": {"class_type": "PreviewImage", "inputs": {"images": ["trainer", 1]}},
    }


def run_collecting(server, prompt, interrupt_at=None, timeout=300):
    """Queue `prompt`, collect websocket messages until it ends; optionally POST /interrupt once the trainer's
    progress reaches `interrupt_at`. Returns (history entry, messages, progress value at the interrupt)."""
    messages, sent = [], []

    def maybe_interrupt(msg):
        data = msg.get("data", {})
        if msg["type"] == "progress" and data.get("node") == "trainer" and interrupt_at and not sent \
                and data["value"] >= interrupt_at:
            sent.append(data["value"])
            server.interrupt()
    entry = server.run(prompt, timeout, messages=messages, on_message=maybe_interrupt)
    return entry, messages, (sent[0] if sent else None)


def trainer_progress(messages):
    return [m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "trainer"]


def test_trainer_writes_a_loadable_table_with_progress(server):
    t0 = time.time()
    entry, messages, _ = run_collecting(server, graph("srv_table"))
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    print(f"EPD Trainer, {STEPS} steps x {ITERATIONS} iterations on the demo model: {time.time() - t0:.1f}s")
    values = trainer_progress(messages)
    assert values[-1] == ITERATIONS and values == sorted(values) and len(values) >= ITERATIONS // 2
    assert any(m["type"] == "binary" for m in messages)  # live loss-curve previews / progress text
    path = server.base / "models" / "epd_params" / "srv_table.safetensors"
    table = EPDParams.load(path)
    assert (table.num_steps, table.num_points) == (STEPS, 2) and table.metadata["model_family"]
    assert table.metadata["schedule"]["type"] == "discrete" and table.metadata["guidance_scale"] == 2.0
    assert table.metadata["provenance"]["iterations"] == ITERATIONS
    assert not (server.base / "models" / "epd_params" / "checkpoints" / "srv_table").exists()
    # listed by Load EPD Params without a restart, and loadable through it
    options = server.get("/object_info/LoadEPDParams")["LoadEPDParams"]["input"]["required"]["name"]
    assert "srv_table.safetensors" in json.dumps(options)
    load = {"load": {"class_type": "LoadEPDParams", "inputs": {"name": "srv_table.safetensors"}},
            "save": {"class_type": "SaveEPDParams", "inputs": {"params": ["load", 0], "name": "srv_table_copy"}}}
    out = server.run(load)
    assert out["status"]["status_str"] == "success", error_message(out)
    copy = EPDParams.load(path.with_name("srv_table_copy.safetensors"))
    assert all((x == y).all() for x, y in zip(copy.tensors(), table.tensors()))
    # the loss curve IMAGE went through PreviewImage
    assert entry["outputs"]["curve"]["images"]


def test_cancel_keeps_the_checkpoint_and_requeue_resumes_it(server):
    name = "srv_resume"
    ckpt = server.base / "models" / "epd_params" / "checkpoints" / name / "distill.distill-checkpoint"
    entry, messages, sent_at = run_collecting(server, graph(name), interrupt_at=15)
    assert entry["status"]["status_str"] != "success"
    assert any(m["type"] == "execution_interrupted" for m in messages), [m["type"] for m in messages]
    after = [v for v in trainer_progress(messages) if v > sent_at]
    print(f"interrupt sent at iteration {sent_at}; iterations completed after it: {len(after)}")
    assert len(after) <= 1  # Cancel takes effect within one iteration
    saved = load_checkpoint(ckpt)
    assert saved["iteration"] % 6 == 0 and 12 <= saved["iteration"] <= sent_at + 1
    snapshot = ckpt.read_bytes()

    entry, messages, _ = run_collecting(server, graph(name))
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    values = trainer_progress(messages)
    assert values[0] == saved["iteration"] + 1, f"did not resume from {saved['iteration']}: {values[:5]}"
    assert snapshot  # the interrupted run's checkpoint was read, then removed after success
    assert not ckpt.exists()
    # the resumed table equals an uninterrupted run with the same settings (the name is not a setting)
    entry, _, _ = run_collecting(server, graph("srv_straight"))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    a = EPDParams.load(server.base / "models" / "epd_params" / f"{name}.safetensors")
    b = EPDParams.load(server.base / "models" / "epd_params" / "srv_straight.safetensors")
    diff = max((x - y).abs().max().item() for x, y in zip(a.tensors(), b.tensors()))
    print(f"max |resumed - uninterrupted| = {diff:.3g}")
    assert diff < 1e-5


# ------------------------------------------------------------------------------------------------ RL (RDPO)

RL_PROMPTS, RL_ITERATIONS = "1\n3\n7\n8", 8


def rl_graph(name, iterations=RL_ITERATIONS, reward=None, init="demo_digits_epd_s4.safetensors"):
    g = graph(name)
    g["init"] = {"class_type": "LoadEPDParams", "inputs": {"name": init}}
    g["reward"] = reward or {"class_type": "EPDRewardDemoClassifier", "inputs": {}}
    g["settings"] = {"class_type": "EPDRLSettings", "inputs": {
        "prompts": RL_PROMPTS, "group_size": 4, "prompts_per_update": 2, "ppo_epochs": 2, "learning_rate": 1e-3,
        "clip": 0.2, "kl_coef": 0.0, "kappa": 15.0, "distill_iterations": 10}}
    g["trainer"]["inputs"].update(mode="rl", iterations=iterations, seed=0, reward=["reward", 0],
                                  rl_settings=["settings", 0], init_params=["init", 0])
    return g


def sample_with(table_name, digit=7, seed=3):
    """SamplerCustomAdvanced + EPD Sampler + EPD Sigmas with a table file, decoded to an image."""
    return {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": digit}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "table": {"class_type": "LoadEPDParams", "inputs": {"name": table_name}},
        "sampler": {"class_type": "EPDSampler", "inputs": {"params": ["table", 0], "solver": "auto", "max_order": 0,
                                                           "afs": "auto", "execution": "auto", "max_batch": 0}},
        "sigmas": {"class_type": "EPDSigmas", "inputs": {"model": ["model", 0], "params": ["table", 0],
                                                         "append_zero": True}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["cond", 0],
                                                         "negative": ["cond", 1], "cfg": 2.0}},
        "run": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
        "decode": {"class_type": "EPDDemoDecode", "inputs": {"samples": ["run", 0], "scale": 8}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": table_name[:-12]}},
    }


def max_change(a, b):
    """Largest difference of the activated values (positions, weights, scales) of two tables."""
    names = ("positions", "weights", "dir_scales", "time_scales")
    return max((getattr(a, n) - getattr(b, n)).abs().max().item() for n in names)


def test_rl_mode_equals_the_cli_and_its_table_samples(server, tmp_path):
    """The trainer's rl mode on the demo model gives the table `python -m epd_core.train rl` gives with the same
    settings (the node's per-prompt conditioning inside ComfyUI's CFGGuider is the CLI's class-label CFG), shows
    a reward progress bar, and the saved table samples in SamplerCustomAdvanced."""
    import os
    import subprocess
    import sys
    from bench.comfyui_server import REPO
    t0 = time.time()
    entry, messages, _ = run_collecting(server, rl_graph("srv_rl"))
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    print(f"EPD Trainer rl, {RL_ITERATIONS} updates x 2 prompts x group 4 on the demo model: {time.time() - t0:.1f}s")
    assert trainer_progress(messages)[-1] == RL_ITERATIONS
    path = server.base / "models" / "epd_params" / "srv_rl.safetensors"
    table = EPDParams.load(path)
    start = EPDParams.load(REPO / "pretrained_params" / "demo_digits_epd_s4.safetensors")
    prov = table.metadata["provenance"]
    assert prov["reward"] == "demo_classifier" and prov["prompts_per_iteration"] == 2 and prov["num_prompts"] == 4
    assert table.metadata["guidance_scale"] == 2.0 and table.metadata["schedule"] == start.metadata["schedule"]
    moved = max_change(table, start)
    assert moved > 1e-3  # it trained
    assert entry["outputs"]["curve"]["images"]  # the reward curve IMAGE

    out = tmp_path / "cli_rl.safetensors"
    cmd = [sys.executable, "-m", "epd_core.train", "rl", "--init", str(REPO / "pretrained_params" /
           "demo_digits_epd_s4.safetensors"), "--prompts", RL_PROMPTS.replace("\n", ","), "--prompts-per-update", "2",
           "--iterations", str(RL_ITERATIONS), "--group-size", "4", "--epochs", "2", "--lr", "1e-3", "--kl-coef", "0",
           "--guidance-scale", "2.0", "--seed", "0", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli = EPDParams.load(out)
    diff = max_change(table, cli)
    print(f"max |node rl table - CLI rl table| = {diff:.3g} (moved {moved:.3g} from the start)")
    assert diff < 0.05 * moved

    entry = server.run(sample_with("srv_rl.safetensors"))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 2 and all(server.output_path(i).is_file() for i in images)


def test_rl_mode_errors_are_clear(server):
    g = rl_graph("srv_rl_err")
    del g["trainer"]["inputs"]["reward"], g["reward"]
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error" and "connect an EPD Reward node" in error_message(entry)
    g = rl_graph("srv_rl_err", reward={"class_type": "EPDRewardLocalModel", "inputs": {"kind": "pickscore",
                                                                                       "path": ""}})
    entry = server.run(g)
    msg = error_message(entry)
    assert entry["status"]["status_str"] == "error" and "epd_rewards" in msg and "never downloads" in msg, msg
    g = rl_graph("srv_rl_err")
    g["settings"]["inputs"]["prompts"] = "three"
    entry = server.run(g)
    assert entry["status"]["status_str"] == "error" and "digits 0-9" in error_message(entry)


def test_rl_without_init_distills_first_and_resumes_after_cancel(server):
    """No init_params: a starting table is distilled first (10 iterations), then 12 RL updates (a checkpoint
    after each). Cancel during RL, re-queue: the finished distillation is not repeated, RL resumes from its
    checkpoint, and the result equals an uninterrupted run."""
    def graph_no_init(name):
        g = rl_graph(name, iterations=12)
        del g["init"], g["trainer"]["inputs"]["init_params"]
        return g
    name, sent, messages = "srv_rl_resume", [], []

    def interrupt_in_rl(msg):
        data = msg.get("data", {})
        if msg["type"] == "progress" and data.get("node") == "trainer" and data["max"] == 12 and data["value"] >= 5 \
                and not sent:
            sent.append(data["value"])
            server.interrupt()
    entry = server.run(graph_no_init(name), messages=messages, on_message=interrupt_in_rl)
    assert sent and entry["status"]["status_str"] != "success"
    folder = server.base / "models" / "epd_params" / "checkpoints" / name
    assert (folder / "distill.distill-checkpoint").is_file() and (folder / "rl.rl-checkpoint").is_file()

    messages = []
    entry = server.run(graph_no_init(name), messages=messages)
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    phases = [(m["data"]["max"], m["data"]["value"]) for m in messages
              if m["type"] == "progress" and m["data"].get("node") == "trainer"]
    rl_values = [v for mx, v in phases if mx == 12]
    print(f"interrupted at RL update {sent[0]}; the re-queued run reported RL updates {rl_values}")
    assert not [v for mx, v in phases if mx == 10 and v < 10]  # the distillation was not run again
    assert rl_values[0] > 1 and rl_values[-1] == 12  # RL resumed from its checkpoint
    assert not folder.exists()

    entry = server.run(graph_no_init("srv_rl_straight"))
    assert entry["status"]["status_str"] == "success", error_message(entry)
    a, b = (EPDParams.load(server.base / "models" / "epd_params" / f"{n}.safetensors")
            for n in (name, "srv_rl_straight"))
    print(f"max |resumed - uninterrupted| = {max_change(a, b):.3g}")
    assert max_change(a, b) < 1e-6


@pytest.mark.parametrize("name", ["epd_demo_trainer", "epd_demo_rl_trainer"])
def test_shipped_trainer_workflows_train_and_sample(server, name):
    """What a user gets by loading the shipped trainer workflow and pressing Queue: a table file, its loss or
    reward curve, its preview picture, and digits sampled with it in the same graph."""
    from bench.comfyui_server import REPO
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    t0 = time.time()
    entry = server.run(api, timeout=1200)  # training, then the held-out report within its measure_minutes
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    trainer = api["4"]["inputs"]
    table = EPDParams.load(server.base / "models" / "epd_params" / f"{trainer['name']}.safetensors")
    images = {k: v["images"] for k, v in entry["outputs"].items() if v.get("images")}
    assert set(images) >= {"5", "6", "13"} and len(images["13"]) == 8  # curve, table preview, 8 digits
    print(f"{name}: {time.time() - t0:.1f}s, {table.describe()}, {table.metadata['provenance'].get('trainer')}, "
          f"measured: {table.metadata.get('measured')}")
