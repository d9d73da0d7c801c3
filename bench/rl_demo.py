"""RDPO fine-tuning (docs/method.md, "RL fine-tuning") of the shipped demo-digits table on the classifier reward:
reward gain versus
image quality, for a few settings.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_demo.py            # 7 runs, ~3 min on 1 busy CPU core
    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_demo.py --quick    # 2 runs, ~1.5 min

Start: pretrained_params/demo_digits_epd_s4.safetensors on its own schedule (+ final 0), CFG 2, reward
DemoClassifierReward (log p(digit | image)), prompts = digits 0..9, lr 1e-3, group 4, seed 0. For the starting
table and every RL table, on HELD-OUT noises (a seed no training batch uses; 20 per digit by default):
mean reward, classifier accuracy, RMSE of the final images to a 100-step Heun (karras) reference, the RMSE ratio
RL / start, and RMSE ÷ the best deterministic ComfyUI built-in at the same latency NFE (model calls counted by a
wrapper, CFG pair = 1 call; the built-in's sampler/scheduler/steps chosen on separate FIT noises, as in
bench/quality_vs_nfe.py). Writes bench/results/rl_demo.(md|json) and rl_demo_samples.png (rows: Heun reference,
start table, each RL table; the same noise per column, digits 0..9).
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
from bench.quality_vs_nfe import DETERMINISTIC, builtin_sampler, comfy_sigmas, problem  # noqa: E402

from epd_core.compare import Counted, per_sample_rmse  # noqa: E402
from epd_core.demo import models as demo_model  # noqa: E402
from epd_core.tables.params import EPDParams  # noqa: E402
from epd_core.training.rl import DemoClassifierReward, RLConfig, rdpo  # noqa: E402
from epd_core.sampling.paper import sample_epd  # noqa: E402
from epd_core.training.cli import vp_start_scale  # noqa: E402

START = REPO / "pretrained_params" / "demo_digits_epd_s4.safetensors"
CFG, LR, GROUP = 2.0, 1e-3, 4
FIT_SEED, TEST_SEED, PNG_SEED = 101, 202, 303  # training noises come from batch_seed(0, it), never these
# (prompts_per_iteration, iterations, kl_coef); 0 prompts per iteration = all ten digits every update
RUNS = [(2, 40, 0.0), (0, 40, 0.0), (2, 100, 0.0), (0, 100, 0.0), (2, 100, 0.1), (0, 100, 0.1), (2, 100, 1.0)]
QUICK_RUNS = [(2, 40, 0.0), (0, 40, 0.0)]


def noises(seed, n, sigma0, sigma_max):
    """n starting states (ComfyUI's EPS noise scaling at sigma_max) and labels 0..9 cycling."""
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * vp_start_scale(sigma0, sigma_max)
    return x, torch.arange(n) % 10


def sample_table(den, x, labels, sigmas, table):
    m = Counted(den, {"cond": labels})
    with torch.no_grad():
        out = sample_epd(m, x, sigmas, table, disable=True)
    return out, m.calls


def evaluate(den, reward, x, labels, ref, sigmas, table):
    out, nfe = sample_table(den, x, labels, sigmas, table)
    e = per_sample_rmse(out, ref)
    return {"reward": float(reward(out, labels.tolist()).mean()),
            "accuracy": float((reward.logits(out).argmax(1) == labels).double().mean()),
            "rmse": float(e.mean()), "rmse_median": float(e.median()), "nfe": nfe}


def best_builtin(den, nfe, x_fit, lab_fit, ref_fit, x_test, lab_test, ref_test):
    """Best deterministic built-in (sampler, scheduler, steps) with exactly `nfe` calls, chosen on the fit noises.
    Call counts are probed on one sample first, so only candidates with the right NFE are run on the fit set."""
    _, ms, *_, k = problem("demo", 1)
    import comfy.samplers

    def run(sampler, sched, steps, x, labels):
        m = Counted(den, {"cond": labels[:x.shape[0]]})
        with torch.no_grad():
            out = builtin_sampler(k, sampler)(m, x, comfy_sigmas(ms, sampler, sched, steps).float())
        return out, m.calls
    best = (float("inf"), None)
    for sampler in DETERMINISTIC:
        for sched in comfy.samplers.SCHEDULER_NAMES:
            for steps in range(1, nfe + 1):
                try:
                    if run(sampler, sched, steps, x_fit[:1], lab_fit)[1] != nfe:
                        continue
                    e = float(per_sample_rmse(run(sampler, sched, steps, x_fit, lab_fit)[0], ref_fit).mean())
                except Exception:  # noqa: BLE001 - a pair ComfyUI cannot run at this size
                    continue
                if e < best[0]:
                    best = (e, (sampler, sched, steps))
    sampler, sched, steps = best[1]
    e = per_sample_rmse(run(sampler, sched, steps, x_test, lab_test)[0], ref_test)
    return {"sampler": sampler, "scheduler": sched, "steps": steps, "nfe": nfe, "rmse": float(e.mean()),
            "rmse_median": float(e.median())}


def save_grid(rows, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 10, figsize=(10 * 0.9 + 1.6, len(rows) * 0.93))
    for i, (imgs, name) in enumerate(zip(rows, names)):
        for j in range(10):
            ax = axes[i, j]
            ax.imshow(imgs[j, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(str(j), fontsize=8)
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    torch.set_num_threads(args.threads)
    den = demo_model.DemoDenoiser(demo_model.load_demo_model(), cfg=CFG)
    reward = DemoClassifierReward()
    start = EPDParams.load(START)
    sig_list = [float(s) for s in start.schedule_sigmas] + [0.0]
    sigmas = torch.tensor(sig_list)
    ref_sig = demo_model.karras_sigmas(100, den.sigma_min, sig_list[0])
    heun = lambda x, lab: demo_model.sample_heun(den, x, ref_sig, cond=lab)  # noqa: E731
    x_test, lab_test = noises(TEST_SEED, args.samples, sig_list[0], den.sigma_max)
    x_fit, lab_fit = noises(FIT_SEED, args.fit_samples, sig_list[0], den.sigma_max)
    x_png, lab_png = noises(PNG_SEED, 10, sig_list[0], den.sigma_max)
    ref_test, ref_fit, ref_png = heun(x_test, lab_test), heun(x_fit, lab_fit), heun(x_png, lab_png)

    base = evaluate(den, reward, x_test, lab_test, ref_test, sigmas, start)
    builtin = best_builtin(den, base["nfe"], x_fit, lab_fit, ref_fit, x_test, lab_test, ref_test)
    ref_eval = {"reward": float(reward(ref_test, lab_test.tolist()).mean()),
                "accuracy": float((reward.logits(ref_test).argmax(1) == lab_test).double().mean())}
    print(f"start: {base}; best built-in at NFE {base['nfe']}: {builtin}; Heun-100 reference: {ref_eval}", flush=True)
    png_rows, png_names = [ref_png, sample_table(den, x_png, lab_png, sigmas, start)[0]], ["Heun-100", "start s4"]
    noise_fn = lambda g, n: torch.randn(n, 1, 8, 8, generator=g) * vp_start_scale(sig_list[0], den.sigma_max)  # noqa: E731
    runs = []
    for ppi, iters, kl in (QUICK_RUNS if args.quick else RUNS):
        cfg = RLConfig(iterations=iters, group_size=GROUP, prompts_per_iteration=ppi, lr=LR, kl_coef=kl, seed=0)
        hist = []
        t0 = time.time()
        table = rdpo(den, sigmas, start, reward, list(range(10)), noise_fn, cfg, history=hist)
        seconds = time.time() - t0
        ev = evaluate(den, reward, x_test, lab_test, ref_test, sigmas, table)
        shift = max(float((a - b).abs().max()) for a, b in zip(table.activated().values(),
                                                               start.activated().values()))
        r = {"prompts_per_iteration": ppi, "iterations": iters, "kl_coef": kl, "seconds": round(seconds, 1),
             "train_reward_first10": sum(h["reward"] for h in hist[:10]) / 10,
             "train_reward_last10": sum(h["reward"] for h in hist[-10:]) / 10, "final_kl": hist[-1]["kl"],
             "max_table_change": shift, **ev, "rmse_ratio_vs_start": ev["rmse"] / base["rmse"],
             "rmse_ratio_vs_builtin": ev["rmse"] / builtin["rmse"],
             "table": {k: v.tolist() for k, v in table.activated().items()}}
        runs.append(r)
        print(f"ppi {ppi} it {iters} kl {kl}: reward {base['reward']:.4f} -> {ev['reward']:.4f}, rmse "
              f"{base['rmse']:.4f} -> {ev['rmse']:.4f} (x{r['rmse_ratio_vs_start']:.2f}), {seconds:.1f}s", flush=True)
        png_rows.append(sample_table(den, x_png, lab_png, sigmas, table)[0])
        png_names.append(f"RL p{ppi or 10} i{iters} kl{kl:g}")
    return {"start_table": START.name, "cfg": CFG, "lr": LR, "group_size": GROUP, "samples": args.samples,
            "reference": "Heun 100 steps, karras", "heun_reference": ref_eval, "start": base, "best_builtin": builtin,
            "start_table_rows": {k: v.tolist() for k, v in start.activated().items()},
            "runs": runs}, png_rows, png_names


def report(res) -> str:
    b, s = res["best_builtin"], res["start"]
    lines = [f"### RDPO on the demo digits model: {res['start_table']} (NFE {s['nfe']}), CFG {res['cfg']}, "
             f"lr {res['lr']}, group {res['group_size']}, {res['samples']} held-out samples",
             "", f"Best built-in at NFE {b['nfe']}: {b['sampler']} ({b['scheduler']}, {b['steps']} steps), RMSE "
             f"{b['rmse']:.4f} (median {b['rmse_median']:.4f}). Heun-100 reference itself: reward "
             f"{res['heun_reference']['reward']:.4f}, accuracy {res['heun_reference']['accuracy']:.1%}.", "",
             "| setting | wall s | train reward, first → last 10 it | held-out reward | accuracy "
             "| RMSE vs Heun-100 mean / median | RMSE ÷ start | RMSE ÷ best built-in | max table change |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| start table | — | — | {s['reward']:.4f} | {s['accuracy']:.1%} | {s['rmse']:.4f} / "
             f"{s['rmse_median']:.4f} | 1.00 | {s['rmse'] / b['rmse']:.2f} | — |"]
    for r in res["runs"]:
        name = f"prompts/update {r['prompts_per_iteration'] or 'all'}, {r['iterations']} it, kl {r['kl_coef']:g}"
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['train_reward_first10']:.4f} → "
                     f"{r['train_reward_last10']:.4f} "
                     f"| {r['reward']:.4f} ({r['reward'] - s['reward']:+.4f}) | {r['accuracy']:.1%} "
                     f"| {r['rmse']:.4f} / {r['rmse_median']:.4f} | **{r['rmse_ratio_vs_start']:.2f}** "
                     f"| {r['rmse_ratio_vs_builtin']:.2f} "
                     f"| {r['max_table_change']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 runs of 40 iterations")
    ap.add_argument("--samples", type=int, default=200, help="held-out samples (labels cycle 0..9)")
    ap.add_argument("--fit-samples", type=int, default=30, help="noises that pick the best built-in")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than 1 crawls on a busy CPU)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res, png_rows, png_names = run(args)
    res["seconds"] = round(time.time() - t0, 1)
    stem = "rl_demo_quick" if args.quick else "rl_demo"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    table = report(res)
    (args.out / f"{stem}.md").write_text(table + "\n")
    save_grid(png_rows, png_names, args.out / f"{stem}_samples.png")
    print(table)
    print(f"\nwrote {args.out}/{stem}.(md|json) and {stem}_samples.png in {res['seconds']}s")
    return res


if __name__ == "__main__":
    main()
