"""EPD Trainer inside a real ComfyUI server (main.py --cpu) on the embedded demo model: progress events on the
websocket, the table written to models/epd_params/ and listed without a restart, Cancel (POST /interrupt)
within an iteration leaving the last checkpoint intact, and re-queueing resuming from it to the same table
as an uninterrupted run."""
import json
import time

import pytest

from comfyui_server import ComfyServer, error_message
from epd_core.demo_model import DEFAULT_WEIGHTS
from epd_core.distill import load_checkpoint
from epd_core.params import EPDParams

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
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 3}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "trainer": {"class_type": "EPDTrainer", "inputs": {
            "mode": "distill", "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
            "latent": ["empty", 0], "steps": STEPS, "num_points": 2, "solver": "epd", "schedule": "epd_discrete",
            "teacher": "heun", "inserted_steps": 1, "iterations": iterations, "learning_rate": 0.1, "batch": 4,
            "seed": 7, "cfg": 2.0, "objective": "per_step+end_to_end", "name": name}},
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
