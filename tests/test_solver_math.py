"""EPD's math against ComfyUI's own samplers on an exact Gaussian-mixture denoiser (docs/method.md, "A step")."""
import pytest
import torch
from conftest import default_dtype

from epd_core.demo.gmm import GaussianMixtureDenoiser, cfg_model
from epd_core.tables.params import EPDParams
from epd_core.sampling.schedules import polynomial, with_final_zero
from epd_core.sampling.paper import PointEvaluator, epd_step, integrate, sample_epd, sample_epd_plugin



@pytest.fixture(autouse=True)
def float64_by_default():
    """Reductions are checked to ~1e-10: build every tensor in float64, then restore the global default."""
    with default_dtype(torch.float64):
        yield


def setup(steps=8, batch=4, seed=1):
    model = GaussianMixtureDenoiser(dim=16, seed=0)
    sigmas = with_final_zero(polynomial(steps, 0.002, 80.0))
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80.0
    return model, sigmas, x


def table(steps, positions, weights, **meta):
    r = torch.tensor([positions] * steps, dtype=torch.float64)
    w = torch.tensor([weights] * steps, dtype=torch.float64)
    return EPDParams.from_values(r, w, **meta)


def test_k1_midpoint_equals_comfyui_dpm_2_step_for_step(comfy_sampling):
    model, sigmas, x = setup()
    params = table(len(sigmas) - 2, [0.5], [1.0])
    ours, theirs = [], []
    out = sample_epd(model, x, sigmas, params, callback=lambda d: ours.append(d["x"]), disable=True)
    ref = comfy_sampling.sample_dpm_2(model, x, sigmas, callback=lambda d: theirs.append(d["x"]), disable=True)
    assert len(ours) == len(theirs) == len(sigmas) - 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)  # |x| ~ 80: float64 reordering
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
    print("max |EPD(K=1,r=.5) - dpm_2| =", (out - ref).abs().max().item())


def test_k2_endpoints_converge_to_comfyui_heun(comfy_sampling):
    model, sigmas, x = setup()
    ref = comfy_sampling.sample_heun(model, x, sigmas, disable=True)
    errors = []
    for eps in (1e-2, 1e-4, 1e-7):
        params = table(len(sigmas) - 2, [eps, 1 - eps], [0.5, 0.5])
        errors.append((sample_epd(model, x, sigmas, params, disable=True) - ref).abs().max().item())
    print("max |EPD(K=2, r=(eps,1-eps)) - heun| for eps=1e-2,1e-4,1e-7:", errors)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


def test_plugin_order_1_equals_epd():
    model, sigmas, x = setup()
    params = table(len(sigmas) - 2, [0.3, 0.8], [0.4, 0.6], scale_dir=0.05)
    a = sample_epd(model, x, sigmas, params, disable=True)
    b = sample_epd_plugin(model, x, sigmas, params, max_order=1, disable=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sample_epd_plugin(model, x, sigmas, params, max_order=3, disable=True)
    assert (a - c).abs().max() > 1e-6  # a higher-order predictor really changes the points


def test_batched_step_equals_sequential_step_and_is_one_call():
    model, sigmas, x = setup()
    rows = table(1, [0.2, 0.6, 0.9], [0.2, 0.3, 0.5], scale_dir=0.05, scale_time=0.05).activated()
    rows["c"] = torch.tensor([[0.97, 1.02, 1.01]])
    rows["a"] = torch.tensor([[1.01, 0.99, 1.02]])
    t_cur, t_next = sigmas[2], sigmas[3]
    d = (x - model(x, t_cur.expand(4))) / t_cur
    batched, sequential = PointEvaluator(model), PointEvaluator(model, sequential=True)
    args = (x, d, t_cur, t_next, *(rows[n][0] for n in "rwca"))
    one = epd_step(batched, *args)
    seq = epd_step(sequential, *args)
    chunked = epd_step(PointEvaluator(model, max_batch=8), *args)  # 2 points (8 samples) per call
    torch.testing.assert_close(one, seq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one, chunked, rtol=1e-12, atol=1e-12)
    assert (batched.calls, sequential.calls) == (1, 3)


def test_step_formula_matches_the_spec_written_out():
    model, sigmas, x = setup(batch=2)
    r, w, c, a = [0.25, 0.75], [0.3, 0.7], [1.02, 0.98], [0.99, 1.01]
    t0, t1 = sigmas[1], sigmas[2]
    d_cur = (x - model(x, t0.expand(2))) / t0
    expected = torch.zeros_like(x)
    for k in range(2):
        t_k = t1 ** r[k] * t0 ** (1 - r[k])
        x_k = x + (t_k - t0) * d_cur
        d_k = (x_k - model(x_k, (a[k] * t_k).expand(2))) / t_k
        expected += w[k] * c[k] * d_k
    expected = x + (t1 - t0) * expected
    got = epd_step(PointEvaluator(model), x, d_cur, t0, t1, *map(torch.tensor, (r, w, c, a)))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_afs_saves_one_model_call_and_final_step_is_euler_to_zero():
    model, sigmas, x = setup(steps=5)
    params = table(4, [0.3, 0.7], [0.5, 0.5])
    model.calls = 0
    sample_epd(model, x, sigmas, params, disable=True)
    plain = model.calls
    model.calls = 0
    sample_epd(model, x, sigmas, params, afs=True, disable=True)
    assert (plain, model.calls) == (4 * 2 + 1, 4 * 2)  # 4 EPD steps (2 sequential calls) + Euler to 0


def test_cfg_conditioning_is_tiled_point_major():
    model, sigmas, x = setup()
    guided = cfg_model(model, 3.0)
    labels = torch.tensor([0, 3, 5, 7])
    params = table(len(sigmas) - 2, [0.3, 0.7], [0.5, 0.5])
    batched = sample_epd(guided, x, sigmas, params, extra_args={"cond": labels}, disable=True)
    seq = sample_epd(guided, x, sigmas, params, extra_args={"cond": labels}, sequential=True, disable=True)
    torch.testing.assert_close(batched, seq, rtol=1e-10, atol=1e-10)
    assert (model.mode_of(batched) == labels).all()  # guidance pulls each sample to its own class


def test_history_of_plugin_counts_afs_estimate():
    model, sigmas, x = setup(steps=6)
    rows = {k: v for k, v in table(5, [0.4], [1.0]).activated().items()}
    states = [x]
    integrate(model, x, sigmas, rows, max_order=4, afs=True, callback=lambda info: states.append(info["x_next"]))
    assert len(states) == len(sigmas)
    assert all(torch.isfinite(s).all() for s in states)


def test_table_with_override_sigmas_samples_on_its_own_schedule():
    """A table whose schedule says override_sigmas replaces a scheduler's full-denoise list by its training
    sigmas (same step count), rebuilds its polynomial schedule for other counts / img2img starts, and leaves
    everything alone without the flag or with own_schedule=False."""
    from epd_core.sampling.paper import table_schedule_for
    gmm = GaussianMixtureDenoiser(dim=16)
    own = polynomial(4, 0.3, 80.0)
    params = EPDParams.from_values(torch.full((3, 2), 0.5), torch.full((3, 2), 0.5),
                                   schedule={"type": "polynomial", "rho": 7.0, "sigma_min": 0.3, "sigma_max": 80.0,
                                             "sigmas": own.tolist(), "override_sigmas": True})
    karras = with_final_zero(polynomial(4, 0.002, 80.0))
    torch.testing.assert_close(table_schedule_for(params, karras), with_final_zero(own))
    assert table_schedule_for(params, with_final_zero(own)) is None  # already its own list
    more = table_schedule_for(params, with_final_zero(polynomial(6, 0.002, 80.0)))
    torch.testing.assert_close(more, with_final_zero(polynomial(6, 0.3, 80.0)))
    partial = table_schedule_for(params, with_final_zero(polynomial(4, 0.002, 5.0)))
    torch.testing.assert_close(partial, with_final_zero(polynomial(4, 0.3, 5.0)))
    assert table_schedule_for(params, polynomial(4, 0.002, 80.0)) is None  # no final 0: as given
    x = 80.0 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sample_epd(gmm, x, karras, params, disable=True),
                               sample_epd(gmm, x, with_final_zero(own), params, disable=True))
    as_given = sample_epd(gmm, x, karras, params, disable=True, own_schedule=False)
    assert not torch.allclose(as_given, sample_epd(gmm, x, karras, params, disable=True))
    plain = EPDParams.from_values(torch.full((3, 2), 0.5), torch.full((3, 2), 0.5),
                                  schedule={"type": "polynomial", "sigmas": own.tolist()})
    assert table_schedule_for(plain, karras) is None
