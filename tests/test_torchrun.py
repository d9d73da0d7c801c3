"""The distillation CLI under `torchrun --standalone --nproc_per_node 2` (gloo on CPU) gives the same table as
one process with the same total batch: every rank slices the same full batch and gradients are averaged."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epd_core.training.distill import load_checkpoint
from epd_core.tables.params import EPDParams

REPO = Path(__file__).resolve().parents[1]
ARGS = ["distill", "--model", "gmm", "--gmm-dim", "16", "--steps", "3", "--iterations", "30", "--batch", "8",
        "--num-batches", "2", "--objective", "per_step+end_to_end", "--solver", "epd_plugin", "--quiet"]


def run(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_same_total_batch(tmp_path):
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi.safetensors"
    ckpt = ["--checkpoint-interval", "10"]
    run([sys.executable, "-m", "epd_core.train", *ARGS, *ckpt, "--out", str(single), "--checkpoint-dir",
         str(tmp_path / "c1")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "epd_core.train", *ARGS, *ckpt, "--out", str(multi), "--checkpoint-dir", str(tmp_path / "c2")])
    a, b = EPDParams.load(single), EPDParams.load(multi)
    diff = max((x - y).abs().max().item() for x, y in zip(a.tensors(), b.tensors()))
    # the float64 logits of the final checkpoints show the (rounding-level) difference the float32 table hides
    ca, cb = (load_checkpoint(tmp_path / c / f"{n}.distill-checkpoint") for c, n in (("c1", "single"), ("c2", "multi")))
    diff64 = max((ca["tensors"][k] - cb["tensors"][k]).abs().max().item() for k in ("theta_r", "theta_w", "theta_c"))
    print(f"max |2 ranks x batch 4 - 1 process x batch 8|: table (float32) {diff:.3g}, logits (float64) {diff64:.3g}")
    assert diff < 1e-5 and diff64 < 1e-5
    assert b.metadata["provenance"]["world_size"] == 2 and a.metadata["provenance"]["world_size"] == 1
    assert (a.theta_r - EPDParams.neutral(3, 2).theta_r).abs().max() > 0.05  # it really trained
    # only rank 0 wrote: one checkpoint, no temp files left by a second writer
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == ["multi.distill-checkpoint"]


def test_cli_errors_are_clear(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = str(tmp_path / "t.safetensors")
    proc = subprocess.run([sys.executable, "-m", "epd_core.train", *ARGS[:-1], "--steps", "1", "--out", out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "at least 2 student steps" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "epd_core.train", "rl"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--out" in proc.stderr  # rl needs an output file
    # a ComfyUI checkpoint goes through the pack's adapter (epd_core never imports ComfyUI) ...
    proc = subprocess.run([sys.executable, "-m", "epd_core.train", "distill", "--checkpoint", "x.safetensors",
                           "--out", out], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "python nodes/train_cli.py distill --checkpoint" in proc.stderr
    # ... which needs a ComfyUI install
    proc = subprocess.run([sys.executable, "nodes/train_cli.py", "distill", "--checkpoint", "x.safetensors",
                           "--out", out], cwd=REPO, env=dict(env, COMFYUI_PATH=str(tmp_path)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "needs a ComfyUI install" in proc.stderr


@pytest.mark.slow
def test_rl_rollouts_shard_over_two_ranks(tmp_path):
    """`train rl` under torchrun: each rank rolls out its share of the prompt groups, the policy gradients
    and reward statistics are summed over ranks, and the table equals one process doing all the groups."""
    init = REPO / "pretrained_params" / "demo_digits_epd_s4.safetensors"
    rl = ["rl", "--init", str(init), "--prompts", "1,3,7,8", "--prompts-per-update", "2", "--iterations", "4",
          "--group-size", "4", "--lr", "1e-3", "--quiet"]
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi.safetensors"
    run([sys.executable, "-m", "epd_core.train", *rl, "--out", str(single)])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "epd_core.train", *rl, "--out", str(multi)])
    a, b = EPDParams.load(single), EPDParams.load(multi)
    names = ("positions", "weights", "dir_scales", "time_scales")
    diff = max((getattr(a, n) - getattr(b, n)).abs().max().item() for n in names)
    moved = max((getattr(a, n) - getattr(EPDParams.load(init), n)).abs().max().item() for n in names)
    print(f"RL: max |2 ranks - 1 process| = {diff:.3g} (the table moved {moved:.3g})")
    assert b.metadata["provenance"]["world_size"] == 2 and moved > 1e-3 and diff < 1e-5
