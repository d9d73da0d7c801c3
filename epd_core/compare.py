"""Quality against latency NFE on the user's own model: EPD tables versus the best built-in sampler, measured.

The method of bench/quality_vs_nfe.py, for any k-diffusion-convention model D(x, sigma) (the EPD Compare node and
the EPD Trainer's held-out report run it inside ComfyUI's guider; the tests on the demo models directly):

  * a reference solution (an accurate solver with many steps) from each noise;
  * error = per-sample RMSE to the reference, in the sampler's own space (latent space in ComfyUI);
  * NFE = sequential model calls per image, counted by wrapping the model (the K points of an EPD step are one
    call), never computed from formulas;
  * the built-in field: each (sampler, scheduler, steps) candidate runs on the FIT noises; per sampler and NFE the
    configuration with the lowest mean FIT error is kept, and the best built-in per NFE is the sampler whose kept
    configuration has the lowest FIT error. Only then are they scored, with the tables, on the separate TEST
    noises: a choice made on the noises it is scored on would flatter the built-ins.

Pure torch; the caller builds the candidates (sampler functions and sigmas). Nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .runtime import is_oom

Sample = Callable[..., torch.Tensor]  # sample(model, x, sigmas) -> x at sigma 0


@dataclass
class Candidate:
    """One way to sample: `sample(model, x, sigmas)` on `sigmas`. kind "table" (scored as given) or "builtin"
    (competes for its sampler's slot on the fit noises). `calls`: its model calls per image when known (from
    probe_calls), used to plan the work and to skip built-in configurations of an NFE nobody asked for."""
    name: str
    sample: Sample
    sigmas: torch.Tensor
    kind: str = "builtin"
    sampler: str = ""
    scheduler: str = ""
    steps: int = 0
    calls: int | None = None


class Counted:
    """Counts model calls (one call = one NFE, CFG included), merges `extra` into every call's keyword arguments,
    and runs `on_call()` before each (progress, Cancel)."""

    def __init__(self, model, extra: dict | None = None, on_call: Callable[[], None] | None = None):
        self.model, self.extra, self.on_call, self.calls = model, extra or {}, on_call, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        return self.model(x, sigma, **{**self.extra, **kw})


def per_sample_rmse(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((a.to(ref.dtype) - ref) ** 2).flatten(1).mean(1).sqrt()


def probe_calls(cand: Candidate, shape=(1, 1, 4, 4)) -> int | None:
    """Model calls per image of a candidate, counted on a stand-in model (denoised = 0) and a tiny tensor: the
    deterministic samplers' call count depends on the sigmas, not on what the model returns. None when the
    candidate cannot run (e.g. a sampler / scheduler pair ComfyUI refuses at this size)."""
    stand_in = Counted(lambda x, sigma, **_: torch.zeros_like(x))
    x = torch.ones(shape, dtype=cand.sigmas.dtype) * float(cand.sigmas[0])
    try:
        with torch.no_grad():
            cand.sample(stand_in, x, cand.sigmas)
    except Exception:  # noqa: BLE001 - any failure: the candidate is left out, as in the benchmark
        return None
    return stand_in.calls


def solve(model, cand: Candidate, x: torch.Tensor, chunk: int, extra=None, on_call=None):
    """Run `cand` on the noises `x` in chunks of at most `chunk` samples: (model calls per image, samples)."""
    outs, calls = [], None
    for part in x.split(max(1, chunk)):
        counted = Counted(model, extra, on_call)
        with torch.no_grad():
            outs.append(cand.sample(counted, part, cand.sigmas.to(part.device, part.dtype)))
        calls = counted.calls if calls is None else calls
    return calls, torch.cat(outs)


def planned_calls(reference: Candidate, builtins: list[Candidate], tables: list[Candidate], nfes: list[int],
                  fit_chunks: int, test_chunks: int) -> int:
    """Model calls compare() will make (from the candidates' probed `calls`), for the time estimate and the
    progress bar."""
    wanted = set(nfes)
    fit = [c for c in builtins if c.calls in wanted]
    samplers = {(c.sampler, c.calls) for c in fit}
    return ((reference.calls or 0) * (fit_chunks + test_chunks) + sum(c.calls for c in fit) * fit_chunks
            + sum(n for _, n in samplers) * test_chunks + sum(c.calls or 0 for c in tables) * test_chunks)


@dataclass
class Comparison:
    """compare()'s result. nfe[n] = {"builtins": {sampler: {scheduler, steps, fit, rmse}}, "best_builtin":
    sampler or None, "tables": {name: {rmse, ratio}}}; `firsts` holds each scored candidate's first test sample
    (and the reference's under "reference") for an image grid."""
    reference: str
    fit_samples: int
    test_samples: int
    nfe: dict = field(default_factory=dict)
    firsts: dict = field(default_factory=dict)
    unmatched: dict = field(default_factory=dict)  # table name -> its NFE, when no built-in was compared there
    skipped: dict = field(default_factory=dict)  # built-in configuration -> why it could not run
    seconds: float = 0.0

    def best(self, nfe: int) -> dict | None:
        row = self.nfe.get(nfe, {})
        name = row.get("best_builtin")
        return None if name is None else dict(row["builtins"][name], sampler=name)

    def ratios(self) -> dict[str, dict[int, float]]:
        """table name -> {NFE: its test RMSE / the best built-in's}."""
        out: dict[str, dict[int, float]] = {}
        for n, row in self.nfe.items():
            for name, t in row["tables"].items():
                if t.get("ratio") is not None:
                    out.setdefault(name, {})[n] = t["ratio"]
        return out


def compare(model, fit_noise: torch.Tensor, test_noise: torch.Tensor, reference: Candidate,
            builtins: list[Candidate], tables: list[Candidate], nfes: list[int], chunk: int = 64,
            extra: dict | None = None, on_call: Callable[[], None] | None = None,
            on_stage: Callable[[str], None] | None = None) -> Comparison:
    """Per latency NFE in `nfes`: the best built-in (chosen on fit_noise) and each table, RMSE to the reference
    on test_noise, and each table's ratio to the best built-in (< 1: the table is better). `model` is
    D(x, sigma, **extra); `chunk` samples per call at most; on_stage(text) names each stage as it starts."""
    t0 = time.monotonic()
    stage = on_stage or (lambda _text: None)
    run = lambda cand, x: solve(model, cand, x, chunk, extra, on_call)  # noqa: E731
    stage(f"reference ({reference.name}) on the fit noises")
    _, ref_fit = run(reference, fit_noise)
    stage(f"reference ({reference.name}) on the test noises")
    _, ref_test = run(reference, test_noise)
    result = Comparison(reference.name, len(fit_noise), len(test_noise), firsts={"reference": ref_test[:1]})
    wanted = sorted(set(nfes))
    for n in wanted:
        result.nfe[n] = {"builtins": {}, "best_builtin": None, "tables": {}}

    # the built-ins: every configuration on the fit noises, the best per (sampler, NFE) kept
    kept: dict[tuple[str, int], tuple[float, Candidate]] = {}
    todo = [c for c in builtins if c.calls is None or c.calls in wanted]
    for i, cand in enumerate(todo):
        stage(f"built-ins on the fit noises: {cand.name} ({i + 1}/{len(todo)})")
        try:
            calls, out = run(cand, fit_noise)
        except (RuntimeError, ValueError, ZeroDivisionError, IndexError) as e:
            if is_oom(e):
                raise
            result.skipped[cand.name] = f"{type(e).__name__}: {str(e)[:120]}"  # reported, as the benchmark skips
            continue  # configurations ComfyUI cannot run; Cancel is not one of these exceptions
        e = per_sample_rmse(out, ref_fit)
        fit = float(e.mean()) if bool(torch.isfinite(e).all()) else math.inf
        if calls in wanted and fit < kept.get((cand.sampler, calls), (math.inf,))[0]:
            kept[(cand.sampler, calls)] = (fit, cand)
    for (sampler, n), (fit, cand) in sorted(kept.items(), key=lambda kv: (kv[0][1], kv[1][0])):
        stage(f"NFE {n}: {cand.name} on the test noises")
        _, out = run(cand, test_noise)
        e = per_sample_rmse(out, ref_test)
        result.nfe[n]["builtins"][sampler] = {"scheduler": cand.scheduler, "steps": cand.steps, "fit": fit,
                                              "rmse": float(e.mean()), "name": cand.name}
        result.firsts[("builtin", n, sampler)] = out[:1]
    for n, row in result.nfe.items():
        if row["builtins"]:
            row["best_builtin"] = min(row["builtins"], key=lambda s: row["builtins"][s]["fit"])

    # the tables, on the test noises only (nothing is chosen for them)
    for cand in tables:
        stage(f"table {cand.name} on the test noises")
        calls, out = run(cand, test_noise)
        rmse = float(per_sample_rmse(out, ref_test).mean())
        result.firsts[("table", calls, cand.name)] = out[:1]
        best = result.best(calls)
        if calls not in result.nfe:
            result.unmatched[cand.name] = calls
            continue
        result.nfe[calls]["tables"][cand.name] = {"rmse": rmse,
                                                  "ratio": rmse / best["rmse"] if best and best["rmse"] > 0 else None}
    result.seconds = time.monotonic() - t0
    return result


def verdict(ratio: float | None, builtin: str) -> str:
    """One plain sentence on a ratio (table RMSE / best built-in RMSE)."""
    if ratio is None:
        return "no built-in to compare with at this NFE"
    if ratio < 0.95:
        return f"wins: {ratio:.2f}x the error of the best built-in ({builtin})"
    if ratio <= 1.05:
        return f"ties with the best built-in ({builtin}): {ratio:.2f}x its error"
    return f"does NOT beat the best built-in ({builtin}): {ratio:.2f}x its error"


def report(result: Comparison) -> str:
    """The text table: per NFE the best built-in (chosen on the fit noises) and each table, RMSE and ratio."""
    lines = [f"RMSE to the reference ({result.reference}) on {result.test_samples} held-out samples; built-in "
             f"schedulers chosen on {result.fit_samples} other samples. ratio = table RMSE / best built-in RMSE "
             "(< 1: the table wins).", "",
             f"{'NFE':>4} | {'best built-in (fit-selected)':<44} | {'RMSE':>9} | table: RMSE (ratio)"]
    for n in sorted(result.nfe):
        row = result.nfe[n]
        best = result.best(n)
        b = f"{best['name']:<44} | {best['rmse']:9.4g}" if best else f"{'(none ran at this NFE)':<44} | {'-':>9}"
        tables = "; ".join(f"{name}: {t['rmse']:.4g}" + (f" ({t['ratio']:.3f})" if t["ratio"] is not None else "")
                           for name, t in row["tables"].items()) or "-"
        lines.append(f"{n:>4} | {b} | {tables}")
    verdicts = [f"  {name} at NFE {n}: {verdict(t['ratio'], (result.best(n) or {}).get('name', '-'))}"
                for n in sorted(result.nfe) for name, t in result.nfe[n]["tables"].items()]
    if verdicts:
        lines += ["", "Verdict:", *verdicts]
    for name, n in result.unmatched.items():
        lines.append(f"  {name}: {n} model calls per image, not in the NFE list (add {n} to compare it)")
    others = [f"  NFE {n}: " + ", ".join(f"{s} {b['rmse']:.4g} ({b['scheduler']}, {b['steps']} steps)"
                                          for s, b in sorted(result.nfe[n]["builtins"].items(),
                                                             key=lambda kv: kv[1]["fit"]))
              for n in sorted(result.nfe) if result.nfe[n]["builtins"]]
    if others:
        lines += ["", "Every built-in's best configuration (test RMSE; sorted by fit RMSE):", *others]
    if result.skipped:
        lines += ["", f"Skipped {len(result.skipped)} built-in configuration(s) that could not run, e.g.:",
                  *(f"  {name}: {why}" for name, why in list(result.skipped.items())[:3])]
    lines.append(f"\n({result.seconds:.1f}s)")
    return "\n".join(lines)


def measured_text(measured: dict | None) -> str:
    """One line on a table's `measured` metadata (the EPD Trainer's held-out report), for the trainer's output and
    Preview EPD Params."""
    if not isinstance(measured, dict) or not measured:
        return ""
    if "skipped" in measured:
        return f"not measured against the built-ins ({str(measured['skipped'])[:160]}); use EPD Compare"
    try:
        return (f"measured at NFE {measured['nfe']} on {measured['held_out_samples']} held-out samples: "
                f"{measured['verdict']}")
    except (KeyError, TypeError, ValueError):
        return "measured: (unreadable)"
