"""EPD Compare and the trainer's held-out report.

  * epd_core.compare on the exact Gaussian-mixture denoiser: NFE counted by wrapping the model, built-in
    schedulers chosen on the fit noises only, a losing table called a loser;
  * the node in-process on the MNIST demo model agrees with bench/quality_vs_nfe.py's method on the same noises
    (same seeds, same reference, same built-in field): the ratios within RATIO_TOLERANCE;
  * through a real server: the shipped epd_compare_demo workflow, the EPD Trainer writing `measured` into its
    table, and (slow) the node on the random-weight SD1.5 architecture with a VAE grid.
"""
import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from epd_core import compare
from epd_core.gmm import GaussianMixtureDenoiser
from epd_core.params import EPDParams
from epd_core.schedules import polynomial, with_final_zero
from epd_core.solvers import variant

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_epd_under_test"  # the pack's modules without its __init__ side effects (test_newest_comfyui)
RATIO_TOLERANCE = 0.01  # relative: the node runs through ComfyUI's CFGGuider in float32, the benchmark directly


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
    calls = []
    result = compare.compare(model, noise(1), noise(2), ref, builtins, [table], [4, 5], chunk=4,
                             on_call=lambda: calls.append(1))
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
    assert "NFE" in text and best["name"] in text
    assert compare.verdict(1.5, "x").startswith("does NOT beat the best built-in (x): 1.50x")
    assert compare.verdict(0.5, "x").startswith("wins: 0.50x")


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


# ---- the node in-process against the benchmark on the MNIST demo model ------------------------------------
@pytest.fixture(scope="module")
def pack():
    from conftest import import_comfy_sampling
    import_comfy_sampling()  # ComfyUI on the path, CPU
    if PACKAGE not in sys.modules:
        for name, path in ((PACKAGE, REPO), (PACKAGE + ".nodes", REPO / "nodes")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    mods = {m: importlib.import_module(f"{PACKAGE}.nodes.{m}") for m in ("compare_nodes", "demo_nodes", "tables")}
    mods["tables"].register_folder()
    return types.SimpleNamespace(**mods)


SETTING = dict(samplers="euler,dpmpp_2m,ipndm,gradient_estimation", schedulers="karras,exponential", nfe=(4, 6),
               batch=8, ref_steps=60, digit=7, fit_seed=101, test_seed=202)  # the benchmark's noise seeds


def bench_ratios(tmp_path) -> dict[int, float]:
    """bench/quality_vs_nfe.py's numbers on the same noises: its own run(), with the node's single digit as the
    class label of every sample (the benchmark cycles through 0-9; the node has one positive conditioning)."""
    sys.path.insert(0, str(REPO / "bench"))
    import quality_vs_nfe as bench
    s = SETTING
    original = bench.problem

    def one_digit(name, cfg):
        model, ms, noise, _, mode_of, k = original(name, cfg)
        return model, ms, noise, lambda n: {"cond": torch.full((n,), s["digit"])}, mode_of, k
    args = argparse.Namespace(model="mnist", samples=s["batch"], fit_samples=s["batch"], fd_samples=0, cfg=1.0,
                              fd_ref_steps=10, reuse_builtins=None, wait_for_tables=0, recipe="final_euler",
                              min_nfe=min(s["nfe"]), max_nfe=max(s["nfe"]), schedulers=s["schedulers"],
                              iterations=0, threads=1, ref_steps=s["ref_steps"], samplers=s["samplers"],
                              schedule_search=False, out=tmp_path)
    bench.problem = one_digit
    try:
        results = bench.run(args)
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
        reference_steps=s["ref_steps"], max_minutes=10.0)
    plot, text, grid = out.result
    assert plot.shape[-1] == 3 and plot.shape[1] > 200 and grid.shape[1] > 50
    node = {n: ratio for name, per in _ratios_from_text(text).items() for n, ratio in per.items()}
    bench = bench_ratios(tmp_path)
    print("\nnode:", node, "\nbenchmark:", {n: (r["best_builtin"], r["epd_over_best"]) for n, r in bench.items()})
    for n in s["nfe"]:
        assert bench[n]["best_builtin"].split(" (")[0] in text.split("\n")[3 + s["nfe"].index(n)]
        assert node[n] == pytest.approx(bench[n]["epd_over_best"], rel=RATIO_TOLERANCE)


@pytest.fixture
def one_thread_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ratios_from_text(text: str) -> dict[str, dict[int, float]]:
    """The ratios the node's text table states (the user-visible numbers), 4 digits: table -> {NFE: ratio}."""
    import re
    out: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+) \|", line)
        if not m:
            continue
        for name, ratio in re.findall(r"([\w ]+ - [^:;]+): [\d.e+-]+ \(([\d.]+)\)", line):
            out.setdefault(name, {})[int(m.group(1))] = float(ratio)
    return out
