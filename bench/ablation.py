"""Which lever makes EPD win: each row changes ONE setting of the shipped recipe and reports the held-out RMSE
at one latency NFE, next to the best ComfyUI built-in at that NFE (chosen on fit noises from a strong field).

    .venv/bin/python bench/ablation.py --model mnist --nfe 4      # writes bench/results/ablation_mnist_nfe4.md
    .venv/bin/python bench/ablation.py --model demo --nfe 4       # the 8x8 digits model (CFG 2)

The shipped recipe (quality_vs_nfe.shipped_recipe, as scripts/make_pretrained.sh): K = 2, learned schedule,
last row steps to 0 (to_zero), end-to-end objective, Adam lr 0.03 (schedule 0.02), polynomial rho-7 start ending
at 0.1, Heun teacher (100 fine steps).
RMSE is to a 500-step Heun reference on held-out noises (seed 202, as bench/quality_vs_nfe.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core
from bench import quality_vs_nfe as Q  # noqa: E402

from epd_core.training.distill import distill  # noqa: E402
from epd_core.sampling.schedules import polynomial, with_final_zero  # noqa: E402
from epd_core.sampling.paper import sample_epd, sample_epd_plugin  # noqa: E402
from epd_core.training.teachers import teacher_calls, teacher_states  # noqa: E402

FIELD = [(s, c) for s in ("uni_pc_bh2", "uni_pc", "ipndm_v", "dpmpp_2m", "deis", "res_multistep")
         for c in ("karras", "normal", "exponential", "ays_sd1", "gits_1.20", "sgm_uniform")]


LEVERS = {
    "shipped recipe": {},
    "fixed schedule (polynomial rho 7 to 0.1)": {"learn_schedule": False},
    "final Euler step instead of to_zero": {"to_zero": False},
    "per-step then end-to-end objective": {"objective": "per_step+end_to_end"},
    "old optimiser (lr 0.1, 200 iterations)": {"lr": 0.1, "schedule_lr": 0.05, "iterations": 200},
    "K = 1": {"num_points": 1},
    "K = 3": {"num_points": 3},
    "EPD-Plugin (Adams-Bashforth predictor)": {"solver": "epd_plugin"},
    # the teacher's cost: it runs once per noise batch, before training can use that batch
    "teacher Heun, 50 steps (half the calls)": {"teacher_steps": 50},
    "teacher DPM++(2M), 100 steps (half the calls)": {"teacher": "dpmpp"},
    "teacher DPM++(2M), 50 steps (a quarter)": {"teacher": "dpmpp", "teacher_steps": 50},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("mnist", "demo"), default="mnist")
    ap.add_argument("--nfe", type=int, default=4)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--fit-samples", type=int, default=16)
    ap.add_argument("--ref-steps", type=int, default=500)
    ap.add_argument("--levers", default="", help="comma-separated row numbers (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg_scale = 1.0 if args.model == "mnist" else 2.0
    model, ms, noise, extra_for, _, k = Q.problem(args.model, cfg_scale)
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    x_fit, x_test = noise(101, args.fit_samples), noise(202, args.samples)
    ref_sig = with_final_zero(polynomial(args.ref_steps, smin, smax))
    with torch.no_grad():
        refs = {id(x): k.sample_heun(Q.Counted(model, extra_for(len(x))), x, ref_sig, disable=True)
                for x in (x_fit, x_test)}

    def rmse(fn, x):
        m = Q.Counted(model, extra_for(len(x)))
        with torch.no_grad():
            out = fn(m, x)
        return m.calls, float(Q.per_sample_rmse(out, refs[id(x)]).mean())

    best = None
    for sampler, sched in FIELD:  # the best built-in at this NFE, chosen on the fit noises
        run = Q.builtin_sampler(k, sampler)
        for steps in range(1, args.nfe + 1):
            try:
                sig = Q.comfy_sigmas(ms, sampler, sched, steps).to(x_fit.dtype)
                calls, fit = rmse(lambda m, x: run(m, x, sig), x_fit)
            except Exception:  # noqa: BLE001 - a pair ComfyUI cannot run at this size
                continue
            if calls == args.nfe and (best is None or fit < best[0]):
                best = (fit, sampler, sched, sig)
    _, b_sampler, b_sched, b_sig = best
    run = Q.builtin_sampler(k, b_sampler)
    _, b_rmse = rmse(lambda m, x: run(m, x, b_sig), x_test)
    print(f"best built-in at NFE {args.nfe}: {b_sampler} ({b_sched}) {b_rmse:.4f}", flush=True)

    problem_noise = lambda g, n: (1 + smax ** 2) ** 0.5 * torch.randn(n, *x_test.shape[1:], generator=g)  # noqa: E731
    labels = lambda g, n: {"cond": torch.randint(0, 10, (n,), generator=g)}  # noqa: E731
    from epd_core.demo.problems import demo_problem  # the same network, with gradients for distillation
    grad_model = demo_problem(args.model, guidance_scale=cfg_scale).model
    rows = []
    chosen = [int(i) for i in args.levers.split(",")] if args.levers else range(len(LEVERS))
    for i, (lever, change) in enumerate(LEVERS.items()):
        if i not in chosen:
            continue
        config = Q.shipped_recipe(args.nfe, smin, smax, **change)
        if config is None:
            print(f"{lever}: not possible at NFE {args.nfe} (needs 2 rows)")
            continue
        t0 = time.time()
        table = distill(grad_model, None, problem_noise, config, labels)
        own = torch.tensor(table.schedule["sigmas"] + ([0.0] if table.schedule["final_zero"] else []))
        fn = sample_epd if config.solver == "epd" else sample_epd_plugin
        calls, e = rmse(lambda m, x: fn(m, x, own.to(x.dtype), table, disable=True), x_test)
        assert calls == args.nfe, (lever, calls)
        t_sig = config.sigmas + ([0.0] if config.sigmas[-1] > 0 else [])  # the teacher runs on to sigma 0
        t_args = (config.teacher, config.inserted_steps)
        t_kw = {"fine_steps": config.teacher_steps, "sigma_end": config.teacher_sigma_min}
        with torch.no_grad():  # the teacher's own error: its end point against the reference, held-out noises
            t_end = teacher_states(model, x_test, torch.tensor(t_sig), *t_args, extra_for(len(x_test)), **t_kw)[-1]
        rows.append({"lever": lever, "rmse": e, "over_best": e / b_rmse, "seconds": round(time.time() - t0),
                     "teacher_calls": teacher_calls(t_sig, *t_args, **t_kw),
                     "teacher_rmse": float(Q.per_sample_rmse(t_end, refs[id(x_test)]).mean())})
        print(f"{lever}: {e:.4f} (÷ best {e / b_rmse:.2f}, {rows[-1]['seconds']} s)", flush=True)

    base = next((r for r in rows if r["lever"] == "shipped recipe"), None)
    lines = [f"### Ablation on {args.model} at latency NFE {args.nfe} ({args.samples} held-out samples, "
             f"{args.ref_steps}-step reference, CFG {cfg_scale}); best built-in {b_sampler} ({b_sched}): "
             f"RMSE {b_rmse:.4f}", "",
             "| lever (one change to the shipped recipe) | EPD RMSE | EPD ÷ best built-in | change vs recipe | "
             "teacher calls per batch | teacher's own RMSE |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{r['over_best'] - base['over_best']:+.2f}" if base and r is not base else "—"
        lines.append(f"| {r['lever']} | {r['rmse']:.4f} | {r['over_best']:.2f} | {delta} | {r['teacher_calls']} | "
                     f"{r['teacher_rmse']:.4f} |")
    lines.append("")
    lines.append(f"Command: `.venv/bin/python bench/ablation.py --model {args.model} --nfe {args.nfe}`")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ablation_{args.model}_nfe{args.nfe}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"best_builtin": [b_sampler, b_sched, b_rmse], "rows": rows},
                                                    indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
