"""What KSampler's entry samples with at each CFG and NFE, from the measurements the shipped tables carry: the CFG
guard's choice (epd_core/sampling/cfg_guard.py, the code KSampler runs) among a solver's tables of that NFE, and the
held-out ratio recorded for it (its `measured_cfg` entry at that CFG; 1.00 where the guard falls back to the best
built-in). For tables measured after a sweep on its noises (bench/cfg_transfer.py --record), without sampling again.

    .venv/bin/python bench/ksampler_picks.py --model mnist

The CFG scales default to the model's sweep (bench/results/cfg/quality_vs_nfe_<model>_cfg.json); with others
(or other NFEs) the report goes to ksampler_picks_<model>_<solver>_cfg<list>_nfe<list>.*, never over the sweep's.
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
    ap.add_argument("--cfg", default="", help="comma list (default: the model's sweep)")
    ap.add_argument("--nfe", default="3-10")
    args = ap.parse_args(argv)
    nfes = nfe_list(args.nfe)
    sweep = REPO / "bench" / "results" / "cfg" / f"quality_vs_nfe_{args.model}_cfg.json"
    swept = json.loads(sweep.read_text())["cfgs"]
    cfgs = [float(c) for c in args.cfg.split(",")] if args.cfg else swept
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
    name = f"ksampler_picks_{args.model}_{args.solver}"
    if cfgs != swept or args.nfe != ap.get_default("nfe"):  # a subset or another range: beside the sweep's report
        name += f"_cfg{','.join(f'{c:g}' for c in cfgs)}_nfe{args.nfe}"
    stem = REPO / "bench" / "results" / "cfg" / name
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
