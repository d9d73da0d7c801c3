"""RDPO (docs/method.md, "RL fine-tuning"): residual Dirichlet policy, rewards, RLOO + PPO loop, checkpoints, CLI."""
import math

import pytest
import torch

from epd_core.tables.params import EPDParams
from epd_core.training.rl import (DemoClassifierReward, LocalModelReward, ResidualDirichletPolicy,
                                  RewardUnavailableError, RLCancelled, RLConfig, RLError, TableDistanceReward, rdpo,
                                  rloo_advantages)
from epd_core.training.rl.rdpo import ppo_loss

torch.set_num_threads(1)


def make_table(n=3, k=2, scale_dir=0.05, seed=0, sort=True):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, k, generator=g, dtype=torch.float64) * 0.9 + 0.05
    if sort:
        r = r.sort(-1).values
    w = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    c = 1 + 0.6 * scale_dir * (torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1) if scale_dir else None
    return EPDParams.from_values(r, w, c, scale_dir=scale_dir, solver="epd",
                                 provenance={"trainer": "test"}, model_family="gmm")


@pytest.mark.parametrize("k,scale_dir", [(1, 0.0), (2, 0.05), (3, 0.1)])
def test_cold_start_mean_is_the_table(k, scale_dir):
    t = make_table(4, k, scale_dir)
    m = ResidualDirichletPolicy(t, kappa=15.0).mean_table()
    for name in ("positions", "weights", "dir_scales", "time_scales"):
        assert torch.allclose(getattr(m, name), getattr(t, name), atol=1e-6, rtol=0), name
    assert m.metadata["model_family"] == "gmm" and m.metadata["solver"] == "epd"
    assert m.metadata["provenance"]["trainer"] == "epd_core.training.rl.rdpo"
    assert m.metadata["provenance"]["base_provenance"] == {"trainer": "test"}


def test_unsorted_table_is_sorted_consistently():
    t = make_table(3, 3, 0.05, seed=1, sort=False)
    m = ResidualDirichletPolicy(t).mean_table()
    order = t.positions.argsort(-1)
    for name in ("positions", "weights", "dir_scales"):
        assert torch.allclose(getattr(m, name), getattr(t, name).gather(-1, order), atol=1e-6), name


def test_log_prob_and_entropy_match_torch_distributions():
    t = make_table(3, 2, 0.05, seed=2)
    pol = ResidualDirichletPolicy(t, kappa=12.0)
    with torch.no_grad():  # random residuals so the check is not at the trivial cold start
        g = torch.Generator().manual_seed(0)
        for p in pol.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    s, rows, lp = pol.sample(5, torch.Generator().manual_seed(1))
    p = pol.dist_params()
    D, LN = torch.distributions.Dirichlet, torch.distributions.LogNormal
    ref = (D(p["alpha_r"]).log_prob(s["seg"]).sum(-1) + D(p["alpha_w"]).log_prob(s["w"]).sum(-1)
           + LN(p["mu_c"], p["sigma_c"]).log_prob(s["c"]).sum((-1, -2)))
    assert torch.allclose(lp, ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(pol.log_prob(s), ref, rtol=1e-9, atol=1e-9)
    ent = (D(p["alpha_r"]).entropy().sum() + D(p["alpha_w"]).entropy().sum()
           + LN(p["mu_c"], p["sigma_c"]).entropy().sum())
    assert torch.allclose(pol.entropy(), ent, rtol=1e-9)
    # sampled tables are valid: monotone positions in (0,1), weights on the simplex, scales inside the bound
    assert (rows["r"][..., 1:] > rows["r"][..., :-1]).all() and (rows["r"] > 0).all() and (rows["r"] < 1).all()
    assert torch.allclose(rows["w"].sum(-1), torch.ones(5, 3, dtype=torch.float64))
    assert ((rows["c"] - 1).abs() < 0.05).all()
    assert float(pol.kl_to_reference().detach()) > 0


def test_sampling_is_seeded():
    pol = ResidualDirichletPolicy(make_table())
    a = pol.sample(4, torch.Generator().manual_seed(3))[2]
    b = pol.sample(4, torch.Generator().manual_seed(3))[2]
    assert torch.equal(a, b)


def test_ppo_ratio_is_one_at_first_epoch():
    pol = ResidualDirichletPolicy(make_table())
    s, _, lp_old = pol.sample(8, torch.Generator().manual_seed(0))
    adv = torch.randn(8, dtype=torch.float64)
    loss, ratio = ppo_loss(pol.log_prob(s), lp_old, adv, 0.2)
    assert torch.allclose(ratio, torch.ones(8, dtype=torch.float64), atol=1e-12)
    loss.backward()
    assert pol.head.weight.grad.abs().sum() > 0  # zero-initialised output layer still gets gradient


def test_rloo_advantages_hand_example():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 0.0])
    adv = rloo_advantages(r, 4)
    # group 1: baselines (11/3, 10/3, 9/3, 6/3); group 2: (4/3, 4/3, 0, 4/3)
    expect = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, -4 / 3, -4 / 3, 4, -4 / 3], dtype=torch.float64)
    assert torch.allclose(adv, expect)
    assert torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2, dtype=torch.float64))


def test_one_table_per_sample_in_the_same_loop():
    """RL rollouts give every sample its own table: rows (B, steps, K) through the same integrate. Equal tables
    reproduce the shared-table run; sample 0's result depends only on its own table."""
    from epd_core.demo.gmm import GaussianMixtureDenoiser
    from epd_core.sampling.paper import integrate
    gmm = GaussianMixtureDenoiser(dim=8, num_components=4, seed=0)
    rows = {k: v.double() for k, v in make_table(3, 2, 0.05).activated().items()}
    other = {k: v.double() for k, v in make_table(3, 2, 0.05, seed=9).activated().items()}
    sig = torch.tensor([8.0, 2.0, 0.6, 0.1, 0.0], dtype=torch.float64)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8
    shared = integrate(gmm, x, sig, rows, disable=True)
    per_sample = integrate(gmm, x, sig, {k: v.expand(5, -1, -1) for k, v in rows.items()}, disable=True)
    assert torch.allclose(per_sample, shared, atol=1e-10)
    mixed = integrate(gmm, x, sig, {k: torch.stack([rows[k]] + [other[k]] * 4) for k in rows}, disable=True)
    assert torch.allclose(mixed[0], shared[0], atol=1e-10)
    assert not torch.allclose(mixed[1:], shared[1:], atol=1e-6)


def _toy_setup():
    base = make_table(3, 2, 0.0, seed=4)
    target = make_table(3, 2, 0.0, seed=5).activated()
    return base, target, TableDistanceReward(target)


def test_rl_moves_table_toward_target():
    base, target, reward = _toy_setup()
    hist = []
    cfg = RLConfig(iterations=60, group_size=8, epochs=2, lr=3e-3, kappa=15.0, kl_coef=0.0, seed=0)
    out = rdpo(None, torch.tensor([5.0, 2.0, 1.0, 0.5]), base, reward, list(range(4)), config=cfg, history=hist)
    d0 = float(reward.distance({k: v[None].double() for k, v in ResidualDirichletPolicy(base).mean_rows().items()}))
    d1 = float(reward.distance({k: v[None].double() for k, v in out.activated().items()}))
    assert d1 < 0.35 * d0, (d0, d1)
    assert all(math.isfinite(h["entropy"]) and math.isfinite(h["grad_norm"]) for h in hist)
    assert out.metadata["provenance"]["reward"] == "table_distance"


def test_checkpoint_resume_is_exact_and_cancel(tmp_path):
    base, _, reward = _toy_setup()
    sig = torch.tensor([5.0, 2.0, 1.0, 0.5])
    cfg = RLConfig(iterations=6, group_size=4, lr=3e-3, kl_coef=0.0, seed=1)
    full = rdpo(None, sig, base, reward, [0, 1], config=cfg)
    ck = tmp_path / "rl.ckpt"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3
    with pytest.raises(RLCancelled):
        rdpo(None, sig, base, reward, [0, 1], config=RLConfig(**{**cfg.__dict__, "checkpoint_path": str(ck),
                                                                  "checkpoint_interval": 1}), should_stop=stop)
    assert ck.exists()
    with pytest.raises(RLError, match="already exists"):
        rdpo(None, sig, base, reward, [0, 1], config=RLConfig(**{**cfg.__dict__, "checkpoint_path": str(ck)}))
    resumed = rdpo(None, sig, base, reward, [0, 1],
                   config=RLConfig(**{**cfg.__dict__, "checkpoint_path": str(ck), "resume": True}))
    for a, b in zip(full.tensors(), resumed.tensors()):
        assert torch.equal(a, b)
    with pytest.raises(RLError, match="different"):
        rdpo(None, sig, base, reward, [0, 1],
             config=RLConfig(**{**cfg.__dict__, "lr": 1e-3, "checkpoint_path": str(ck), "resume": True}))


def test_missing_local_reward_weights_give_clear_error(tmp_path):
    with pytest.raises(RewardUnavailableError, match="epd_rewards"):
        LocalModelReward("hpsv2", tmp_path / "nope.pt")
    with pytest.raises(RewardUnavailableError, match="epd_rewards"):
        LocalModelReward("pickscore", None)
    with pytest.raises(RewardUnavailableError, match="unknown reward"):
        LocalModelReward("mps", tmp_path)


def test_demo_classifier_reward_scores_real_digits():
    from sklearn.datasets import load_digits
    rew = DemoClassifierReward()
    d = load_digits()
    imgs = torch.tensor(d.data[:50] / 8.0 - 1.0, dtype=torch.float32).view(50, 1, 8, 8)
    good = rew(imgs, d.target[:50].tolist())
    bad = rew(imgs, ((d.target[:50] + 1) % 10).tolist())
    assert good.shape == (50,) and good.mean() > -0.5 > bad.mean()


def test_cli_toy_errors(tmp_path, capsys):
    from epd_core.training.cli import main
    assert main(["rl", "--model", "demo", "--init", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "o.safetensors"), "--iterations", "1"]) == 1
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_model_rl_raises_held_out_reward():
    """Short seeded RDPO run on the embedded digits model (4 steps, K=2, CFG 2) with the classifier reward:
    the held-out reward of the exported table beats the distilled cold start, and the images stay close to a
    100-step Heun reference (no collapse)."""
    from epd_core.demo import models as demo_model
    from epd_core.sampling import schedules
    from epd_core.training.distill import DistillConfig, distill
    from epd_core.sampling.paper import sample_epd
    from epd_core.demo.problems import vp_start_scale

    net = demo_model.load_demo_model()
    den = demo_model.DemoDenoiser(net, cfg=2.0)

    class GradDen(demo_model.DemoDenoiser):
        eps_denoise = demo_model.DemoDenoiser.eps_denoise.__wrapped__
    sig = [float(s) for s in schedules.discrete(5, den.sigmas.double(), 1.0)] + [0.0]
    scale = vp_start_scale(sig[0], den.sigma_max)
    noise_fn = lambda g, n: torch.randn(n, 1, 8, 8, generator=g) * scale  # noqa: E731
    base = distill(GradDen(net, cfg=2.0), None, noise_fn,
                   DistillConfig(sigmas=sig, num_points=2, iterations=40, batch=8, num_batches=4, seed=0),
                   lambda g, n: {"cond": torch.randint(0, 10, (n,), generator=g)})
    reward = DemoClassifierReward()
    import time
    t0 = time.time()
    out = rdpo(den, torch.tensor(sig), base, reward, list(range(10)), noise_fn,
               RLConfig(iterations=20, group_size=4, epochs=2, lr=1e-3, seed=0))
    rl_seconds = time.time() - t0
    ref_sig = demo_model.karras_sigmas(100, den.sigma_min, sig[0])
    r0 = r1 = e0 = e1 = 0.0
    for s in (100, 101):
        x = noise_fn(torch.Generator().manual_seed(s), 40)
        lab = torch.arange(40) % 10
        o0 = sample_epd(den, x, torch.tensor(sig), base, {"cond": lab}, disable=True)
        o1 = sample_epd(den, x, torch.tensor(sig), out, {"cond": lab}, disable=True)
        ref = demo_model.sample_heun(den, x, ref_sig, cond=lab)
        r0 += float(reward(o0, lab.tolist()).mean()) / 2
        r1 += float(reward(o1, lab.tolist()).mean()) / 2
        e0 += float((o0 - ref).square().mean()) / 2
        e1 += float((o1 - ref).square().mean()) / 2
    print(f"held-out reward {r0:.4f} -> {r1:.4f}; RMSE vs Heun-100 {e0 ** 0.5:.4f} -> {e1 ** 0.5:.4f} "
          f"(ratio {(e1 / e0) ** 0.5:.3f}); RL {rl_seconds:.1f}s")
    assert r1 > r0 + 0.02
    assert (e1 / e0) ** 0.5 < 5.0 and e1 ** 0.5 < 0.3


def test_cli_rl_distills_then_fine_tunes_and_resumes(tmp_path):
    from epd_core.training.cli import main
    out = tmp_path / "rl.safetensors"
    common = ["rl", "--model", "demo", "--steps", "2", "-K", "2", "--distill-iterations", "2", "--prompts", "0,1",
              "--group-size", "2", "--lr", "1e-3", "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"),
              "--quiet"]
    assert main(common + ["--iterations", "1"]) == 0
    t = EPDParams.load(out)
    assert t.metadata["provenance"]["trainer"] == "epd_core.training.rl.rdpo" and t.num_steps == 2
    assert main(common + ["--iterations", "2", "--resume"]) == 1  # iterations is a result field: refused clearly


TORCHRUN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from epd_core.training.cli import init_distributed
from epd_core.tables.params import EPDParams
from epd_core.training.rl import RLConfig, TableDistanceReward, rdpo
rank, world = init_distributed()
n = 3
base = EPDParams.from_values(torch.tensor([[0.2, 0.6]] * n), torch.tensor([[0.5, 0.5]] * n))
target = {"r": torch.tensor([[0.4, 0.9]] * n, dtype=torch.float64),
          "w": torch.tensor([[0.2, 0.8]] * n, dtype=torch.float64)}
out = rdpo(None, torch.tensor([4.0, 2.0, 1.0, 0.5]), base, TableDistanceReward(target), [0, 1, 2, 3],
           config=RLConfig(iterations=5, group_size=4, lr=3e-3, seed=0))
if rank == 0:
    out.save(sys.argv[1])
if world > 1:  # ranks leave together: one tearing gloo down while rank 0 still writes aborts the run
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_rl_two_ranks_equal_one_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "rl_ddp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    for cmd in ([sys.executable, str(script), str(tmp_path / "one.safetensors")],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                 str(tmp_path / "two.safetensors")]):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = EPDParams.load(tmp_path / "one.safetensors"), EPDParams.load(tmp_path / "two.safetensors")
    assert max((x - y).abs().max().item() for x, y in zip(a.tensors(), b.tensors())) < 1e-5
    assert b.metadata["provenance"]["world_size"] == 2
