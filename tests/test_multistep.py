"""EPD-MS, the pack's one-call-per-step solver: an untrained table IS a ComfyUI built-in, a step is one batched
model call, training improves on the built-in it starts from, and its tables go through files, the registry and
distillation checkpoints like the paper's."""
import json

import pytest
import torch
from safetensors.torch import save as st_save

from epd_core.training.distill import DistillCancelled, DistillConfig, distill
from epd_core.sampling.epd import EPDSamplingError
from epd_core.sampling.multistep import BUILTINS, ms_table, sample_epd_ms
from epd_core.tables.params import TENSOR_NAMES, EPDParams, EPDParamsError
from epd_core.sampling.paper import sample_epd
from epd_core.sampling.registry import NAMES, SOLVERS, variant


def karras_list(k, steps, smin=0.002, smax=80.0):
    return k.get_sigmas_karras(steps, smin, smax, 7.0).double()


class CountingModel:
    """Forwards to a denoiser and records the batch size of every call."""
    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x, sigma, **kw):
        self.batches.append(x.shape[0])
        return self.model(x, sigma, **kw)


@pytest.mark.parametrize("builtin", BUILTINS)
@pytest.mark.parametrize("num_points", [1, 3])
def test_an_untrained_table_samples_exactly_as_its_builtin(comfy_sampling, gmm32, float64_one_thread, builtin,
                                                           num_points):
    sigmas = karras_list(comfy_sampling, 6)
    x = 80 * torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    expected = getattr(comfy_sampling, f"sample_{builtin}")(gmm32, x, sigmas, disable=True)
    table = EPDParams.from_bytes(ms_table(sigmas, builtin, num_points=num_points).to_bytes())  # through a file
    got = sample_epd_ms(gmm32, x, sigmas, table, disable=True)
    # to 1e-6: a file stores ipndm's 23/12, 55/24, ... as float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # no table at all: the named built-in on the given sigmas
    torch.testing.assert_close(sample_epd_ms(gmm32, x, sigmas, None, builtin=builtin, disable=True), expected,
                               rtol=0, atol=1e-6)


def test_one_step_is_one_model_call_with_the_k_points_batched(comfy_sampling, gmm32, float64_one_thread):
    sigmas = karras_list(comfy_sampling, 5)
    model = CountingModel(gmm32)
    x = 80 * torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    sample_epd_ms(model, x, sigmas, ms_table(sigmas, num_points=3), disable=True)
    assert model.batches == [3 * 2] * 5  # 5 steps = 5 sequential calls (latency NFE 5), each of K * B samples
    model.batches.clear()
    sample_epd_ms(model, x, sigmas, ms_table(sigmas, num_points=3), sequential=True, disable=True)
    assert model.batches == [2] * 15  # the fallback for graphs that cannot batch: one call per point


def test_distillation_beats_the_builtin_it_starts_from_on_held_out_noises(comfy_sampling, gmm32, float64_one_thread):
    sigmas = karras_list(comfy_sampling, 4)
    positive = sigmas[:-1].tolist() + [float(sigmas[-2]) / 2]  # the last positive sigma anchors the step to 0
    cfg = DistillConfig(sigmas=positive, solver="epd_ms", num_points=2, to_zero=True, objective="end_to_end",
                        learn_schedule=True, schedule_floor=1e-4, lr=0.01, schedule_lr=0.02, iterations=120,
                        batch=16, num_batches=4, model_family="gmm")
    table = distill(gmm32, None, lambda g, n: 80 * torch.randn(n, 32, generator=g, dtype=torch.float64), cfg)
    assert table.solver == "epd_ms" and table.metadata["latency_nfe"] == 4 and table.num_points == 2
    x = 80 * torch.randn(128, 32, generator=torch.Generator().manual_seed(99), dtype=torch.float64)  # held out
    ref = comfy_sampling.sample_heun(gmm32, x, karras_list(comfy_sampling, 400), disable=True)
    rmse = lambda out: float((out - ref).square().mean().sqrt())  # noqa: E731
    start = rmse(comfy_sampling.sample_gradient_estimation(gmm32, x, sigmas, disable=True))
    model = CountingModel(gmm32)
    trained = rmse(sample_epd_ms(model, x, sigmas, EPDParams.from_bytes(table.to_bytes()), disable=True))
    assert len(model.batches) == 4  # on its own learned sigmas: still 4 calls
    assert trained < 0.8 * start, (trained, start)


def test_an_interrupted_run_resumes_to_the_same_table(tmp_path, comfy_sampling, gmm32, float64_one_thread):
    sigmas = karras_list(comfy_sampling, 3)
    positive = sigmas[:-1].tolist() + [float(sigmas[-2]) / 2]
    noise = lambda g, n: 80 * torch.randn(n, 32, generator=g, dtype=torch.float64)  # noqa: E731
    cfg = DistillConfig(sigmas=positive, solver="epd_ms", num_points=2, to_zero=True, objective="end_to_end",
                        learn_schedule=True, schedule_floor=1e-4, lr=0.01, iterations=12, batch=4, num_batches=2,
                        checkpoint_interval=4, checkpoint_path=str(tmp_path / "run.ckpt"))
    whole = distill(gmm32, None, noise, DistillConfig(**{**cfg.__dict__, "checkpoint_path": None}))
    done = [0]
    with pytest.raises(DistillCancelled):  # Cancel after 6 iterations: the checkpoint of iteration 4 stays
        distill(gmm32, None, noise, cfg, progress=lambda it, loss: done.__setitem__(0, it),
                should_stop=lambda: done[0] >= 6)
    resumed = distill(gmm32, None, noise, DistillConfig(**{**cfg.__dict__, "resume": True}))
    for a, b in zip(whole.tensors(), resumed.tensors()):
        torch.testing.assert_close(a, b)
    assert whole.schedule["sigmas"] == pytest.approx(resumed.schedule["sigmas"])


def test_tables_and_solvers_do_not_mix(comfy_sampling, gmm32, tmp_path):
    sigmas = karras_list(comfy_sampling, 4)
    ms = ms_table(sigmas, num_points=2)
    x = torch.randn(1, 32, dtype=torch.float64)
    with pytest.raises(EPDSamplingError, match="sample it with epd_ms"):
        sample_epd(gmm32, x, sigmas, ms, disable=True)
    paper = EPDParams.neutral(3, 2)
    with pytest.raises(EPDSamplingError, match="needs an epd_ms table"):
        sample_epd_ms(gmm32, x, sigmas, paper, disable=True)
    # a file that claims epd_ms without its history coefficients is refused with the fix
    header = {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
              "epd_metadata": json.dumps(dict(ms.metadata, num_steps=4, num_points=2))}
    path = tmp_path / "broken.safetensors"
    path.write_bytes(st_save(dict(zip(TENSOR_NAMES, ms.tensors())), metadata=header))  # theta_h left out
    with pytest.raises(EPDParamsError, match=r"broken\.safetensors: an epd_ms table needs 'theta_h'"):
        EPDParams.load(path)


def test_tables_from_before_the_past_denoised_terms_sample_as_before(comfy_sampling, gmm32, float64_one_thread,
                                                                   tmp_path):
    """theta_h had 3 columns (past directions) before the 3 of the past denoised outputs: such a file still loads
    and samples exactly as the 6-column table with those 3 at 0."""
    sigmas = karras_list(comfy_sampling, 5)
    new = EPDParams.from_bytes(ms_table(sigmas, "ipndm", num_points=2).to_bytes())
    assert tuple(new.theta_h.shape) == (5, 6)
    old = new.with_tensors([*new.tensors()[:4], new.theta_h[:, :3]])
    old = EPDParams.from_bytes(old.to_bytes())
    x = 80 * torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sample_epd_ms(gmm32, x, sigmas, old, disable=True),
                               sample_epd_ms(gmm32, x, sigmas, new, disable=True), rtol=0, atol=1e-9)


def test_coefficients_no_training_could_give_are_refused_on_load(comfy_sampling, tmp_path):
    """EPD-MS coefficients are free numbers; a crafted 3e38 would overflow every image, so a file beyond the bound
    is refused naming the tensor and the limit."""
    table = ms_table(karras_list(comfy_sampling, 4))
    h = table.theta_h.clone()
    h[1, 4] = 3e38
    path = tmp_path / "crafted.safetensors"
    header = {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
              "epd_metadata": json.dumps(dict(table.metadata, num_steps=4, num_points=1))}
    tensors = dict(zip((*TENSOR_NAMES, "theta_h"), (t.float() for t in (*table.tensors()[:4], h))))
    path.write_bytes(st_save(tensors, metadata=header))
    with pytest.raises(EPDParamsError, match=r"crafted\.safetensors: 'theta_h' has a coefficient of magnitude "
                                             r"3e\+38, beyond the limit 100"):
        EPDParams.load(path)


def test_a_table_on_other_step_counts_falls_back_to_its_builtin(comfy_sampling, gmm32, float64_one_thread):
    """KSampler with 5 steps and a 4-step table: no row per step, so the untrained built-in runs (logged), never
    a guess; strict mode refuses instead."""
    table = ms_table(karras_list(comfy_sampling, 4), num_points=2)
    sigmas = karras_list(comfy_sampling, 5, smax=40.0)  # another list: the table's own schedule does not apply
    x = 40 * torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    expected = comfy_sampling.sample_gradient_estimation(gmm32, x, sigmas, disable=True)
    torch.testing.assert_close(sample_epd_ms(gmm32, x, sigmas, table, disable=True), expected, rtol=0, atol=1e-6)
    with pytest.raises(EPDSamplingError, match="5 steps, this EPD-MS table 4"):
        sample_epd_ms(gmm32, x, sigmas, table, strict=True, disable=True)


def test_the_registry_names_every_variant_once_and_their_costs():
    assert NAMES[:3] == ("epd", "epd_plugin", "epd_ms") and len(set(NAMES)) == len(NAMES)  # the paper's first
    assert [SOLVERS[n].calls_per_step for n in NAMES[:3]] == [2, 2, 1]
    assert variant("epd_ms").sample_fn() is sample_epd_ms and not variant("epd_ms").rl
    with pytest.raises(ValueError, match="use one of " + ", ".join(NAMES)):
        variant("dpm_2")


@pytest.mark.parametrize("loss", ["mse", "rmse"])
def test_the_teacher_target_of_a_step_to_zero_ends_at_the_models_lowest_sigma(comfy_sampling, gmm32,
                                                                              float64_one_thread, loss):
    """The anchor below the teacher's end sigma (ComfyUI's lists end at sigma_min; the anchor sits at half of it)
    is not where the ODE ends: the target is D(x(sigma_min)), as the benchmark's reference and every built-in
    end, not D(x(anchor)). The loss is the batch's mean squared error, or the mean of per-sample RMSEs."""
    from epd_core.training.distill import make_batch
    from epd_core.training.teachers import teacher_states
    sigmas = karras_list(comfy_sampling, 4, smin=0.5)
    positive = sigmas[:-1].tolist() + [float(sigmas[-2]) / 2]
    cfg = DistillConfig(sigmas=positive, solver="epd_ms", to_zero=True, objective="end_to_end", lr=1e-12,
                        iterations=1, batch=8, num_batches=1, teacher_sigma_min=0.5, loss=loss)
    noise = lambda g, n: 80 * torch.randn(n, 32, generator=g, dtype=torch.float64)  # noqa: E731
    losses = []
    distill(gmm32, None, noise, cfg, history=losses)
    x0, _ = make_batch(0, cfg, noise, None)
    student = sample_epd_ms(gmm32, x0, sigmas, None, disable=True)  # the untrained table: gradient_estimation

    def loss_to(end_list):
        target = teacher_states(gmm32, x0, torch.tensor(end_list), cfg.teacher, cfg.inserted_steps, {}, None,
                                cfg.teacher_steps, cfg.teacher_sigma_min)[-1]
        err = (student - target).square()
        return float(err.mean() if loss == "mse" else err.mean(1).sqrt().mean())
    assert losses[0] == pytest.approx(loss_to(sigmas.tolist()), rel=1e-6)  # ends sigma_min, then 0
    assert abs(loss_to(positive + [0.0]) - losses[0]) > 0.01 * losses[0]  # was: on to the anchor, then 0


@pytest.mark.parametrize("solver,flag,expected", [("epd_ms", [], "rmse"), ("epd", [], "mse"),
                                                  ("epd_ms", ["--loss", "mse"], "mse")])
def test_the_command_line_trains_with_the_solvers_own_loss_unless_told(tmp_path, solver, flag, expected):
    from epd_core.training.cli import main
    out = tmp_path / "table.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["distill", "--model", "gmm", "--gmm-dim", "8", "--steps", "3", "--solver", solver, "--iterations", "2",
              "--batch", "4", "--num-batches", "1", "--quiet", "--out", str(out), *flag])
    finally:
        torch.set_num_threads(threads)
    assert EPDParams.load(out).metadata["provenance"]["loss"] == expected
    assert flag or variant(solver).loss == expected  # the default is the registry's
