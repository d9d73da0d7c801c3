"""Where EPD-MS's gain comes from: the same recipe with one lever at a time, on held-out noises, plus oracle rows.

    .venv/bin/python bench/ms_attribution.py --model mnist --nfe 4,6 --out bench/results

Rows at each latency NFE (RMSE to the benchmark's 500-step Heun reference on its 128 test noises, seed 202, and
the ratio to the best built-in of bench/results/quality_vs_nfe_<model>.json):
  (a) schedule only      the starting built-in's coefficients, only its sigmas learned (LD3 / AYS-like)
  (b) coefficients, K=1  learned multistep coefficients + schedule, no look-ahead point (S4S-like)
  (c) EPD-MS K=2, K=3    + 1 or 2 look-ahead points in the same call
  (d) epd, epd_plugin    the paper's solvers (shipped tables)
and "oracle" copies of (a)-(c): trained on the 128 test noises themselves (16 batches of 8), the best any training
of that step could do on them - so a miss is the step's capacity when the oracle misses too, else the training's.
(b) and (c, K=2) are the candidates scripts/make_ms_tables.py trained (bench/results/ms_candidates/). With
--loss rmse every trained row is trained anew with that loss and labelled so. A run adds its rows to the results
of earlier runs with the same setting (--only 'oracle' measures just those rows):

    .venv/bin/python bench/ms_attribution.py --model mnist --nfe 4 --only oracle --loss rmse
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
from bench.quality_vs_nfe import comfy_sigmas, ms_recipe, problem, reference, starting_builtin  # noqa: E402
from scripts.make_ms_tables import CFG, PREFIX  # noqa: E402

from epd_core.compare import per_sample_rmse  # noqa: E402
from epd_core.training.distill import distill  # noqa: E402
from epd_core.sampling.multistep import anchored, sample_epd_ms  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.runtime import batch_seed  # noqa: E402
from epd_core.sampling.registry import variant  # noqa: E402
from epd_core.demo.problems import demo_problem  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(PREFIX), default="mnist")
    ap.add_argument("--nfe", default="4,6")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--skip", default="", help="comma list of row labels' first words to leave out, e.g. 'K=3'")
    ap.add_argument("--only", default="", help="comma list: only the rows whose labels contain one, e.g. 'oracle'")
    ap.add_argument("--loss", choices=("mse", "rmse"), default="mse",
                    help="the distillation loss of the trained rows (rmse: their labels say so)")
    ap.add_argument("--cfg", type=float, default=None, help="the CFG scale (default: the model's own): its sweep's "
                    "noises, reference and best built-ins (bench/results/cfg/quality_vs_nfe_<model>_cfg<C>.json)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scale = CFG[args.model] if args.cfg is None else args.cfg
    tag = "" if args.cfg is None else f"_cfg{args.cfg:g}"
    sweep = "" if args.cfg is None or args.cfg == CFG[args.model] else tag  # the sweep's run at the model's own CFG
    bench = json.loads((REPO / "bench" / "results" / (f"cfg/quality_vs_nfe_{args.model}{sweep}.json" if tag else
                                                      f"quality_vs_nfe_{args.model}.json")).read_text())
    parts = problem(args.model, scale)
    model, ms, noise, extra_for, _, k = parts
    train = demo_problem(args.model, guidance_scale=scale)
    t0 = time.time()
    x_test, ref = reference(parts, args.model, scale, 202, bench["samples"], bench["ref_steps"])
    labels = extra_for(len(x_test))
    print(f"reference done ({time.time() - t0:.0f}s)", flush=True)

    def score(fn) -> float:
        with torch.no_grad():
            return float(per_sample_rmse(fn(lambda x, s, **kw: model(x, s, **labels, **kw), x_test), ref).mean())

    out = {"model": args.model, "cfg": scale, "samples": bench["samples"], "iterations": args.iterations, "nfe": {}}
    results_path = args.out / f"ms_attribution_{args.model}{tag}.json"
    if results_path.exists():  # rows of earlier runs with the same setting stay; one measured again is replaced
        old = json.loads(results_path.read_text())
        if all(old.get(key) == out[key] for key in ("model", "samples", "iterations")):
            out["nfe"] = {int(n): old["nfe"][n] for n in sorted(old["nfe"], key=int)}
    for nfe in (int(v) for v in args.nfe.split(",")):
        builtin, scheduler, steps = starting_builtin(bench["nfe"][str(nfe)]["builtins"])
        sig = comfy_sigmas(ms, builtin, scheduler, steps).double()
        positive = anchored(sig)
        summary = next(r for r in bench["summary"] if r["nfe"] == nfe)
        best = summary["best_builtin_rmse"]
        rows = out["nfe"].get(nfe, {}).get("rmse", {})
        rows.update({"best built-in": best, "start (the untrained table = its built-in)": score(
            lambda m, x: sample_epd_ms(m, x, sig, None, builtin=builtin, disable=True))})
        names = {"best built-in": summary["best_builtin"], "start": f"{builtin} ({scheduler})"}

        def trained(num_points, learn_table=True, oracle=False):
            cfg = ms_recipe(positive, builtin, num_points, float(ms.sigma_min), learn_table=learn_table,
                            loss=args.loss, iterations=args.iterations, model_family=train.family,
                            **({"num_batches": len(x_test) // 8} if oracle else {}))  # oracle: every test noise once
            noise_fn, extra_fn = train.noise_fn(positive[0]), train.extra_args_fn
            if oracle:  # batch j = test noises 8j..8j+7 with their labels (make_batch draws batch j from this seed)
                index = {batch_seed(cfg.seed, j): j for j in range(cfg.num_batches)}
                noise_fn = lambda g, n: x_test[8 * index[g.initial_seed()]:][:n].clone()  # noqa: E731
                extra_fn = lambda g, n: {"cond": labels["cond"][8 * index[g.initial_seed()]:][:n]}  # noqa: E731
            table = distill(train.model, None, noise_fn, cfg, extra_fn)
            return score(lambda m, x: sample_epd_ms(m, x, sig, table, disable=True))

        cand = REPO / "bench" / "results" / "ms_candidates" if args.loss == "mse" else None  # trained with mse
        for label, fn in (
                ("(a) schedule only", lambda: trained(1, learn_table=False)),
                ("(b) coefficients + schedule, K=1", lambda: _candidate(cand, args.model, nfe, 1, sig, score)
                 or trained(1)),
                ("(c) EPD-MS K=2", lambda: _candidate(cand, args.model, nfe, 2, sig, score) or trained(2)),
                ("(c) EPD-MS K=3", lambda: trained(3)),
                ("(a) oracle: schedule only", lambda: trained(1, learn_table=False, oracle=True)),
                ("(b) oracle: K=1", lambda: trained(1, oracle=True)),
                ("(c) oracle: K=2", lambda: trained(2, oracle=True)),
                ("(c) oracle: K=3", lambda: trained(3, oracle=True))):
            if ("oracle" in label and not args.oracle) or any(w and w in label for w in args.skip.split(",")):
                continue
            if args.only and not any(w and w in label for w in args.only.split(",")):
                continue
            if args.loss != "mse":
                label += f" [{args.loss} loss]"
            t1 = time.time()
            rows[label] = fn()
            print(f"NFE {nfe} {label}: {rows[label]:.4f} (÷ best {rows[label] / best:.3f}, {time.time() - t1:.0f}s)",
                  flush=True)
        for solver in ("epd", "epd_plugin"):
            shipped = REPO / "pretrained_params" / f"{PREFIX[args.model]}_{solver}_nfe{nfe}.safetensors"
            if shipped.exists():
                table = EPDParams.load(shipped)
                own = table.schedule_sigmas
                rows[f"(d) {solver} (shipped)"] = score(lambda m, x: variant(solver).sample_fn()(
                    m, x, own.to(x.dtype), table, disable=True))
        out["nfe"][nfe] = {"rmse": rows, "over_best": {r: v / best for r, v in rows.items()}, "names": names}
        results_path.write_text(json.dumps(out, indent=1))
    (args.out / f"ms_attribution_{args.model}{tag}.md").write_text(report(out) + "\n")
    print(report(out))


def report(out: dict) -> str:
    lines = [f"### EPD-MS attribution, {out['model']} at CFG {out.get('cfg')}: RMSE on {out['samples']} held-out "
             "noises (÷ best built-in)", "",
             "| row | " + " | ".join(f"NFE {n}" for n in out["nfe"]) + " |", "|---|" + "---|" * len(out["nfe"])]
    labels = {label for v in out["nfe"].values() for label in v["rmse"]}
    for label in sorted(labels, key=lambda t: (t[0] == "(", t.startswith("(d)"), "oracle" in t, t)):
        cells = [f"{v['rmse'][label]:.4f} ({v['over_best'][label]:.2f})" if label in v["rmse"] else "—"
                 for v in out["nfe"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n, v in out["nfe"].items():
        names = v.get("names", {})
        lines.append(f"\nNFE {n}: best built-in {names.get('best built-in')}, start {names.get('start')}.")
    return "\n".join(lines)


def _candidate(folder: Path | None, model: str, nfe: int, num_points: int, sig, score) -> float | None:
    path = folder / f"{PREFIX[model]}_epd_ms_k{num_points}_nfe{nfe}.safetensors" if folder else None
    if path is None or not path.exists():
        return None
    table = EPDParams.load(path)
    return score(lambda m, x: sample_epd_ms(m, x, sig, table, disable=True))


if __name__ == "__main__":
    main()
