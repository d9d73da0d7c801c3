"""EPD Compare and the trainer's held-out report.

  * epd_core.compare on the exact Gaussian-mixture denoiser: NFE counted by wrapping the model, built-in
    schedulers chosen on the fit noises only, a losing table called a loser; compute NFE counted beside latency
    NFE, every candidate timed and each table held at equal time against a built-in that is not slower (the
    assertions are on structure and consistency, never on how fast this machine is);
  * the node in-process on the MNIST demo model agrees with bench/quality_vs_nfe.py's method on the same noises
    (same seeds, same reference, same built-in field): the ratios within RATIO_TOLERANCE;
  * through a real server: the shipped epd_compare_demo workflow, the EPD Trainer writing `measured` into its
    table, and (slow) the node on the random-weight SD1.5 architecture with a VAE grid.
"""
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from bench.comfyui_server import error_message
from epd_core import compare
from epd_core.demo.gmm import GaussianMixtureDenoiser
from epd_core.tables.params import EPDParams
from epd_core.sampling.schedules import polynomial, with_final_zero
from epd_core.sampling.registry import variant

REPO = Path(__file__).resolve().parents[1]
# relative; the node prints 3 decimals (<= 0.09 % rounding at these ratios) and runs through ComfyUI's CFGGuider,
# the benchmark calls the network directly: measured agreement 0.593 / 0.777 against 0.5930 / 0.7770
RATIO_TOLERANCE = 0.005


# ---- epd_core.compare on the exact mixture ----------------------------------------------------------------
def euler(m, x, s):
    for i in range(len(s) - 1):
        x = x + (x - m(x, s[i] * x.new_ones(len(x)))) / s[i] * (s[i + 1] - s[i])
    return x


def heun(m, x, s):
    for i in range(len(s) - 1):
        d = (x - m(x, s[i] * x.new_ones(len(x)))) / s[i]
        xn = x + d * (s[i + 1] - s[i])
        if s[i + 1] > 0:
            xn = x + (d + (xn - m(xn, s[i + 1] * x.new_ones(len(x)))) / s[i + 1]) / 2 * (s[i + 1] - s[i])
        x = xn
    return x


def karras(n, rho=7.0):
    return with_final_zero(polynomial(n, 0.002, 80.0, rho))


@pytest.fixture(scope="module")
def mixture():
    model = GaussianMixtureDenoiser(dim=16, seed=0)

    def noise(seed, n=8):
        return 80.0 * torch.randn(n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, noise


def test_compare_counts_calls_and_chooses_schedulers_on_the_fit_noises(mixture, float64_one_thread):
    model, noise = mixture
    builtins = []
    for name, fn, per_step in (("euler", euler, 1), ("heun", heun, 2)):
        for rho in (1.0, 3.0, 7.0):
            for steps in range(2, 7):
                c = compare.Candidate(f"{name} rho {rho}, {steps}", fn, karras(steps, rho), "builtin", name,
                                      f"rho{rho}", steps)
                c.calls = compare.probe_calls(c)
                builtins.append(c)
    assert [c.calls for c in builtins if c.sampler == "euler"][:5] == [2, 3, 4, 5, 6]
    assert [c.calls for c in builtins if c.sampler == "heun"][:5] == [3, 5, 7, 9, 11]  # no 2nd call into 0
    neutral = EPDParams.neutral(2, 2, solver="epd", afs=False)
    fn = variant("epd").sample_fn()
    table = compare.Candidate("neutral K=2", lambda m, x, s: fn(m, x, s, neutral, disable=True), karras(3), "table")
    ref = compare.Candidate("heun 200", heun, karras(200), "reference")

    def broken(m, x, s):
        raise ValueError("this sampler cannot run at this size")
    builtins.append(compare.Candidate("broken", broken, karras(4), "builtin", "broken"))
    calls = []
    result = compare.compare(model, noise(1), noise(2), ref, builtins, [table], [4, 5], chunk=4,
                             on_call=lambda: calls.append(1))
    assert result.skipped == {"broken": "ValueError: this sampler cannot run at this size"}
    # the table's NFE was counted, not computed: 2 rows x (d_cur + one K-point call) + final Euler = 5
    assert "neutral K=2" in result.nfe[5]["tables"] and not result.nfe[4]["tables"]
    assert result.nfe[4]["best_builtin"] == "euler"  # heun has no 4-call configuration here
    assert set(result.nfe[5]["builtins"]) == {"euler", "heun"}
    # the choice is the lowest FIT error, whatever the test error says
    row = result.nfe[5]["builtins"]
    assert result.nfe[5]["best_builtin"] == min(row, key=lambda s: row[s]["fit"])
    # every model call went through the counter (two chunks of 4 per solve)
    ref_calls = 2 * 199 * 2
    assert len(calls) >= ref_calls + 2 * 4 * 2
    ratio = result.nfe[5]["tables"]["neutral K=2"]["ratio"]
    best = result.best(5)
    assert ratio == pytest.approx(result.nfe[5]["tables"]["neutral K=2"]["rmse"] / best["rmse"])
    text = compare.report(result)
    assert "NFE" in text and best["name"] in text and "Skipped 1 built-in configuration(s)" in text
    assert compare.verdict(1.5, "x").startswith("does NOT beat the best built-in (x): 1.50x")
    assert compare.verdict(0.5, "x").startswith("wins: 0.50x")


def test_compute_nfe_timing_and_the_verdict_at_equal_time(mixture, float64_one_thread):
    model, noise = mixture
    builtins = []
    for steps in range(2, 9):
        for rho in (3.0, 7.0):
            c = compare.Candidate(f"euler rho {rho}, {steps}", euler, karras(steps, rho), "builtin", "euler",
                                  f"rho{rho}", steps)
            c.calls = compare.probe_calls(c)
            builtins.append(c)
    neutral = EPDParams.neutral(2, 3, solver="epd", afs=False)
    fn = variant("epd").sample_fn()
    table = compare.Candidate("neutral K=3", lambda m, x, s: fn(m, x, s, neutral, disable=True), karras(3), "table")
    table.calls = compare.probe_calls(table)
    assert table.calls == 5 and table.evals == 2 * (1 + 3) + 1  # latency 5, compute 9
    ref = compare.Candidate("heun 100", heun, karras(100), "reference")
    ref.calls = compare.probe_calls(ref)
    calls = []
    result = compare.compare(model, noise(1), noise(2), ref, builtins, [table], [3, 5, 7, 9], chunk=8, repeats=3,
                             timed_samples=4, on_call=lambda: calls.append(1))
    assert len(calls) == compare.planned_calls(ref, builtins, [table], [3, 5, 7, 9], 1, 1, repeats=3)
    assert (result.repeats, result.timed_samples, result.device) == (3, 4, "cpu")
    t = result.nfe[5]["tables"]["neutral K=3"]
    assert t["compute_nfe"] == 9 and all(b["compute_nfe"] == n for n, row in result.nfe.items()
                                         for b in row["builtins"].values())
    timed = [b for row in result.nfe.values() for b in row["builtins"].values()] + [t]
    assert all(c["seconds"] is not None and c["seconds"] > 0 for c in timed)
    # at equal time: of the kept configurations not slower than the table (timing tolerance included), the one
    # with the lowest FIT error; its ratio is the table's test RMSE over its own
    eligible = [(n, b) for n, row in result.nfe.items() for b in row["builtins"].values()
                if b["seconds"] <= t["seconds"] * (1 + compare.EQUAL_TIME_TOLERANCE)]
    opponent = t["equal_time"]
    if eligible:
        n, b = min(eligible, key=lambda nb: nb[1]["fit"])
        assert (opponent["nfe"], opponent["name"]) == (n, b["name"])
        assert opponent["seconds"] <= t["seconds"] * (1 + compare.EQUAL_TIME_TOLERANCE)
        assert opponent["ratio"] == pytest.approx(t["rmse"] / b["rmse"])
    else:
        assert opponent is None
    text = compare.report(result)
    assert "Verdict at equal calls" in text and "Verdict at equal time" in text
    assert re.search(r"\n\s+5 \|\s+9 \|\s+[\d.]+ ms \| neutral K=3", text), text
    assert compare.time_verdict(t["seconds"], opponent) in text
    # a built-in exactly as fast is an opponent; one slower by more than the tolerance is not
    fake = compare.Comparison("r", 1, 1, nfe={4: {"builtins": {"a": {"fit": 1.0, "rmse": 1.0, "seconds": 1.0,
                                                                       "name": "a"},
                                                                 "b": {"fit": 0.5, "rmse": 0.5, "seconds": 1.2,
                                                                       "name": "b"}},
                                                  "best_builtin": "b", "tables": {}}})
    assert fake.equal_time(1.0)["name"] == "a" and fake.equal_time(1.15)["name"] == "b"
    assert fake.equal_time(0.5) is None
    assert compare.time_verdict(0.5, None).startswith("faster (500 ms per image) than every built-in")
    untimed = compare.compare(model, noise(1, 2), noise(2, 2), ref, builtins[:4], [table], [5], chunk=2)
    assert untimed.repeats == 0 and "Verdict at equal time" not in compare.report(untimed)


def test_planned_calls_is_what_compare_spends(mixture, float64_one_thread):
    model, noise = mixture
    builtins = []
    for steps in range(2, 6):
        c = compare.Candidate(f"euler {steps}", euler, karras(steps), "builtin", "euler", "k", steps)
        c.calls = compare.probe_calls(c)
        builtins.append(c)
    ref = compare.Candidate("heun 20", heun, karras(20), "reference")
    ref.calls = compare.probe_calls(ref)
    calls = []
    compare.compare(model, noise(1, 4), noise(2, 4), ref, builtins, [], [3, 5], chunk=4,
                    on_call=lambda: calls.append(1))
    assert len(calls) == compare.planned_calls(ref, builtins, [], [3, 5], 1, 1)
    calls.clear()
    compare.compare(model, noise(1, 4), noise(2, 4), ref, builtins, [], [3, 5], chunk=4, repeats=2, timed_samples=2,
                    on_call=lambda: calls.append(1))
    assert len(calls) == compare.planned_calls(ref, builtins, [], [3, 5], 1, 1, repeats=2)


def test_the_standard_error_of_a_ratio_is_how_much_it_moves_between_draws_of_noises():
    """ratio_se(errors, baseline) on 32 paired noises predicts the spread of mean(errors) / mean(baseline) over
    other draws of 32 (what the CFG guard's 2-SE margin relies on)."""
    from epd_core.compare import ratio_se
    g = torch.Generator().manual_seed(0)
    baseline = (1 + 0.4 * torch.randn(200_000, generator=g)).abs()
    errors = 0.9 * baseline * (1 + 0.3 * torch.randn(200_000, generator=g)).abs()  # paired: same noise, same hardness
    draws = torch.randint(0, 200_000, (4000, 32), generator=g)
    ratios = errors[draws].mean(1) / baseline[draws].mean(1)
    predicted = torch.tensor([ratio_se(errors[d], baseline[d]) for d in draws[:400]])
    assert abs(predicted.mean() / ratios.std() - 1) < 0.15
    assert ratio_se(2 * baseline[:32], baseline[:32]) < 1e-12  # an exact multiple: no spread at all
    with pytest.raises(ValueError, match="paired"):
        ratio_se(errors[:32], baseline[:31])


def test_the_measuring_module_imports_no_comfyui():
    import subprocess
    code = "import sys, epd_core.compare; sys.exit(any(m.split('.')[0] in ('comfy', 'comfy_extras', 'folder_paths') " \
           "for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ---- the node in-process against the benchmark on the MNIST demo model ------------------------------------
@pytest.fixture(scope="module")
def pack():
    from conftest import import_pack_nodes
    mods = import_pack_nodes("compare_nodes", "demo_nodes", "tables", "plotting")
    mods["tables"].register_folder()
    return types.SimpleNamespace(**mods)


SETTING = dict(samplers="euler,dpmpp_2m,ipndm,gradient_estimation", schedulers="karras,exponential", nfe=(4, 6),
               batch=8, ref_steps=60, digit=7, fit_seed=101, test_seed=202)  # the benchmark's noise seeds


def bench_ratios(tmp_path) -> dict[int, float]:
    """bench/quality_vs_nfe.py's numbers on the same noises: its own run(), with the node's single digit as the
    class label of every sample (the benchmark cycles through 0-9; the node has one positive conditioning)."""
    from bench import quality_vs_nfe as bench
    s = SETTING
    original = bench.problem

    def one_digit(name, cfg):
        model, ms, noise, _, mode_of, k = original(name, cfg)
        return model, ms, noise, lambda n: {"cond": torch.full((n,), s["digit"])}, mode_of, k
    argv = ["--model", "mnist", "--samples", str(s["batch"]), "--fit-samples", str(s["batch"]), "--fd-samples", "0",
            "--cfg", "1", "--solvers", "epd", "--recipe", "final_euler", "--min-nfe", str(min(s["nfe"])),
            "--max-nfe", str(max(s["nfe"])), "--schedulers", s["schedulers"], "--threads", "1",
            "--ref-steps", str(s["ref_steps"]), "--samplers", s["samplers"], "--no-schedule-search",
            "--out", str(tmp_path)]  # through its command line: every option it has since gets its default
    bench.problem = one_digit
    try:
        results = bench.main(argv)
    finally:
        bench.problem = original
    (tmp_path / "bench.json").write_text(json.dumps(results["summary"], indent=1))
    return {r["nfe"]: r for r in results["summary"] if r["nfe"] in s["nfe"]}


def test_node_ratios_agree_with_the_benchmark_on_mnist(pack, tmp_path, one_thread_torch):
    s = SETTING
    patcher = pack.demo_nodes.build_demo_model_patcher(which="mnist")
    pos, neg = pack.demo_nodes.demo_conditioning(s["digit"]), pack.demo_nodes.demo_conditioning(10)
    out = pack.compare_nodes.EPDCompare.execute(
        model=patcher, positive=pos, negative=neg, latent={"samples": torch.zeros(s["batch"], 4, 28, 28)}, cfg=1.0,
        seeds=f"{s['fit_seed']},{s['test_seed']}", fit_seeds=1, nfe=",".join(map(str, s["nfe"])), pack_pick="epd",
        builtins=s["samplers"], schedulers=s["schedulers"], reference_sampler="heun", reference_scheduler="karras",
        reference_steps=s["ref_steps"], max_minutes=10.0, timing_repeats=2)
    plot, text, grid = out.result
    assert plot.shape[-1] == 3 and plot.shape[1] > 200 and grid.shape[1] > 50
    # the plot fills its width: the frames of the NFE panel and of the time panel run along the top edge of the
    # panels over 85 % of the width between the margins (one panel with a legend column beside it: 67 %)
    edge = (plot[0, 58, 62:-20] < 0.3).all(-1).float().mean()
    assert edge > 0.85, float(edge)
    assert "median of 2 interleaved runs of 8 sample(s) on cpu" in text and "Verdict at equal time" in text
    node = {n: ratio for name, per in _ratios_from_text(text).items() for n, ratio in per.items()}
    bench = bench_ratios(tmp_path)
    print("\nnode:", node, "\nbenchmark:", {n: (r["best_builtin"], r["epd_over_best"]) for n, r in bench.items()})
    for n in s["nfe"]:
        assert bench[n]["best_builtin"].split(" (")[0] in text.split("\n")[3 + s["nfe"].index(n)]
        assert node[n] == pytest.approx(bench[n]["epd_over_best"], rel=RATIO_TOLERANCE)


def test_labels_wrap_and_are_never_cut(pack):
    """The grid's and the preview's labels: every line fits the width, and together they are the whole text."""
    from PIL import Image, ImageDraw
    d, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), pack.plotting._font(11)
    for text in ("best built-in: gradient_estimation/ays", "epd_ms pick - demo_mnist_epd_ms_k1_nfe10",
                 "x" * 80, "reference: dpmpp_2m (karras, 100 steps)"):
        lines = pack.plotting.wrap(d, text, 150, font)
        assert all(d.textlength(line, font=font) <= 150 for line in lines), lines
        assert "".join(lines).replace(" ", "") == text.replace(" ", ""), lines


@pytest.fixture
def one_thread_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ratios_from_text(text: str) -> dict[str, dict[int, float]]:
    """The ratios the node's text table states (the user-visible numbers), 3 decimals: table -> {NFE: ratio}."""
    out: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+) \|", line)
        if not m:
            continue
        for name, ratio in re.findall(r"([\w ]+ - [^:;]+): [\d.e+-]+ \(([\d.]+)\)", line):
            out.setdefault(name.strip(), {})[int(m.group(1))] = float(ratio)
    return out


# ---- through a real server ---------------------------------------------------------------------------------
def compare_demo():
    return json.loads((REPO / "workflows" / "api" / "epd_compare_demo.json").read_text())


@pytest.mark.server
@pytest.mark.slow
def test_compare_demo_workflow_runs_with_progress_and_writes_plot_and_grid(comfy_server):
    from PIL import Image
    messages = []
    g = compare_demo()
    g["4"]["inputs"]["max_minutes"] = 1440  # the largest budget: the estimate refuses on no machine
    entry = comfy_server.run(g, messages=messages, timeout=1800)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    text = entry["outputs"]["4"]["text"][0]
    assert "Verdict at equal calls" in text and "epd pick - demo_mnist_epd_nfe6" in text and "best built-in" in text
    assert "Verdict at equal time" in text and re.search(r"epd_ms pick - demo_mnist_epd_ms\w*_nfe6", text)
    for node, min_width in (("5", 900), ("6", 400)):
        (info,) = entry["outputs"][node]["images"]
        with Image.open(comfy_server.output_path(info)) as im:
            assert im.width >= min_width and im.height >= 300
    bar = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "4"]
    assert bar and bar[-1]["value"] == bar[-1]["max"] > 300  # model calls, the last one reaching the plan
    stages = [m["text"] for m in messages if m.get("node") == "4" and "text" in m]  # the node's progress text
    assert any(s.startswith("reference") for s in stages) and any("ETA" in s for s in stages), stages[:5]


@pytest.mark.server
def test_compare_refuses_a_run_longer_than_max_minutes_and_cancel_stops_it(comfy_server):
    g = compare_demo()
    # the smallest budget (0.6 s) against 2000-step references of 4 samples: over 4000 model calls, which no
    # machine makes through ComfyUI's guider in 0.6 s (a call of the demo UNet is ~1 ms even on an H100)
    g["4"]["inputs"].update(reference_steps=2000, max_minutes=0.01)
    entry = comfy_server.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "more than the allowed 1s" in error_message(entry) and "raise max_minutes" in error_message(entry)
    g["4"]["inputs"].update(reference_steps=2000, max_minutes=1440)  # the largest budget: refused on no machine
    sent = []

    def cancel_at_first_progress(msg):
        if msg["type"] == "progress" and msg["data"].get("node") == "4" and not sent:
            sent.append(1)
            comfy_server.interrupt()
    entry = comfy_server.run(g, on_message=cancel_at_first_progress, timeout=300)
    assert sent and entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])


@pytest.mark.server
@pytest.mark.slow
def test_trained_table_carries_its_measured_ratio(comfy_server):
    g = {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 3}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "trainer": {"class_type": "EPDTrainer", "inputs": {
            "mode": "distill", "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
            "latent": ["empty", 0], "steps": 3, "num_points": 2, "solver": "epd", "schedule": "karras",
            "teacher": "dpmpp", "inserted_steps": 1, "iterations": 20, "learning_rate": 0.1, "batch": 4,
            "seed": 7, "cfg": 2.0, "objective": "per_step", "name": "measured_table",
            "measure_minutes": 120.0}},  # a budget no machine exceeds here: the report never says 'skipped'
        "skip": {"class_type": "EPDTrainer", "inputs": {
            "mode": "distill", "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
            "latent": ["empty", 0], "steps": 2, "num_points": 1, "solver": "epd", "schedule": "karras",
            "teacher": "dpmpp", "inserted_steps": 0, "iterations": 1, "learning_rate": 0.1, "batch": 1,
            "seed": 7, "cfg": 2.0, "objective": "per_step", "name": "unmeasured_table", "measure_minutes": 0.0}},
        "preview": {"class_type": "PreviewEPDParams", "inputs": {"params": ["trainer", 0]}},
    }
    entry = comfy_server.run(g, timeout=600)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    table = EPDParams.load(comfy_server.base / "models" / "epd_params" / "measured_table.safetensors")
    measured = table.metadata["measured"]
    print("\nmeasured:", measured)
    # 3 rows to a positive sigma, then the final Euler step: 3 x (d_cur + K points in one call) + 1 = 7 calls
    assert measured["nfe"] == 7 and measured["held_out_samples"] == 8
    assert measured["compute_nfe"] == 3 * (1 + 2) + 1  # the K points of a call count K
    assert measured["ratio"] == pytest.approx(measured["rmse"] / measured["best_builtin_rmse"], rel=1e-3)
    # at equal time: a built-in measured not slower than the table (built-ins at NFE 7 and 10 compete)
    assert measured["seconds_per_image"] > 0 and measured["best_builtin_seconds"] > 0
    assert "median of 3 runs of 1 sample(s)" in measured["timing"] and "NFE 7, 10" in measured["timing"]
    opponent = measured["equal_time"]
    if opponent is not None:
        assert opponent["seconds"] <= measured["seconds_per_image"] * (1 + compare.EQUAL_TIME_TOLERANCE)
        assert opponent["nfe"] in (7, 10) and opponent["ratio"] == pytest.approx(measured["rmse"] / opponent["rmse"])
    assert measured["time_verdict"] == compare.time_verdict(measured["seconds_per_image"], opponent)
    skipped = EPDParams.load(comfy_server.base / "models" / "epd_params" / "unmeasured_table.safetensors")
    assert skipped.metadata["measured"] == {"skipped": "measure_minutes is 0"}
    assert measured["best_builtin"].split(" (")[0] in ("ipndm", "ipndm_v", "dpmpp_2m", "deis", "uni_pc",
                                                       "gradient_estimation")
    assert compare.measured_text(measured) in entry["outputs"]["trainer"]["text"][0]
    assert entry["outputs"]["preview"]["images"]


def test_preview_picture_states_the_measurement(pack):
    table = EPDParams.load(REPO / "pretrained_params" / "demo_digits_epd_nfe6.safetensors")
    plain = pack.plotting.table_picture(table)
    table.metadata["measured"] = {"nfe": 6, "ratio": 1.3, "held_out_samples": 8,
                                  "verdict": compare.verdict(1.3, "ipndm (beta, 6 steps)")}
    stated = pack.plotting.table_picture(table)
    assert stated.height == plain.height + 20  # one more line: the measurement
    assert compare.measured_text(table.metadata["measured"]) == ("measured at NFE 6 on 8 held-out samples: does NOT "
                                                                  "beat the best built-in (ipndm (beta, 6 steps)): "
                                                                  "1.30x its error")
    opponent = {"name": "ipndm (beta, 8 steps)", "nfe": 8, "seconds": 0.011, "ratio": 0.9}
    table.metadata["measured"].update(time_verdict=compare.time_verdict(0.012, opponent))
    both = pack.plotting.table_picture(table)
    text = compare.measured_text(table.metadata["measured"])
    assert text.endswith("; wins at equal time: 0.90x the error of the best built-in not slower (ipndm (beta, 8 "
                         "steps) at NFE 8, 11 ms per image against 12 ms)")
    assert both.height == plain.height + 40  # both verdicts, wrapped over two lines rather than cut


@pytest.mark.server
@pytest.mark.slow
def test_compare_on_the_real_sd15_architecture_with_a_vae_grid(tmp_path):
    """The node end to end on a full-size random-weight SD1.5 (bench/real_checkpoints.py) at 64x64: CLIP
    conditioning with CFG, the pack's pick among the operator's listed tables, the VAE grid."""
    import numpy as np
    from PIL import Image

    from test_real_architectures import start_server, stop_server
    table = EPDParams.neutral(2, 2, solver="epd", afs=False, model_family="sd15",
                              schedule={"type": "discrete", "rho": 1.0})
    server = start_server(tmp_path, "sd15", {"real_sd15_compare.safetensors": table})
    try:
        g = {
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.ckpt_name}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube on a table", "clip": ["ckpt", 1]}},
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
            "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "compare": {"class_type": "EPDCompare", "inputs": {
                "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["empty", 0],
                "cfg": 4.0, "seeds": "0,1", "fit_seeds": 1, "nfe": "5", "pack_pick": "epd",
                "builtins": "euler,dpmpp_2m", "schedulers": "karras", "reference_sampler": "dpmpp_2m",
                "reference_scheduler": "karras", "reference_steps": 10, "max_minutes": 1440.0, "timing_repeats": 1,
                "vae": ["ckpt", 2]}},
            "plot": {"class_type": "SaveImage", "inputs": {"images": ["compare", 0], "filename_prefix": "cmp_plot"}},
            "grid": {"class_type": "SaveImage", "inputs": {"images": ["compare", 2], "filename_prefix": "cmp_grid"}},
        }
        entry = server.run(g, timeout=1200)
        assert entry["status"]["status_str"] == "success", error_message(entry) + "\n" + server.log_tail()
        text = entry["outputs"]["compare"]["text"][0]
        print("\n" + text)
        # 2 rows x (d_cur + the K points in one call) + the final Euler step: 5 calls, matched at NFE 5
        assert "epd pick - real_sd15_compare: " in text and "Verdict at equal calls" in text
        planned = re.search(r"EPD Compare: (\d+) model calls", server.log_path.read_text())
        # reference, 2 built-ins, the table, and one timed run of each built-in's kept configuration and the table
        assert planned and int(planned.group(1)) == 2 * 10 + 2 * (5 + 5) + 5 + (5 + 5 + 5)
        (info,) = entry["outputs"]["grid"]["images"]
        with Image.open(server.output_path(info)) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] >= 64 + 28 and pixels.std() > 5  # decoded tiles, not a blank placeholder
    finally:
        stop_server(server, "sd15")


def test_a_table_that_is_exactly_the_best_builtin_has_ratio_one(pack, one_thread_torch):
    """An untrained EPD-MS table on karras IS gradient_estimation on karras (epd_core/sampling/multistep.py): through
    the node, both routes (table on its own schedule, built-in on KSampler's list) count 5 calls and give ratio 1."""
    from epd_core.sampling.multistep import ms_table
    patcher = pack.demo_nodes.build_demo_model_patcher(which="digits")
    sigmas = pack.compare_nodes.scheduler_sigmas(patcher, "epd_demo_digits", "gradient_estimation", "karras", 5)
    table = ms_table(sigmas.double().tolist(), "gradient_estimation", model_family="epd_demo_digits")
    out = pack.compare_nodes.EPDCompare.execute(
        model=patcher, positive=pack.demo_nodes.demo_conditioning(3), negative=pack.demo_nodes.demo_conditioning(10),
        latent={"samples": torch.zeros(2, 4, 8, 8)}, cfg=2.0, seeds="0,1", fit_seeds=1, nfe="5", pack_pick="none",
        builtins="gradient_estimation", schedulers="karras", reference_sampler="dpmpp_2m",
        reference_scheduler="karras", reference_steps=20, max_minutes=5.0, params=table)
    text = out.result[1]
    assert "   5 | gradient_estimation (karras, 5 steps)" in text
    assert _ratios_from_text(text) == {"table 1 - epd_ms, 5 steps, K=1": {5: 1.0}}, text
    assert "ties with the best built-in" in text
    assert re.search(r"\n\s+5 \|\s+5 \|\s+[\d.]+ ms \| table 1 - epd_ms, 5 steps, K=1", text), text  # K = 1
