"""DyWeight's published tables (Westlake-AGI-Lab/DyWeight) as dyweight EPDParams tables (epd_core/sampling/dyweight.py).
FLUX (dyweight_flux/checkpoints/dyweight_nfe*.pt) is read without torch.load: torch's zip layout parsed by the
pack's bounded reader (epd_core/tables/torch_storage.py) under budgets sized for a 3 kB file. The EDM / SD snapshots
(exps/*/network-snapshot-*.pkl) are read by the bounded pickle reader (predictor_pickle.py); `import_snapshot` hands
`edm_table` the predictor's tensors and the plain hyperparameters. The files by name, their pickles' allowed names and
the zip budget: dyweight_format.py.

What the file holds (their train_flux.py `materialize_dyweight`): `window_size`, `dyweight_weights_raw` W (K, K)
lower triangular, `dyweight_t_scales` a (K,) already through 0.5 + sigmoid, and in the published files also
`dyweight_meta` {K, tscale_low, tscale_high} and `dyweight_params` {theta, phi, tril_mask, win_mask}. The grid is
not in the file: their sampler uses time_shift(mu, linspace(1, 0, K + 1)) with mu from the image size, and the
published tables were trained at 512 x 512 (their train_example.yaml), mu 0.63. The velocity is normalised by the
evaluation time (norm "eval"); FLUX.1-dev's guidance 3.5 goes through its guidance input.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from epd_core.sampling.dyweight import flux_grid, flux_mu, from_weights
from epd_core.tables.params import MAX_POINTS, EPDParams, EPDParamsError
from epd_core.sampling.schedules import sigmas_for
from epd_core.tables.dyweight_format import FIX_ZIP, ZIP_LIMITS
from epd_core.tables.predictor_pickle import _Array, _Budget, _FunctionName, _plain, _Record, _TooBig
from epd_core.tables.torch_storage import TorchFileError, read_bytes

FLUX_TRAINED_SIZE = (512, 512)
FLUX_GUIDANCE = 3.5
_REQUIRED = ("window_size", "dyweight_weights_raw", "dyweight_t_scales")
_KNOWN = (*_REQUIRED, "dyweight_meta", "dyweight_params")
IMPORTER_VERSION = 1
_EDM_SCHEDULES = ("polynomial", "logsnr", "time_uniform", "discrete")
_LATENT_DATASETS = ("ms_coco", "lsun_bedroom_ldm")  # latent models: their sigma range is the model's
# dataset_name -> model_family (the names KSampler matches tables by, epd_core/tables/params.py FAMILY_NAME)
_FAMILIES = {"ms_coco": "sd15", "cifar10": "cifar10", "ffhq": "ffhq", "afhqv2": "afhqv2",
             "imagenet64": "imagenet64", "lsun_bedroom_ldm": "lsun_bedroom_ldm"}


def import_flux_pt(data: bytes, name: str, fail) -> EPDParams:
    """The dyweight table of a DyWeight FLUX checkpoint's bytes; `fail(problem, fix)` raises the importer's error."""
    try:
        top = read_bytes(data, ZIP_LIMITS)
    except TorchFileError as e:
        fail(f"refused: {e}", FIX_ZIP)
    if not isinstance(top, dict) or not all(k in top for k in _REQUIRED):
        fail("this is a zip archive (a torch.save checkpoint) but not a DyWeight FLUX checkpoint (expected a dict with "
             f"{', '.join(_REQUIRED)})", "Pass a published dyweight_nfe*.pt file, or an EPD/DyWeight .pkl predictor.")
    unknown = [str(k)[:40] for k in top if k not in _KNOWN]
    if unknown:
        fail(f"unexpected entries {unknown} in a DyWeight FLUX checkpoint", "Download the published file again.")
    W, a, window = top["dyweight_weights_raw"], top["dyweight_t_scales"], top["window_size"]
    if not (isinstance(W, torch.Tensor) and W.dim() == 2 and W.shape[0] == W.shape[1]
            and 1 <= W.shape[0] <= MAX_POINTS and W.is_floating_point()):
        fail(f"dyweight_weights_raw is not a square float matrix of at most {MAX_POINTS} steps "
             f"({_shape(W)})", "Download the published file again.")
    steps = W.shape[0]
    if not (isinstance(a, torch.Tensor) and tuple(a.shape) == (steps,) and a.is_floating_point()):
        fail(f"dyweight_t_scales must be {steps} floats, got {_shape(a)}", "Download the published file again.")
    if not (type(window) is int and 1 <= window <= steps + 1):
        fail(f"window_size {str(window)[:20]!r} is not a number of directions in 1..{steps + 1}",
             "Download the published file again.")
    if not (torch.isfinite(W).all() and torch.isfinite(a).all()):
        fail("the weights or time scales contain NaN or inf", "The training run diverged; use another file.")
    meta = top.get("dyweight_meta")
    low, high = 0.5, 1.5
    if meta is not None:
        if not (isinstance(meta, dict) and meta.get("K") == steps
                and all(type(meta.get(k)) is float for k in ("tscale_low", "tscale_high"))):
            fail("dyweight_meta does not describe this table (K and the time-scale range)",
                 "Download the published file again.")
        low, high = meta["tscale_low"], meta["tscale_high"]
    if not bool(((a >= low - 1e-6) & (a <= high + 1e-6)).all()) or not 0 < low < high <= 10:
        fail(f"time scales outside their range [{low:g}, {high:g}]", "Download the published file again.")
    mu = flux_mu(*FLUX_TRAINED_SIZE)
    grid = flux_grid(steps, mu)
    metadata = {
        "guidance_scale": FLUX_GUIDANCE, "model_family": "flux",
        "provenance": {"format": "DyWeight FLUX checkpoint (.pt)", "source": Path(name).name[:200],
                       "sha256": hashlib.sha256(data).hexdigest(), "importer_version": IMPORTER_VERSION,
                       "method": "DyWeight (arXiv 2603.11607)"},
    }
    schedule = {"type": "explicit", "mu": mu, "grid": "flux_time_shift", "trained_size": list(FLUX_TRAINED_SIZE)}
    try:
        return from_weights(W.double(), a.double(), grid.tolist(), norm="eval", window=window, schedule=schedule,
                            **metadata)
    except EPDParamsError as e:
        fail(f"the converted table is invalid ({e})", "The file is inconsistent; download it again.")


def edm_table(hybrid_weights, mask, t_scale, state: dict, data: bytes, name: str, fail) -> EPDParams:
    """The dyweight table of a DyWeight EDM / SD snapshot: W = hybrid_weights * mask (K x K, K = num_steps - 1),
    a from t_scale (K entries, or K - 1 with AFS: step 0 then makes no call, so a_i = t_scale[i - 1]; entries the
    published sampler has none for are 1), d normalised by tau; the grid of the loss object's schedule."""
    steps = state.get("num_steps")
    if not (type(steps) is int and 2 <= steps <= MAX_POINTS + 1):
        fail(f"num_steps {str(steps)[:20]!r} is not a number of time points in 2..{MAX_POINTS + 1}",
             "Download the file again.")
    k, afs = steps - 1, state.get("afs")
    if type(afs) is not bool:
        fail(f"afs {str(afs)[:20]!r} is not true or false", "Download the file again.")
    if tuple(hybrid_weights.shape) != (k, k) or tuple(mask.shape) != (k, k):
        fail(f"hybrid_weights / mask are {tuple(hybrid_weights.shape)} / {tuple(mask.shape)}, num_steps {steps} "
             f"requires ({k}, {k})", "The file is inconsistent; download it again.")
    if not (torch.isfinite(hybrid_weights).all() and torch.isfinite(mask).all()):
        fail("the weights contain NaN or inf", "The training run diverged; use another file.")
    a = torch.ones(k, dtype=torch.float64)
    if t_scale is not None:
        if t_scale.dim() != 1 or t_scale.numel() > k or not torch.isfinite(t_scale).all():
            fail(f"t_scale has shape {tuple(t_scale.shape)}, expected at most {k} finite numbers",
                 "The file is inconsistent; download it again.")
        shift = int(afs)
        n = min(t_scale.numel(), k - shift)
        a[shift:shift + n] = t_scale[:n]
    kind = state.get("schedule_type")
    if kind not in _EDM_SCHEDULES:
        fail(f"schedule_type {str(kind)[:40]!r} is not one of {_EDM_SCHEDULES}", "Download the file again.")
    dataset = state.get("dataset_name")
    schedule = {"type": kind, "rho": float(state["schedule_rho"]) if _number(state.get("schedule_rho")) else 7.0}
    # DyWeight samples on the network's own sigma range (their sample.py): 0.002..80 for the EDM models, the
    # model's for the latent ones (SD1.5 0.0292..14.6), whatever the loss object recorded; the latter's grid is
    # built from the connected model when sampled (dyweight.sample_dyweight)
    grid = None
    if kind != "discrete" and dataset not in _LATENT_DATASETS:
        schedule.update(sigma_min=0.002, sigma_max=80.0)
        grid = sigmas_for(schedule, k).tolist()
    guidance = state.get("guidance_rate")
    metadata = {
        "guidance_scale": float(guidance) if _number(guidance) else None,
        "model_family": _FAMILIES.get(dataset) if isinstance(dataset, str) else None,
        "provenance": {"format": "DyWeight snapshot (.pkl)", "source": Path(name).name[:200],
                       "sha256": hashlib.sha256(data).hexdigest(), "importer_version": IMPORTER_VERSION,
                       "method": "DyWeight (arXiv 2603.11607)", "dataset_name": dataset,
                       "teacher": state.get("teacher"), "teacher_steps": state.get("teacher_steps"),
                       "max_history_steps": state.get("max_history_steps")},
    }
    W = hybrid_weights * mask  # what the predictor's forward() returns
    band = max((i - j for i in range(k) for j in range(i + 1) if float(W[i, j]) != 0.0), default=0) + 1
    try:
        if grid is not None:
            return from_weights(W, a, grid, norm="tau", afs=afs, window=band, schedule=schedule, **metadata)
        table = from_weights(W, a, [float(k - i) for i in range(k + 1)], norm="tau", afs=afs, window=band,
                             schedule=schedule, **metadata)
        for key in ("sigmas", "to_zero", "override_sigmas"):  # the grid comes from the model when sampled
            table.metadata["schedule"].pop(key)
        table.validate()
        return table
    except EPDParamsError as e:
        fail(f"the converted table is invalid ({e})", "The file is inconsistent; download it again.")


def _number(v) -> bool:
    return type(v) in (int, float) and v == v and abs(v) < 1e9


def _shape(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__


def import_snapshot(top: dict, data: bytes, name: str, fail) -> EPDParams:
    """A DyWeight EDM / SD snapshot: {'predictor': <persistent DyWeight_predictor>, 'loss_fn': <persistent
    DyWeight_loss>}, the numbers in the predictor (hybrid_weights, t_scale, the band mask), schedule in the loss."""
    def state_of(key: str, class_name: str) -> dict:
        record = top.get(key)
        meta = record.meta if isinstance(record, _Record) else None
        if not (isinstance(meta, dict) and meta.get("type") == "class" and meta.get("class_name") == class_name
                and isinstance(meta.get("state"), dict)):
            fail(f"not a DyWeight snapshot: its '{key}' entry is not a persistent {class_name}",
                 "Pass a network-snapshot-*.pkl from DyWeight's exps/ folder.")
        return meta["state"]
    pred, loss = state_of("predictor", "DyWeight_predictor"), state_of("loss_fn", "DyWeight_loss")

    def tensor(group: str, key: str, required: bool = True):
        holder = pred.get(group)
        arr = holder.get(key) if isinstance(holder, dict) else None
        if arr is None and not required:
            return None
        if not isinstance(arr, _Array) or not arr.tensor.is_floating_point():
            fail(f"the predictor's {group}['{key}'] is missing or not a float tensor", "Download the file again.")
        return arr.tensor.double()
    budget = _Budget()
    try:
        plain = {k: _plain(v, budget, k) for k, v in (
            ("num_steps", pred.get("num_steps")), ("afs", pred.get("afs")),
            ("guidance_rate", pred.get("guidance_rate")), ("max_history_steps", pred.get("max_history_steps")),
            ("schedule_type", loss.get("schedule_type")), ("schedule_rho", loss.get("schedule_rho")),
            ("sigma_min", loss.get("sigma_min")), ("sigma_max", loss.get("sigma_max")),
            ("dataset_name", loss.get("dataset_name")), ("teacher_steps", loss.get("teacher_steps")))}
    except _TooBig as e:
        fail(str(e), "A DyWeight snapshot records a few small hyperparameters; this file is crafted.")
    teacher = loss.get("solver_tea")
    plain["teacher"] = teacher.name if isinstance(teacher, _FunctionName) else None
    if not (isinstance(loss.get("solver_stu"), _FunctionName) and loss["solver_stu"].name == "dyweight_sampler"):
        fail("the snapshot's student sampler is not dyweight_sampler", "Pass a DyWeight snapshot.")
    return edm_table(tensor("_parameters", "hybrid_weights"), tensor("_buffers", "mask"),
                     tensor("_parameters", "t_scale", required=False), plain, data, name, fail)
