"""Transfer across CFG scales: each EPD-MS table (trained at CFG c, or over a range) scored at every CFG c' of the
sweep, on the held-out noises of bench/quality_vs_nfe.py (seed 202, its cached reference at c'), as a ratio to
the best built-in there (that run's fit-selected one). Tables: the shipped ones of the NFE (K = 1 and K >= 2, and
the _cfg<c> / _cfg<lo>-<hi> ones), and with --candidates every trained candidate in bench/results/ms_candidates/.

    .venv/bin/python bench/cfg_transfer.py --model demo --nfe 4,6
    .venv/bin/python bench/cfg_transfer.py --model mnist --nfe 4 --tables demo_mnist_epd_ms_k1_cfg5_nfe4 --record

--record writes each scored table's measured_cfg (as bench/quality_vs_nfe.py --record does: the ratio on the sweep's
validation noises, seed 404, for the guard; the held-out one; the best built-in) for a table trained after the
sweep, without scoring the whole field again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench and epd_core
from bench.quality_vs_nfe import (TABLE_PREFIX, best_builtin_of, best_val_errors, measured_entry,  # noqa: E402
                                  problem, reference)

from epd_core.compare import per_sample_rmse, ratio_se  # noqa: E402
from epd_core.sampling.cfg_guard import span, trained_range, with_measurements  # noqa: E402
from epd_core.sampling.multistep import sample_epd_ms  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.sampling.plan import sampler_sigmas  # noqa: E402

RESULTS = REPO / "bench" / "results"


def sweep_run(model: str, cfg: float) -> dict:
    default = 2.0 if model == "demo" else 1.0
    return json.loads((RESULTS / "cfg" / (f"quality_vs_nfe_{model}.json" if cfg == default else
                                          f"quality_vs_nfe_{model}_cfg{cfg:g}.json")).read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "mnist"), default="demo")
    ap.add_argument("--nfe", default="4,6")
    ap.add_argument("--cfg", default="1,3,5,7.5")
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--tables", default="", help="only these table names (comma list, without .safetensors)")
    ap.add_argument("--record", action="store_true", help="write measured_cfg into the scored tables")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfgs = [float(c) for c in args.cfg.split(",")]
    lines = [f"### {args.model}: EPD-MS tables across CFG (held-out ÷ best built-in at the scoring CFG)", "",
             "| NFE | table | K | trained at | " + " | ".join(f"CFG {c:g}" for c in cfgs) + " |",
             "|---|---|---|---|" + "---|" * len(cfgs)]
    out = {}
    for nfe in (int(n) for n in args.nfe.split(",")):
        folders = [REPO / "pretrained_params"] + ([RESULTS / "ms_candidates"] if args.candidates else [])
        paths = [p for f in folders for p in sorted(f.glob(f"{TABLE_PREFIX[args.model]}epd_ms*_nfe{nfe}.safetensors"))]
        if args.tables:
            paths = [p for p in paths if p.stem in args.tables.split(",")]
        scores = {p: [] for p in paths}
        entries = {p: [] for p in paths}
        for cfg in cfgs:
            run = sweep_run(args.model, cfg)
            parts = problem(args.model, cfg)
            model, ms, noise, extra_for, _, k = parts
            x, ref = reference(parts, args.model, cfg, 202, run["samples"], run["ref_steps"])
            b = run["nfe"].get(str(nfe), {}).get("builtins")
            if not b:  # the sweep did not run this NFE at this CFG (MNIST: NFE 4, 6, 8 at CFG 3 and 7.5)
                for p in paths:
                    scores[p].append(float("nan"))
                continue
            name, best_row = best_builtin_of(b)
            best = best_row["mean"]
            x_val, ref_val = reference(parts, args.model, cfg, 404, run["val_samples"], run["ref_steps"]) \
                if args.record else (None, None)

            def errors(t, x, ref):
                with torch.no_grad():
                    y = sample_epd_ms(lambda z, s, **kw: model(z, s, **extra_for(len(x)), **kw), x,
                                      sampler_sigmas(t, ms).to(x.dtype), t, disable=True)
                return per_sample_rmse(y, ref)
            base = best_val_errors(k, ms, model, extra_for, name, best_row, x_val, ref_val) if args.record else None
            for p in paths:
                t = EPDParams.load(p)
                scores[p].append(float(errors(t, x, ref).mean()) / best)
                if args.record:
                    e_val = errors(t, x_val, ref_val)
                    row = {"fit_ratio": float(e_val.mean()) / best_row["val"], "fit_ratio_se": ratio_se(e_val, base),
                           "ratio": scores[p][-1]}
                    entries[p].append(measured_entry(argparse.Namespace(cfg=cfg, model=args.model, **{
                        k: run[k] for k in ("fit_samples", "val_samples", "samples", "ref_steps")}), name, best_row,
                        row))
        for p in paths:
            t = EPDParams.load(p)
            if args.record:
                t.metadata["measured_cfg"] = with_measurements(t, entries[p])
                t.save(p)
            rng = trained_range(t)
            at = "?" if rng is None else span(*rng)
            cells = ["—" if v != v else f"{v:.2f}" for v in scores[p]]  # nan: not in the sweep
            lines.append(f"| {nfe} | {p.name} | {t.num_points} | {at} | " + " | ".join(cells) + " |")
            out[f"{nfe}/{p.name}"] = {"K": t.num_points, "trained_at": rng, "over_best": dict(zip(cfgs, scores[p]))}
    text = "\n".join(lines)
    print(text)
    suffix = "" if not args.tables else "_" + args.tables.replace(",", "_")
    (RESULTS / "cfg" / f"cfg_transfer_{args.model}{suffix}.md").write_text(text + "\n")
    (RESULTS / "cfg" / f"cfg_transfer_{args.model}{suffix}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
