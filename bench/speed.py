"""Speed and memory of the parallel EPD step, measured as ratios side by side in one run.

    .venv/bin/python bench/speed.py [--device cpu|cuda] [--quick] [--out DIR]

What it measures (docs/method.md, "A step": one step = one d_cur call + ONE batched call of the K points, batch B*K):

1. Step latency. One EPD step (d_cur call + `epd_step` with a `PointEvaluator`) for K = 1, 2, 3, divided by
   - a single-eval step (one model call of the sample batch + the Euler update),
   - a Heun step (two sequential calls: the honest per-step latency comparison),
   - the same EPD step with the K points as K sequential calls (`PointEvaluator(sequential=True)`);
   and, alone, the K-point call (one PointEvaluator call of batch B*K) / one model call of batch B.
   Models: the pack's demo model (DemoDenoiser, CFG 2: cond+uncond in one call like ComfyUI) and an SD1.5-sized
   UNet (ComfyUI's openaimodel.UNetModel with SD1.5's exact config, random weights, no download) wrapped as an eps
   denoiser with batched CFG; latent 4x64x64 on CUDA, smaller on CPU (see the header of the results).
   Every round times every variant once (in a rotated order) and forms the ratios within the round; the table
   reports the median over rounds, so a load change between rounds cancels out.
2. Sampler overhead: the time outside model calls / total time of a full `sample_epd` run (10 steps, K=2),
   with a trivial model (x * 0.5) and the demo model; model time from a timing wrapper around the model (with
   a device sync on CUDA). ComfyUI's own sample_heun with the demo model is measured beside it for reference.
3. Peak memory of one step: EPD (K-batch unchunked, and chunked with max_batch = B i.e. one point per call) vs
   ComfyUI's built-in Heun step (comfy.k_diffusion.sampling.sample_heun, one step). CUDA: max_memory_allocated
   above the allocation before the step. CPU: the peak of the running sum of every allocation and free made by
   torch's CPU allocator during the step, from torch.profiler(profile_memory=True) memory events (tracemalloc does
   not see torch tensors; RSS is blurred by the allocator's caching). Work buffers that bypass torch's allocator
   (e.g. oneDNN scratchpads) are not in the CPU number.

Results: a markdown table printed and written to <out>/speed_<device>.md, and the same data as JSON next to it.
Never asserts on times; tests/test_speed_bench.py checks the structure only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
sys.path.insert(0, str(REPO))

from epd_core.demo.models import DemoDenoiser, demo_sigmas, load_demo_model  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.sampling.paper import PointEvaluator, epd_step, sample_epd  # noqa: E402

# SD1.5's UNet exactly as comfy/model_detection.py builds it (SD15 entry + supported_models.SD15.unet_extra_config)
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
STEP_METRICS = ("step_vs_single", "step_vs_heun", "batched_vs_sequential", "kcall_vs_single")


def expected_step_metrics(K: int) -> tuple[str, ...]:
    """The ratios reported for K points (the last two compare K calls with one, so they need K > 1)."""
    return STEP_METRICS if K > 1 else STEP_METRICS[:2]
OVERHEAD_MODELS = ("trivial", "demo", "demo (ComfyUI sample_heun)")


def import_comfy():
    """ComfyUI's modules in-process, CPU mode unless CUDA is asked for."""
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    import comfy.ops
    from comfy.k_diffusion import sampling
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return comfy.ops, sampling, UNetModel


# ------------------------------------------------------------------------------------------------ models

def build_sd15_unet(device, dtype, model_channels=320, seed=0):
    """SD1.5's UNet with random weights (normal std 0.02 for matrices/kernels, norms 1, biases 0): the same
    work per call as the real model. `model_channels` < 320 builds a narrower net of the same shape (tests)."""
    ops, _, UNetModel = import_comfy()
    cfg = dict(SD15_UNET, model_channels=model_channels)
    unet = UNetModel(**cfg, dtype=dtype, device=device, operations=ops.disable_weight_init)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return unet.eval().requires_grad_(False)


class SD15EpsCFG:
    """k-diffusion D(x, sigma) around an SD1.5 UNet: discrete eps model on SD1.5's schedule (nearest timestep,
    input x/sqrt(sigma^2+1)), classifier-free guidance with cond and uncond in ONE call of batch 2B (as ComfyUI's
    calc_cond_batch). Latents stay float32; the UNet runs in its own dtype."""

    def __init__(self, unet, dtype, device, cfg=7.5, context_dim=768, tokens=77, seed=0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.unet, self.dtype, self.cfg = unet, dtype, float(cfg)
        self.cond = torch.randn(1, tokens, context_dim, generator=gen).to(device, dtype)
        self.uncond = torch.randn(1, tokens, context_dim, generator=gen).to(device, dtype)
        self.log_sigmas = demo_sigmas().log().to(device)  # SD1.5's 1000 discrete sigmas

    def __call__(self, x, sigma, **_):
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).float()
        sigma = sigma.expand(b) if sigma.dim() == 0 else sigma
        s = sigma.view(-1, *([1] * (x.dim() - 1)))
        t = (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(dim=0).float()
        xc = (x / (s ** 2 + 1) ** 0.5).to(self.dtype)
        ctx = torch.cat([self.cond.expand(b, -1, -1), self.uncond.expand(b, -1, -1)])
        eps = self.unet(torch.cat([xc, xc]), torch.cat([t, t]), context=ctx).float()
        e_cond, e_uncond = eps.chunk(2)
        return x - (e_uncond + self.cfg * (e_cond - e_uncond)) * s


def trivial_model(x, sigma, **_):
    return x * 0.5


# ------------------------------------------------------------------------------------------------ timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fns(model, x, extra_args, t_cur, t_next, ks):
    """The step variants to time, as zero-argument callables."""
    s_in = x.new_ones([x.shape[0]])
    rows = {K: {k: v.to(x.device) for k, v in EPDParams.neutral(1, K).activated().items()} for K in ks}

    def single():
        d = (x - model(x, t_cur * s_in, **extra_args)) / t_cur
        return x + (t_next - t_cur) * d

    def heun():  # the body of k-diffusion's sample_heun for one step to a positive sigma
        d = (x - model(x, t_cur * s_in, **extra_args)) / t_cur
        x_2 = x + (t_next - t_cur) * d
        d_2 = (x_2 - model(x_2, t_next * s_in, **extra_args)) / t_next
        return x + (t_next - t_cur) * (d + d_2) / 2

    def epd(K, sequential):
        evaluator = PointEvaluator(model, extra_args, sequential=sequential)
        row = [rows[K][n][0] for n in "rwca"]

        def step():
            d_cur = (x - model(x, t_cur * s_in, **extra_args)) / t_cur
            return epd_step(evaluator, x, d_cur, t_cur, t_next, *row)
        return step

    def call():  # one model call of the sample batch, nothing else
        return model(x, t_cur * s_in, **extra_args)

    def kcall(K):  # the K-point call alone: one PointEvaluator call of batch B*K on prebuilt points
        evaluator = PointEvaluator(model, extra_args)
        xs = x.unsqueeze(0).repeat(K, *([1] * x.dim()))
        sig = torch.linspace(float(t_next), float(t_cur), K + 2, device=x.device)[1:-1]
        return lambda: evaluator(xs, sig)

    fns = {"single": single, "heun": heun, "call": call}
    for K in ks:
        fns[f"epd_b{K}"] = epd(K, False)
        if K > 1:
            fns[f"epd_s{K}"] = epd(K, True)
            fns[f"kcall{K}"] = kcall(K)
    return fns


def time_interleaved(fns: dict, device, rounds: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of every fn, `rounds` times; each round runs all fns once in a rotated order."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) / inner)
    return times


def step_ratios(times: dict[str, list[float]], ks) -> dict:
    """Median over rounds of the per-round ratios."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rounds = range(len(times["single"]))
    out = {"heun_vs_single": med([times["heun"][i] / times["single"][i] for i in rounds]), "K": {}}
    for K in ks:
        b, s, h = times[f"epd_b{K}"], times["single"], times["heun"]
        res = {"step_vs_single": med([b[i] / s[i] for i in rounds]),
               "step_vs_heun": med([b[i] / h[i] for i in rounds])}
        if K > 1:
            q, kc, c = times[f"epd_s{K}"], times[f"kcall{K}"], times["call"]
            res["batched_vs_sequential"] = med([b[i] / q[i] for i in rounds])
            res["kcall_vs_single"] = med([kc[i] / c[i] for i in rounds])
        out["K"][K] = res
    out["single_ms"] = 1e3 * med(times["single"])  # absolute, for context only
    out["seconds"] = times  # the raw per-round times (JSON only)
    return out


def bench_steps(name, model, x, extra_args, ks, rounds, min_measure_s, device, log):
    t_cur = torch.tensor(10.0, device=x.device)
    t_next = torch.tensor(6.0, device=x.device)
    fns = step_fns(model, x, extra_args, t_cur, t_next, ks)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        fns["single"]()
        _sync(device)
        t_single = time.perf_counter() - t0
        if t_single < 0.5:  # cheap model: warm every variant
            for fn in fns.values():
                fn()
        else:  # expensive: warm the distinct call shapes (B and B*K) only
            for K in ks[1:]:
                model(x.repeat(K, *([1] * (x.dim() - 1))), t_cur * x.new_ones(K * x.shape[0]), **extra_args)
        _sync(device)
        t0 = time.perf_counter()
        fns["single"]()
        _sync(device)
        inner = max(1, math.ceil(min_measure_s / max(time.perf_counter() - t0, 1e-6)))
        log(f"  {name} B={x.shape[0]}: single step {1e3 * (time.perf_counter() - t0):.1f} ms, "
            f"{rounds} rounds x {inner} calls per variant")
        times = time_interleaved(fns, device, rounds, inner)
    return step_ratios(times, ks)


# ------------------------------------------------------------------------------------------------ overhead

class TimedModel:
    """Accumulates the wall time spent inside model calls (with a device sync around each on CUDA)."""

    def __init__(self, model, device):
        self.model, self.device, self.seconds, self.calls = model, device, 0.0, 0

    def __call__(self, x, sigma, **kw):
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(x, sigma, **kw)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def bench_overhead(demo, comfy_sampling, device, batch=4, steps=10, K=2, rounds=5, log=print):
    from epd_core.demo.models import karras_sigmas
    sigmas = karras_sigmas(steps, 0.0292, 14.6146).to(device)  # 10 steps, the last one to 0 (Euler)
    params = EPDParams.neutral(steps - 1, K)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device) * 14.6
    cond = torch.arange(batch) % 10
    runs = {
        "trivial": lambda m: sample_epd(m, x, sigmas, params, disable=True),
        "demo": lambda m: sample_epd(m, x, sigmas, params, extra_args={"cond": cond}, disable=True),
        "demo (ComfyUI sample_heun)": lambda m: comfy_sampling.sample_heun(m, x, sigmas, extra_args={"cond": cond},
                                                                           disable=True),
    }
    base = {"trivial": trivial_model, "demo": demo, "demo (ComfyUI sample_heun)": demo}
    fractions = {n: [] for n in runs}
    outside_us = {n: [] for n in runs}
    calls = {}
    with torch.inference_mode():
        for n, run in runs.items():  # warm-up
            run(base[n])
        for r in range(rounds):
            for n, run in runs.items():
                inner = 20 if n == "trivial" else 1  # the trivial run is too short to time once
                timed = TimedModel(base[n], device)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    run(timed)
                _sync(device)
                total = time.perf_counter() - t0
                fractions[n].append((total - timed.seconds) / total)
                outside_us[n].append(1e6 * (total - timed.seconds) / (inner * steps))
                calls[n] = timed.calls // inner
    out = {n: {"overhead_fraction": statistics.median(fractions[n]),
               "outside_us_per_step": statistics.median(outside_us[n]), "model_calls": calls[n]} for n in runs}
    log("  overhead: " + ", ".join(f"{n} {100 * v['overhead_fraction']:.2f}%" for n, v in out.items()))
    return out


# ------------------------------------------------------------------------------------------------ memory

def peak_bytes(fn, device) -> int:
    """Peak bytes allocated by `fn` above what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations (+bytes) and frees (-bytes) while fn runs, from the allocator
    events that torch.profiler(profile_memory=True) records (read from its trace: every allocation and free in
    order, also those inside an op, which the per-op memory columns only show netted)."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    mem = sorted((e["args"].get("Ev Idx", 0), e["ts"], e["args"]["Bytes"]) for e in events
                 if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    current = peak = 0
    for _, _, nbytes in mem:
        current += nbytes
        peak = max(peak, current)
    return peak


def bench_memory(name, model, x, extra_args, ks, comfy_sampling, device, log):
    sigmas = torch.tensor([10.0, 6.0], device=x.device)
    B = x.shape[0]
    out = {}
    with torch.inference_mode():
        # warm the allocator / kernels so one-time buffers are not counted for the first variant only
        comfy_sampling.sample_heun(model, x, sigmas, extra_args=extra_args, disable=True)
        heun = peak_bytes(lambda: comfy_sampling.sample_heun(model, x, sigmas, extra_args=extra_args,
                                                             disable=True), device)
        for K in ks:
            params = EPDParams.neutral(1, K)
            sample_epd(model, x, sigmas, params, extra_args=extra_args, disable=True)
            full = peak_bytes(lambda: sample_epd(model, x, sigmas, params, extra_args=extra_args, disable=True),
                              device)
            chunked = peak_bytes(lambda: sample_epd(model, x, sigmas, params, extra_args=extra_args,
                                                    max_batch=B, disable=True), device)
            out[K] = {"heun_mib": heun / 2 ** 20, "epd_mib": full / 2 ** 20, "epd_chunked_mib": chunked / 2 ** 20,
                      "unchunked_vs_heun": full / heun, "chunked_vs_heun": chunked / heun}
            log(f"  memory {name} B={B} K={K}: heun {heun / 2 ** 20:.1f} MiB, EPD {full / heun:.2f}x, "
                f"chunked {chunked / heun:.2f}x")
    return out


# ------------------------------------------------------------------------------------------------ report

def fmt(v, digits=2):
    return f"{v:.{digits}f}"


def markdown(res) -> str:
    c = res["config"]
    lines = [f"# EPD step speed and memory ({res['device']})", "",
             f"- device: {res['device_name']}; torch {res['torch']}; threads {c['threads']}; "
             f"load average (1 min) {res['load_start']:.2f} at start, {res['load_end']:.2f} at end",
             f"- models: demo = DemoDenoiser (1x8x8, CFG 2, cond+uncond in one call); sd15 = SD1.5 UNet config "
             f"(model_channels {c['sd_channels']}), random weights, {c['sd_dtype']}, CFG 7.5 batched, "
             f"latent 4x{c['sd_latent']}x{c['sd_latent']}",
             f"- {c['rounds_demo']} (demo) / {c['rounds_sd']} (sd15) interleaved rounds; every ratio is the median "
             f"of the per-round ratios{'; --quick' if c['quick'] else ''}",
             f"- memory proxy: {res['memory_proxy']}", "",
             "## Step latency (ratios; lower is better)", "",
             "| model | latent | B | K | EPD step / single-eval step | EPD step / Heun step | batched / K sequential "
             "| K-point call alone / one model call |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in res["steps"]:
        for K, r in entry["K"].items():
            bs = fmt(r["batched_vs_sequential"]) if "batched_vs_sequential" in r else "(same calls)"
            kc = fmt(r["kcall_vs_single"]) if "kcall_vs_single" in r else "(same call)"
            lines.append(f"| {entry['model']} | {entry['latent']} | {entry['batch']} | {K} | "
                         f"{fmt(r['step_vs_single'])} | {fmt(r['step_vs_heun'])} | {bs} | {kc} |")
    lines += ["", "Heun step / single-eval step for reference: " + ", ".join(
        f"{e['model']} B={e['batch']}: {fmt(e['heun_vs_single'])} (single step {e['single_ms']:.1f} ms)"
        for e in res["steps"]), "",
        "## Sampler overhead (full run, 10 steps, K=2, B=4)", "",
        "| model | time outside model calls / total | outside model, us per step | model calls |", "|---|---|---|---|"]
    for n, v in res["overhead"].items():
        lines.append(f"| {n} | {100 * v['overhead_fraction']:.2f} % | {v['outside_us_per_step']:.0f} | "
                     f"{v['model_calls']} |")
    lines += ["", "## Peak memory of one step vs ComfyUI's sample_heun step", "",
              "| model | latent | B | K | Heun peak MiB | EPD unchunked / Heun | EPD max_batch=B (1 point per call) "
              "/ Heun |", "|---|---|---|---|---|---|---|"]
    for entry in res["memory"]:
        for K, m in entry["K"].items():
            lines.append(f"| {entry['model']} | {entry['latent']} | {entry['batch']} | {K} | {m['heun_mib']:.1f} | "
                         f"{fmt(m['unchunked_vs_heun'])} | {fmt(m['chunked_vs_heun'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only, K memory 2 only, small "
                                                         "SD latent on CPU: a few minutes on a CPU")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--batches", default=None, help="default 1,4 (1 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds for the SD1.5 UNet")
    ap.add_argument("--sd-latent", type=int, default=None, help="latent side (default 64 on CUDA, 16 on CPU, "
                                                                "8 on CPU with --quick)")
    ap.add_argument("--sd-channels", type=int, default=320, help="UNet model_channels (320 = SD1.5; smaller "
                                                                 "only for smoke tests)")
    ap.add_argument("--sd-dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="UNet dtype (default fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--skip-sd", action="store_true", help="demo model only")
    ap.add_argument("--threads", default="auto", help="CPU threads; 'auto' = torch's default, or 1 when the load "
                                                      "average already fills the cores (OpenMP threads that spin on "
                                                      "busy cores make every call 10-100x slower)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,4")).split(",")]
    rounds_sd = args.rounds or (2 if args.quick else (3 if cpu else 7))
    rounds_demo = 3 if args.quick else 9
    min_measure = 0.02 if args.quick else 0.2
    sd_latent = args.sd_latent or ((8 if args.quick else 16) if cpu else 64)
    sd_dtype_name = args.sd_dtype or ("fp32" if cpu else "fp16")
    sd_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[sd_dtype_name]
    mem_ks = [2] if args.quick else [k for k in ks if k > 1]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    if cpu and args.threads == "auto" and os.getloadavg()[0] > (os.cpu_count() or 1) - 1:
        log(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores: using 1 thread (--threads to override)")
        torch.set_num_threads(1)
    elif args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    _, comfy_sampling, _ = import_comfy()
    torch.manual_seed(0)
    res = {"device": device.type, "torch": torch.__version__, "load_start": os.getloadavg()[0],
           "device_name": torch.cuda.get_device_name(device) if not cpu else (platform.processor() or "cpu"),
           "memory_proxy": ("torch.cuda.max_memory_allocated above the pre-step allocation" if not cpu else
                            "peak running sum of torch CPU allocator events (torch.profiler profile_memory=True)"),
           "config": {"threads": torch.get_num_threads(), "sd_channels": args.sd_channels, "sd_latent": sd_latent,
                      "sd_dtype": sd_dtype_name, "rounds_sd": rounds_sd, "rounds_demo": rounds_demo,
                      "quick": args.quick, "ks": ks, "batches": batches},
           "steps": [], "overhead": {}, "memory": []}
    log(f"load average {os.getloadavg()}")

    demo = DemoDenoiser(load_demo_model(device=device), cfg=2.0)
    models = [("demo", demo, (1, 8, 8), lambda B: {"cond": torch.arange(B) % 10}, rounds_demo)]
    if not args.skip_sd:
        log(f"building the SD1.5 UNet (model_channels {args.sd_channels}, {sd_dtype_name}) ...")
        unet = build_sd15_unet(device, sd_dtype, args.sd_channels)
        sd = SD15EpsCFG(unet, sd_dtype, device)
        models.append(("sd15", sd, (4, sd_latent, sd_latent), lambda B: {}, rounds_sd))

    for name, model, shape, extra, rounds in models:
        for B in batches:
            x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(B)).to(device) * 10.0
            r = bench_steps(name, model, x, extra(B), ks, rounds, min_measure, device, log)
            res["steps"].append({"model": name, "latent": "x".join(map(str, shape)), "batch": B, **r})
    res["overhead"] = bench_overhead(demo, comfy_sampling, device, rounds=3 if args.quick else 7, log=log)
    for name, model, shape, extra, _ in models:
        for B in batches:
            x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(B)).to(device) * 10.0
            res["memory"].append({"model": name, "latent": "x".join(map(str, shape)), "batch": B,
                                  "K": bench_memory(name, model, x, extra(B), mem_ks, comfy_sampling, device, log)})
    res["load_end"] = os.getloadavg()[0]

    md = markdown(res)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed_{device.type}.md").write_text(md)
    (out / f"speed_{device.type}.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out / f'speed_{device.type}.md'}")
    return res


if __name__ == "__main__":
    main()
