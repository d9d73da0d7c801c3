"""What KSampler's entry samples with at each CFG and NFE, from the measurements the shipped tables carry: the CFG
guard's choice (epd_core/sampling/cfg_guard.py, the code KSampler runs) among a solver's tables of that NFE, and the
held-out ratio recorded for it (its `measured_cfg` entry at that CFG; 1.00 where the guard falls back to the best
built-in). For tables measured after a sweep on its noises (bench/cfg_transfer.py --record), without sampling again.

    .venv/bin/python bench/ksampler_picks.py --model mnist --cfg 1,3,5,7.5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for bench, scripts and epd_core
from bench.quality_vs_nfe import TABLE_PREFIX  # noqa: E402
from scripts.make_ms_tables import nfe_list  # noqa: E402

from epd_core.sampling.cfg_guard import choose, measurements  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402


def picks(model: str, solver: str, cfgs: list[float], nfes: list[int]) -> dict:
    out = {}
    for nfe in nfes:
        pattern = f"{TABLE_PREFIX[model]}{solver}_*nfe{nfe}.safetensors"
        found = [(p.stem, EPDParams.load(p)) for p in sorted((REPO / "pretrained_params").glob(pattern))]
        found = [(stem, t) for stem, t in found if t.metadata.get("latency_nfe") == nfe]
        tables, names = [t for _, t in found], {id(t): stem for stem, t in found}
        for cfg in cfgs:
            choice = choose(tables, cfg)
            at = [e for e in measurements(choice.table) if e["cfg"] == cfg] if choice.table is not None else []
            measured_here = any(e["cfg"] == cfg for t in tables for e in measurements(t))
            # the fallback is the best built-in (1.00) where the sweep measured it at this CFG; elsewhere unknown
            ratio = at[0]["ratio"] if at else (1.0 if choice.table is None and measured_here else None)
            out[f"{cfg:g}/{nfe}"] = {"cfg": cfg, "nfe": nfe, "ratio": ratio, "reason": choice.reason,
                                     "table": names.get(id(choice.table)) if choice.table is not None else None}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(TABLE_PREFIX), default="mnist")
    ap.add_argument("--solver", default="epd_ms")
    ap.add_argument("--cfg", default="1,3,5,7.5")
    ap.add_argument("--nfe", default="3-10")
    args = ap.parse_args(argv)
    nfes = nfe_list(args.nfe)
    cfgs = [float(c) for c in args.cfg.split(",")]
    out = picks(args.model, args.solver, cfgs, nfes)
    lines = [f"### {args.model}: {args.solver} as KSampler runs it (the CFG guard's pick; held-out ratio to the best "
             "built-in recorded in the table, 1.00 = the fallback; — = not measured there: "
             "the built-in recorded at the nearest measured CFG runs)", "",
             "| CFG | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for cfg in cfgs:
        cells = [out[f"{cfg:g}/{n}"]["ratio"] for n in nfes]
        lines.append(f"| {cfg:g} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in cells) + " |")
    lines += ["", "Picks: " + "; ".join(f"{k}: {v['table'] or 'built-in'}" for k, v in out.items())]
    text = "\n".join(lines)
    print(text)
    stem = REPO / "bench" / "results" / "cfg" / f"ksampler_picks_{args.model}_{args.solver}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
