"""epd_core.sampling.plan: the one decision of which sigmas and rows a table gets on a sigma list. Every shipped table
gives the same samples through KSampler's path (its scheduler's list at the table's step count, the model carrying its
noise schedule) as through the benchmark's (bench/quality_vs_nfe.py: EPD Sigmas' list, plan.sampler_sigmas, on a
bare model)."""
import math
from pathlib import Path

import pytest
import torch

from epd_core.tables.params import EPDParams
from epd_core.sampling.plan import plan
from epd_core.sampling.plan import sampler_sigmas, with_own_sigmas
from epd_core.sampling.registry import variant

REPO = Path(__file__).resolve().parents[1]
TABLES = REPO / "pretrained_params"
SCHEDULERS = ("normal", "karras", "sgm_uniform", "exponential")
# the learned schedules that start below sigma_max (14.61): 14.44 and 14.27
MNIST = ("demo_mnist_epd_ms_nfe7", "demo_mnist_epd_ms_k1_nfe7", "demo_mnist_epd_ms_k1_nfe8", "demo_mnist_epd_nfe5",
         "demo_mnist_epd_plugin_nfe4")


class Patcher:
    def __init__(self, ms):
        self.ms = ms

    def get_model_object(self, name):
        return self.ms


class KSamplerModel:
    """What a KSampler entry's sampler function gets: a CFG wrapper whose patcher carries the model_sampling."""
    def __init__(self, model, ms):
        self.model = model
        self.inner_model = type("Inner", (), {"model_patcher": Patcher(ms)})()

    def __call__(self, x, sigma, **kw):
        return self.model(x, sigma, **kw)


def ksampler_steps(table: EPDParams) -> int:
    """The KSampler step count a table is picked for (nodes/tables.py _rank): its model calls for a "to_zero"
    table, else its rows plus the final step."""
    if table.to_zero:
        return variant(table.solver).calls_per_step * table.num_steps - int(table.afs)
    return table.num_steps + 1


@pytest.fixture(scope="module")
def models(comfy_ref):
    from epd_core.demo.models import DEMO_MODELS, DemoDenoiser, load_demo_model
    return {"digits": comfy_ref["denoiser"],
            "mnist": DemoDenoiser(load_demo_model(DEMO_MODELS["mnist"]["weights"]), cfg=2.0)}


def shipped():
    paths = sorted(TABLES.glob("demo_digits_*.safetensors"))
    paths += [TABLES / f"{name}.safetensors" for name in MNIST]
    return [p for p in paths if p.is_file()]


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_every_shipped_table_samples_the_same_through_ksampler_as_through_the_benchmark(path, comfy_ref, models):
    torch.manual_seed(0)
    table = EPDParams.load(path)
    ms = comfy_ref["ms"]
    model = models["mnist" if path.stem.startswith("demo_mnist") else "digits"]
    size = 28 if path.stem.startswith("demo_mnist") else 8
    x = math.sqrt(1 + float(ms.sigma_max) ** 2) * torch.randn(2, 1, size, size)  # KSampler's full-denoise noise
    extra = {"cond": torch.tensor([3, 7])}
    fn = variant(table.solver).sample_fn()
    with torch.no_grad():
        bench = fn(model, x, sampler_sigmas(table, ms).float(), table, extra_args=extra, disable=True)
        for scheduler in SCHEDULERS:
            sigmas = comfy_ref["samplers"].KSampler(comfy_ref["stub"], ksampler_steps(table), "cpu", table.solver,
                                                    scheduler).sigmas.float()
            wrapped = KSamplerModel(model, ms)
            ours = fn(wrapped, x, sigmas, with_own_sigmas(table, sigmas, ms), extra_args=extra, disable=True)
            torch.testing.assert_close(ours, bench, rtol=1e-5, atol=1e-5, msg=f"{path.stem} on {scheduler}")


def test_a_learned_schedule_below_sigma_max_runs_from_the_lists_first_sigma(comfy_ref):
    """The MNIST EPD-MS NFE 7 table's schedule starts at 14.44, KSampler's full denoise at sigma_max 14.61: its own
    sigmas run, the first one replaced by the list's (RMSE 0.028 against 0.035-0.072 on KSampler's lists, see
    epd_core/sampling/plan.py); a list starting lower (img2img) keeps row i for step i."""
    table = EPDParams.load(TABLES / "demo_mnist_epd_ms_nfe7.safetensors")
    ms = comfy_ref["ms"]
    own = table.schedule_sigmas
    assert float(own[0]) < 0.99 * float(ms.sigma_max)
    sigmas = comfy_ref["samplers"].KSampler(comfy_ref["stub"], 7, "cpu", "epd_ms", "karras").sigmas
    p = plan(table, sigmas, model_sampling=ms)
    assert p.own and p.mode == "exact" and p.to_zero and p.table is table
    torch.testing.assert_close(p.sigmas[1:], own[1:].to(p.sigmas))
    assert float(p.sigmas[0]) == float(sigmas[0])
    # EPD Sigmas' list (the benchmark's) is a full denoise too, without the model's sigma_max
    listed = sampler_sigmas(table, ms)
    assert float(listed[0]) == pytest.approx(float(ms.sigma_max)) and float(listed[-1]) == 0
    torch.testing.assert_close(plan(table, listed).sigmas, p.sigmas.to(listed), rtol=1e-6, atol=0)
    lower = comfy_ref["samplers"].KSampler(comfy_ref["stub"], 7, "cpu", "epd_ms", "karras", denoise=0.6).sigmas
    p = plan(table, lower, model_sampling=ms)
    assert not p.own and p.mode == "by_index" and torch.equal(p.sigmas, lower)
    assert plan(None, sigmas, solver="epd_ms").mode == "builtin"
