"""Ship one K = 1 EPD-MS table per latency NFE beside the K >= 2 one (equal compute: one model evaluation per
step, like a built-in): per NFE, the K = 1 candidate that scripts/make_ms_tables.py trained (bench/results/
ms_candidates/) with the lowest error on the benchmark's FIT noises, kept only where it beats its untrained start.

    .venv/bin/python scripts/ship_k1_tables.py --model mnist
    .venv/bin/python scripts/ship_k1_tables.py --model demo
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core
from bench.quality_vs_nfe import problem  # noqa: E402

from epd_core.compare import per_sample_rmse  # noqa: E402
from epd_core.sampling.multistep import ms_table, sample_epd_ms  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.sampling.schedules import polynomial, with_final_zero  # noqa: E402
from epd_core.sampling.plan import sampler_sigmas  # noqa: E402

PREFIX = {"mnist": "demo_mnist", "demo": "demo_digits"}
CFG = {"mnist": 1.0, "demo": 2.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(PREFIX), default="mnist")
    ap.add_argument("--fit-samples", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, ms, noise, extra_for, _, k = problem(args.model, CFG[args.model])
    x_fit = noise(101, args.fit_samples)  # the benchmark's fit noises (its test noises are seed 202)
    ref_sig = with_final_zero(polynomial(500, float(ms.sigma_min), float(ms.sigma_max))).to(x_fit.dtype)

    def m(x, s, **kw):
        return model(x, s, **extra_for(len(x_fit)), **kw)
    with torch.no_grad():
        ref = k.sample_heun(m, x_fit, ref_sig, disable=True)

    def fit(table) -> float:  # sampled as KSampler / EPD Sigmas give it: on its own schedule
        with torch.no_grad():
            out = sample_epd_ms(m, x_fit, sampler_sigmas(table).to(x_fit.dtype), table, disable=True)
        return float(per_sample_rmse(out, ref).mean())
    cand_dir = REPO / "bench" / "results" / "ms_candidates"
    for nfe in range(3, 11):
        pattern = re.compile(rf"{PREFIX[args.model]}_epd_ms_k1(_.*)?_nfe{nfe}\.safetensors")
        scored = []
        for path in sorted(cand_dir.glob("*.safetensors")):
            if pattern.fullmatch(path.name):
                table = EPDParams.load(path)
                scored.append((fit(table), path.name, table))
        if not scored:
            print(f"NFE {nfe}: no K = 1 candidate", flush=True)
            continue
        err, name, table = min(scored, key=lambda s: s[0])
        start = ms_table(sampler_sigmas(table).double(), table.metadata.get("initial_builtin", "gradient_estimation"))
        start_err = fit(start)  # the built-in it started from, on the list it started from
        verdict = "ships" if err < start_err else "not shipped (no better than its start)"
        print(f"NFE {nfe}: {name} fit {err:.4f} (its start {start_err:.4f}; {len(scored)} candidates): {verdict}",
              flush=True)
        if err < start_err:
            table.metadata["provenance"] = dict(table.metadata.get("provenance") or {}, fit_rmse_k1_selection=err,
                                                selected_from=name)
            table.save(REPO / "pretrained_params" / f"{PREFIX[args.model]}_epd_ms_k1_nfe{nfe}.safetensors")


if __name__ == "__main__":
    main()
