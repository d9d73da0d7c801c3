"""Quality against latency NFE on the user's own model: EPD tables versus the best built-in sampler, measured.

The method of bench/quality_vs_nfe.py, for any k-diffusion-convention model D(x, sigma) (the EPD Compare node and
the EPD Trainer's held-out report run it inside ComfyUI's guider; the tests on the demo models directly):

  * a reference solution (an accurate solver with many steps) from each noise;
  * error = per-sample RMSE to the reference, in the sampler's own space (latent space in ComfyUI);
  * NFE = sequential model calls per image, counted by wrapping the model (the K points of an EPD step are one
    call), never computed from formulas: the latency NFE; beside it the compute NFE, the model evaluations per
    image (the rows the model was given per sample: a K-point call counts K);
  * time: each scored candidate is run `repeats` times on the same samples, interleaved so a change in the
    machine's load hits every candidate alike, and its median is the seconds per image on the user's device;
  * the built-in field: each (sampler, scheduler, steps) candidate runs on the FIT noises; per sampler and NFE the
    configuration with the lowest mean FIT error is kept, and the best built-in per NFE is the sampler whose kept
    configuration has the lowest FIT error. Only then are they scored, with the tables, on the separate TEST
    noises: a choice made on the noises it is scored on would flatter the built-ins;
  * two verdicts per table: at equal calls (the best built-in at its latency NFE) and at equal time (the built-in
    configuration, among the kept ones at every NFE compared, with the lowest fit error whose median time is not
    above the table's, EQUAL_TIME_TOLERANCE included).

Pure torch; the caller builds the candidates (sampler functions and sigmas). Nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from epd_core.runtime import is_oom

Sample = Callable[..., torch.Tensor]  # sample(model, x, sigmas) -> x at sigma 0
# A built-in whose median time is up to 5 % above a table's still competes with it at equal time: two samplers of
# the same calls differ by about that much from run to run on a loaded machine, and timing noise must not hand a
# table a weaker opponent (a lower NFE) than the one that really runs in its time.
EQUAL_TIME_TOLERANCE = 0.05


@dataclass
class Candidate:
    """One way to sample: `sample(model, x, sigmas)` on `sigmas`. kind "table" (scored as given) or "builtin"
    (competes for its sampler's slot on the fit noises). `calls`: its model calls per image when known (from
    probe_calls), used to plan the work and to skip built-in configurations of an NFE nobody asked for; `evals`:
    its model evaluations per image (compute NFE: a K-point call counts K)."""
    name: str
    sample: Sample
    sigmas: torch.Tensor
    kind: str = "builtin"
    sampler: str = ""
    scheduler: str = ""
    steps: int = 0
    calls: int | None = None
    evals: float | None = None


class Counted:
    """Counts model calls (one call = one NFE, CFG included) and the rows they carry (a K-point call of B samples
    has K x B), merges `extra` into every call's keyword arguments, and runs `on_call()` before each (progress,
    Cancel)."""

    def __init__(self, model, extra: dict | None = None, on_call: Callable[[], None] | None = None):
        self.model, self.extra, self.on_call, self.calls, self.rows = model, extra or {}, on_call, 0, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        self.rows += x.shape[0]
        if self.on_call is not None:
            self.on_call()
        return self.model(x, sigma, **{**self.extra, **kw})


def per_sample_rmse(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((a.to(ref.dtype) - ref) ** 2).flatten(1).mean(1).sqrt()


def ratio_se(errors: torch.Tensor, baseline: torch.Tensor) -> float:
    """Standard error of mean(errors) / mean(baseline), both measured on the same noises (paired; delta method):
    how far the ratio could move on another draw of as many noises."""
    n = len(errors)
    if n < 2 or len(baseline) != n:
        raise ValueError(f"ratio_se needs two paired error lists of >= 2 noises, got {n} and {len(baseline)}")
    a, b = errors.double(), baseline.double()
    r = a.mean() / b.mean()
    return float((a - r * b).std() / (n ** 0.5 * b.mean()))


def probe_calls(cand: Candidate, shape=(1, 1, 4, 4)) -> int | None:
    """Model calls per image of a candidate, counted on a stand-in model (denoised = 0) and a tiny tensor: the
    deterministic samplers' call count depends on the sigmas, not on what the model returns; sets cand.evals (the
    compute NFE) on the way. None when the candidate cannot run (e.g. a sampler / scheduler pair ComfyUI refuses
    at this size)."""
    stand_in = Counted(lambda x, sigma, **_: torch.zeros_like(x))
    x = torch.ones(shape, dtype=cand.sigmas.dtype) * float(cand.sigmas[0])
    try:
        with torch.no_grad():
            cand.sample(stand_in, x, cand.sigmas)
    except Exception:  # noqa: BLE001 - any failure: the candidate is left out, as in the benchmark
        return None
    cand.evals = stand_in.rows / shape[0]
    return stand_in.calls


def solve(model, cand: Candidate, x: torch.Tensor, chunk: int, extra=None, on_call=None):
    """Run `cand` on the noises `x` in chunks of at most `chunk` samples: (model calls per image, samples), and
    cand.evals set to the model evaluations per image counted on the first chunk."""
    outs, calls = [], None
    for part in x.split(max(1, chunk)):
        counted = Counted(model, extra, on_call)
        with torch.no_grad():
            outs.append(cand.sample(counted, part, cand.sigmas.to(part.device, part.dtype)))
        if calls is None:
            calls, cand.evals = counted.calls, counted.rows / len(part)
    return calls, torch.cat(outs)


def time_candidates(model, cands: list[Candidate], x: torch.Tensor, repeats: int, extra=None, on_call=None,
                    on_stage: Callable[[str], None] | None = None) -> dict[str, float]:
    """Seconds per image of each candidate on the samples `x` (one call of len(x)): the median of `repeats` runs,
    the candidates interleaved (run r of every candidate, then run r + 1) so a change in the machine's load falls
    on all of them alike. Reading one value of the result waits for an asynchronous device (CUDA) to finish."""
    times: dict[str, list[float]] = {c.name: [] for c in cands}
    for r in range(repeats):
        if on_stage is not None:
            on_stage(f"timing every candidate on {len(x)} sample(s): run {r + 1} of {repeats}")
        for cand in cands:
            counted = Counted(model, extra, on_call)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = cand.sample(counted, x, cand.sigmas.to(x.device, x.dtype))
                float(out.flatten()[0])
            times[cand.name].append((time.perf_counter() - t0) / len(x))
    return {name: statistics.median(t) for name, t in times.items() if t}


def planned_calls(reference: Candidate, builtins: list[Candidate], tables: list[Candidate], nfes: list[int],
                  fit_chunks: int, test_chunks: int, repeats: int = 0) -> int:
    """Model calls compare() will make (from the candidates' probed `calls`), for the time estimate and the
    progress bar; `repeats` timed runs of every scored candidate (time_candidates) included."""
    wanted = set(nfes)
    fit = [c for c in builtins if c.calls in wanted]
    samplers = {(c.sampler, c.calls) for c in fit}
    scored = sum(n for _, n in samplers) + sum(c.calls or 0 for c in tables)
    return ((reference.calls or 0) * (fit_chunks + test_chunks) + sum(c.calls for c in fit) * fit_chunks
            + scored * test_chunks + scored * repeats)


@dataclass
class Comparison:
    """compare()'s result. nfe[n] = {"builtins": {sampler: {scheduler, steps, fit, rmse, name, compute_nfe,
    seconds}}, "best_builtin": sampler or None, "tables": {name: {rmse, ratio, compute_nfe, seconds,
    equal_time}}}; `seconds` is the median time per image (None when not timed) and `equal_time` the built-in
    configuration a table is held against at equal time ({sampler, name, nfe, rmse, seconds, ratio}, None when
    no built-in is as fast). `firsts` holds each scored candidate's first test sample (and the reference's under
    "reference") for an image grid."""
    reference: str
    fit_samples: int
    test_samples: int
    nfe: dict = field(default_factory=dict)
    firsts: dict = field(default_factory=dict)
    unmatched: dict = field(default_factory=dict)  # table name -> its NFE, when no built-in was compared there
    skipped: dict = field(default_factory=dict)  # built-in configuration -> why it could not run
    seconds: float = 0.0
    repeats: int = 0  # timed runs per candidate (0: not timed)
    timed_samples: int = 0  # samples per timed run
    device: str = ""

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

    def equal_time(self, seconds: float | None, tolerance: float = EQUAL_TIME_TOLERANCE) -> dict | None:
        """The built-in a candidate taking `seconds` per image meets at equal time: among the kept configurations
        (the best of each sampler at each NFE compared) those whose median time is at most `seconds` x (1 +
        tolerance), the one with the lowest FIT error (chosen like the best built-in per NFE, never on the
        scoring noises). None when nothing was timed or every built-in is slower."""
        if seconds is None:
            return None
        fast = [dict(b, sampler=s, nfe=n) for n, row in self.nfe.items() for s, b in row["builtins"].items()
                if b.get("seconds") is not None and b["seconds"] <= seconds * (1 + tolerance)]
        return min(fast, key=lambda b: (b["fit"], b["seconds"])) if fast else None


def compare(model, fit_noise: torch.Tensor, test_noise: torch.Tensor, reference: Candidate,
            builtins: list[Candidate], tables: list[Candidate], nfes: list[int], chunk: int = 64,
            extra: dict | None = None, on_call: Callable[[], None] | None = None,
            on_stage: Callable[[str], None] | None = None, repeats: int = 0, timed_samples: int = 1,
            tolerance: float = EQUAL_TIME_TOLERANCE) -> Comparison:
    """Per latency NFE in `nfes`: the best built-in (chosen on fit_noise) and each table, RMSE to the reference
    on test_noise, and each table's ratio to the best built-in (< 1: the table is better). `model` is
    D(x, sigma, **extra); `chunk` samples per call at most; on_stage(text) names each stage as it starts.
    repeats > 0: every scored candidate is also timed (time_candidates, on the first `timed_samples` test
    noises) and each table gets its equal-time opponent (Comparison.equal_time with `tolerance`)."""
    t0 = time.monotonic()
    stage = on_stage or (lambda _text: None)
    run = lambda cand, x: solve(model, cand, x, chunk, extra, on_call)  # noqa: E731
    stage(f"reference ({reference.name}) on the fit noises")
    _, ref_fit = run(reference, fit_noise)
    stage(f"reference ({reference.name}) on the test noises")
    _, ref_test = run(reference, test_noise)
    result = Comparison(reference.name, len(fit_noise), len(test_noise), firsts={"reference": ref_test[:1]},
                        device=str(test_noise.device))
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
                                              "rmse": float(e.mean()), "name": cand.name,
                                              "compute_nfe": cand.evals, "seconds": None}
        result.firsts[("builtin", n, sampler)] = out[:1]
    for n, row in result.nfe.items():
        if row["builtins"]:
            row["best_builtin"] = min(row["builtins"], key=lambda s: row["builtins"][s]["fit"])

    # the tables, on the test noises only (nothing is chosen for them)
    scored = [kept_cand for _, kept_cand in kept.values()]
    for cand in tables:
        stage(f"table {cand.name} on the test noises")
        calls, out = run(cand, test_noise)
        rmse = float(per_sample_rmse(out, ref_test).mean())
        result.firsts[("table", calls, cand.name)] = out[:1]
        best = result.best(calls)
        if calls not in result.nfe:
            result.unmatched[cand.name] = calls
            continue
        scored.append(cand)
        result.nfe[calls]["tables"][cand.name] = {
            "rmse": rmse, "ratio": rmse / best["rmse"] if best and best["rmse"] > 0 else None,
            "compute_nfe": cand.evals, "seconds": None, "equal_time": None}

    # time: every scored candidate on the user's device, then each table's opponent at equal time
    if repeats > 0 and scored:
        x = test_noise[:max(1, timed_samples)]
        seconds = time_candidates(model, scored, x, repeats, extra, on_call, stage)
        result.repeats, result.timed_samples = repeats, len(x)
        for row in result.nfe.values():
            for b in row["builtins"].values():
                b["seconds"] = seconds.get(b["name"])
            for name, t in row["tables"].items():
                t["seconds"] = seconds.get(name)
        for row in result.nfe.values():
            for t in row["tables"].values():
                opponent = result.equal_time(t["seconds"], tolerance)
                if opponent is not None:
                    opponent["ratio"] = t["rmse"] / opponent["rmse"] if opponent["rmse"] > 0 else None
                    t["equal_time"] = {k: opponent[k] for k in ("sampler", "name", "nfe", "rmse", "seconds", "ratio")}
    result.seconds = time.monotonic() - t0
    return result


def verdict(ratio: float | None, builtin: str) -> str:
    """One plain sentence on a ratio (table RMSE / best built-in RMSE)."""
    if ratio is None:
        return "no built-in to compare with at this NFE"
    return {"wins": f"wins: {ratio:.2f}x the error of the best built-in ({builtin})",
            "ties": f"ties with the best built-in ({builtin}): {ratio:.2f}x its error",
            "loses": f"does NOT beat the best built-in ({builtin}): {ratio:.2f}x its error"}[outcome(ratio)]


def outcome(ratio: float) -> str:
    """'wins' below 0.95x the error of the opponent, 'ties' up to 1.05x, else 'loses' (both verdicts' bands)."""
    return "wins" if ratio < 0.95 else "ties" if ratio <= 1.05 else "loses"


def per_image(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def time_verdict(seconds: float | None, opponent: dict | None) -> str:
    """One plain sentence on a table at equal time: `opponent` is its Comparison.equal_time entry (with ratio)."""
    if seconds is None:
        return "not timed"
    if opponent is None:
        return (f"faster ({per_image(seconds)} per image) than every built-in configuration compared: no "
                "built-in runs in its time (add lower NFEs to compare it at equal time)")
    ratio, who = opponent.get("ratio"), (f"{opponent['name']} at NFE {opponent['nfe']}, "
                                         f"{per_image(opponent['seconds'])} per image against "
                                         f"{per_image(seconds)}")
    if ratio is None:
        return f"no error to compare with ({who})"
    return {"wins": f"wins at equal time: {ratio:.2f}x the error of the best built-in not slower ({who})",
            "ties": f"ties at equal time with the best built-in not slower ({who}): {ratio:.2f}x its error",
            "loses": f"does NOT beat at equal time the best built-in not slower ({who}): {ratio:.2f}x its error"
            }[outcome(ratio)]


def _nfe(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def report(result: Comparison) -> str:
    """The text table: per NFE the best built-in (chosen on the fit noises) and each table, RMSE and ratio; the
    compute NFE and time per image of each; the verdicts at equal calls and at equal time."""
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
    timed = f"median of {result.repeats} interleaved runs of {result.timed_samples} sample(s) on {result.device}"
    rows = [(n, f"best built-in: {b['name']}", b) for n in sorted(result.nfe) if (b := result.best(n))]
    rows += [(n, name, t) for n in sorted(result.nfe) for name, t in result.nfe[n]["tables"].items()]
    if rows:
        lines += ["", "Latency NFE (sequential model calls per image), compute NFE (model evaluations per image: a "
                      "call with K parallel points counts K) and time per image"
                      + (f" ({timed}):" if result.repeats else " (not timed):"),
                  f"  {'latency':>7} | {'compute':>7} | {'time/image':>10} | candidate"]
        lines += [f"  {n:>7} | {_nfe(c.get('compute_nfe')):>7} | {per_image(c.get('seconds')):>10} | {name}"
                  for n, name, c in sorted(rows, key=lambda r: (r[0], not r[1].startswith("best")))]
    verdicts = [f"  {name} at NFE {n}: {verdict(t['ratio'], (result.best(n) or {}).get('name', '-'))}"
                for n in sorted(result.nfe) for name, t in result.nfe[n]["tables"].items()]
    if verdicts:
        lines += ["", "Verdict at equal calls (the best built-in at the table's latency NFE):", *verdicts]
    if verdicts and result.repeats:
        lines += ["", "Verdict at equal time (the built-in configuration with the lowest fit error among those, at "
                      f"any NFE compared, whose time per image is at most the table's + {EQUAL_TIME_TOLERANCE:.0%}):",
                  *(f"  {name} at NFE {n}: {time_verdict(t['seconds'], t['equal_time'])}"
                    for n in sorted(result.nfe) for name, t in result.nfe[n]["tables"].items())]
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
    Preview EPD Params: the verdict at equal calls, then (tables measured with timing) the one at equal time."""
    if not isinstance(measured, dict) or not measured:
        return ""
    if "skipped" in measured:
        return f"not measured against the built-ins ({str(measured['skipped'])[:160]}); use EPD Compare"
    try:
        text = (f"measured at NFE {measured['nfe']} on {measured['held_out_samples']} held-out samples: "
                f"{measured['verdict']}")
        if "time_verdict" in measured:
            text += f"; {measured['time_verdict']}"
        return text
    except (KeyError, TypeError, ValueError):
        return "measured: (unreadable)"
