"""Train the shipped DyWeight tables for the demo models, one per NFE (seeded, CPU).

    .venv/bin/python scripts/make_dyweight_tables.py --model demo --nfe 3-10
    .venv/bin/python scripts/make_dyweight_tables.py --model mnist --nfe 3-10

Per NFE the grid is the scheduler the benchmark chose for its best built-in on FIT noises
(bench/results/quality_vs_nfe_<model>.json), with NFE steps from sigma_max ending in 0 (where that scheduler gives
no such list, the common scheduler on which the untrained ipndm start has the lowest FIT error), and DyWeight's
recipe (the registry's: end-to-end L2 to a Heun teacher, Adam with cosine decay, gradient clipping) trains from each
of its untrained starts (euler, and ipndm with 3 directions). The untrained starts are candidates too: the
candidate with the lowest error on the FIT noises (seed 101) ships as <out>/<prefix>_dyweight_nfe<N>.safetensors;
the benchmark scores it on its held-out noises (bench/quality_vs_nfe.py --solvers dyweight).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench, scripts and epd_core
from bench.quality_vs_nfe import comfy_sigmas, problem, reference  # noqa: E402
from scripts.make_ms_tables import CFG, PREFIX, nfe_list  # noqa: E402

from epd_core.compare import per_sample_rmse  # noqa: E402
from epd_core.training.distill import distill  # noqa: E402
from epd_core.training.distill_config import DistillConfig  # noqa: E402
from epd_core.sampling.dyweight import STARTS, TRAIN_WINDOW, dyweight_table, sample_dyweight  # noqa: E402
from epd_core.demo.problems import demo_problem  # noqa: E402

FALLBACK_SCHEDULERS = ("karras", "sgm_uniform", "normal", "exponential")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(PREFIX), default="demo")
    ap.add_argument("--nfe", default="3-10")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-batches", type=int, default=16)
    ap.add_argument("--fit-samples", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=100, help="the Heun teacher's steps (more where the tables "
                    "get close to its own error)")
    ap.add_argument("--starts", default=",".join(STARTS))
    ap.add_argument("--out", type=Path, default=REPO / "pretrained_params")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = json.loads((REPO / "bench" / "results" / f"quality_vs_nfe_{args.model}.json").read_text())
    cfg_scale = CFG[args.model]
    parts = problem(args.model, cfg_scale)
    model_eval, ms, noise, extra_for, _, k = parts
    train = demo_problem(args.model, guidance_scale=cfg_scale)
    x_fit, ref_fit = reference(parts, args.model, cfg_scale, 101, args.fit_samples, 500)
    extra = extra_for(len(x_fit))

    def m_fit(x, s, **kw):
        return model_eval(x, s, **extra, **kw)

    def fit_error(table, sig) -> float:
        with torch.no_grad():
            return float(per_sample_rmse(sample_dyweight(m_fit, x_fit, sig.to(x_fit.dtype), table), ref_fit).mean())
    for nfe in nfe_list(args.nfe):
        row = results["nfe"][str(nfe)]["builtins"]
        best_name = min(row, key=lambda s: row[s]["fit"])
        # the best built-in's scheduler, else the common ones: a full denoise of NFE steps from sigma_max to 0 (some
        # schedulers give another step count or start lower, e.g. ddim_uniform at 8 steps from 7.37), the one where
        # the untrained ipndm start has the lowest FIT error
        grids = []
        for scheduler in dict.fromkeys([row[best_name]["scheduler"], *FALLBACK_SCHEDULERS]):
            sig = comfy_sigmas(ms, "euler", scheduler, nfe).double()
            if len(sig) - 1 == nfe and float(sig[-1]) == 0.0 and abs(float(sig[0]) / float(ms.sigma_max) - 1) < 1e-3:
                grids.append((fit_error(dyweight_table(sig, start="ipndm", window=TRAIN_WINDOW), sig), scheduler, sig))
            if grids and scheduler == row[best_name]["scheduler"]:
                break  # the best built-in's own scheduler gives a full denoise: no need to look further
        if not grids:
            print(f"NFE {nfe}: no scheduler gives a full denoise of {nfe} steps; skipped", flush=True)
            continue
        _, scheduler, sig = min(grids, key=lambda g: g[0])
        meta = dict(model_family=train.family, guidance_scale=cfg_scale)
        best = None
        for start in args.starts.split(","):
            untrained = dyweight_table(sig, start=start, window=TRAIN_WINDOW, **meta)
            fit0 = fit_error(untrained, sig)
            if best is None or fit0 < best[0]:
                best = (fit0, untrained, f"untrained {start}")
            t0 = time.time()
            cfg = DistillConfig(sigmas=sig.tolist(), solver="dyweight", builtin=start, num_points=1,
                                iterations=args.iterations, lr=args.lr, batch=args.batch, num_batches=args.num_batches,
                                teacher="heun", inserted_steps=3, teacher_steps=args.teacher_steps, seed=0,
                                teacher_sigma_min=float(ms.sigma_min), schedule={"type": "explicit"}, **meta)
            table = distill(train.model, None, train.noise_fn(float(sig[0])), cfg, train.extra_args_fn)
            fit = fit_error(table, sig)
            table.metadata["provenance"].update(fit_rmse=fit, fit_rmse_start=fit0, scheduler=scheduler,
                                                fit_samples=args.fit_samples)
            print(f"NFE {nfe} from {start} on {scheduler}: fit RMSE {fit0:.4f} -> {fit:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if fit < best[0]:
                best = (fit, table, f"trained from {start}")
        print(f"NFE {nfe}: ships {best[2]} (fit {best[0]:.4f})", flush=True)
        best[1].save(args.out / f"{PREFIX[args.model]}_dyweight_nfe{nfe}.safetensors")


if __name__ == "__main__":
    main()
