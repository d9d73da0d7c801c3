"""Train the shipped EPD-MS tables for the demo models, one per latency NFE (seeded, CPU).

    .venv/bin/python scripts/make_ms_tables.py --model mnist --nfe 3-10 --points 1,2
    .venv/bin/python scripts/make_ms_tables.py --model demo --nfe 3-10 --points 1,2

Per NFE the starting point is the best built-in that EPD-MS reproduces exactly (gradient_estimation, ipndm,
ipndm_v or euler), on the scheduler the benchmark chose for it on FIT noises
(bench/results/quality_vs_nfe_<model>.json, same seeds); an untrained table samples exactly as that built-in.
Training learns the coefficients, look-ahead positions and (optionally) the schedule end to end against a Heun
teacher on training noises (seed 0). Every K and every `--configs` entry is a candidate, and so are the untrained
table and the table the run would replace: the one with the lowest error on the FIT noises ships as
<out>/<prefix>_epd_ms_nfe<N>.safetensors, so a table never ships that is worse on them than where it started or
than the one it replaces. Every trained candidate is kept in bench/results/ms_candidates/ (docs/results.md).

Tables for other CFG scales (docs/results.md, "Across CFG"): --cfg 5 starts each NFE from the best built-in of the
benchmark's run at that CFG (bench/results/cfg/quality_vs_nfe_<model>_cfg5.json) and ships
<prefix>_epd_ms_k<K>_cfg5_nfe<N>; --cfg-range 1,7.5 trains one table over the range (one CFG scale per noise
batch) from the best built-in at the middle --fit-cfgs scale, ranked by its mean fit error at the --fit-cfgs, and
ships <prefix>_epd_ms_k<K>_cfg1-7.5_nfe<N>. Each file is shipped only where it beats its untrained start.

The 8x8 tables of NFE 6-10 (2026-12-04, from ipndm_v):
    .venv/bin/python scripts/make_ms_tables.py --model demo --nfe 6-10 --points 1,2 --batch 16 --num-batches 64 \
        --fit-samples 128 --configs "lr=0.01;lr=0.001,learn_schedule=0"
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
from bench.quality_vs_nfe import comfy_sigmas, ms_recipe, problem, reference, starting_builtin  # noqa: E402

from epd_core.compare import per_sample_rmse  # noqa: E402
from epd_core.training.distill import distill  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.sampling.multistep import anchored, ms_table, sample_epd_ms  # noqa: E402
from epd_core.demo.problems import demo_problem  # noqa: E402

PREFIX = {"mnist": "demo_mnist", "demo": "demo_digits"}
CFG = {"mnist": 1.0, "demo": 2.0}


def nfe_list(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(v) for v in text.split(",")]


def _parse_change(kv: str) -> tuple[str, object]:
    key, value = kv.split("=")
    if key == "learn_schedule":
        return key, bool(int(value))
    if key in ("iterations", "batch", "num_batches"):
        return key, int(value)
    return key, (value if key == "loss" else float(value))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(PREFIX), default="mnist")
    ap.add_argument("--nfe", default="3-10")
    ap.add_argument("--points", default="1,2", help="K values to train (the current point included)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--schedule-lr", type=float, default=0.02)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-batches", type=int, default=16)
    ap.add_argument("--fit-samples", type=int, default=32, help="fit noises (seed 101) the candidates are ranked on")
    ap.add_argument("--configs", default="", help="candidate recipes, ';'-separated 'field=value,...' changes to "
                    "ms_recipe() (e.g. 'lr=0.01;lr=0.001,learn_schedule=0'); default: the flags above")
    ap.add_argument("--out", type=Path, default=REPO / "pretrained_params")
    ap.add_argument("--cfg", type=float, default=None, help="the CFG scale to train at (default: the model's own)")
    ap.add_argument("--cfg-range", default=None, help="LO,HI: one table over this range of CFG scales")
    ap.add_argument("--fit-cfgs", default="1,3,5,7.5", help="--cfg-range: the scales its fit error is averaged over")
    ap.add_argument("--results", type=Path, default=None, help="the benchmark JSON whose best built-ins are the "
                    "starting points (default: bench/results/quality_vs_nfe_<model>.json; with --cfg c its run "
                    "bench/results/cfg/quality_vs_nfe_<model>_cfg<c>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg_range = [float(v) for v in args.cfg_range.split(",")] if args.cfg_range else None
    train_cfg = args.cfg if args.cfg is not None else (sum(cfg_range) / 2 if cfg_range else CFG[args.model])
    fit_cfgs = [c for c in map(float, args.fit_cfgs.split(",")) if cfg_range[0] <= c <= cfg_range[1]] \
        if cfg_range else [train_cfg]
    # the shipped file's name: <prefix>_epd_ms_nfe<N> at the model's own CFG (K chosen on the fit noises), else
    # one file per K and CFG (range)
    tag = "" if args.cfg is None and not cfg_range else \
        (f"_cfg{cfg_range[0]:g}-{cfg_range[1]:g}" if cfg_range else f"_cfg{args.cfg:g}")
    start_cfg = fit_cfgs[len(fit_cfgs) // 2]  # a range's table starts from the best built-in at its middle scale
    results_path = args.results or (REPO / "bench" / "results" / (
        f"quality_vs_nfe_{args.model}.json" if not tag else f"cfg/quality_vs_nfe_{args.model}_cfg{start_cfg:g}.json"))
    results = json.loads(results_path.read_text())
    train = demo_problem(args.model, guidance_scale=train_cfg)
    fits = []  # (model, fit noises, reference) per fit CFG: the benchmark's fit noises (its test noises: seed 202)
    for c in fit_cfgs:
        parts = problem(args.model, c)
        model_eval, ms, noise, extra_for, _, k = parts
        x_fit, ref_fit = reference(parts, args.model, c, 101, args.fit_samples, 500)

        def m_fit(x, s, model_eval=model_eval, extra_for=extra_for, n=len(x_fit), **kw):
            return model_eval(x, s, **extra_for(n), **kw)
        fits.append((m_fit, x_fit, ref_fit))
    cand_dir = REPO / "bench" / "results" / "ms_candidates"
    cand_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    configs = [dict(_parse_change(kv) for kv in c.split(",") if kv) for c in args.configs.split(";")] or [{}]
    for nfe in nfe_list(args.nfe):
        builtin, scheduler, steps = starting_builtin(results["nfe"][str(nfe)]["builtins"])
        sig = comfy_sigmas(ms, builtin, scheduler, steps).double()
        if len(sig) - 1 != nfe:
            print(f"NFE {nfe}: {builtin} {scheduler} gives {len(sig) - 1} steps; skipped", flush=True)
            continue
        positive = anchored(sig)

        def fit_error(table) -> float:  # mean per-sample RMSE on the fit noises (and CFGs), on the built-in's list
            errs = []
            for m_fit, x_fit, ref_fit in fits:
                with torch.no_grad():
                    out = sample_epd_ms(m_fit, x_fit, sig.to(x_fit.dtype), table, disable=True)
                errs.append(float(per_sample_rmse(out, ref_fit).mean()))
            return sum(errs) / len(errs)
        meta = dict(model_family=train.family, guidance_scale=train_cfg,
                    schedule={"type": "explicit", "initial": f"{builtin} {scheduler}"})
        start_table = ms_table(sig, builtin, **meta)
        fit0 = fit_error(start_table)
        start_table.metadata["provenance"].update(fit_rmse=fit0, fit_rmse_start=fit0)
        best = (fit0, start_table, "untrained")
        for i, kk in enumerate(int(v) for v in args.points.split(",")):
            shipped = args.out / (f"{PREFIX[args.model]}_epd_ms_k{kk}{tag}_nfe{nfe}.safetensors" if tag else
                                  f"{PREFIX[args.model]}_epd_ms_nfe{nfe}.safetensors")
            if shipped.is_file() and (tag or i == 0):  # the table there now is a candidate: replaced only by a better
                fit = fit_error(EPDParams.load(shipped))
                print(f"NFE {nfe}: the table there now ({shipped.name}): fit RMSE {fit:.4f}", flush=True)
                if fit < best[0]:
                    best = (fit, None, "the table there now (kept)")
            for change in configs:
                t0 = time.time()
                opts = dict(lr=args.lr, schedule_lr=args.schedule_lr, iterations=args.iterations, batch=args.batch,
                            num_batches=args.num_batches)
                opts.update(change)
                cfg = ms_recipe(positive, builtin, kk, float(ms.sigma_min), cfg_range=cfg_range, **meta, **opts)
                params = distill(train.model, None, train.noise_fn(positive[0]), cfg, train.extra_args_fn)
                fit = fit_error(params)
                params.metadata["provenance"].update(fit_rmse=fit, fit_rmse_start=fit0)
                name = "".join(f"_{k}{v}" for k, v in change.items())
                name += "" if "loss" in change or cfg.loss == "mse" else f"_loss{cfg.loss}"  # old files: mse
                params.save(cand_dir / f"{PREFIX[args.model]}_epd_ms_k{kk}{name}{tag}_nfe{nfe}.safetensors")
                print(f"NFE {nfe} K={kk} {change or ''} from {builtin} ({scheduler}) at CFG "
                      f"{cfg_range or train_cfg}: fit RMSE {fit0:.4f} -> {fit:.4f} ({time.time() - t0:.0f}s)",
                      flush=True)
                summary[f"{nfe}_k{kk}{name}{tag}"] = {"builtin": builtin, "scheduler": scheduler, "fit_start": fit0,
                                                      "fit": fit, **change}
                if fit < best[0]:
                    best = (fit, params, f"K={kk} {change}")
            if tag:  # one file per K: each ships its best, or nothing when none beats the untrained start
                print(f"NFE {nfe} K={kk}: ships {best[2]} (fit {best[0]:.4f}, untrained {fit0:.4f})", flush=True)
                if best[1] is not None and best[2] != "untrained":
                    best[1].save(shipped)
                best = (fit0, start_table, "untrained")
        if not tag:
            print(f"NFE {nfe}: ships {best[2]} (fit {best[0]:.4f}, untrained {fit0:.4f})", flush=True)
            if best[1] is not None:
                best[1].save(args.out / f"{PREFIX[args.model]}_epd_ms_nfe{nfe}.safetensors")
    print(json.dumps(summary, indent=1))

if __name__ == "__main__":
    main()
