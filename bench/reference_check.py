"""How far the CFG sweep's 200-step Heun reference is from a 500-step one (bench/quality_vs_nfe.py --ref-steps 200
at CFG > 1, where every call costs a double batch): RMSE between the two on a subset of the fit noises, per CFG.

    .venv/bin/python bench/reference_check.py --model mnist --cfg 1,7.5 --samples 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core
from bench.quality_vs_nfe import problem  # noqa: E402

from epd_core.compare import per_sample_rmse  # noqa: E402
from epd_core.sampling.schedules import polynomial, with_final_zero  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "mnist"), default="mnist")
    ap.add_argument("--cfg", default="1,7.5")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", default="200,500")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    short, long = (int(v) for v in args.steps.split(","))
    print(f"| model | CFG | RMSE({short}-step ref, {long}-step ref), mean over {args.samples} fit noises | max |")
    print("|---|---|---|---|")
    for cfg in (float(c) for c in args.cfg.split(",")):
        model, ms, noise, extra_for, _, k = problem(args.model, cfg)
        x = noise(101, args.samples)
        refs = []
        for n in (short, long):
            sig = with_final_zero(polynomial(n, float(ms.sigma_min), float(ms.sigma_max))).to(x.dtype)
            with torch.no_grad():
                refs.append(k.sample_heun(lambda y, s, **kw: model(y, s, **extra_for(len(x)), **kw), x, sig,
                                          disable=True))
        e = per_sample_rmse(refs[0], refs[1])
        print(f"| {args.model} | {cfg:g} | {float(e.mean()):.2e} | {float(e.max()):.2e} |", flush=True)


if __name__ == "__main__":
    main()
