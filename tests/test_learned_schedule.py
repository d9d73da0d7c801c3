"""Learned step schedules and tables whose last row steps to sigma 0 (no final model call), on the exact
Gaussian-mixture denoiser: the parametrisation, the exactness of the step to zero, the NFE a table costs, and
that learning the sigmas with the table lowers the held-out error."""
import pytest
import torch
from conftest import default_dtype

from epd_core.training.distill import DistillConfig, DistillError, distill
from epd_core.tables.params import EPDParams
from epd_core.sampling.schedules import polynomial, schedule_logits, sigmas_from_logits
from epd_core.sampling.paper import EPDSamplingError, integrate, sample_epd, sample_epd_plugin

DIM, SMIN, SMAX = 32, 0.002, 80.0


pytestmark = pytest.mark.usefixtures("float64_one_thread")


@pytest.fixture(scope="module")
def gmm(gmm32):
    return gmm32


def noise_fn(g, n):
    return SMAX * torch.randn(n, DIM, generator=g, dtype=torch.float64)


class CountingModel:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.model(x, sigma, **kw)


def test_schedule_logits_round_trip_and_any_logits_give_a_valid_schedule():
    sig = polynomial(5, 0.1, SMAX)
    torch.testing.assert_close(sigmas_from_logits(sig[0], SMIN, schedule_logits(sig, SMIN)), sig)
    for seed in range(20):
        logits = 5 * torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        s = sigmas_from_logits(torch.tensor(SMAX), SMIN, logits)
        assert s[0] == SMAX and (s[1:] < s[:-1]).all() and (s > SMIN).all()
    with pytest.raises(ValueError, match="floor"):
        schedule_logits(sig, 0.5)  # the floor must lie below the last sigma


def test_step_to_zero_is_exact_on_a_linear_ode():
    """D = 0 (pure noise): the ODE solution is x * sigma / sigma_0, so x(0) = 0 exactly; a to_zero table gets
    there from any positions and weights, while stopping at the last sigma would leave x * sigma_N / sigma_0."""
    x = torch.randn(4, DIM, dtype=torch.float64)
    sig = polynomial(3, 0.5, SMAX)
    table = EPDParams.from_values(torch.tensor([[0.2, 0.7], [0.4, 0.9]]), torch.tensor([[0.3, 0.7], [0.5, 0.5]]))
    rows = {k: v.double() for k, v in table.activated().items()}
    zero = lambda x, s, **kw: torch.zeros_like(x)  # noqa: E731
    out = integrate(zero, x, sig, rows, disable=True, to_zero=True)
    assert out.abs().max() < 1e-12
    torch.testing.assert_close(integrate(zero, x, sig, rows, disable=True), x * 0.5 / SMAX)
    with pytest.raises(EPDSamplingError, match="positive sigmas"):
        integrate(zero, x, torch.cat([sig, sig.new_zeros(1)]), rows, disable=True, to_zero=True)


@pytest.fixture(scope="module")
def tables(gmm):
    """Tables of 2 rows at latency NFE 4 (to_zero, no AFS): fixed polynomial sigmas vs learned ones."""
    with default_dtype(torch.float64):
        sig = polynomial(3, 0.3, SMAX).tolist()
        base = dict(sigmas=sig, to_zero=True, objective="end_to_end", iterations=60, batch=16, num_batches=4,
                    lr=0.05, schedule_lr=0.05, teacher_sigma_min=SMIN, model_family="gmm")
        fixed = distill(gmm, None, noise_fn, DistillConfig(**base))
        learned = distill(gmm, None, noise_fn, DistillConfig(**base, learn_schedule=True))
    return fixed, learned


def test_learned_schedule_table_records_its_sigmas_and_costs_its_latency_nfe(gmm, tables):
    _, learned = tables
    spec = learned.schedule
    assert spec["learned"] and spec["to_zero"] and spec["override_sigmas"] and not spec["final_zero"]
    sig = torch.tensor(spec["sigmas"])
    assert sig[0] == SMAX and (sig[1:] < sig[:-1]).all() and sig[-1] > SMIN
    assert not torch.allclose(sig, polynomial(3, 0.3, SMAX))  # the sigmas moved
    assert learned.metadata["latency_nfe"] == 4
    m = CountingModel(gmm)
    x = SMAX * torch.randn(8, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # a ComfyUI-style list (any step count, ending in 0) is replaced by the table's own sigmas; no final call
    out = sample_epd(m, x, torch.cat([polynomial(7, SMIN, SMAX), torch.zeros(1)]), learned, disable=True)
    assert m.calls == 4 and torch.isfinite(out).all()


def test_learning_the_schedule_lowers_the_held_out_error(gmm, tables):
    fixed, learned = tables
    x = SMAX * torch.randn(128, DIM, generator=torch.Generator().manual_seed(4321), dtype=torch.float64)
    ref_sig = torch.cat([polynomial(400, SMIN, SMAX), torch.zeros(1)])
    import epd_core.training.distill as D
    ref = D.teacher_states(gmm, x, ref_sig, "heun", 0)[-1]

    def err(t):
        return (sample_epd(gmm, x, torch.tensor(t.schedule["sigmas"]), t, disable=True) - ref).square().mean().sqrt()
    e_fixed, e_learned = float(err(fixed)), float(err(learned))
    print(f"held-out RMSE at NFE 4: fixed sigmas {e_fixed:.4f}, learned {e_learned:.4f}")
    assert e_learned < 0.9 * e_fixed


def test_plugin_and_afs_with_a_learned_schedule(gmm):
    cfg = DistillConfig(sigmas=polynomial(4, 0.3, SMAX).tolist(), solver="epd_plugin", afs=True, to_zero=True,
                        learn_schedule=True, iterations=4, batch=4, num_batches=1, model_family="gmm")
    table = distill(gmm, None, noise_fn, cfg)
    assert table.metadata["latency_nfe"] == 5 and table.solver == "epd_plugin"
    m = CountingModel(gmm)
    sample_epd_plugin(m, SMAX * torch.randn(2, DIM, dtype=torch.float64), torch.tensor(table.schedule["sigmas"]),
                      table, disable=True)
    assert m.calls == 5


def test_bad_learned_schedule_settings_are_refused():
    sig = polynomial(3, 0.3, SMAX).tolist()
    with pytest.raises(DistillError, match="schedule_floor"):
        DistillConfig(sigmas=sig, learn_schedule=True, schedule_floor=1.0).validate()
    with pytest.raises(DistillError, match="to_zero"):
        DistillConfig(sigmas=sig + [0.0], to_zero=True).validate()


def test_demo_model_training_sees_how_the_network_moves_with_its_time_input():
    """The demo models' training wrapper rounds the timestep exactly like ComfyUI in the forward pass, but lets
    the gradient through the fractional index (straight-through): a learned sigma gets the network's part."""

    from epd_core.demo.models import DemoDenoiser
    from epd_core.demo.problems import demo_problem
    with default_dtype(torch.float32):
        grad_model = demo_problem("digits", guidance_scale=1.0).model
        plain = DemoDenoiser(grad_model.net)
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.3, 2.0], requires_grad=True)
        out = grad_model(x, sigma, cond=[1, 2])
        torch.testing.assert_close(out, plain(x, sigma.detach(), cond=[1, 2]), rtol=0, atol=0)
        (g_st,) = torch.autograd.grad(out.square().sum(), sigma)
        grad_model.timestep = lambda s: DemoDenoiser.timestep(grad_model, s)  # rounding only: no time gradient
        (g_round,) = torch.autograd.grad(grad_model(x, sigma, cond=[1, 2]).square().sum(), sigma)
    assert torch.isfinite(g_st).all() and (g_st - g_round).abs().min() > 1e-3 * g_round.abs().max()


def test_progress_ends_at_the_callers_step_count_when_the_table_brings_its_own_sigmas(gmm, tables):
    _, learned = tables  # 2 rows, while the caller's list has 6 steps
    seen = []
    x = SMAX * torch.randn(2, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sample_epd(gmm, x, torch.cat([polynomial(6, SMIN, SMAX), torch.zeros(1)]), learned, disable=True,
               callback=lambda info: seen.append(info["i"]))
    assert seen == [2, 5]  # ComfyUI shows i + 1 of 6: 3/6, then 6/6
