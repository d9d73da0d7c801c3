"""Bad input never hangs, never allocates without bound, never returns a silent black image."""
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epd_core.demo.gmm import GaussianMixtureDenoiser
from epd_core.tables.params import EPDParams, EPDParamsError
from epd_core.sampling.schedules import polynomial, with_final_zero
from epd_core.sampling.paper import EPDSamplingError, PointEvaluator, sample_epd, sample_epd_plugin

VALID = EPDParams.from_values(torch.full((5, 2), 0.5), torch.full((5, 2), 0.5), solver="epd",
                              schedule={"type": "polynomial", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0,
                                        "sigmas": polynomial(6, 0.002, 80).tolist()}).to_bytes()
FUZZ_CASES = {"count": 0}


def _load_or_clear_error(data: bytes):
    FUZZ_CASES["count"] += 1
    try:
        EPDParams.from_bytes(data, source="fuzz.safetensors")
    except EPDParamsError as e:
        assert "fuzz.safetensors" in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_truncation_and_byte_flips(data):
    blob = bytearray(VALID)
    cut = data.draw(st.integers(0, len(blob)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), max_size=8))
    for pos, val in flips:
        blob[pos] = val
    _load_or_clear_error(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob))


@settings(max_examples=150, deadline=None)
@given(shape=st.lists(st.integers(0, 2 ** 40), min_size=0, max_size=4),
       dtype=st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "F64", "XX"]),
       meta=st.dictionaries(st.sampled_from(["solver", "max_order", "afs", "schedule", "num_points", "num_steps"]),
                            st.one_of(st.none(), st.integers(-5, 10 ** 12), st.text(max_size=8),
                                      st.lists(st.floats(), max_size=4)), max_size=4))
def test_fuzz_lying_headers_huge_shapes_and_metadata(shape, dtype, meta):
    """Headers may claim any shape/dtype (e.g. 2^40 rows): we must refuse before allocating anything."""
    header = {n: {"dtype": dtype, "shape": shape, "data_offsets": [0, 16]} for n in
              ("theta_r", "theta_w", "theta_c", "theta_a")}
    header["__metadata__"] = {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
                              "epd_metadata": json.dumps(meta)}
    raw = json.dumps(header).encode()
    _load_or_clear_error(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=64))
def test_fuzz_non_utf8_metadata(junk):
    raw = b'{"__metadata__": {"epd_format_version": "1", "epd_metadata": "' + junk + b'"}}'
    _load_or_clear_error(struct.pack("<Q", len(raw)) + raw)


def test_report_fuzz_count():
    print(f"fuzz cases run: {FUZZ_CASES['count']}")
    assert FUZZ_CASES["count"] >= 500


# ---- sampling faults ------------------------------------------------------------------------------------
def _model_and_table(steps=4, k=2):
    return (GaussianMixtureDenoiser(dim=8), EPDParams.neutral(steps, k))


class ConvDenoiser(torch.nn.Module):
    """A small real network on any spatial shape (image 4-D or video 5-D latents)."""
    def __init__(self, channels, video=False):
        super().__init__()
        conv = torch.nn.Conv3d if video else torch.nn.Conv2d
        self.net = conv(channels, channels, 3, padding=1)

    def forward(self, x, sigma, **_):
        scale = (1 / (1 + sigma ** 2)).view(-1, *([1] * (x.dim() - 1)))
        return self.net(x * scale) * 0.1 + x * scale


@pytest.mark.parametrize("batch", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(4, 7, 5), (16, 3, 9), (4, 3, 6, 5)])  # odd sizes; 5-D video latent
def test_batches_odd_sizes_and_video_latents_match_sequential(batch, shape):
    torch.manual_seed(0)
    model = ConvDenoiser(shape[0], video=len(shape) == 4).eval()
    params = EPDParams.neutral(3, 3)
    sigmas = with_final_zero(polynomial(4, 0.03, 14.6)).float()
    x = torch.randn(batch, *shape) * 14.6
    with torch.no_grad():
        batched = sample_epd(model, x, sigmas, params, disable=True)
        seq = sample_epd(model, x, sigmas, params, sequential=True, disable=True)
        chunked = sample_epd_plugin(model, x, sigmas, params, max_batch=batch * 2, disable=True)
        chunked_ref = sample_epd_plugin(model, x, sigmas, params, disable=True)
    assert batched.shape == x.shape and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, seq, rtol=1e-5, atol=1e-5)  # conv reduction order differs by batch size
    torch.testing.assert_close(chunked, chunked_ref, rtol=1e-5, atol=1e-5)


def test_out_of_memory_splits_the_batch_and_remembers():
    model = GaussianMixtureDenoiser(dim=8)
    seen = []

    def tight(x, s, **kw):  # a device that cannot hold more than 4 samples at once
        seen.append(x.shape[0])
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(x, s)
    params = EPDParams.neutral(4, 3)
    sigmas = with_final_zero(polynomial(5, 0.002, 80))
    x = torch.randn(2, 8, dtype=torch.float64) * 80
    out = sample_epd(tight, x, sigmas, params, disable=True)
    ref = sample_epd(model, x, sigmas, params, sequential=True, disable=True)
    torch.testing.assert_close(out, ref)
    # step 0: d_cur (2), the 3-point call (6) fails, halving 3 -> 1 point per call (2, 2, 2); remembered after
    assert seen[:5] == [2, 6, 2, 2, 2]
    assert max(seen[5:]) == 2


def test_evaluator_reports_calls():
    model = GaussianMixtureDenoiser(dim=4)
    ev = PointEvaluator(model, max_batch=3)
    ev(torch.randn(3, 2, 4), torch.tensor([1.0, 2.0, 3.0]))
    assert ev.calls == 3  # max_batch 3 with batch 2 -> one whole point per call


# ---- NaN / inf from the model or the input, bad sigma lists, empty lists: both solvers -------------------
@pytest.mark.parametrize("solver", [sample_epd, sample_epd_plugin])
@pytest.mark.parametrize("bad_call,step,poison", [
    (2, 0, float("nan")),   # step 0's batched K-point call
    (4, 1, float("inf")),   # step 1's K-point call, inf instead of NaN
    (5, 2, float("nan")),   # step 2's d_cur call
    (9, 4, float("nan")),   # the final step to sigma 0
])
def test_nan_or_inf_mid_run_names_the_step(solver, bad_call, step, poison):
    model, params = _model_and_table()  # 4 rows, K=2, no AFS: calls 2i+1 (d_cur) and 2i+2 (points), 9 = final
    sigmas = with_final_zero(polynomial(5, 0.002, 80)).float()
    calls = {"n": 0}

    def flaky(x, s, **kw):
        calls["n"] += 1
        out = model(x, s)
        return out * poison if calls["n"] == bad_call else out
    with pytest.raises(EPDSamplingError, match=rf"NaN/inf at step {step} \(sigma"):
        solver(flaky, torch.randn(2, 8) * 80, sigmas, params, disable=True)


def test_nan_in_the_input_latent_is_an_error_not_a_black_image():
    model, params = _model_and_table()
    x = torch.randn(2, 8) * 80
    x[1, 3] = float("nan")
    with pytest.raises(EPDSamplingError, match="input latent already contains NaN/inf before the first step"):
        sample_epd(model, x, with_final_zero(polynomial(5, 0.002, 80)).float(), params, disable=True)


@pytest.mark.parametrize("solver", [sample_epd, sample_epd_plugin])
@pytest.mark.parametrize("sigmas,match", [
    ([80.0, 10.0, 20.0, 0.0], "strictly descending"),
    ([80.0, 10.0, 10.0, 0.0], "strictly descending"),
    ([80.0, 10.0, 1.0, 2.0, 0.0], "strictly descending"),  # goes up again late in the list
    ([0.0, 10.0], "strictly descending"),
    ([80.0, float("nan"), 0.0], "NaN"),
    ([float("inf"), 10.0, 0.0], "NaN or inf"),
    ([80.0, -1.0], ">= 0"),
    ([[80.0, 10.0], [1.0, 0.0]], "1-D"),
])
def test_bad_sigmas_are_refused_clearly(solver, sigmas, match):
    model, params = _model_and_table()
    with pytest.raises(EPDSamplingError, match=match):
        solver(model, torch.randn(1, 8), torch.tensor(sigmas), params, disable=True)


@pytest.mark.parametrize("sigmas", [[], [5.0]])
def test_empty_or_single_sigma_list_returns_the_input_like_comfyui(sigmas, comfy_sampling):
    """No step to take: the input comes back unchanged, as from ComfyUI's own k-diffusion samplers."""
    model, params = _model_and_table()
    x = torch.randn(2, 8)
    sig = torch.tensor(sigmas)
    for solver in (sample_epd, sample_epd_plugin):
        assert torch.equal(solver(model, x, sig, params, disable=True), x)
    assert torch.equal(comfy_sampling.sample_euler(model, x, sig, disable=True), x)


# ---- which equality holds: bit-identical reruns, float-tolerance chunking ---------------------------------
@pytest.mark.parametrize("solver", [sample_epd, sample_epd_plugin])
def test_same_seed_is_bit_identical_for_both_solvers_batched_and_chunked(solver):
    """Same seed, same settings, same process -> torch.equal (not just close), also through max_batch chunks."""
    torch.manual_seed(0)
    model = ConvDenoiser(4).eval()
    params = EPDParams.neutral(3, 3)
    sigmas = with_final_zero(polynomial(4, 0.03, 14.6)).float()
    for max_batch in (None, 2):
        runs = []
        for _ in range(2):
            x = torch.randn(3, 4, 7, 5, generator=torch.Generator().manual_seed(11)) * 14.6
            with torch.no_grad():
                runs.append(solver(model, x, sigmas, params, max_batch=max_batch, disable=True))
        assert torch.equal(runs[0], runs[1])


CHUNK_DIFFS = {}


@pytest.mark.parametrize("solver", [sample_epd, sample_epd_plugin])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_chunked_max_batch_equals_batched_to_float_tolerance(solver, dtype, tol):
    """max_batch splits the K-point call into calls of whole points (1, 1, 2, 3 of K=3 points here for a batch
    of 3). The maths is the same; only the model's kernels may sum in another order at another batch size
    (oneDNN / cuDNN choose algorithms by shape), so the guarantee is float tolerance: rtol = atol = 1e-5 in
    float32, 1e-12 in float64. On this CPU the results are in fact bit-identical (printed below)."""
    torch.manual_seed(0)
    model = ConvDenoiser(4).to(dtype).eval()
    params = EPDParams.neutral(3, 3)
    sigmas = with_final_zero(polynomial(4, 0.03, 14.6)).to(dtype)
    x = torch.randn(3, 4, 7, 5, generator=torch.Generator().manual_seed(5), dtype=dtype) * 14.6
    with torch.no_grad():
        batched = solver(model, x, sigmas, params, disable=True)
        for max_batch in (1, 3, 6, 9):
            chunked = solver(model, x, sigmas, params, max_batch=max_batch, disable=True)
            torch.testing.assert_close(chunked, batched, rtol=tol, atol=tol)
            key = (solver.__name__, str(dtype))
            CHUNK_DIFFS[key] = max(CHUNK_DIFFS.get(key, 0.0), (chunked - batched).abs().max().item())
    print(f"max |chunked - batched| {solver.__name__} {dtype}: {CHUNK_DIFFS[key]:.3g} (tolerance {tol:g})")
