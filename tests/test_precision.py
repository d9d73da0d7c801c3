"""fp16 / bf16 handling of the EPD step, and the call shapes a model sees during a run (docs/method.md, "A step").

- With low-precision latents the K directions are combined in >= fp32 (`epd_step`'s `acc`), so one step from a
  bf16/fp16 x equals the exact (float64) combination of the same model outputs, correctly rounded to bf16/fp16.
- A run calls the model with exactly two batch sizes, B (d_cur) and B*K (the K points), with the same dtype and
  trailing shape every step, so a compiled model (torch.compile) is not recompiled per step.
"""
import pytest
import torch

from epd_core.demo.models import DemoDenoiser, karras_sigmas, load_demo_model
from epd_core.tables.params import EPDParams
from epd_core.sampling.paper import PointEvaluator, epd_step, sample_epd, sample_epd_plugin

B = 8
COND = torch.arange(B) % 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The demo model is tiny: one thread is as fast, and immune to OpenMP threads spinning on busy cores
    (on a loaded 2-core machine two threads made every call ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nets():
    return {torch.float32: load_demo_model(), torch.bfloat16: load_demo_model().to(torch.bfloat16)}


def low_precision_model(nets, dtype, out_dtype):
    """The demo model with CFG 2, its network in bf16 (fp32 network for fp16 latents: fp16 convs are not
    available on every CPU build), returning `out_dtype` (None: what DemoDenoiser returns, float32)."""
    net = nets[torch.bfloat16] if dtype == torch.bfloat16 else nets[torch.float32]
    den = DemoDenoiser(net, cfg=2.0)

    def model(x, sigma, **kw):
        out = den(x.float() if dtype == torch.float16 else x, sigma.float(), **kw)
        return out if out_dtype is None else out.to(out_dtype)
    return model


def ulp(ref: torch.Tensor, dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |ref| (float64)."""
    mag = ref.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(mag))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_out", ["same", "float32"])
def test_low_precision_step_is_the_exact_combination_correctly_rounded(nets, dtype, model_out):
    torch.manual_seed(0)
    model = low_precision_model(nets, dtype, dtype if model_out == "same" else torch.float32)
    x = (torch.randn(B, 1, 8, 8) * 6).to(dtype)
    t_cur, t_next = torch.tensor(6.0), torch.tensor(3.5)
    rows = EPDParams.from_values([[0.2, 0.5, 0.85]], [[0.2, 0.3, 0.5]], [[1.03, 0.98, 1.01]],
                                 scale_dir=0.05).activated()
    r, w, c, a = (rows[n][0] for n in "rwca")
    with torch.no_grad():
        d_cur = (x - model(x, t_cur * x.new_ones(B), cond=COND)) / t_cur
        evaluator = PointEvaluator(model, {"cond": COND})
        seen = {}

        def recording(xs, sigmas):
            seen["xs"], seen["out"] = xs, evaluator(xs, sigmas)
            return seen["out"]
        got = epd_step(recording, x, d_cur, t_cur, t_next, r, w, c, a)

    # the exact combination of the very same points and model outputs, in float64
    shape = (-1, 1, 1, 1, 1)
    t_k = t_next.double() ** r.double() * t_cur.double() ** (1 - r.double())
    d_k = (seen["xs"].double() - seen["out"].double()) / t_k.view(shape)
    exact = x.double() + (t_next - t_cur).double() * ((w * c).double().view(shape) * d_k).sum(0)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = (got.double() - exact).abs() / ulp(exact, dtype)
    assert err.max() <= 0.5001, f"not correctly rounded: {err.max():.3f} ulp"  # fp32 accumulation, one rounding
    assert torch.equal(got, exact.to(dtype)) or (got != exact.to(dtype)).float().mean() < 0.01

    # accumulating in the latent dtype instead would be visibly worse (the test can tell the difference)
    naive_dk = (seen["xs"].to(dtype) - seen["out"].to(dtype)) / t_k.view(shape).to(dtype)
    naive = x + (t_next - t_cur).to(dtype) * ((w * c).to(dtype).view(shape) * naive_dk).sum(0)
    naive_err = (naive.double() - exact).abs() / ulp(exact, dtype)
    print(f"{dtype} model->{model_out}: max error {err.max():.3f} ulp (accumulating in {dtype}: "
          f"{naive_err.max():.1f} ulp)")
    assert naive_err.max() > 2


def test_fp32_latents_are_unchanged_by_the_low_precision_path():
    """The upcasts in epd_step are no-ops for fp32 / fp64 latents: bit-identical to a plain expression."""
    model = DemoDenoiser(load_demo_model(), cfg=2.0)
    x = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 6
    t_cur, t_next = torch.tensor(6.0), torch.tensor(3.5)
    r, w, c, a = torch.tensor([0.3, 0.7]), torch.tensor([0.4, 0.6]), torch.tensor([1.0, 1.02]), torch.ones(2)
    with torch.no_grad():
        d_cur = (x - model(x, t_cur.expand(B), cond=COND)) / t_cur
        got = epd_step(PointEvaluator(model, {"cond": COND}), x, d_cur, t_cur, t_next, r, w, c, a)
        t_k = t_next ** r * t_cur ** (1 - r)
        x_k = x.unsqueeze(0) + (t_k - t_cur).view(-1, 1, 1, 1, 1) * d_cur.unsqueeze(0)
        den = model(x_k.reshape(2 * B, 1, 8, 8), (a * t_k).repeat_interleave(B), cond=COND).reshape(x_k.shape)
        d_k = (x_k - den) / t_k.view(-1, 1, 1, 1, 1)
        d_mix = ((w * c).view(-1, 1, 1, 1, 1) * d_k).sum(0)
        expected = x + (t_next - t_cur) * d_mix
    assert torch.equal(got, expected)


class ShapeRecorder:
    """Wraps a model (the sampler-level callable) and the network inside it, recording every call."""

    def __init__(self, model, net=None):
        self.model, self.calls, self.net_calls = model, [], []
        if net is not None:
            net.register_forward_hook(lambda mod, args, out: self.net_calls.append((tuple(args[0].shape),
                                                                                     args[0].dtype)))

    def __call__(self, x, sigma, **kw):
        self.calls.append((tuple(x.shape), x.dtype, tuple(sigma.shape), sigma.dtype))
        return self.model(x, sigma, **kw)


@pytest.mark.parametrize("variant,K,dtype", [(v, k, torch.float32) for v in ("epd", "epd_afs", "plugin")
                                             for k in (2, 3)]
                         + [("epd", 3, torch.bfloat16), ("plugin", 2, torch.bfloat16)])  # bf16 convs are slow on CPU
def test_model_sees_exactly_two_batch_sizes_every_step(variant, K, dtype):
    """ComfyUI's case (fp32 latents) and an all-bf16 model: the d_cur call has batch B, the K-point call B*K,
    in every step, with one dtype and one trailing shape; inside CFG the network sees 2B and 2BK."""
    net = load_demo_model().to(dtype)
    den = DemoDenoiser(net, cfg=2.0)
    model = den if dtype == torch.float32 else (lambda x, s, **kw: den(x, s, **kw).to(x.dtype))
    rec = ShapeRecorder(model, net)
    steps = 6
    sigmas = karras_sigmas(steps, 0.0292, 14.6146)  # ends in 0: the last step is one Euler call
    params = EPDParams.neutral(steps - 1, K)
    x = (torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 14.6).to(dtype)
    sampler = sample_epd_plugin if variant == "plugin" else sample_epd
    with torch.no_grad():
        out = sampler(rec, x, sigmas, params, extra_args={"cond": COND}, afs=variant == "epd_afs", disable=True)
    assert torch.isfinite(out).all()
    batches = [shape[0] for shape, *_ in rec.calls]
    assert set(batches) == {B, B * K}
    assert batches.count(B * K) == steps - 1  # one batched K-point call per step to a positive sigma
    assert {shape[1:] for shape, *_ in rec.calls} == {(1, 8, 8)}
    assert {dt for _, dt, _, _ in rec.calls} == {dtype}
    assert {sdt for *_, sdt in rec.calls} == {dtype}  # sigma * s_in in the latent dtype, as ComfyUI's samplers
    assert all(sshape == (shape[0],) for shape, _, sshape, _ in rec.calls)
    assert {s[0] for s, _ in rec.net_calls} == {2 * B, 2 * B * K}  # cond + uncond in one call
    assert {dt for _, dt in rec.net_calls} == {dtype}
