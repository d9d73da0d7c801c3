"""Schedules: the closed forms, and 'discrete' / 'flowmatch' against ComfyUI's own model_sampling."""
import math

import pytest
import torch

from epd_core.sampling import schedules
def test_polynomial_logsnr_time_uniform_endpoints_and_order():
    for s in (schedules.polynomial(10, 0.002, 80, 7), schedules.logsnr(10, 0.002, 80),
              schedules.time_uniform(10, 0.002, 80)):
        assert s.shape == (10,) and (s[1:] < s[:-1]).all()
        torch.testing.assert_close(s[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64), rtol=1e-9, atol=0)
    log = schedules.logsnr(5, 0.01, 100).log()
    torch.testing.assert_close(log.diff(), torch.full((4,), log.diff()[0].item(), dtype=torch.float64))


@pytest.fixture(scope="module")
def model_sampling(comfy_sampling):
    import comfy.model_sampling as ms

    class Config:  # what ComfyUI's model configs carry
        def __init__(self, **settings):
            self.sampling_settings = settings

    class SD15(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    return {"sd15": SD15(Config(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)),
            "sd3": ms.ModelSamplingDiscreteFlow(Config(shift=3.0, multiplier=1000)),
            "flux": ms.ModelSamplingFlux(Config(shift=1.15))}


@pytest.mark.parametrize("n", [2, 6, 11, 21])
def test_discrete_uses_the_models_own_sigmas(model_sampling, n):
    table = model_sampling["sd15"].sigmas.double()
    s = schedules.discrete(n, table, rho=1.0)
    expected_idx = torch.linspace(999, 0, n, dtype=torch.float64).round().long()
    torch.testing.assert_close(s, table[expected_idx], rtol=0, atol=0)
    assert s[0] == table[-1] and s[-1] == table[0]


@pytest.mark.parametrize("n", [3, 8, 29])
def test_flowmatch_matches_sd3_and_flux_model_sampling(model_sampling, n):
    sd3 = model_sampling["sd3"]
    t = torch.linspace(1.0, 1e-3, n, dtype=torch.float64)
    torch.testing.assert_close(schedules.flowmatch(n, shift=3.0, t_min=1e-3),
                               sd3.sigma(t * 1000).double(), rtol=1e-6, atol=1e-7)
    assert math.isclose(schedules.flowmatch(n, shift=3.0, t_min=1e-3)[-1].item(), float(sd3.sigma_min), rel_tol=1e-5)
    flux = model_sampling["flux"]
    t = torch.linspace(1.0, 1e-4, n, dtype=torch.float64)
    torch.testing.assert_close(schedules.flowmatch(n, mu=1.15, t_min=1e-4), flux.sigma(t).double(),
                               rtol=1e-6, atol=1e-7)
    assert math.isclose(schedules.flowmatch(n, mu=1.15, t_min=1e-4)[-1].item(), float(flux.sigma_min), rel_tol=1e-5)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError):
        schedules.polynomial(1, 0.002, 80)
    with pytest.raises(ValueError):
        schedules.logsnr(5, 1.0, 0.5)
    with pytest.raises(ValueError):
        schedules.explicit([1.0, 2.0])
    with pytest.raises(ValueError, match="MODEL"):
        schedules.sigmas_for({"type": "discrete"}, 4)
