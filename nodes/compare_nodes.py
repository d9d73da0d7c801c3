"""EPD Compare: is a table better than ComfyUI's best sampler on THIS model? (docs/comfyui.md, "EPD Compare").

The node builds the candidates (ComfyUI's deterministic samplers on its schedulers and the AlignYourSteps
scheduler, the connected tables and the pack's own pick on their own schedules, a reference solver), makes the
noises like KSampler does, and runs epd_core.compare inside ComfyUI's CFGGuider (the model loaded, patches and
CFG applied). The EPD Trainer uses measure_table() for its held-out report.
"""
from __future__ import annotations

import logging
import math
import time
import types

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from PIL import Image, ImageDraw

from epd_core import compare
from epd_core.sampling import cfg_guard
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.sampling.plan import sampler_sigmas
from epd_core.sampling.registry import NAMES as SOLVER_NAMES
from epd_core.sampling.registry import variant

from .compat import fix_empty_latent, io, send_progress_text, sequential_reasons, sigma_list_reader
from .sockets import CATEGORY, EPDParamsType
from .progress import duration
from .plotting import _font, nfe_chart, to_image_tensor, wrap
from .tables import ksampler_tables, model_family

log = logging.getLogger("epd")
# ComfyUI's deterministic samplers (the benchmark's field); the default is the strongest of them there
DETERMINISTIC = ["euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "deis", "ipndm", "ipndm_v", "uni_pc",
                 "uni_pc_bh2", "res_multistep", "gradient_estimation"]
DEFAULT_BUILTINS = "ipndm,ipndm_v,dpmpp_2m,deis,uni_pc,gradient_estimation"
DEFAULT_SCHEDULERS = "karras,exponential,sgm_uniform,beta,ays"
AYS_MODEL_TYPE = {"sd15": "SD1", "sd2": "SD1", "epd_demo_mnist": "SD1", "epd_demo_digits": "SD1", "sdxl": "SDXL"}
PACK_PICK = ["all", *SOLVER_NAMES, "none"]
HELD_OUT_SEED = 1_000_003  # the trainer's held-out noises: seeds seed + this + i, a stream training never draws
TIMING_REPEATS = 3  # timed runs per candidate (the median is kept): EPD Compare's default, the trainer's report
MEASURE_MINUTES = 10.0  # the EPD Trainer's default budget for its held-out report (an input: measure_minutes)


# ================================================================================================ candidates

def parse_ints(text: str, what: str, lo: int = 0, hi: int = 2 ** 63 - 1) -> list[int]:
    try:
        values = [int(t) for t in str(text).replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"EPD Compare: {what} must be whole numbers separated by commas, e.g. '4,6,8'; got "
                         f"{str(text)[:60]!r}") from None
    if not values or any(not lo <= v <= hi for v in values):
        raise ValueError(f"EPD Compare: {what} must be whole numbers from {lo} to {hi}; got {str(text)[:60]!r}")
    return list(dict.fromkeys(values))


def parse_names(text: str, allowed, what: str) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"EPD Compare: unknown {what} {bad}; use names from {', '.join(allowed)}")
    return names


def builtin_sample(name: str):
    """sample(model, x, sigmas) for a ComfyUI k-diffusion sampler (UniPC from its own module)."""
    if name in ("uni_pc", "uni_pc_bh2"):
        from comfy.extra_samplers import uni_pc
        fn = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
        return lambda m, x, s: fn(m, x, s, extra_args={}, callback=None, disable=True)
    import comfy.k_diffusion.sampling as k
    fn = getattr(k, f"sample_{name}")
    return lambda m, x, s: fn(m, x, s, disable=True)


def scheduler_sigmas(model_patcher, family: str, sampler: str, scheduler: str, steps: int) -> torch.Tensor | None:
    """KSampler's list for (sampler, scheduler, steps), with its discard-penultimate rule, or the AlignYourSteps
    node's list as SamplerCustom gets it ("ays"; None where AYS has no list for this model)."""
    if scheduler == "ays":
        if family not in AYS_MODEL_TYPE:
            return None
        from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
        return AlignYourStepsScheduler.execute(AYS_MODEL_TYPE[family], steps, 1.0).result[0].float()
    return comfy.samplers.KSampler(model_patcher, steps, "cpu", sampler, scheduler).sigmas.float()


def builtin_field(model_patcher, samplers: list[str], schedulers: list[str], nfes: list[int]):
    """Every (sampler, scheduler, steps) whose counted model calls (probe_calls) are one of `nfes`."""
    family, out = model_family(model_patcher), []
    for sampler in samplers:
        sample = builtin_sample(sampler)
        for sched in schedulers:
            for steps in range(1, max(nfes) + 1):
                try:
                    sig = scheduler_sigmas(model_patcher, family, sampler, sched, steps)
                except Exception:  # noqa: BLE001 - a scheduler without a list at this step count: left out
                    continue
                if sig is None:
                    break
                cand = compare.Candidate(f"{sampler} ({sched}, {steps} steps)", sample, sig, "builtin", sampler, sched,
                                         steps)
                cand.calls = compare.probe_calls(cand)
                if cand.calls is not None and cand.calls > max(nfes):
                    break
                if cand.calls in nfes:
                    out.append(cand)
    return out


def table_candidate(params: EPDParams, name: str, model_sampling, sequential: bool) -> compare.Candidate:
    fn = variant(params.solver).sample_fn()

    def sample(m, x, s):
        return fn(m, x, s, params, disable=True, sequential=sequential)
    cand = compare.Candidate(name, sample, sampler_sigmas(params, model_sampling).float(), "table")
    cand.calls = compare.probe_calls(cand)
    return cand


def pack_picks(model_patcher, which: str, nfes: list[int], cfg: float | None = None) -> list[tuple[str, EPDParams]]:
    """The tables KSampler would pick by itself for this model at each NFE and this CFG (nodes/tables.py
    ksampler_tables, then epd_core.sampling.cfg_guard as KSampler chooses; where it would sample as a built-in there
    is no table to add: the built-ins are compared anyway)."""
    if which == "none":
        return []
    family, found = model_family(model_patcher), {}
    for solver in (SOLVER_NAMES if which == "all" else [which]):
        for n in nfes:
            hits = ksampler_tables(family, solver, max(1, n // 2), n)
            if not hits:
                continue
            choice = cfg_guard.choose([h[0] for h in hits], cfg)
            for params, name in hits:
                if params is choice.table:
                    found.setdefault(name, params)
    return [(f"{p.solver} pick - {name.removesuffix('.safetensors')}", p) for name, p in found.items()]


# ================================================================================================ running

class _RunInsideGuider(comfy.samplers.Sampler):
    """ComfyUI calls sample(guider, ...) with the model loaded and the conds prepared: measure there."""

    def __init__(self, fn):
        self.fn, self.result = fn, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.fn(model_wrap, extra_args)
        return noise


def make_noises(model_patcher, latent: dict, seeds: list[int]) -> torch.Tensor:
    """KSampler's starting noise for each seed (comfy.sample.prepare_noise on the latent), concatenated."""
    zeros = torch.zeros_like(fix_empty_latent(model_patcher, latent))
    return torch.cat([comfy.sample.prepare_noise(zeros, s) for s in seeds])


def inside_guider(model_patcher, positive, negative, cfg: float, batch_shape, fn):
    """fn(ctx) with ctx.model (D(x, sigma) with CFG), ctx.extra (its keyword arguments), ctx.scale(noise) (the
    noise at the model's sigma_max, as KSampler scales it), ctx.model_sampling, ctx.sequential, ctx.device."""
    problem = sigma_list_reader(model_patcher)
    if problem:
        raise RuntimeError(f"EPD Compare: {problem}")
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)

    def run(inner, extra_args):
        ms = inner.inner_model.model_sampling
        device = model_patcher.load_device
        smax = torch.tensor([float(ms.sigma_max)], device=device)

        def scale(noise):
            noise = noise.to(device)
            return ms.noise_scaling(smax, noise, torch.zeros_like(noise), True)
        reasons = sequential_reasons(types.SimpleNamespace(inner_model=inner), extra_args)
        return fn(types.SimpleNamespace(model=inner, extra=extra_args, scale=scale, model_sampling=ms,
                                        sequential=bool(reasons), device=device,
                                        latent_out=inner.inner_model.process_latent_out))
    runner = _RunInsideGuider(run)
    latent = torch.zeros(batch_shape)
    sigmas = torch.tensor([float(model_patcher.get_model_object("model_sampling").sigma_max), 0.0])
    guider.sample(latent.clone(), latent, runner, sigmas, seed=0)
    return runner.result


def seconds_per_call(ctx, x: torch.Tensor) -> float:
    """One model call's time on `x` (the second of two calls: the first may include one-off set-up)."""
    sigma = torch.full((x.shape[0],), float(ctx.model_sampling.sigma_max), device=x.device)
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            ctx.model(x, sigma, **ctx.extra)
            comfy.model_management.soft_empty_cache()
            times.append(time.perf_counter() - t0)
    return times[-1]


def check_fits(device, latent_numel: int, samples: int, chunk: int, calls: int, per_call: float, max_seconds: float,
               who: str = "EPD Compare") -> float:
    """The time and memory estimate; raises with the way out when either would not fit. Returns the seconds."""
    estimate = calls * per_call
    if estimate > max_seconds:
        raise ValueError(f"{who}: about {duration(estimate)} of model calls ({calls} calls x {per_call:.2f}s each), "
                         f"more than the allowed {duration(max_seconds)}. Use fewer seeds, NFEs, built-ins or "
                         "schedulers, fewer reference steps or a smaller latent, or raise max_minutes.")
    # noises, references and outputs of every sample, plus a chunk's working states (up to K = 8 points + history)
    needed = 4 * latent_numel * (4 * samples + 16 * chunk)
    try:
        free = int(comfy.model_management.get_free_memory(device))
    except Exception:  # noqa: BLE001 - no estimate available: do not block
        return estimate
    if needed > free // 2:
        raise ValueError(f"{who}: the samples would need about {needed / 2 ** 30:.1f} GiB, but only "
                         f"{free / 2 ** 30:.1f} GiB is free on {getattr(device, 'type', device)}. Use fewer seeds "
                         "or a smaller latent batch.")
    return estimate


class _Progress:
    """ComfyUI's progress bar (value = model calls made), and a text line with the stage and the time left."""

    def __init__(self, total: int, node_id, bar: bool = True):
        self.total, self.node_id, self.done = max(total, 1), node_id, 0
        self.bar = comfy.utils.ProgressBar(self.total) if bar else None
        self.t0, self.last, self.stage_text = time.monotonic(), -math.inf, ""

    def on_call(self):
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel
        self.done += 1
        if self.bar is not None:
            self.bar.update_absolute(min(self.done, self.total), self.total)
        if time.monotonic() - self.last > 5:
            self.text()

    def stage(self, text):
        self.stage_text = text
        self.text()

    def text(self):
        self.last = time.monotonic()
        spent = self.last - self.t0
        left = spent / self.done * max(self.total - self.done, 0) if self.done else None
        eta = f"ETA {duration(left)}" if left is not None else "ETA after the first model call"
        message = f"{self.stage_text} - {self.done}/{self.total} model calls, {eta}"
        send_progress_text(message, self.node_id)


def reference_candidate(model_patcher, sampler: str, scheduler: str, steps: int) -> compare.Candidate:
    sig = scheduler_sigmas(model_patcher, model_family(model_patcher), sampler, scheduler, steps)
    if sig is None:
        raise ValueError(f"EPD Compare: the reference scheduler {scheduler!r} has no list for this model; pick "
                         "karras or exponential")
    cand = compare.Candidate(f"{sampler} ({scheduler}, {steps} steps)", builtin_sample(sampler), sig, "reference")
    cand.calls = compare.probe_calls(cand)
    return cand


def run_comparison(model, positive, negative, cfg, latent, fit_seeds, test_seeds, nfes, tables, builtins,
                   schedulers, reference, max_seconds, node_id=None, who="EPD Compare", bar=True,
                   repeats: int = TIMING_REPEATS):
    """Build everything and run epd_core.compare in the guider. tables: [(name, EPDParams)]; reference:
    (sampler, scheduler, steps); bar: drive the running node's progress bar (the trainer keeps its own);
    repeats: timed runs of every scored candidate on one seed's batch (the latent's batch: seconds per image at
    the batch size the user samples with). Returns (Comparison, latent_out function)."""
    fit_noise, test_noise = make_noises(model, latent, fit_seeds), make_noises(model, latent, test_seeds)
    field = builtin_field(model, builtins, schedulers, nfes)
    ref = reference_candidate(model, *reference)
    chunk = max(len(fit_noise), len(test_noise))

    def measure(ctx):
        cands = [table_candidate(p, name, ctx.model_sampling, ctx.sequential) for name, p in tables]
        calls = compare.planned_calls(ref, field, cands, nfes, 1, 1, repeats)
        scaled = ctx.scale(fit_noise)
        per_call = seconds_per_call(ctx, scaled[:1])  # one sample first: a batch is never faster
        if len(scaled) > 1 and calls * per_call <= max_seconds:
            per_call = seconds_per_call(ctx, scaled)
        estimate = check_fits(ctx.device, fit_noise[0].numel(), len(fit_noise) + len(test_noise), chunk, calls,
                              per_call, max_seconds, who)
        log.info("%s: %d model calls, about %s (%d fit + %d test samples, %d built-in configurations, %d tables)",
                 who, calls, duration(estimate), len(fit_noise), len(test_noise), len(field), len(cands))
        progress = _Progress(calls, node_id, bar)
        result = compare.compare(ctx.model, ctx.scale(fit_noise), ctx.scale(test_noise), ref, field, cands, nfes,
                                 chunk=chunk, extra=ctx.extra, on_call=progress.on_call, on_stage=progress.stage,
                                 repeats=repeats, timed_samples=len(test_noise) // len(test_seeds))
        return result, ctx.latent_out
    return inside_guider(model, positive, negative, cfg, (chunk, *fit_noise.shape[1:]), measure)


# ================================================================================================ pictures

def plot(result: compare.Comparison, title: str) -> Image.Image:
    """RMSE against latency NFE and (timed runs) against time per image: the best built-in per NFE, dashed,
    labelled sampler/scheduler; one curve per connected table and per solver of the pack's picks."""
    nfes = sorted(result.nfe)
    best = {n: b["rmse"] for n in nfes if (b := result.best(n))}
    labels = {n: f"{b['sampler']}/{b['scheduler']}" for n in nfes if (b := result.best(n))}
    key = "best built-in (fit-chosen per NFE)"
    series, times = {key: best}, {key: {n: b["seconds"] for n in nfes if (b := result.best(n))}}
    for n in nfes:  # one curve per connected table, one per solver of the pack's picks (a table per NFE)
        for name, t in result.nfe[n]["tables"].items():
            series.setdefault(name.split(" - ")[0], {})[n] = t["rmse"]
            times.setdefault(name.split(" - ")[0], {})[n] = t["seconds"]
    return nfe_chart(series, title, labels, ylabel=f"RMSE to {result.reference}, held-out seeds",
                     times=times if result.repeats else None)


def grid(result: compare.Comparison, decode) -> Image.Image:
    """Per NFE one row: each table's first test sample, the best built-in's, the reference (same seed), each
    labelled in full (wrapped over lines, never cut) with its held-out RMSE."""
    rows = []
    for n in sorted(result.nfe):
        row = [(name.split(" - ")[-1] if " pick - " in name else name, t["rmse"],
                result.firsts[("table", n, name)]) for name, t in result.nfe[n]["tables"].items()]
        b = result.best(n)
        if b:
            row.append((f"best built-in: {b['sampler']}/{b['scheduler']}", b["rmse"],
                        result.firsts[("builtin", n, b["sampler"])]))
        if row:
            rows.append((n, row + [(f"reference: {result.reference}", None, result.firsts["reference"])]))
    if not rows:
        return Image.new("RGB", (320, 40), (255, 255, 255))
    tiles = [[(label, rmse, decode(x)) for label, rmse, x in row] for _, row in rows]
    tw = max(150, max(im.width for row in tiles for *_, im in row))
    th = max(im.height for row in tiles for *_, im in row)
    cols = max(len(row) for row in tiles)
    font, line_h = _font(11), 13
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [[wrap(d, label, tw, font) + ([f"RMSE {rmse:.4g}"] if rmse is not None else []) for label, rmse, _ in row]
             for row in tiles]
    heads = [6 + line_h * max(len(t) for t in row) + 4 for row in texts]
    pad = 64
    img = Image.new("RGB", (pad + cols * (tw + 10), sum(heads) + len(tiles) * (th + 6)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = 0
    for (n, _), row, text, head in zip(rows, tiles, texts, heads):
        d.text((4, y + head + th // 2 - 7), f"NFE {n}", fill=(30, 30, 30), font=_font(13))
        for j, ((_, _, im), lines) in enumerate(zip(row, text)):
            x = pad + j * (tw + 10)
            d.multiline_text((x, y + 6), "\n".join(lines), fill=(30, 30, 30), font=font, spacing=2)
            img.paste(im, (x + (tw - im.width) // 2, y + head))
        y += head + th + 6
    return img


def decoder(vae, latent_out):
    """latent (model space, 1 sample) -> PIL image: through the VAE, or for a 1-channel latent (the demo models)
    the latent itself, white on black, enlarged."""
    def decode(x):
        x = latent_out(x.float().cpu())
        if vae is not None:
            img = vae.decode(x)
            img = img.reshape(-1, *img.shape[-3:])[0]
        else:
            img = ((x[0, :1] + 1) / 2).clamp(0, 1)
            scale = max(1, 112 // img.shape[-1])
            img = torch.nn.functional.interpolate(img[None], scale_factor=scale, mode="nearest")[0]
            img = img.movedim(0, -1).expand(-1, -1, 3)
        return Image.fromarray((img.clamp(0, 1).cpu().numpy() * 255).astype("uint8"))
    return decode


# ================================================================================================ node

class EPDCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDCompare", display_name="EPD Compare", category=CATEGORY, is_output_node=True,
            description="Is an EPD table better than the best ComfyUI sampler on YOUR model? Measures the error "
                        "(RMSE in latent space) to an accurate reference solution against the latency NFE (model "
                        "calls per image, counted), for the connected tables and/or the pack's own pick and for "
                        "ComfyUI's deterministic samplers, each with the scheduler that suits it best on the first "
                        "seeds, scored on the other seeds. Times every candidate on this device (seconds per image) "
                        "and gives two verdicts per table: at equal calls and at equal time (against the best "
                        "built-in that is not slower). Outputs a plot, a text table and, with a VAE, an image "
                        "grid. Estimates its time first and refuses runs longer than max_minutes.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to measure on."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning (as for KSampler)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for CFG."),
                io.Latent.Input("latent", tooltip="Size and batch of the samples (e.g. Empty Latent Image); each "
                                                  "seed gives one batch, as in KSampler."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.String.Input("seeds", default="0,1,2,3",
                                tooltip="Comma-separated noise seeds. The first fit_seeds choose each built-in's "
                                        "scheduler and step count; the rest are the held-out seeds the table is "
                                        "scored on."),
                io.Int.Input("fit_seeds", default=2, min=1, max=64,
                             tooltip="How many of the seeds (the first ones) choose the built-ins' schedulers."),
                io.String.Input("nfe", default="4,6,8",
                                tooltip="Latency NFEs to compare at (sequential model calls per image)."),
                io.Combo.Input("pack_pick", options=PACK_PICK, default="all",
                               tooltip="Also measure the tables KSampler's epd / epd_plugin / epd_ms would pick "
                                       "for this model at each NFE (the pack's own and the operator's listed ones); "
                                       "none: only the connected tables."),
                io.String.Input("builtins", default=DEFAULT_BUILTINS,
                                tooltip="ComfyUI samplers to compare with (deterministic ones: "
                                        + ", ".join(DETERMINISTIC) + ")."),
                io.String.Input("schedulers", default=DEFAULT_SCHEDULERS,
                                tooltip="Schedulers each built-in may pick from (ComfyUI's names, and 'ays' for "
                                        "AlignYourSteps where it has a list: SD1.x / SDXL)."),
                io.Combo.Input("reference_sampler", options=DETERMINISTIC, default="dpmpp_2m",
                               tooltip="The accurate solver the others are measured against."),
                io.Combo.Input("reference_scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="karras",
                               tooltip="The reference's scheduler."),
                io.Int.Input("reference_steps", default=100, min=10, max=2000,
                             tooltip="The reference's steps (100 DPM++ 2M steps is near exact for most models)."),
                io.Float.Input("max_minutes", default=30.0, min=0.01, max=1440.0, step=0.5,
                               tooltip="Refuse to start when the estimated time (measured model-call time x the "
                                       "calls needed) is longer."),
                io.Int.Input("timing_repeats", default=TIMING_REPEATS, min=0, max=50, optional=True,
                             tooltip="Timed runs of every candidate on one seed's batch (the median is kept, in "
                                     "seconds per image on this device) for the verdict at equal time; 0: no "
                                     "timing, the verdict at equal calls only."),
                EPDParamsType.Input("params", optional=True, tooltip="A table to measure (Load EPD Params, EPD "
                                                                     "Trainer), on its own schedule."),
                EPDParamsType.Input("params_2", optional=True, tooltip="Another table to measure."),
                EPDParamsType.Input("params_3", optional=True, tooltip="Another table to measure."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the image grid (same seed: tables, best "
                                                           "built-in, reference)."),
            ],
            outputs=[io.Image.Output(display_name="plot", tooltip="RMSE to the reference against latency NFE and "
                                                                  "against time per image."),
                     io.String.Output(display_name="table", tooltip="The numbers, with a verdict per table."),
                     io.Image.Output(display_name="grid", tooltip="Per NFE: the tables, the best built-in and the "
                                                                  "reference from the first held-out seed.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, cfg, seeds, fit_seeds, nfe, pack_pick, builtins, schedulers,
                reference_sampler, reference_scheduler, reference_steps, max_minutes, timing_repeats=TIMING_REPEATS,
                params=None, params_2=None, params_3=None, vae=None) -> io.NodeOutput:
        seed_list = parse_ints(seeds, "seeds", 0, 0xFFFFFFFFFFFFFFFF)
        if len(seed_list) <= fit_seeds:
            raise ValueError(f"EPD Compare: {len(seed_list)} seeds and fit_seeds {fit_seeds} leave none to score "
                             "on; give more seeds than fit_seeds (e.g. 4 seeds, fit_seeds 2)")
        nfes = parse_ints(nfe, "nfe", 1, 400)
        samplers = parse_names(builtins, DETERMINISTIC, "built-in sampler(s)")
        scheds = parse_names(schedulers, [*comfy.samplers.SCHEDULER_NAMES, "ays"], "scheduler(s)")
        tables = [(f"table {i + 1} - {p.solver}, {p.num_steps} steps, K={p.num_points}", p)
                  for i, p in enumerate((params, params_2, params_3)) if p is not None]
        tables += pack_picks(model, pack_pick, nfes, cfg)
        if not tables:
            log.warning("EPD Compare: no table connected and no pack's pick for this model: built-ins only")
        result, latent_out = run_comparison(model, positive, negative, cfg, latent, seed_list[:fit_seeds],
                                            seed_list[fit_seeds:], nfes, tables, samplers, scheds,
                                            (reference_sampler, reference_scheduler, reference_steps),
                                            max_minutes * 60, cls.hidden.unique_id if cls.hidden else None,
                                            repeats=timing_repeats)
        text = compare.report(result)
        log.info("EPD Compare:\n%s", text)
        chart = to_image_tensor(plot(result, f"EPD Compare - {model_family(model)}"))
        if vae is None and result.firsts["reference"].shape[1] != 1:
            picture = Image.new("RGB", (420, 40), (255, 255, 255))
            ImageDraw.Draw(picture).text((8, 12), "connect a VAE to EPD Compare for the image grid", fill=(30, 30, 30),
                                         font=_font(13))
        else:
            picture = grid(result, decoder(vae, latent_out))
        image = to_image_tensor(picture)
        return io.NodeOutput(chart, text, image, ui={"text": [text]})


# ================================================================================================ the trainer

def measure_table(model, positive, negative, cfg, latent, table: EPDParams, seed: int, budget_s: float,
                  repeats: int = TIMING_REPEATS) -> dict:
    """The EPD Trainer's held-out report: the new table against the built-ins (default field, chosen on 8 held-out
    noises, scored on 8 more) at the table's latency NFE and at its compute NFE (as many calls as the table makes
    model evaluations: what a built-in may spend at equal time on a device where a K-point call costs K calls),
    each candidate timed at batch 1; the `measured` metadata of the table, with the verdict at equal calls and at
    equal time. When the estimate exceeds budget_s (or budget_s is 0), {"skipped": why} instead."""
    if budget_s <= 0:
        return {"skipped": "measure_minutes is 0"}
    latent = {**latent, "samples": latent["samples"][:1]}
    seeds = [seed + HELD_OUT_SEED + i for i in range(16)]
    try:
        probe = table_candidate(table, "new table", model.get_model_object("model_sampling"), False)
        if probe.calls is None:
            return {"skipped": "the table could not be run on its own schedule"}
        nfes = sorted({probe.calls, math.ceil(probe.evals or probe.calls)})
        result, _ = run_comparison(model, positive, negative, cfg, latent, seeds[:8], seeds[8:], nfes,
                                   [("new table", table)], parse_names(DEFAULT_BUILTINS, DETERMINISTIC, ""),
                                   parse_names(DEFAULT_SCHEDULERS, [*comfy.samplers.SCHEDULER_NAMES, "ays"], ""),
                                   ("dpmpp_2m", "karras", 100), budget_s, who="EPD Trainer's measurement",
                                   bar=False, repeats=repeats)
    except (ValueError, EPDParamsError) as e:
        return {"skipped": str(e)}
    best, row = result.best(probe.calls), result.nfe[probe.calls]["tables"].get("new table")
    if not best or not row:
        return {"skipped": f"no built-in ran at NFE {probe.calls}"}
    measured = {"nfe": probe.calls, "compute_nfe": row["compute_nfe"], "ratio": round(row["ratio"], 4),
                "rmse": row["rmse"], "best_builtin": best["name"], "best_builtin_rmse": best["rmse"],
                "reference": result.reference, "held_out_samples": result.test_samples,
                "fit_samples": result.fit_samples, "verdict": compare.verdict(row["ratio"], best["name"])}
    if result.repeats:
        opponent = row["equal_time"]
        measured.update(seconds_per_image=row["seconds"], best_builtin_seconds=best["seconds"],
                        timing=f"median of {result.repeats} runs of {result.timed_samples} sample(s) on "
                               f"{result.device}, built-ins at NFE {', '.join(map(str, nfes))}",
                        equal_time=opponent, time_verdict=compare.time_verdict(row["seconds"], opponent))
    return measured


def record_measurement(table: EPDParams, model, positive, negative, cfg, latent, seed: int, budget_s: float) -> str:
    """The EPD Trainer's report: measure_table() within `budget_s` seconds (the node's measure_minutes), written
    into the table's metadata as `measured`; returns the line for the node's output."""
    measured = measure_table(model, positive, negative, cfg, latent, table, seed, budget_s)
    table.metadata["measured"] = measured
    text = compare.measured_text(measured)
    log.info("EPD Trainer: the new table %s", text)
    return text


COMPARE_NODES = [EPDCompare]
