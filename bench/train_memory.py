"""Peak memory of one distillation loss + gradient on the MNIST demo model, per objective and form, each in its own
process (CPU: peak resident set size above the process's size before the step; CUDA: max_memory_allocated).

    .venv/bin/python bench/train_memory.py [--batch 64] [--steps 10] [--device cpu]

Forms: per_step summed (one backward of the summed row losses: every step's activations alive at once) against
row by row (each row's loss back-propagated as soon as it exists, as the trainer does); end_to_end plain against
checkpointed (each step recomputed in backward, as the EPD Trainer node does).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMS = ("per_step summed", "per_step row by row", "end_to_end", "end_to_end checkpointed")


def measure(form: str, batch: int, steps: int, device: str) -> float:
    """MiB above the baseline for one loss + gradient in this process."""
    import torch
    sys.path.insert(0, str(REPO))
    from epd_core.training import distill as D
    from epd_core.tables.params import EPDParams, activate
    from epd_core.sampling.schedules import sigmas_for
    from epd_core.demo.problems import demo_problem
    problem = demo_problem("mnist", device=device)
    sig = torch.cat([sigmas_for({"type": "discrete", "rho": 1.0}, steps, problem.model_sampling).float(),
                     torch.zeros(1)]).to(device)
    g = torch.Generator().manual_seed(0)
    x = problem.noise_fn(float(sig[0]))(g, batch)
    extra = problem.extra_args_fn(g, batch)
    targets = D.teacher_states(problem.model, x, sig, "euler", 0, extra)
    theta = [t.to(device).requires_grad_(True) for t in EPDParams.neutral(steps, 2, spread=1.0).tensors()]
    rows = activate(*theta, 0.05, 0.0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if form == "per_step summed":
        torch.autograd.grad(torch.stack(D.per_step_losses(problem.model, x, sig, rows, targets, extra)).sum(), theta)
    elif form == "per_step row by row":
        leaves = {k: v.detach().requires_grad_(True) for k, v in rows.items()}
        D.per_step_losses(problem.model, x, sig, leaves, targets, extra,
                          backward=lambda loss: loss.backward(inputs=list(leaves.values())))
        torch.autograd.grad(list(rows.values()), theta, [leaves[k].grad for k in rows])
    else:
        loss = D.end_to_end_loss(problem.model, x, sig, rows, targets[-1], extra,
                                 checkpointed=form.endswith("checkpointed"))
        torch.autograd.grad(loss, theta)
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--form", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a child
    args = ap.parse_args(argv)
    if args.form:
        print(json.dumps(measure(args.form, args.batch, args.steps, args.device)))
        return
    results = {}
    for form in FORMS:
        out = subprocess.run([sys.executable, __file__, "--form", form, "--batch", str(args.batch), "--steps",
                              str(args.steps), "--device", args.device], capture_output=True, text=True, check=True)
        results[form] = float(out.stdout.strip().splitlines()[-1])
    print(f"MNIST demo model, batch {args.batch}, {args.steps} rows, K 2, {args.device}: peak MiB above baseline")
    for form, mib in results.items():
        print(f"  {form:26s} {mib:8.0f}")
    print(f"  per_step: row by row / summed = {results[FORMS[1]] / results[FORMS[0]]:.2f}; end_to_end: "
          f"checkpointed / plain = {results[FORMS[3]] / results[FORMS[2]]:.2f}")


if __name__ == "__main__":
    main()
