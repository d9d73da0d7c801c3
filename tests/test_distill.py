"""Distillation (docs/method.md, "Training") on the exact Gaussian-mixture denoiser: teachers, objectives, quality on
held-out noises, fault tolerance (checkpoints, resume, cancel, NaN, bad input)."""
import errno
import math
import os
import threading

import pytest
import torch

from epd_core.training import distill as D
from epd_core.training.distill import DistillCancelled, DistillConfig, DistillError, distill
from epd_core.demo.gmm import cfg_model
from epd_core.tables.params import EPDParams, activate
from epd_core.sampling.schedules import polynomial, with_final_zero
from epd_core.sampling.paper import sample_epd

DIM = 32
SMIN, SMAX = 0.002, 80.0


pytestmark = pytest.mark.usefixtures("float64_one_thread")


@pytest.fixture(scope="module")
def gmm(gmm32):
    return gmm32


def noise_fn(g, n):
    return SMAX * torch.randn(n, DIM, generator=g, dtype=torch.float64)


def held_out(n=128, seed=4321):
    return SMAX * torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ksampler_sigmas(rows):
    """What ComfyUI's KSampler gives dpm_2 for `rows + 1` steps: karras with sigma_min dropped, then 0. It has
    rows + 1 positive sigmas, i.e. exactly a table of `rows` rows; latency NFE 2 * rows + 1 for both."""
    return with_final_zero(polynomial(rows + 2, SMIN, SMAX)[:-1])


def config(sigmas, **kw):
    base = dict(sigmas=sigmas.tolist(), iterations=12, batch=8, num_batches=2, lr=0.1)
    base.update(kw)
    return DistillConfig(**base)


def rmse(a, b):
    return (a - b).square().mean().sqrt().item()


# ============================================================================================== teachers

@pytest.mark.parametrize("teacher,reference", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                               ("dpm2", "sample_dpm_2"), ("dpmpp", "sample_dpmpp_2m"),
                                               ("ipndm", "sample_ipndm")])
def test_teacher_without_inserted_steps_is_comfyui_sampler(gmm, comfy_sampling, teacher, reference):
    sigmas = with_final_zero(polynomial(7, SMIN, SMAX))
    x = held_out(8)
    ours = D.teacher_states(gmm, x, sigmas, teacher, inserted=0)
    theirs = getattr(comfy_sampling, reference)(gmm, x, sigmas, disable=True)
    assert len(ours) == len(sigmas)
    torch.testing.assert_close(ours[-1], theirs, rtol=1e-9, atol=1e-9)


def test_refined_grid_is_geometric_and_keeps_the_step_to_zero():
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.0])
    fine, index = D.refine_sigmas(sigmas, 3)
    assert index == [0, 4, 8, 9] and fine[-1] == 0 and torch.allclose(fine[index], sigmas.double())
    ratios = fine[1:-1] / fine[:-2]
    torch.testing.assert_close(ratios[:4], torch.full((4,), (10 / 80) ** 0.25))
    torch.testing.assert_close(ratios[4:], torch.full((4,), 0.1 ** 0.25))


def test_teacher_grid_is_fine_and_reaches_the_ode_end_point(gmm):
    """teacher_steps > 0: at least that many steps overall, every student sigma on the grid (at least M steps
    inserted per interval), and below the last student sigma on to teacher_sigma_min before the step to 0."""
    sigmas = torch.tensor([80.0, 10.0, 0.3, 0.0])
    fine, index = D.teacher_grid(sigmas, 2, 40, 0.002)
    assert fine[-1] == 0 and abs(float(fine[-2]) - 0.002) < 1e-12 and len(fine) - 1 >= 40
    torch.testing.assert_close(fine[index[:-1]], sigmas[:-1].double(), rtol=0, atol=0)
    assert index[-1] == len(fine) - 1 and all(b - a >= 3 for a, b in zip(index, index[1:-1]))
    assert (fine[1:-1] < fine[:-2]).all()
    # the teacher's end point is close to a 500-step Heun solution; the old M-only grid was not
    x = held_out(32)
    ref = D.teacher_states(gmm, x, with_final_zero(polynomial(500, SMIN, SMAX)), "heun", 0)[-1]
    fine_end = D.teacher_states(gmm, x, sigmas, "heun", 3, fine_steps=100, sigma_end=0.002)[-1]
    coarse_end = D.teacher_states(gmm, x, sigmas, "heun", 3)[-1]
    assert rmse(fine_end, ref) < 0.2 * rmse(coarse_end, ref), (rmse(fine_end, ref), rmse(coarse_end, ref))


def test_teacher_runs_once_per_cached_batch(gmm):
    calls = {"teacher": 0}

    def model(x, sigma, **kw):
        if not torch.is_grad_enabled():
            calls["teacher"] += 1
        return gmm(x, sigma, **kw)
    sigmas = ksampler_sigmas(3)
    cfg = config(sigmas, iterations=6, num_batches=2, teacher="heun", inserted_steps=1)
    distill(model, None, noise_fn, cfg)
    fine, _ = D.teacher_grid(sigmas, 1, cfg.teacher_steps, cfg.teacher_sigma_min)
    per_run = 2 * (len(fine) - 2) + 1  # heun: 2 calls per positive step, 1 into sigma 0
    assert calls["teacher"] == 2 * per_run


# ============================================================================================ objectives

@pytest.mark.parametrize("solver,order,afs", [("epd", 1, False), ("epd_plugin", 3, True)])
def test_per_step_gradient_reaches_only_its_own_row(gmm, solver, order, afs):
    sigmas = ksampler_sigmas(4)
    x = held_out(6)
    targets = D.teacher_states(gmm, x, sigmas, "heun", 2)
    table = EPDParams.neutral(4, 2, scale_dir=0.05, scale_time=0.05)
    theta = [t.clone().double().requires_grad_(True) for t in table.tensors()]
    losses = D.per_step_losses(gmm, x, sigmas, activate(*theta, 0.05, 0.05), targets, max_order=order, afs=afs)
    assert len(losses) == 4
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, theta, retain_graph=True)
        for name, g in zip("rwca", grads):
            others = torch.cat([g[:i], g[i + 1:]])
            assert others.abs().max() == 0, f"loss {i} leaks into other rows of theta_{name}"
            assert g[i].abs().max() > 0, f"loss {i} does not reach row {i} of theta_{name}"
    # the end-to-end loss, by contrast, trains every row
    e2e = D.end_to_end_loss(gmm, x, sigmas, activate(*theta, 0.05, 0.05), targets[-1], max_order=order, afs=afs)
    g_r = torch.autograd.grad(e2e, theta[0])[0]
    assert (g_r.abs().amax(1) > 0).all()


def test_checkpointed_end_to_end_has_the_same_gradients(gmm):
    sigmas = ksampler_sigmas(3)
    x = held_out(4)
    target = D.teacher_states(gmm, x, sigmas, "heun", 1)[-1]
    grads = []
    for checkpointed in (False, True):
        theta = [t.clone().double().requires_grad_(True) for t in EPDParams.neutral(3, 2).tensors()]
        rows = activate(*theta, 0.05, 0.05)
        loss = D.end_to_end_loss(gmm, x, sigmas, rows, target, max_order=3, afs=True, checkpointed=checkpointed)
        grads.append((loss.detach(), torch.autograd.grad(loss, theta)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_per_step_losses_backpropagated_row_by_row_give_the_same_gradient(gmm):
    """The memory-light form the trainer uses: each row's loss back-propagated as soon as it exists, into the
    activated rows, then once from the rows into the logits; equal to one backward of the summed loss."""
    sigmas = ksampler_sigmas(3)
    x = held_out(4)
    targets = D.teacher_states(gmm, x, sigmas, "heun", 1)
    theta = [t.clone().double().requires_grad_(True) for t in EPDParams.neutral(3, 2, spread=1.0).tensors()]
    rows = activate(*theta, 0.05, 0.05)
    summed = torch.stack(D.per_step_losses(gmm, x, sigmas, rows, targets, max_order=3, afs=True)).sum()
    expected = torch.autograd.grad(summed, theta)

    rows = activate(*theta, 0.05, 0.05)  # afresh: the backward above freed the first graph
    leaves = {k: v.detach().requires_grad_(True) for k, v in rows.items()}
    losses = D.per_step_losses(gmm, x, sigmas, leaves, targets, max_order=3, afs=True,
                               backward=lambda loss: loss.backward(inputs=list(leaves.values())))
    assert all(not loss.requires_grad for loss in losses)  # nothing of the trajectory is kept alive
    got = torch.autograd.grad(list(rows.values()), theta, grad_outputs=[leaves[k].grad for k in rows])
    torch.testing.assert_close(torch.stack(losses).sum(), summed.detach(), rtol=1e-12, atol=0)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_k2_points_do_not_collapse_with_the_spread_init(gmm):
    sigmas = ksampler_sigmas(3)
    spread = distill(gmm, None, noise_fn, config(sigmas, iterations=40, spread=1.0))
    identical = distill(gmm, None, noise_fn, config(sigmas, iterations=40, spread=0.0))
    gap = (spread.positions[:, 0] - spread.positions[:, 1]).abs()
    print("K=2 position gaps per row (spread init):", gap.tolist())
    assert (gap > 0.05).all()
    # the reason for the spread: identical points get identical gradients forever (docs/method.md)
    assert torch.equal(identical.theta_r[:, 0], identical.theta_r[:, 1])


def test_distilled_tables_beat_neutral_and_comfyui_dpm_2_at_equal_nfe(gmm, comfy_sampling):
    """Student: N rows on polynomial(N+1) ending at sigma_min (latency NFE 2N). dpm_2 gets the better, chosen on
    separate fitting noises, of the same list (2N) and KSampler's list with one row less (2N-1 <= 2N).
    Test noises are never used in training (training noises come from batch_seed(seed, j))."""
    ref_sigmas = with_final_zero(polynomial(500, SMIN, SMAX))
    x_fit, x_test = held_out(128, seed=1234), held_out(256, seed=999)
    ref_fit, ref_test = (comfy_sampling.sample_heun(gmm, x, ref_sigmas, disable=True) for x in (x_fit, x_test))
    lines = []
    for rows in (2, 3, 4, 5):
        sigmas = polynomial(rows + 1, SMIN, SMAX)
        table = distill(gmm, None, noise_fn, config(sigmas, iterations=150, batch=32, num_batches=4))
        e_table = rmse(sample_epd(gmm, x_test, sigmas, table, disable=True), ref_test)
        e_neutral = rmse(sample_epd(gmm, x_test, sigmas, EPDParams.neutral(rows, 2), disable=True), ref_test)
        dpm2 = min((sigmas, ksampler_sigmas(rows - 1)),
                   key=lambda s: rmse(comfy_sampling.sample_dpm_2(gmm, x_fit, s, disable=True), ref_fit))
        e_dpm2 = rmse(comfy_sampling.sample_dpm_2(gmm, x_test, dpm2, disable=True), ref_test)
        lines.append(f"NFE {2 * rows}: distilled {e_table:.4f}  neutral {e_neutral:.4f}  dpm_2 {e_dpm2:.4f} "
                     f"(ratio {e_table / e_dpm2:.2f})")
        assert e_table < 0.5 * e_neutral and e_table < 0.85 * e_dpm2, lines[-1]
    print("\n".join(lines))


def test_cfg_conditioning_is_tiled_for_the_k_points(gmm):
    """Class labels travel in extra_args; the K stacked points get them tiled point-major."""
    model = cfg_model(gmm, 2.0)
    labels = lambda g, n: {"cond": torch.randint(0, 8, (n,), generator=g)}  # noqa: E731
    table = distill(model, None, noise_fn, config(ksampler_sigmas(2), iterations=4), extra_args_fn=labels)
    assert table.metadata["provenance"]["iterations"] == 4


# ========================================================================================== fault tolerance

def test_result_metadata(gmm):
    sigmas = ksampler_sigmas(3)
    table = distill(gmm, None, noise_fn, config(sigmas, schedule={"type": "polynomial", "rho": 7.0},
                                                guidance_scale=1.0, model_family="gmm", solver="epd_plugin"))
    m = table.metadata
    assert (m["solver"], m["max_order"], m["afs"]) == ("epd_plugin", 3, False)
    assert (m["model_family"], m["num_points"], m["guidance_scale"]) == ("gmm", 2, 1.0)
    assert m["schedule"]["type"] == "polynomial" and m["schedule"]["sigmas"] == sigmas[:-1].tolist()
    prov = m["provenance"]
    assert {"teacher", "M", "objective", "iterations", "lr", "seed", "final_loss", "date"} <= set(prov)
    assert math.isfinite(prov["final_loss"])
    torch.testing.assert_close(EPDParams.from_bytes(table.to_bytes()).theta_r, table.theta_r)


@pytest.mark.parametrize("stop_before", [5, 8])  # checkpoints every 3: resume at 3 (per-step stage) / 6 (the switch)
def test_checkpoint_and_resume_equal_an_uninterrupted_run(gmm, tmp_path, stop_before):
    sigmas = ksampler_sigmas(3)
    kw = dict(iterations=12, objective="per_step+end_to_end", checkpoint_interval=3, num_batches=3)
    whole_history = []
    whole = distill(gmm, None, noise_fn, config(sigmas, **kw), history=whole_history)
    path = tmp_path / "run.distill-checkpoint"
    done = []
    with pytest.raises(DistillCancelled, match="nothing new was written"):
        distill(gmm, None, noise_fn, config(sigmas, checkpoint_path=str(path), **kw),
                progress=lambda it, loss: done.append(it), should_stop=lambda: len(done) >= stop_before - 1)
    saved = D.load_checkpoint(path)
    assert saved["iteration"] == 3 * ((stop_before - 1) // 3)
    resumed_history = []
    resumed = distill(gmm, None, noise_fn, config(sigmas, checkpoint_path=str(path), resume=True, **kw),
                      history=resumed_history)
    for a, b in zip(whole.tensors(), resumed.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert resumed_history == pytest.approx(whole_history, rel=1e-12)
    print(f"stop before {stop_before}: max |resumed - uninterrupted| =",
          max((a - b).abs().max().item() for a, b in zip(whole.tensors(), resumed.tensors())))


def test_cancel_leaves_the_last_checkpoint_intact_and_loadable(gmm, tmp_path):
    path = tmp_path / "c.distill-checkpoint"
    done = []
    snapshots = {}

    def progress(it, loss):
        done.append(it)
        if path.exists():
            snapshots[it] = path.read_bytes()
    with pytest.raises(DistillCancelled) as err:
        distill(gmm, None, noise_fn, config(ksampler_sigmas(3), iterations=20, checkpoint_interval=4,
                                            checkpoint_path=str(path)),
                progress=progress, should_stop=lambda: len(done) >= 7)
    assert "iteration 4" in str(err.value) and "resume" in str(err.value)
    assert path.read_bytes() == snapshots[4] == snapshots[7]  # nothing written after iteration 4
    ckpt = D.load_checkpoint(path)
    assert ckpt["iteration"] == 4 and len(ckpt["losses"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nan_is_a_clear_error_and_keeps_the_checkpoint(gmm, tmp_path):
    path = tmp_path / "n.distill-checkpoint"
    state = {"poison": False}

    def model(x, sigma, **kw):
        out = gmm(x, sigma, **kw)
        return out * float("nan") if state["poison"] else out

    def progress(it, loss):
        state["poison"] = it >= 5
    kw = dict(iterations=10, checkpoint_interval=4, checkpoint_path=str(path))
    with pytest.raises(DistillError, match=r"iteration 5.*NaN.*iteration 4\) is unchanged"):
        distill(model, None, noise_fn, config(ksampler_sigmas(3), **kw), progress=progress)
    assert D.load_checkpoint(path)["iteration"] == 4
    # a NaN loss from the (feature) loss itself
    path.unlink()
    with pytest.raises(DistillError, match="loss became nan at iteration 0.*Lower the learning rate"):
        distill(gmm, None, noise_fn, config(ksampler_sigmas(3), **kw), feature_fn=lambda x: x * float("nan"))


def test_bad_inputs_are_clear_errors(gmm, tmp_path):
    sig3 = ksampler_sigmas(3)
    with pytest.raises(DistillError, match="at least 2 student steps.*got 1"):
        distill(gmm, None, noise_fn, config(ksampler_sigmas(1)))
    with pytest.raises(DistillError, match="K .*got 0"):
        distill(gmm, None, noise_fn, config(sig3, num_points=0))
    with pytest.raises(DistillError, match="unknown teacher 'rk4'.*heun"):
        distill(gmm, None, noise_fn, config(sig3, teacher="rk4"))
    with pytest.raises(DistillError, match="does not exist. Create it"):
        distill(gmm, None, noise_fn, config(sig3, checkpoint_path=str(tmp_path / "missing" / "c.ckpt")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DistillError, match="is not a folder"):
        distill(gmm, None, noise_fn, config(sig3, checkpoint_path=str(tmp_path / "file" / "c.ckpt")))
    with pytest.raises(DistillError, match="no checkpoint to resume"):
        distill(gmm, None, noise_fn, config(sig3, checkpoint_path=str(tmp_path / "c.ckpt"), resume=True))


def test_a_model_without_gradients_is_refused(gmm):
    @torch.no_grad()
    def frozen(x, sigma, **kw):  # e.g. a sampler-only wrapper: the tables would silently not learn
        return gmm(x, sigma, **kw)
    with pytest.raises(DistillError, match="no gradient.*enable_grad"):
        distill(frozen, None, noise_fn, config(ksampler_sigmas(3)))


def test_disk_full_keeps_the_earlier_checkpoint(gmm, tmp_path, monkeypatch):
    path = tmp_path / "d.distill-checkpoint"
    kw = dict(iterations=8, checkpoint_interval=2, checkpoint_path=str(path))
    real_fsync = os.fsync
    state = {"full": False}

    def fsync(fd):
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    def progress(it, loss):
        if it == 2:
            before["bytes"] = path.read_bytes()
            state["full"] = True
    before = {}
    with pytest.raises(DistillError, match="checkpoint not written.*No space left.*free disk space"):
        distill(gmm, None, noise_fn, config(ksampler_sigmas(3), **kw), progress=progress)
    assert path.read_bytes() == before["bytes"]
    assert D.load_checkpoint(path)["iteration"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # an existing checkpoint is never overwritten by a fresh (non-resume) run
    state["full"] = False
    with pytest.raises(DistillError, match="already exists.*nothing was overwritten"):
        distill(gmm, None, noise_fn, config(ksampler_sigmas(3), **kw))
    assert path.read_bytes() == before["bytes"]


def test_concurrent_checkpoint_writes_do_not_interleave(tmp_path):
    path = tmp_path / "x.distill-checkpoint"
    cfg = config(ksampler_sigmas(3))
    versions = {}
    for v in (1, 2):
        theta = [torch.full((3, 2), float(v), requires_grad=True) for _ in range(4)]
        opt = torch.optim.Adam(theta)
        sum(t.sum() for t in theta).backward()
        opt.step()
        versions[v] = (theta, opt)
    errors, seen = [], set()

    def writer(v):
        try:
            for _ in range(40):
                D.save_checkpoint(path, versions[v][0], versions[v][1], v, [float(v)] * 100 * v, cfg, (0.05, 0.0))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def reader():
        while any(t.is_alive() for t in writers):
            if path.exists():
                ck = D.load_checkpoint(path)  # raises on a torn file
                v = ck["iteration"]
                assert torch.all(ck["tensors"]["theta_r"] == versions[v][0][0].detach())
                assert ck["losses"] == [float(v)] * 100 * v
                seen.add(v)
    writers = [threading.Thread(target=writer, args=(v,)) for v in (1, 2)]
    for t in writers:
        t.start()
    reader()
    for t in writers:
        t.join()
    assert not errors, errors
    assert D.load_checkpoint(path)["iteration"] in (1, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
