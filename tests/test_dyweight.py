"""DyWeight, the fourth solver variant (epd_core/sampling/dyweight.py): an untrained table IS ComfyUI's euler / ipndm, a
table samples exactly as plain transcriptions of the published FLUX and EDM loops, tables go through files and
bad ones are refused."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epd_core.sampling.dyweight import dyweight_table, flux_grid, flux_mu, from_weights, sample_dyweight, taus
from epd_core.sampling.epd import EPDSamplingError
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.sampling.registry import variant
from test_import_official import PACK_IN_A_PROCESS

REPO = Path(__file__).resolve().parents[1]


def karras_list(k, steps, smin=0.002, smax=80.0):
    return k.get_sigmas_karras(steps, smin, smax, 7.0).double()


def noise(n=4, dim=32, seed=1, scale=80.0):
    return scale * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def banded(steps, width, seed, around=1.0):
    """A trained-looking lower-triangular W: the current direction near `around`, `width - 1` past ones small."""
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(steps, steps, dtype=torch.float64)
    for i in range(steps):
        W[i, i] = around + 0.1 * torch.randn((), generator=g, dtype=torch.float64)
        for back in range(1, min(width, i + 1)):
            W[i, i - back] = 0.1 * torch.randn((), generator=g, dtype=torch.float64)
    return W


def flux_model(gmm):
    """A flow-matching (CONST) denoiser from the analytic mixture: x_t = (1 - t) x0 + t n, D = E[x0 | x_t] in
    closed form (component j: x_t ~ N((1 - t) mu_j, v I), v = (1 - t)^2 s^2 + t^2), defined for t > 1 too (a
    learned a_0 evaluates slightly above t = 1); ComfyUI's convention model(x, t) -> denoised."""
    mu, s2 = gmm.means, gmm.std ** 2

    def model(x, t, **_):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        v = (1 - t) ** 2 * s2 + t ** 2
        centred = x[:, None, :] - (1 - t)[:, :, None] * mu[None]  # (B, J, dim)
        post = torch.softmax(-0.5 * (centred ** 2).sum(-1) / v, dim=1)
        cond = mu[None] + ((1 - t) * s2 / v)[:, :, None] * centred
        return (post[:, :, None] * cond).sum(1)
    return model


# ---- plain transcriptions of the published loops (Westlake-AGI-Lab/DyWeight at 620534e), in our convention --
def published_flux_loop(model, x, sigmas, W, t_scales):
    """models/flux/dyweight_pipeline_flux.py, step_mode 'dyweight': velocity at sigma_true * t_scales[i],
    full row W[i, :i+1] over all past velocities, sigma_true moved by the row sum. The transformer's velocity is
    (x - D(x, s)) / s in ComfyUI's CONST convention."""
    outputs = []
    sigma_true = sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma_cur, sigma_next = sigma_true, sigmas[i + 1]
        s = sigma_cur * t_scales[i]
        v = (x - model(x, s.expand(x.shape[0]))) / s
        outputs.append(v)
        weight = W[i, :i + 1]
        v_hat = torch.tensordot(weight, torch.stack(outputs[:i + 1]), dims=([0], [0]))
        x = x + (sigma_next - sigma_cur) * v_hat
        sigma_true = sigma_cur + (sigma_next - sigma_cur) * weight.sum()
    return x


def published_edm_loop(net, x, t_steps, hybrid_weights, t_scale, afs):
    """solvers.py dyweight_sampler: t_scale index i - 1 under AFS (none on step 0), d divided by (t_cur + 1e-8)
    with t_cur the true time, no final denoise. `x` is already latents * t_steps[0]."""
    derivatives = []
    t_next_true = t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x
        t_cur = t_next_true
        if afs and i == 0:
            d_cur = x_cur / ((1 + t_cur ** 2).sqrt())
        else:
            idx = i - 1 if afs else i
            scaled = (t_scale[idx] * t_cur).abs() if t_scale is not None and 0 <= idx < len(t_scale) else t_cur
            d_cur = (x_cur - net(x_cur, scaled.expand(x.shape[0]))) / (t_cur + 1e-8)
        derivatives.append(d_cur)
        w = hybrid_weights[i, :i + 1]
        weighted = torch.zeros_like(d_cur)
        for j in range(i + 1):
            weighted = weighted + w[j] * derivatives[j]
        x = x_cur + (t_next - t_cur) * weighted
        t_next_true = t_cur + w.sum() * (t_next - t_cur)
    return x


# ---- reductions to ComfyUI ------------------------------------------------------------------------------------
def test_an_untrained_table_is_comfyuis_euler(comfy_sampling, gmm32, float64_one_thread):
    sigmas = karras_list(comfy_sampling, 6)
    x = noise()
    expected = comfy_sampling.sample_euler(gmm32, x, sigmas, disable=True)
    table = EPDParams.from_bytes(dyweight_table(sigmas).to_bytes())  # through a file
    diffs = [float((sample_dyweight(gmm32, x, sigmas, p, disable=True) - expected).abs().max())
             for p in (table, None)]
    assert max(diffs) < 1e-6, diffs
    # and on a flow model's list, where the call happens at the exact sigmas ComfyUI's euler uses
    fm = flux_model(gmm32)
    grid = flux_grid(5, 0.63)
    xf = noise(scale=1.0)
    expected = comfy_sampling.sample_euler(fm, xf, grid, disable=True)
    assert float((sample_dyweight(fm, xf, grid, dyweight_table(grid, norm="eval"), disable=True)
                  - expected).abs().max()) < 1e-6


@pytest.mark.parametrize("window", [3, 4])
def test_the_banded_ipndm_start_is_comfyuis_ipndm(comfy_sampling, gmm32, float64_one_thread, window):
    sigmas = karras_list(comfy_sampling, 7)
    x = noise(seed=2)
    expected = comfy_sampling.sample_ipndm(gmm32, x, sigmas, disable=True, max_order=window)
    table = EPDParams.from_bytes(dyweight_table(sigmas, "ipndm", window=window).to_bytes())
    got = sample_dyweight(gmm32, x, sigmas, table, disable=True)
    # to 1e-6: a file stores 23/12, 55/24, ... as float32
    assert float((got - expected).abs().max()) < 1e-6


def test_the_registry_entry_runs_with_the_k_diffusion_signature(gmm32, float64_one_thread):
    v = variant("dyweight")
    assert v.sample_fn() is sample_dyweight and v.calls_per_step == 1 and v.untrained == "euler"
    sigmas = flux_grid(3, 0.63)
    calls = []

    def model(x, s, **kw):
        calls.append((float(s[0]), kw))
        return flux_model(gmm32)(x, s)
    table = from_weights(banded(3, 2, 0), [1.02, 0.98, 0.99], sigmas, norm="eval")
    v.sample_fn()(model, noise(scale=1.0), sigmas, table, extra_args={"cond": None}, disable=True)
    assert len(calls) == 3 and all(kw == {"cond": None} for _, kw in calls)  # one sequential call per step
    assert math.isclose(calls[0][0], 1.02, rel_tol=1e-6)  # the first call at a_0 * t_0, above t = 1


# ---- the published loops -------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [3, 5, 7])
def test_a_flux_table_samples_as_the_published_flux_loop(gmm32, float64_one_thread, steps):
    fm = flux_model(gmm32)
    grid = flux_grid(steps, flux_mu(512, 512))
    W = banded(steps, 2, steps, around=0.9)  # rows summing to ~0.9: tau_N is not the grid end
    a = 0.5 + torch.sigmoid(0.1 * torch.randn(steps, generator=torch.Generator().manual_seed(steps),
                                              dtype=torch.float64))
    W, a = W.float().double(), a.float().double()  # what a file holds
    x = noise(scale=1.0, seed=steps)
    expected = published_flux_loop(fm, x, grid, W, a)
    table = EPDParams.from_bytes(from_weights(W, a, grid, norm="eval").to_bytes())
    got = sample_dyweight(fm, x, grid, table, disable=True)
    assert float((got - expected).abs().max()) < 1e-6
    assert float(taus(W, grid)[-1]) > 0.01  # the true end time is not 0, by design


@pytest.mark.parametrize("afs", [False, True])
def test_an_edm_table_samples_as_the_published_edm_loop(comfy_sampling, gmm32, float64_one_thread, afs):
    steps = 6
    grid = karras_list(comfy_sampling, steps + 1)[:-1]  # 7 positive points: polynomial rho 7 on [0.002, 80]
    W = banded(steps, 3, 7).float().double()
    t_scale = (1 + 0.05 * torch.randn(steps - int(afs), generator=torch.Generator().manual_seed(3),
                                      dtype=torch.float64)).float().double()
    x = noise(seed=4)
    expected = published_edm_loop(gmm32, x, grid, W, t_scale, afs)
    ours_a = torch.cat([torch.ones(1, dtype=torch.float64), t_scale]) if afs else t_scale  # the a-index shift
    table = EPDParams.from_bytes(from_weights(W, ours_a, grid, afs=afs).to_bytes())
    model_calls = []

    def counted(x, s, **kw):
        model_calls.append(1)
        return gmm32(x, s, **kw)
    got = sample_dyweight(counted, x, torch.cat([grid[:-1], grid.new_zeros(1)]), table, disable=True)
    assert len(model_calls) == steps - int(afs)  # AFS: no call on step 0
    assert float((got - expected).abs().max()) < 1e-6


# ---- the sampler's choices and refusals ----------------------------------------------------------------------
def test_a_table_of_another_step_count_falls_back_to_euler_or_is_refused_when_strict(comfy_sampling, gmm32,
                                                                                     float64_one_thread):
    table = dyweight_table(karras_list(comfy_sampling, 4), "ipndm")
    sigmas = karras_list(comfy_sampling, 5)
    x = noise(seed=5)
    expected = comfy_sampling.sample_euler(gmm32, x, sigmas, disable=True)
    assert float((sample_dyweight(gmm32, x, sigmas, table, disable=True) - expected).abs().max()) < 1e-6
    with pytest.raises(EPDSamplingError, match="5 steps, this dyweight table 4"):
        sample_dyweight(gmm32, x, sigmas, table, strict=True, disable=True)


def test_nan_from_the_model_and_a_table_that_drives_tau_below_zero_are_refused(comfy_sampling, gmm32,
                                                                             float64_one_thread):
    sigmas = karras_list(comfy_sampling, 4)
    with pytest.raises(EPDSamplingError, match="NaN/inf at step 0"):
        sample_dyweight(lambda x, s, **_: x * float("nan"), noise(), sigmas, None, disable=True)
    W = torch.eye(4, dtype=torch.float64)
    W[0, 0] = 3.0  # tau_1 = 80 + 3 (t_1 - 80) < 0
    with pytest.raises(EPDSamplingError, match="tau_1"):
        sample_dyweight(gmm32, noise(), sigmas, from_weights(W, torch.ones(4), sigmas), disable=True)


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.theta_w.__setitem__((0, 2), 0.5), "above the diagonal"),
    (lambda t: t.theta_w.__setitem__((2, 1), 1e4), "beyond the limit"),
    (lambda t: t.theta_a.__setitem__((1, 1), 50.0), "evaluation-time scales"),
    (lambda t: t.theta_a.__setitem__((1, 0), 0.5), "evaluation-time scales"),
    (lambda t: t.theta_r.__setitem__((1, 0), 0.5), "no point positions"),
    (lambda t: t.metadata["dyweight"].__setitem__("norm", "velocity"), "'norm'"),
])
def test_bad_tables_are_refused_on_load_with_the_problem_named(comfy_sampling, edit, problem):
    table = dyweight_table(karras_list(comfy_sampling, 4), "ipndm")
    edit(table)
    data = table.to_bytes()
    with pytest.raises(EPDParamsError, match=problem):
        EPDParams.from_bytes(data)
    with pytest.raises(EPDParamsError, match="square"):
        EPDParams(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), 0.0, 0.0,
                  {"solver": "dyweight", "dyweight": {"norm": "tau"}})


# ---- importing the published FLUX checkpoints ----------------------------------------------------------------
def published_flux_checkpoint(path, W, a, window=2, low=0.5, high=1.5, extra=None, meta=True):
    """A file in the layout of dyweight_flux/checkpoints/dyweight_nfe*.pt, written here by torch.save (zip, pickle
    protocol 2, float32 tensors): their train_flux.py dict plus the published files' meta and raw parameters."""
    k = W.shape[0]
    tril = torch.tril(torch.ones(k, k))
    band = tril * torch.triu(torch.ones(k, k), diagonal=-(window - 1))
    obj = {"window_size": window, "dyweight_weights_raw": W.float(), "dyweight_t_scales": a.float()}
    if meta:
        obj["dyweight_meta"] = {"K": k, "tscale_low": low, "tscale_high": high}
        obj["dyweight_params"] = {"theta": W.float(), "phi": torch.logit((a.float() - low) / (high - low)),
                                  "tril_mask": tril, "win_mask": band}
    obj.update(extra or {})
    torch.save(obj, path, pickle_protocol=2)
    return path.read_bytes()


def published_flux_schedule(steps, mu=0.63):
    """models/flux/sampling.py get_schedule: time_shift(mu, 1, linspace(1, 0, steps + 1)) in float32."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float32)
    return (math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)).double()


@pytest.mark.parametrize("steps", [3, 7])
def test_an_imported_flux_checkpoint_samples_as_the_published_loop(tmp_path, gmm32, float64_one_thread, steps):
    from epd_core.tables.import_official import import_official_bytes
    W = banded(steps, 2, 10 + steps, around=0.9).float()
    a = 0.5 + torch.sigmoid(0.2 * torch.randn(steps, generator=torch.Generator().manual_seed(steps))).float()
    data = published_flux_checkpoint(tmp_path / "final-step.pt", W, a)
    table = import_official_bytes(data, "dyweight_nfe.pt")
    assert table.solver == "dyweight"
    assert table.metadata["model_family"] == "flux" and table.metadata["dyweight"] == {"norm": "eval", "window": 2}
    assert torch.equal(table.activated()["W"], W) and torch.equal(table.activated()["a"], a)
    fm = flux_model(gmm32)
    x = noise(scale=1.0, seed=steps)
    expected = published_flux_loop(fm, x, published_flux_schedule(steps), W.double(), a.double())
    comfy_list = flux_grid(steps, flux_mu(512, 512))  # what a scheduler gives: the same start, ending in 0
    got = sample_dyweight(fm, x, comfy_list, EPDParams.from_bytes(table.to_bytes()), disable=True)
    assert float((got - expected).abs().max()) < 1e-6
    # the training script's own final save (no meta / raw parameters) reads the same
    plain = import_official_bytes(published_flux_checkpoint(tmp_path / "plain.pt", W, a, meta=False), "plain.pt")
    assert torch.equal(plain.theta_w, table.theta_w) and torch.equal(plain.theta_a, table.theta_a)


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def _truncated_storage(data: bytes) -> bytes:
    import io
    import zipfile
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            body = src.read(info)
            z.writestr(info.filename, body[:-4] if info.filename.endswith("data/0") else body)
    return out.getvalue()


@pytest.mark.parametrize("case, problem", [
    ("global", "global"),
    ("truncated", "storage '0' claims"),
    ("upper", "above the diagonal"),
    ("scale", "outside their range"),
    ("nan", "NaN"),
    ("extra", "unexpected entries"),
    ("huge", "square float matrix"),
    ("not_dyweight", "not a DyWeight FLUX checkpoint"),
])
def test_hostile_or_broken_flux_checkpoints_are_refused_with_the_problem_named(tmp_path, case, problem):
    from epd_core.tables.import_official import EPDImportError, import_official_bytes
    W, a = torch.tril(torch.ones(3, 3)) * 0.3, torch.ones(3)
    path = tmp_path / "final-step.pt"
    if case == "global":
        data = published_flux_checkpoint(path, W, a, extra={"x": Payload()})
    elif case == "truncated":
        data = _truncated_storage(published_flux_checkpoint(path, W, a))
    elif case == "upper":
        data = published_flux_checkpoint(path, W + torch.triu(torch.ones(3, 3), 1), a)
    elif case == "scale":
        data = published_flux_checkpoint(path, W, a * 2)
    elif case == "nan":
        data = published_flux_checkpoint(path, W * float("nan"), a)
    elif case == "extra":
        data = published_flux_checkpoint(path, W, a, extra={"payload": 1})
    elif case == "huge":
        data = published_flux_checkpoint(path, torch.tril(torch.ones(100, 100)), torch.ones(100), meta=False)
    else:
        torch.save({"state_dict": {"w": W}}, path)
        data = path.read_bytes()
    with pytest.raises(EPDImportError, match=problem):
        import_official_bytes(data, "x.pt")


def test_the_published_names_are_pinned_and_a_wrong_file_is_refused_before_reading(tmp_path):
    from epd_core.tables.dyweight_format import COMMIT
    from epd_core.tables.import_official import (OFFICIAL_FILES, EPDImportError, convert_command,
                                                 import_official_by_name, official_url)
    names = [n for n in OFFICIAL_FILES if n.startswith("dyweight-")]
    assert names == ["dyweight-flux-nfe3", "dyweight-flux-nfe5", "dyweight-flux-nfe7", "dyweight-sd15-nfe8",
                     "dyweight-sd15-nfe12", "dyweight-sd15-nfe16", "dyweight-sd15-nfe20"]
    assert official_url("dyweight-flux-nfe3", None).endswith(
        f"Westlake-AGI-Lab/DyWeight/{COMMIT}/dyweight_flux/checkpoints/dyweight_nfe3.pt")
    assert convert_command("dyweight-flux-nfe5").endswith("dyweight-flux-nfe5.pt OUT.safetensors")
    data = published_flux_checkpoint(tmp_path / "final-step.pt", torch.eye(3), torch.ones(3))
    with pytest.raises(EPDImportError, match="not the published 'dyweight-flux-nfe3'"):
        import_official_by_name("dyweight-flux-nfe3", data, "nfe3.pt")


def test_the_command_line_converts_a_flux_checkpoint_in_its_isolated_child(tmp_path, capsys):
    from epd_core.tables.import_official import main
    W = torch.tril(torch.ones(3, 3)) * 0.3
    src = tmp_path / "final-step.pt"
    published_flux_checkpoint(src, W, torch.ones(3))
    assert main([str(src), str(tmp_path / "t.safetensors"), "--print"]) == 0
    table = EPDParams.load(tmp_path / "t.safetensors")
    assert table.solver == "dyweight" and table.to_zero and table.schedule["mu"] == pytest.approx(0.63)
    assert "W row" in capsys.readouterr().out


# ---- a real ComfyUI server -----------------------------------------------------------------------------------
@pytest.mark.server
def test_ksampler_dyweight_in_a_real_server_is_euler_without_a_table_and_uses_a_listed_one(comfy_server, comfy_ref):
    """KSampler `dyweight` on the 8x8 demo model: with no table for its step count it is exactly euler (and says
    so); a listed dyweight table of the demo family (here ipndm's rows on KSampler's karras list) is picked and
    sampled on its grid, one model call per step: exactly ipndm."""
    from bench.comfyui_server import error_message
    from test_server_sampling import BATCH, base_graph, batches, ksampler, read_latent, save_latent
    folder = comfy_server.base / "models" / "epd_params"
    table_steps, plain_steps, seed = 10, 12, 11  # 10: more columns than an EPD table may have points; 12: no
    # shipped demo table (NFE 3-10)
    sigmas = comfy_ref["samplers"].KSampler(comfy_ref["stub"], table_steps, "cpu", "dyweight", "karras", 1.0).sigmas
    dyweight_table(sigmas.double(), "ipndm", window=4, model_family="epd_demo_digits",
                   guidance_scale=2.0).save(folder / "dyweight_demo.safetensors")
    (folder / "ksampler_presets.txt").write_text("dyweight_demo\n")
    try:
        g = base_graph("ks_dyweight")
        runs = (("dw_table", "dyweight", table_steps), ("ipndm", "ipndm", table_steps),
                ("dw_plain", "dyweight", plain_steps), ("euler", "euler", plain_steps))
        for name, sampler, steps in runs:
            g[name] = ksampler(("empty", 0), sampler, steps, seed, model=("logged", 0) if name == "dw_table"
                               else ("model", 0))
            g[f"save_{name}"] = save_latent(name, f"dyweight_{name}")
        entry = comfy_server.run(g)
        assert entry["status"]["status_str"] == "success", error_message(entry)
        latent = lambda node: read_latent(comfy_server, entry, node)  # noqa: E731
        torch.testing.assert_close(latent("save_dw_table"), latent("save_ipndm"), rtol=0, atol=1e-5)
        torch.testing.assert_close(latent("save_dw_plain"), latent("save_euler"), rtol=0, atol=1e-5)
        assert not torch.allclose(latent("save_dw_table"), latent("save_dw_plain"), atol=1e-3)
        assert batches(comfy_server, "ks_dyweight") == [2 * BATCH] * table_steps  # cond + uncond, one call a step
        log = comfy_server.log_path.read_text(errors="replace")
        assert f"dyweight on epd_demo_digits with {table_steps - 1} steps uses dyweight_demo.safetensors" in log
        assert f"no dyweight table of {plain_steps} steps for this model: exactly euler" in log
        assert "dyweight runs the 1 points of each step" in log  # W's columns are past directions, not points
    finally:
        (folder / "ksampler_presets.txt").unlink(missing_ok=True)
        (folder / "dyweight_demo.safetensors").unlink(missing_ok=True)


# ---- importing the published EDM / SD snapshots (.pkl) -------------------------------------------------------
def dyweight_snapshot(W, t_scale, afs, dataset="cifar10", schedule_type="polynomial", window=3, protocol=4,
                      solver_stu=("solvers", "dyweight_sampler"), extra_loss=None, mask=None):
    """A file with the structure of DyWeight's exps/*/network-snapshot-*.pkl: {'predictor': <persistent
    DyWeight_predictor>, 'loss_fn': <persistent DyWeight_loss>} (bench/official_pickle.py writes the persistence
    hook and the solver functions as bare globals; tensors as torch pickles them)."""
    import collections
    import io

    from bench.official_pickle import PERSISTENCE_HOOK, FakeCall, FakeGlobal, OfficialPickler, persistent_model
    k = W.shape[0]
    if mask is None:
        mask = torch.tril(torch.ones(k, k)) * torch.triu(torch.ones(k, k), diagonal=-(window - 1))
    module = torch.nn.Module()
    module.register_parameter("hybrid_weights", torch.nn.Parameter(W.float().clone()))
    if t_scale is not None:
        module.register_parameter("t_scale", torch.nn.Parameter(t_scale.float().clone()))
    module.register_buffer("mask", mask)
    state = dict(module.__dict__)
    state["_parameters"] = collections.OrderedDict(state["_parameters"])
    state["_buffers"] = collections.OrderedDict(state["_buffers"])
    attrs = dict(num_steps=k + 1, max_history_steps=window, init_mode="ipndm", enable_t_scale_learning=True,
                 t_scale_init_mode="ones", afs=afs, guidance_rate=None, guidance_type=None,
                 effective_window_size=window - 1)
    state.update(attrs, _init_args=(), _init_kwargs=dict(attrs))
    loss_state = dict(num_steps=k + 1, solver_stu=FakeGlobal(*solver_stu),
                      solver_tea=FakeGlobal("solvers", "heun_sampler"), teacher_steps=35, schedule_type=schedule_type,
                      schedule_rho=7.0, afs=afs, max_order=2, sigma_min=0.002, sigma_max=80.0, dataset_name=dataset,
                      **(extra_loss or {}))
    loss = FakeCall(PERSISTENCE_HOOK, (dict(type="class", version=6, module_src="class DyWeight_loss:\n    pass\n",
                                            module_name="training.loss", class_name="DyWeight_loss",
                                            state=loss_state),))
    buf = io.BytesIO()
    OfficialPickler(buf, protocol).dump({"predictor": persistent_model(state, "DyWeight_predictor"), "loss_fn": loss})
    return buf.getvalue(), mask.double()


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("protocol", [2, 4])
def test_an_imported_edm_snapshot_samples_as_the_published_edm_loop(comfy_sampling, gmm32, float64_one_thread, afs,
                                                                    protocol):
    from epd_core.tables.import_official import import_official_bytes
    steps = 5
    W = banded(steps, 4, 20, around=1.0).float().double()  # entries outside the band: the mask removes them
    t_scale = (1 + 0.05 * torch.randn(steps - int(afs), generator=torch.Generator().manual_seed(5))).float()
    data, mask = dyweight_snapshot(W, t_scale, afs, protocol=protocol)
    table = EPDParams.from_bytes(import_official_bytes(data, "network-snapshot-000010.pkl").to_bytes())
    assert table.afs is afs and table.metadata["model_family"] == "cifar10" and table.metadata["latency_nfe"] == \
        steps - int(afs)
    assert table.metadata["provenance"]["teacher"] == "heun_sampler"
    grid = karras_list(comfy_sampling, steps + 1)[:-1]  # polynomial rho 7 on [0.002, 80]
    assert torch.allclose(torch.tensor(table.schedule["sigmas"], dtype=torch.float64), grid, rtol=1e-12)
    x = noise(seed=6)
    expected = published_edm_loop(gmm32, x, grid, W * mask, t_scale.double(), afs)
    got = sample_dyweight(gmm32, x, torch.cat([grid[:-1], grid.new_zeros(1)]), table, disable=True)
    assert float((got - expected).abs().max()) < 1e-6


def test_an_sd15_snapshot_keeps_the_models_sigma_range_and_its_cfg():
    from epd_core.tables.import_official import import_official_bytes
    data, _ = dyweight_snapshot(torch.eye(4), torch.ones(4), False, dataset="ms_coco", schedule_type="discrete",
                                window=2, extra_loss={"guidance_rate": 7.5})
    table = import_official_bytes(data, "network-snapshot-000005.pkl")
    assert table.metadata["model_family"] == "sd15" and table.schedule == {"type": "discrete", "rho": 7.0,
                                                                           "final_zero": False}
    assert table.metadata["dyweight"] == {"norm": "tau", "window": 1}  # W = I: one direction a row


@pytest.mark.parametrize("case, problem", [
    ("global", "os.system"),
    ("student", "not dyweight_sampler"),
    ("upper", "above the diagonal"),
    ("scale", "evaluation-time scales"),
    ("shape", "requires"),
])
def test_hostile_or_broken_snapshots_are_refused_with_the_problem_named(case, problem):
    from epd_core.tables.import_official import EPDImportError, import_official_bytes
    W, t_scale, kw = torch.eye(3), torch.ones(3), {}
    if case == "global":
        kw["solver_stu"] = ("os", "system")
    elif case == "student":
        kw["solver_stu"] = ("solvers", "heun_sampler")
    elif case == "upper":  # a band mask with entries above the diagonal lets them through
        W, kw["mask"] = W + torch.triu(torch.ones(3, 3), 1), torch.ones(3, 3)
    elif case == "scale":
        t_scale = -t_scale
    data, _ = dyweight_snapshot(W, t_scale, False, **kw)
    if case == "shape":  # num_steps 5 for a 3 x 3 table
        data = data.replace(b"\x8c\tnum_steps\x94K\x04", b"\x8c\tnum_steps\x94K\x05", 1)
    with pytest.raises(EPDImportError, match=problem):
        import_official_bytes(data, "x.pkl")


# ---- grids and EPD Sigmas ------------------------------------------------------------------------------------
class ModelSamplingFlux:  # the name and `shift` of ComfyUI's FLUX noise schedule (mu), nothing else
    def __init__(self, shift):
        self.shift = shift


class Patched:
    """What a ComfyUI sampler function receives: a wrapper whose inner model's patcher holds model_sampling."""
    def __init__(self, model, model_sampling):
        self.model = model
        patcher = type("Patcher", (), {"get_model_object": lambda _, name: model_sampling})()
        self.inner_model = type("Inner", (), {"model_patcher": patcher})()

    def __call__(self, x, sigma, **kw):
        return self.model(x, sigma, **kw)


def test_a_flux_table_samples_on_the_grid_of_the_models_mu_and_says_so(tmp_path, gmm32, float64_one_thread, caplog):
    from epd_core.tables.import_official import import_official_bytes
    table = import_official_bytes(published_flux_checkpoint(tmp_path / "final-step.pt", torch.eye(4) * 0.9,
                                                            torch.ones(4)), "nfe4.pt")
    seen = []
    model = Patched(flux_model(gmm32), ModelSamplingFlux(1.15))  # 1024 x 1024
    with caplog.at_level("WARNING", logger="epd"):
        sample_dyweight(model, noise(scale=1.0), flux_grid(4, 1.15), table, disable=True,
                        callback=lambda info: seen.append(float(info["sigma"])))
    assert seen == pytest.approx(flux_grid(4, 1.15)[:-1].tolist(), rel=1e-12)
    assert "trained at 512x512 (mu 0.63)" in caplog.text and "mu 1.15" in caplog.text
    seen.clear()  # at the trained size: the table's own grid
    sample_dyweight(Patched(flux_model(gmm32), ModelSamplingFlux(0.63)), noise(scale=1.0), flux_grid(4, 1.15), table,
                    disable=True, callback=lambda info: seen.append(float(info["sigma"])))
    assert seen == pytest.approx(flux_grid(4, 0.63)[:-1].tolist(), rel=1e-12)


def test_epd_sigmas_gives_a_dyweight_tables_grid(comfy_sampling):
    from epd_core.sampling.plan import sampler_sigmas
    grid = flux_grid(3, 0.63)
    assert torch.allclose(sampler_sigmas(from_weights(torch.eye(3), torch.ones(3), grid, norm="eval")), grid)
    edm = karras_list(comfy_sampling, 5)[:-1]  # 5 positive points: the list of a scheduler's 4 steps ending in 0
    listed = sampler_sigmas(from_weights(torch.eye(4), torch.ones(4), edm))
    assert torch.allclose(listed[:-1], edm[:-1]) and listed[-1] == 0  # the sampler then lands on its own 0.002


def test_preview_draws_w_and_a(comfy_sampling):
    """Preview EPD Params' picture of a dyweight table (nodes/plotting.py): one row of cells per step, W's sign
    in the colours, a and tau written beside."""
    import numpy as np
    from conftest import import_pack_nodes
    plotting = import_pack_nodes("plotting")["plotting"]
    W = banded(5, 2, 3, around=0.9)
    W[3, 2] = -0.4
    table = from_weights(W, torch.full((5,), 1.02), flux_grid(5, 0.63), norm="eval")
    img = plotting.table_picture(table)
    pixels = torch.from_numpy(np.asarray(img).astype(np.int64)).reshape(-1, 3)
    assert img.width == 900 and (pixels[:, 0] > pixels[:, 2] + 30).any() and (pixels[:, 2] > pixels[:, 0] + 30).any()
    big = plotting.table_picture(from_weights(torch.eye(64), torch.ones(64), karras_list(comfy_sampling, 64)))
    assert big.height < 1200  # the largest table (64 steps) in cells of 16 pixels


# ---- training (DyWeight's recipe: Adam, cosine decay, gradient clipping, end-to-end L2) ---------------------
def test_distilling_a_dyweight_table_starts_at_euler_and_lowers_the_held_out_error(comfy_sampling):
    """The 8x8 demo model at CFG 2 on karras' 4-step list: the run starts exactly at euler (its untrained table),
    trains only the band of TRAIN_WINDOW directions and the time scales, and ends below euler on noises it never
    saw."""
    from epd_core.training.distill import distill
    from epd_core.training.distill_config import DistillConfig
    from epd_core.sampling.dyweight import TRAIN_WINDOW
    from epd_core.demo.problems import demo_problem
    torch.manual_seed(0)
    train = demo_problem("digits", guidance_scale=2.0)
    sig = karras_list(comfy_sampling, 4, smin=float(train.sigma_min), smax=float(train.sigma_max))
    cfg = DistillConfig(sigmas=sig.tolist(), solver="dyweight", num_points=1, iterations=30, lr=0.01, batch=8,
                        num_batches=4, teacher="heun", teacher_steps=60, teacher_sigma_min=float(train.sigma_min))
    assert (cfg.objective, cfg.grad_clip, cfg.builtin) == ("end_to_end", 1.0, "euler")  # the registry's recipe
    table = distill(train.model, None, train.noise_fn(float(sig[0])), cfg, train.extra_args_fn)
    rows = table.activated()
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert table.solver == "dyweight" and table.num_steps == 4 and table.metadata["dyweight"]["window"] == TRAIN_WINDOW
    assert torch.all(rows["W"][(i - j >= TRAIN_WINDOW) | (j > i)] == 0) and not torch.equal(rows["W"], torch.eye(4))
    assert table.metadata["provenance"]["grad_clip"] == 1.0
    g = torch.Generator().manual_seed(202)  # held-out noises and labels
    x = torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64).float() * float(sig[0])
    extra = {"cond": torch.arange(32) % 10}
    ref_sig = karras_list(comfy_sampling, 200, smin=float(train.sigma_min), smax=float(train.sigma_max))
    with torch.no_grad():
        ref = comfy_sampling.sample_heun(train.model, x, ref_sig.float(), extra_args=extra, disable=True)
        euler = comfy_sampling.sample_euler(train.model, x, sig.float(), extra_args=extra, disable=True)
        start = sample_dyweight(train.model, x, sig.float(), dyweight_table(sig), extra_args=extra)
        trained = sample_dyweight(train.model, x, sig.float(), table, extra_args=extra)
    assert torch.allclose(start, euler, atol=1e-5)

    def rmse(a):
        return float((a - ref).square().flatten(1).mean(1).sqrt().mean())
    assert rmse(trained) < 0.9 * rmse(euler), (rmse(trained), rmse(euler))


def test_dyweight_trains_end_to_end_only_and_says_so():
    from epd_core.training.distill_config import DistillConfig, DistillError
    cfg = DistillConfig(sigmas=[80.0, 10.0, 1.0, 0.0], solver="dyweight", num_points=1, objective="per_step")
    with pytest.raises(DistillError, match="dyweight trains with the end_to_end objective only.*'end_to_end'"):
        cfg.validate()
    with pytest.raises(DistillError, match="Use K = 1"):
        DistillConfig(sigmas=[80.0, 10.0, 1.0, 0.0], solver="dyweight", num_points=2).validate()
    with pytest.raises(DistillError, match="unknown starting sampler 'dpmpp_2m' for dyweight"):
        DistillConfig(sigmas=[80.0, 10.0, 1.0, 0.0], solver="dyweight", num_points=1, builtin="dpmpp_2m").validate()


def test_the_command_line_distils_a_dyweight_table(tmp_path):
    out = tmp_path / "dw.safetensors"
    cmd = [sys.executable, "-m", "epd_core.train", "distill", "--model", "demo", "--solver", "dyweight", "-K", "1",
           "--steps", "3", "--iterations", "3", "--batch", "4", "--num-batches", "1", "--teacher-steps", "20",
           "--lr", "0.01", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = EPDParams.load(out)
    assert table.solver == "dyweight" and table.num_steps == 4  # 3 steps to positive sigmas + the step to 0
    assert table.metadata["provenance"]["objective"] == "end_to_end" and table.metadata["latency_nfe"] == 4


IMPORT_NODE_SCRIPT = PACK_IN_A_PROCESS + r"""
from ComfyUI_EPD.nodes.tables import EXTENSIONS
folder_paths.folder_names_and_paths["epd_params"] = ([models], EXTENSIONS)
from ComfyUI_EPD.nodes.import_node import EPDImportPredictor
info = EPDImportPredictor.GET_NODE_INFO_V1()
options = {**info["input"]["required"], **info["input"].get("optional", {})}["predictor"][1]["options"]
out = EPDImportPredictor.execute(predictor="dyweight_nfe3.pt", output_name="", overwrite=False)
print("RESULT" + json.dumps({"options": options, "describe": out.args[0].describe()}))
"""


def test_the_import_node_converts_a_flux_checkpoint_from_the_models_folder(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    comfy = Path(os.environ.get("COMFYUI_PATH", repo / ".comfyui"))
    if not (comfy / "comfy_api").is_dir():
        pytest.skip("no ComfyUI runtime (run scripts/setup_runtime.sh)")
    models = tmp_path / "epd_params"
    models.mkdir()
    W, a = torch.tril(torch.ones(3, 3)) * 0.3, torch.full((3,), 1.01)
    published_flux_checkpoint(models / "dyweight_nfe3.pt", W, a)
    proc = subprocess.run([sys.executable, "-c", IMPORT_NODE_SCRIPT, str(repo), str(comfy), str(models)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT"):])
    assert res["options"][0] == "dyweight_nfe3.pt" and "official: dyweight-flux-nfe7" in res["options"]
    assert res["describe"].startswith("dyweight K=3 steps=3")
    table = EPDParams.load(models / "dyweight_nfe3.safetensors")
    assert torch.equal(table.activated()["W"], W) and torch.equal(table.activated()["a"], a)


def test_float32_latents_and_the_gradient_path(comfy_sampling, gmm32):
    """A float32 latent samples as ComfyUI's float32 euler (coefficients made in float64 on the host, no float64
    on the device); with W and a requiring grad (a trainer) the same result comes with finite gradients."""
    from epd_core.sampling.dyweight import integrate_dyweight
    sigmas = karras_list(comfy_sampling, 5).float()
    x = noise(seed=9).float()
    model = lambda x, s, **kw: gmm32(x.double(), s.double(), **kw).float()  # noqa: E731
    expected = comfy_sampling.sample_euler(model, x, sigmas, disable=True)
    got = sample_dyweight(model, x, sigmas, dyweight_table(sigmas), disable=True)
    assert got.dtype == torch.float32 and float((got - expected).abs().max()) < 1e-4
    W = (0.9 * torch.eye(5, dtype=torch.float64) + torch.diag(torch.full((4,), 0.05, dtype=torch.float64), -1))
    W.requires_grad_()
    a = torch.full((5,), 1.01, dtype=torch.float64, requires_grad=True)
    xd = noise(seed=9)
    out = integrate_dyweight(gmm32, xd, sigmas.double(), W, a, disable=True)
    out.square().mean().backward()
    assert torch.isfinite(W.grad).all() and W.grad.abs().sum() > 0 and torch.isfinite(a.grad).all()
    plain = integrate_dyweight(gmm32, xd, sigmas.double(), W.detach(), a.detach(), disable=True)
    assert float((out.detach() - plain).abs().max()) < 1e-9


def test_by_name_download_fetches_the_pinned_path_and_converts(tmp_path, monkeypatch, capsys):
    """`--official dyweight-flux-nfe3` fetches dyweight_flux/checkpoints/dyweight_nfe3.pt (here from a local server
    through EPD_OFFICIAL_BASE_URL, the pin replaced by the generated file's), checks it, converts it in the child."""
    import hashlib

    import epd_core.tables.import_official as imp
    from epd_core.tables import dyweight_format
    from test_official_tables import file_server
    data = published_flux_checkpoint(tmp_path / "final-step.pt", torch.eye(3) * 0.9, torch.ones(3))
    name = "dyweight-flux-nfe3"
    monkeypatch.setitem(imp.OFFICIAL_FILES, name, imp.OFFICIAL_FILES[name]._replace(
        size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    out = tmp_path / "nfe3.safetensors"
    with file_server({name: data}) as server:
        monkeypatch.setenv(imp.BASE_URL_ENV, server.url)
        assert imp.main(["--official", name, str(out)]) == 0, capsys.readouterr().err
        assert server.requests == ["/dyweight_flux/checkpoints/dyweight_nfe3.pt"]
    prov = EPDParams.load(out).metadata["provenance"]
    assert prov["official_name"] == name and prov["official_url"] == (
        f"{dyweight_format.BASE_URL}/dyweight_flux/checkpoints/dyweight_nfe3.pt")
