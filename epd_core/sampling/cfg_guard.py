"""Which table a sampler uses at the user's CFG scale, and when it samples as the best built-in instead.

A table is trained at one CFG scale (or a range: metadata `cfg_range`, else `guidance_scale`), and its gain over
ComfyUI's built-ins holds near it: a table trained at CFG 1 can be twice as wrong as dpmpp_2m at CFG 6. So a table
carries what was measured at other scales, `measured_cfg`: one entry per CFG scale with the ratio of its error to
the best built-in's on noises apart from the held-out ones (`fit_ratio`, what the choice below uses: the benchmark's
validation noises, on which neither the table nor the built-in was chosen) and its standard error over those noises
(`fit_ratio_se`, optional), the same ratio on held-out noises (`ratio`, what is reported) and that best built-in
({"sampler", "scheduler", "steps"}).

`choose(tables, cfg)` picks, among the tables for one model family and step count:
  1. the tables expected to beat the best built-in at `cfg` (expected ratio + Z standard errors < 1: a ratio of
     0.95 measured on 32 noises may be 1.08 on others), preferring one call per step
     (K = 1: the same compute as a built-in; the K-point tables only when no K = 1 table exists), then the lowest
     expected ratio;
  2. none: the best built-in recorded at the measured CFG nearest `cfg`, sampled exactly as that sampler - also
     when the tables were measured, but not near `cfg` (a table is not trusted far from where it was measured);
  3. no table measured anywhere (the user's own, an official one): the table trained nearest `cfg` (the first of
     `tables` among equals), said to be unmeasured there.
The expected ratio at `cfg` is the worse of the two measured entries around it (outside the measured span the
nearest one, up to MAX_EXTRAPOLATION away), so a table is never trusted between two scales where one of them
showed it losing, nor far from where it was measured; the same for its upper bound, ratio + Z standard errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from epd_core.tables.params import EPDParams

MAX_ENTRIES = 64  # measured_cfg entries read from one table (a file may be crafted: stay cheap)
MAX_EXTRAPOLATION = 1.5  # CFG units beyond its measured span a table's nearest measurement still speaks for
Z = 2.0  # standard errors a measured ratio must stay below 1 by (one-sided, ~98 %: a win that is not noise)


@dataclass
class Choice:
    table: EPDParams | None     # the table to sample with, or None to sample as `builtin`
    builtin: dict | None        # {"sampler", "scheduler", "steps"} when falling back, else None
    reason: str                 # one line for the log and the node's text


def trained_range(params: EPDParams) -> tuple[float, float] | None:
    """The CFG scales a table was trained on: metadata `cfg_range` [lo, hi], else [guidance_scale] * 2."""
    rng = params.metadata.get("cfg_range")
    if _is_pair(rng):
        return float(rng[0]), float(rng[1])
    g = params.metadata.get("guidance_scale")
    return (float(g), float(g)) if _is_number(g) else None


def measurements(params: EPDParams) -> list[dict]:
    """The well-formed `measured_cfg` entries of a table, sorted by CFG (malformed ones are ignored)."""
    entries = params.metadata.get("measured_cfg")
    if not isinstance(entries, list):
        return []
    good = []
    for e in entries[:MAX_ENTRIES]:
        b = e.get("best_builtin") if isinstance(e, dict) else None
        if (isinstance(e, dict) and _is_number(e.get("cfg")) and _is_number(e.get("fit_ratio"))
                and isinstance(b, dict) and isinstance(b.get("sampler"), str) and isinstance(b.get("scheduler"), str)
                and (e.get("fit_ratio_se") is None or _is_number(e["fit_ratio_se"]) and e["fit_ratio_se"] >= 0)):
            good.append(e)
    return sorted(good, key=lambda e: float(e["cfg"]))


def around(entries: list[dict], cfg: float) -> list[dict]:
    """The measured entries that bound `cfg`: the one at it, or the nearest below and above; beyond the measured
    span the nearest one, if it lies within MAX_EXTRAPOLATION (else none: a measurement far away says nothing)."""
    below = [e for e in entries if float(e["cfg"]) <= cfg]
    above = [e for e in entries if float(e["cfg"]) >= cfg]
    if not (below and above):
        near = below[-1:] or above[:1]
        return [e for e in near if abs(float(e["cfg"]) - cfg) <= MAX_EXTRAPOLATION]
    picked = [below[-1], above[0]]
    return picked[:1] if len(picked) == 2 and picked[0] is picked[1] else picked


def expected_ratio(params: EPDParams, cfg: float, upper: bool = False) -> float | None:
    """The worse fit ratio of the measured entries around `cfg` (`upper`: of ratio + Z standard errors; an entry
    without one counts as exact), or None when the table was measured nowhere."""
    near = around(measurements(params), cfg)
    if not near:
        return None
    return max(float(e["fit_ratio"]) + (Z * float(e.get("fit_ratio_se") or 0.0) if upper else 0.0) for e in near)


def nearest_builtin(tables: list[EPDParams], cfg: float, anywhere: bool = False) -> tuple[dict, float] | None:
    """The best built-in recorded at the measured CFG nearest `cfg` over `tables`, and that CFG (`anywhere`: however
    far, else within MAX_EXTRAPOLATION)."""
    entries = [e for t in tables for e in (measurements(t) if anywhere else around(measurements(t), cfg))]
    if not entries:
        return None
    e = min(entries, key=lambda e: abs(float(e["cfg"]) - cfg))
    return dict(e["best_builtin"]), float(e["cfg"])


def choose(tables: list[EPDParams], cfg: float | None) -> Choice:
    """See the module docstring. `cfg` None (unknown, e.g. a custom guider): the tables as trained."""
    if not tables:
        raise ValueError("choose() needs at least one table")
    if cfg is None or not math.isfinite(cfg):
        table = min(tables, key=lambda t: t.num_points)  # one call per step first, else the caller's order
        return Choice(table, None, f"CFG unknown here: {_label(table)} as trained")
    rated = [(expected_ratio(t, cfg), expected_ratio(t, cfg, upper=True), t) for t in tables]
    winners = [(r, t) for r, hi, t in rated if hi is not None and hi < 1.0]
    if winners:
        k1 = [(r, t) for r, t in winners if t.num_points == 1] or winners
        r, table = min(k1, key=lambda rt: (rt[1].num_points, rt[0]))
        measured_at = _measured_span(table, cfg)
        return Choice(table, None, f"{_label(table)}: {r:.2f} of the best built-in's error at CFG {measured_at} "
                      "(validation noises)")
    fallback = nearest_builtin(tables, cfg)
    if fallback is not None:
        b, at = fallback
        best, hi = min(((r, h) for r, h, _ in rated if r is not None), default=(math.inf, math.inf))
        bound = f", up to {hi:.2f} within {Z:g} standard errors" if hi > best and best < 1.0 else ""
        return Choice(None, b, f"no table beats the best built-in at CFG {cfg:g} (best table: {best:.2f} of its "
                      f"error{bound}, measured at CFG {at:g}); sampling exactly as {b['sampler']} ({b['scheduler']})")
    fallback = nearest_builtin(tables, cfg, anywhere=True)
    if fallback is not None:  # measured, but far from this CFG: their gain there is unknown
        b, at = fallback
        return Choice(None, b, f"no table was measured near CFG {cfg:g} (nearest: CFG {at:g}); sampling exactly as "
                      f"the best built-in recorded there, {b['sampler']} ({b['scheduler']})")
    # nearest trained CFG; ties (and tables that do not say) keep the caller's order (KSampler: operator's first)
    table = min(tables, key=lambda t: _distance(t, cfg))
    rng = trained_range(table)
    where = "an unknown CFG" if rng is None else f"CFG {span(*rng)}"
    note = "" if rng is not None and rng[0] <= cfg <= rng[1] else \
        f"; not measured at CFG {cfg:g}, its gain may not hold there (EPD Compare measures it)"
    return Choice(table, None, f"{_label(table)}, trained at {where}{note}")


def with_measurements(params: EPDParams, entries: list[dict]) -> list[dict]:
    """The table's `measured_cfg` with `entries` added, replacing those at the same CFG scales, sorted by CFG."""
    new = {float(e["cfg"]) for e in entries}
    return sorted([m for m in measurements(params) if float(m["cfg"]) not in new] + entries,
                  key=lambda m: float(m["cfg"]))


def _distance(params: EPDParams, cfg: float) -> float:
    rng = trained_range(params)
    if rng is None:
        return 0.0
    return 0.0 if rng[0] <= cfg <= rng[1] else min(abs(cfg - rng[0]), abs(cfg - rng[1]))


def _measured_span(params: EPDParams, cfg: float) -> str:
    cfgs = [float(e["cfg"]) for e in around(measurements(params), cfg)]
    return span(min(cfgs), max(cfgs))


def span(lo: float, hi: float) -> str:
    """'5' or '1-7.5': a CFG scale or range as tables and messages show it."""
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def _label(params: EPDParams) -> str:
    return f"{params.solver} table K={params.num_points}"


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _is_pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and v[0] <= v[1]
