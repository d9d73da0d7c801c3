"""The EPD parameter table: per step i and parallel point k, a position r, weight w, direction scale c and
time scale a (docs/method.md, "The table"), stored as raw logits plus two scale bounds, with JSON metadata.

Files are safetensors (never pickle). Loading validates everything and raises `EPDParamsError`, whose
message names the file, what is wrong and how to fix it.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import safetensors
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from epd_core.tables.fileio import WriteError, atomic_write_bytes, read_safetensors_header

FORMAT_VERSION = 1
TENSOR_NAMES = ("theta_r", "theta_w", "theta_c", "theta_a")
# epd_ms only (multistep.py): (steps, 6) coefficients of the last 3 directions, then of the last 3 denoised outputs;
# tables written before the denoised outputs took part have (steps, 3) and mean 0 for them
HISTORY_TENSOR = "theta_h"
# epd_ms and dyweight coefficients are free numbers: the built-ins they start from have |coefficient| <= 3 and
# training moves them little (docs/method.md). A table beyond this could not come from training, and a step with such
# a coefficient amplifies the model's error into overflow: refused on load (each variant's check_table).
MAX_MS_COEFFICIENT = 100.0
# dyweight (dyweight.py): theta_w is the (steps, steps) lower-triangular weight matrix W, theta_a holds the
# evaluation-time scales a_i on its diagonal, theta_r and theta_c are unused zeros.
SCHEDULE_TYPES = ("polynomial", "logsnr", "time_uniform", "discrete", "flowmatch", "explicit")
MAX_STEPS, MAX_POINTS = 4096, 64
MAX_FILE_BYTES = 64 * 1024 * 1024  # a real table is a few kB; refuse to read anything absurd
_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)
_WEIGHT_LOGIT_FLOOR = -30.0  # log of a zero weight; keeps logits finite
# Metadata is plain JSON of modest size and depth: the safetensors header a table is saved in must stay under
# the 1 MiB the loader accepts, and deeply nested values break json / copy.deepcopy with a RecursionError.
MAX_METADATA_BYTES, MAX_METADATA_DEPTH = 512 * 1024, 16
# Plain numbers a table's schedule may give (outside these, sigmas come out NaN, negative or inverted)
SCHEDULE_NUMBER_RANGES = {"rho": (0.01, 1000.0), "sigma_min": (1e-8, 1e8), "sigma_max": (1e-8, 1e8),
                          "floor": (0.0, 1e8), "shift": (1e-3, 1e3), "mu": (-100.0, 100.0),
                          "t_min": (1e-8, 1.0)}
FAMILY_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")  # model_family: what KSampler matches tables by


def _registry():
    """The solver registry (sampling/registry.py), imported when first needed: it imports the variant modules,
    which import this one, so a module-level import would close a cycle."""
    from epd_core.sampling import registry as solvers
    return solvers


class EPDParamsError(ValueError):
    """A parameter file or table is unusable; the message says why and how to fix it."""


def _default_metadata() -> dict:
    return {
        "solver": "epd",            # a name of solvers.NAMES: its variant (EPDParams.variant)
        "max_order": 1,             # Adams-Bashforth order of the EPD-Plugin predictor (1..4)
        "afs": False,               # analytic first step (saves one model call)
        "fix_last_dir_scale": False,  # c_k = 1 on the last step ('fcn' in the official files)
        "schedule": {},             # e.g. {"type": "polynomial", "rho": 7, "sigma_min": .., "sigmas": [...]}
        "guidance_scale": None,     # CFG scale used in training
        "model_family": None,       # e.g. 'sd15', 'sdxl', 'sd3', 'flux', 'epd_demo_digits', 'gmm'
        "provenance": {},           # who/what produced the table
    }


@dataclass
class EPDParams:
    """N steps x K points of logits; activated values are exposed as properties."""

    theta_r: torch.Tensor
    theta_w: torch.Tensor
    theta_c: torch.Tensor
    theta_a: torch.Tensor
    scale_dir: float = 0.0
    scale_time: float = 0.0
    metadata: dict = field(default_factory=_default_metadata)
    theta_h: torch.Tensor | None = None  # epd_ms: history coefficients (steps, 6); None for the other variants

    def __post_init__(self):
        meta = _default_metadata()
        meta.update(self.metadata or {})
        self.metadata = meta
        self.validate()

    # ---- activated values (docs/method.md, "The table") -------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.theta_r.shape[0]

    @property
    def num_points(self) -> int:
        return self.theta_r.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        return torch.sigmoid(self.theta_r)

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.theta_w, dim=-1)

    @property
    def dir_scales(self) -> torch.Tensor:
        return bounded_scale(self.theta_c, self.scale_dir)

    @property
    def time_scales(self) -> torch.Tensor:
        return bounded_scale(self.theta_a, self.scale_time)

    @property
    def solver(self) -> str:
        return self.metadata["solver"]

    @property
    def variant(self):
        """The solver variant (solvers.SolverVariant) this table is for: its rows, checks, sampler and trainer."""
        return _registry().variant(self.solver)

    @property
    def max_order(self) -> int:
        return int(self.metadata["max_order"])

    @property
    def afs(self) -> bool:
        return bool(self.metadata["afs"])

    @property
    def to_zero(self) -> bool:
        """The last row steps to sigma 0 itself, on the table's own (positive) sigmas: no final model call."""
        return bool((self.schedule or {}).get("to_zero"))

    @property
    def schedule(self) -> dict:
        return self.metadata["schedule"]

    @property
    def schedule_sigmas(self) -> torch.Tensor | None:
        """The N+1 positive sigmas the table was trained on, when recorded."""
        sig = self.schedule.get("sigmas")
        return None if sig is None else torch.tensor(sig, dtype=torch.float64)

    def activated(self) -> dict[str, torch.Tensor]:
        """The rows its variant's loop runs (SolverVariant.table_rows): the paper's r, w, c, a of shape (N, K), c 1
        on the last step if the table says so; epd_ms r (N, K-1), w (N, K), g and u (N, 3); dyweight W and a."""
        return self.variant.table_rows(self.tensors(), (self.scale_dir, self.scale_time),
                                       bool(self.metadata.get("fix_last_dir_scale")))

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_values(cls, positions, weights, dir_scales=None, time_scales=None, **metadata) -> "EPDParams":
        """Build a table from activated values (each steps x K). Scale bounds may be given as
        `scale_dir=` / `scale_time=`; otherwise they are chosen to contain the given scales."""
        r = _as_2d(positions, "positions")
        w = _as_2d(weights, "weights")
        if w.shape != r.shape:
            raise EPDParamsError(f"weights shape {tuple(w.shape)} != positions shape {tuple(r.shape)}")
        if not ((r > 0) & (r < 1)).all():
            raise EPDParamsError("positions must lie strictly inside (0, 1)")
        if (w < 0).any() or not torch.allclose(w.sum(-1), torch.ones(w.shape[0], dtype=w.dtype), atol=1e-4):
            raise EPDParamsError("weights must be >= 0 and sum to 1 on every step")
        scale_dir = metadata.pop("scale_dir", None)
        scale_time = metadata.pop("scale_time", None)
        theta_c, scale_dir = _scales_to_logits(dir_scales, r.shape, scale_dir, "dir_scales")
        theta_a, scale_time = _scales_to_logits(time_scales, r.shape, scale_time, "time_scales")
        theta_r = torch.logit(r)
        theta_w = torch.log(w).clamp_min(_WEIGHT_LOGIT_FLOOR).float()
        return cls(theta_r, theta_w, theta_c, theta_a, scale_dir, scale_time, metadata)

    @classmethod
    def neutral(cls, num_steps: int, num_points: int = 2, spread: float = 1.0, **metadata) -> "EPDParams":
        """An untrained starting table: positions spread around the geometric midpoint (logits in
        [-spread, spread]) and equal weights. Spreading matters: identical points get identical gradients
        forever in training, so K points would collapse into one (docs/method.md, "Training")."""
        lin = torch.linspace(-spread, spread, num_points) if num_points > 1 else torch.zeros(1)
        theta_r = lin.repeat(num_steps, 1)
        zeros = torch.zeros(num_steps, num_points)
        metadata.setdefault("scale_dir", 0.0)
        sd, st = metadata.pop("scale_dir"), metadata.pop("scale_time", 0.0)
        return cls(theta_r, zeros.clone(), zeros.clone(), zeros.clone(), sd, st, metadata)

    def clone(self) -> "EPDParams":
        return self.with_tensors([t.detach().clone() for t in self.tensors()], copy.deepcopy(self.metadata))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The learned tensors: theta_r, theta_w, theta_c, theta_a, and theta_h for epd_ms."""
        base = (self.theta_r, self.theta_w, self.theta_c, self.theta_a)
        return base if self.theta_h is None else (*base, self.theta_h)

    def tensor_names(self) -> tuple[str, ...]:
        return TENSOR_NAMES if self.theta_h is None else (*TENSOR_NAMES, HISTORY_TENSOR)

    def with_tensors(self, tensors, metadata: dict | None = None) -> "EPDParams":
        """A table of the same kind and scale bounds with other tensors (as `tensors()` orders them)."""
        t = list(tensors)
        return EPDParams(*t[:4], self.scale_dir, self.scale_time,
                         copy.deepcopy(self.metadata) if metadata is None else metadata,
                         theta_h=t[4] if len(t) > 4 else None)

    # ---- validation -----------------------------------------------------------------------------------
    def validate(self, source: str = "parameter table") -> None:
        def fail(problem, fix):
            raise EPDParamsError(f"{source}: {problem}. {fix}")

        for name, t in zip(self.tensor_names(), self.tensors()):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                fail(f"'{name}' must be a floating-point tensor", "Re-export the table with EPDParams.save().")
            if t.dim() != 2:
                fail(f"'{name}' has shape {tuple(t.shape)}, expected (steps, K)", "Re-export the table.")
            if t.shape != self.theta_r.shape and name != HISTORY_TENSOR:
                fail(f"'{name}' has shape {tuple(t.shape)} but 'theta_r' has {tuple(self.theta_r.shape)}",
                     "All four tensors must share one (steps, K) shape; re-export the table.")
            if not torch.isfinite(t).all():
                fail(f"'{name}' contains NaN or inf", "The training run diverged; use an earlier checkpoint.")
        n, k = self.theta_r.shape
        if not (1 <= n <= MAX_STEPS and 1 <= k <= MAX_POINTS):
            fail(f"table has {n} steps x {k} points", f"Expected 1..{MAX_STEPS} steps and 1..{MAX_POINTS} points.")
        for name, s in (("scale_dir", self.scale_dir), ("scale_time", self.scale_time)):
            if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s < 1.0):
                fail(f"{name}={s!r} is not a bound in [0, 1)", "Use a small bound such as 0.05, or 0 to disable.")
        m = self.metadata
        solvers = _registry()
        if m["solver"] not in solvers.NAMES:
            fail(f"unknown solver {str(m['solver'])[:40]!r}", f"Use one of {solvers.NAMES}.")
        own = solvers.variant(m["solver"])  # the table's variant: its own checks below
        if not (isinstance(m["max_order"], int) and 1 <= m["max_order"] <= 4):
            fail(f"max_order={m['max_order']!r}", "EPD-Plugin supports Adams-Bashforth orders 1..4.")
        sched = m["schedule"]
        if not isinstance(sched, dict):
            fail("metadata 'schedule' must be an object", "Re-export the table.")
        if sched.get("type") not in (None, *SCHEDULE_TYPES):
            fail(f"unknown schedule type {sched.get('type')!r}", f"Use one of {SCHEDULE_TYPES}.")
        for key, (lo, hi) in SCHEDULE_NUMBER_RANGES.items():
            v = sched.get(key)
            if v is not None and not (type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi):
                fail(f"schedule '{key}' is {repr(v)[:40]}, expected a number in [{lo:g}, {hi:g}]",
                     "Re-export the table with its training schedule.")
        if sched.get("sigma_min") is not None and sched.get("sigma_max") is not None \
                and not sched["sigma_min"] < sched["sigma_max"]:
            fail(f"schedule sigma_min={sched['sigma_min']!r} is not below sigma_max={sched['sigma_max']!r}",
                 "Re-export the table with its training schedule.")
        for key in ("to_zero", "override_sigmas", "final_zero", "learned"):
            if sched.get(key) is not None and type(sched[key]) is not bool:
                fail(f"schedule '{key}' is {repr(sched[key])[:40]}, expected true or false", "Re-export the table.")
        for key in ("afs", "fix_last_dir_scale"):
            if type(m.get(key)) is not bool and m.get(key) not in (0, 1):
                fail(f"metadata '{key}' is {repr(m.get(key))[:40]}, expected true or false (a string such as "
                     "'false' would count as true)", "Re-export the table.")
        sig = sched.get("sigmas")
        if sig is not None:
            ok = (isinstance(sig, list) and len(sig) == n + 1
                  and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in sig)
                  and all(a > b for a, b in zip(sig, sig[1:])))
            if not ok:
                fail(f"schedule 'sigmas' must be {n + 1} positive, strictly descending numbers "
                     f"(one more than the {n} steps)", "Re-export the table with its training sigmas.")
        family = m.get("model_family")
        if family is not None and not (isinstance(family, str) and FAMILY_NAME.fullmatch(family)):
            shown = repr(family[:40]) + ("..." if len(family) > 40 else "") if isinstance(family, str) else \
                type(family).__name__
            fail(f"model_family {shown} is not a plain name", "Use letters, digits and '_', '.', '+', '-' only, "
                 "at most 64 characters (e.g. 'sd15').")
        own.check_table(self, fail)
        if self.theta_h is not None and HISTORY_TENSOR not in own.tensors:
            owners = ", ".join(v.name for v in solvers.SOLVERS.values() if HISTORY_TENSOR in v.tensors)
            fail(f"'{HISTORY_TENSOR}' belongs to {owners} tables, not {m['solver']}", "Re-export the table.")
        problem = metadata_problem(m)
        if problem:
            fail(f"metadata {problem}", "Keep metadata to plain JSON values: strings, numbers, lists and objects.")
        declared_k = m.get("num_points")
        if declared_k is not None and declared_k != k:
            fail(f"metadata says K={declared_k} but the tensors have K={k}", "The file was edited or is "
                 "mismatched; re-export it.")
        declared_n = m.get("num_steps")
        if declared_n is not None and declared_n != n:
            fail(f"metadata says {declared_n} steps but the tensors have {n}", "Re-export the table.")

    # ---- files ------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = dict(self.metadata, num_steps=self.num_steps, num_points=self.num_points)
        header = {
            "epd_format_version": str(FORMAT_VERSION),
            "epd_scale_dir": repr(float(self.scale_dir)),
            "epd_scale_time": repr(float(self.scale_time)),
            "epd_metadata": json.dumps(meta, sort_keys=True),
        }
        tensors = {n: t.detach().to("cpu", torch.float32).contiguous()
                   for n, t in zip(self.tensor_names(), self.tensors())}
        return st_save_bytes(tensors, metadata=header)

    def save(self, path) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written table behind."""
        path = Path(path)
        data = self.to_bytes()
        try:
            atomic_write_bytes(path, data)
        except WriteError as e:
            raise EPDParamsError(str(e)) from None
        return path

    @classmethod
    def load(cls, path) -> "EPDParams":
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise EPDParamsError(f"{path}: cannot read parameter file ({e.strerror}). Check the path.") from None
        if size > MAX_FILE_BYTES:
            raise EPDParamsError(f"{path}: {size} bytes is far too large for an EPD table; wrong file?")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "EPDParams":
        def fail(problem, fix="Re-export it with EPDParams.save() or re-run the trainer."):
            raise EPDParamsError(f"{source}: {problem}. {fix}")

        try:
            header = read_safetensors_header(data)
        except ValueError as e:
            fail(str(e))
        meta_str = header.get("__metadata__") or {}
        if "epd_format_version" not in meta_str:
            fail("not an EPD parameter file (no 'epd_format_version' in its metadata)",
                 "Official .pkl predictors must be converted first: "
                 "python -m epd_core.import_official IN.pkl OUT.safetensors.")
        version = meta_str["epd_format_version"]
        if version != str(FORMAT_VERSION):
            fail(f"format version {version!r} is not supported (this pack reads version {FORMAT_VERSION})",
                 "Update ComfyUI-EPD, or re-export the table with this version.")
        for name in TENSOR_NAMES:
            info = header.get(name)
            if not isinstance(info, dict):
                fail(f"tensor '{name}' is missing")
            if info.get("dtype") not in ("F32", "F16", "BF16", "F64"):
                fail(f"tensor '{name}' has dtype {info.get('dtype')!r}, expected a float type")
            shape = info.get("shape")
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
                    and 1 <= shape[0] <= MAX_STEPS and 1 <= shape[1] <= MAX_POINTS):
                fail(f"tensor '{name}' has shape {shape}, expected (steps <= {MAX_STEPS}, K <= {MAX_POINTS})")
        try:
            meta = json.loads(meta_str["epd_metadata"])
            scale_dir = float(meta_str["epd_scale_dir"])
            scale_time = float(meta_str["epd_scale_time"])
        except RecursionError:
            fail("metadata 'epd_metadata' is nested far too deeply (file corrupt or crafted)")
        except (KeyError, ValueError, TypeError) as e:
            fail(f"metadata is unreadable ({e.__class__.__name__}: {str(e)[:200]})")
        if not isinstance(meta, dict):
            fail("metadata 'epd_metadata' is not a JSON object")
        try:
            tensors = st_load_bytes(data)
        except (_SafetensorError, RuntimeError, ValueError) as e:
            fail(f"tensor data is corrupt ({e})")
        t = [tensors[n].to(torch.float32) for n in TENSOR_NAMES]
        extra = tensors.get(HISTORY_TENSOR)
        if extra is not None and (extra.dim() != 2 or not extra.is_floating_point()):
            fail(f"tensor '{HISTORY_TENSOR}' has shape {list(extra.shape)} / dtype {extra.dtype}, expected "
                 "(steps, 6) floats")
        return _checked(cls, t, scale_dir, scale_time, meta, source,
                        None if extra is None else extra.to(torch.float32))

    def describe(self) -> str:
        m = self.metadata
        sched = m["schedule"].get("type", "unspecified")
        return (f"{m['solver']} K={self.num_points} steps={self.num_steps} schedule={sched} afs={m['afs']} "
                f"family={m.get('model_family')}")


def _checked(cls, t, scale_dir, scale_time, meta, source, theta_h=None):
    """Construct without __post_init__ so validation errors name the file."""
    obj = cls.__new__(cls)
    obj.theta_r, obj.theta_w, obj.theta_c, obj.theta_a = t
    obj.theta_h = theta_h
    obj.scale_dir, obj.scale_time = scale_dir, scale_time
    merged = _default_metadata()
    merged.update(meta)
    obj.metadata = merged
    obj.validate(source)
    return obj


def json_depth(value, limit: int) -> int:
    """Nesting depth of lists / dicts in `value`, counted without recursion; stops at limit + 1 (also when it
    would visit more than a million values, e.g. a structure of shared references)."""
    depth, level, seen = 0, [value], 0
    while level and depth <= limit:
        nxt = []
        seen += len(level)
        if seen > 1_000_000:
            return limit + 1
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, (list, tuple)):
                nxt.extend(v)
        if not nxt:
            break
        depth += 1
        level = nxt
    return depth


def metadata_problem(meta: dict) -> str | None:
    """Why `meta` cannot be stored in a table's header (too deep, not JSON, too large), or None."""
    if json_depth(meta, MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        return f"is nested more than {MAX_METADATA_DEPTH} levels deep (or holds over a million values)"
    try:
        size = len(json.dumps(meta, sort_keys=True))
    except (TypeError, ValueError, RecursionError) as e:  # ValueError: NaN, or an int of > 4300 digits
        return f"is not plain JSON ({type(e).__name__}: {str(e)[:120]})"
    if size > MAX_METADATA_BYTES:
        return f"takes {size} bytes, more than the {MAX_METADATA_BYTES} a table header holds"
    return None


def activate(theta_r, theta_w, theta_c, theta_a, scale_dir: float, scale_time: float,
             fix_last_dir_scale: bool = False) -> dict[str, torch.Tensor]:
    """Logits -> rows {"r","w","c","a"} (docs/method.md, "The table"). Differentiable: trainers optimise them."""
    c = bounded_scale(theta_c, scale_dir)
    if fix_last_dir_scale:
        c = torch.cat([c[:-1], torch.ones_like(c[-1:])])
    return {"r": torch.sigmoid(theta_r), "w": torch.softmax(theta_w, dim=-1), "c": c,
            "a": bounded_scale(theta_a, scale_time)}


def bounded_scale(theta: torch.Tensor, bound: float) -> torch.Tensor:
    """1 + bound * (2 sigmoid(theta/2) - 1): a scale within [1 - bound, 1 + bound]."""
    return 1.0 + bound * (2.0 * torch.sigmoid(theta / 2.0) - 1.0)


def _scales_to_logits(values, shape, bound, name):
    if values is None:
        return torch.zeros(shape), float(bound or 0.0)
    v = _as_2d(values, name)
    if v.shape != shape:
        raise EPDParamsError(f"{name} shape {tuple(v.shape)} != positions shape {tuple(shape)}")
    dev = float((v - 1).abs().max())
    if bound is None:
        bound = 0.0 if dev == 0 else min(0.99, max(0.05, 1.25 * dev))
    if dev > 0 and dev >= bound:
        raise EPDParamsError(f"{name} deviate from 1 by {dev:.4g}, outside the bound {bound}; pass a larger "
                             f"scale bound (scale_dir= / scale_time=)")
    if bound == 0:
        return torch.zeros(shape), 0.0
    u = ((v - 1) / bound + 1) / 2  # = sigmoid(theta/2)
    return 2 * torch.logit(u), float(bound)


def _as_2d(values, name) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().to("cpu")
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.numel() == 0:
        raise EPDParamsError(f"{name} must be a (steps, K) array, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise EPDParamsError(f"{name} contains NaN or inf")
    return t.to(torch.float32) if name != "weights" else t
