"""A small CNN classifier of 28x28 MNIST digits, shipped with the pack for two jobs:
  - its penultimate features give a distribution metric for the MNIST demo model, the Frechet distance
    between feature statistics of generated and real digits (FID's recipe with a network that knows digits);
  - its class log-probability is the RL demo reward for that model (tensors only, nothing fitted at run time).

Images are the demo model's latents: (B, 1, 28, 28) in [-1, 1] (background -1, ink +1).
Pure torch + safetensors; never imports ComfyUI.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "mnist_classifier.safetensors"
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """conv 32 -> conv 64 /2 -> conv 64 /2 -> flatten 7x7 -> 64 features -> 10 logits."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),      # 14x14
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 7x7
        )
        self.proj = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> (B, feature_dim); values outside [-1, 1] are clamped."""
        h = self.convs(images.clamp(-1, 1).to(self.proj.weight.dtype))
        return F.silu(self.proj(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def save_classifier(net: DigitClassifier, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    meta = {"config": json.dumps(net.config), "format": "epd-digit-classifier-v1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_classifier(path=None, device="cpu") -> DigitClassifier:
    """The shipped classifier (float32, eval mode, no gradients)."""
    from safetensors import safe_open
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"MNIST classifier weights not found at {path}; they ship with the pack "
                                "(re-create them with scripts/train_demo_model.py --dataset mnist)")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    net = DigitClassifier(**config).to(torch.float32)
    net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def frechet_distance(stats_a, stats_b) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two Gaussians (FID's formula).
    tr((S_a S_b)^(1/2)) = sum of sqrt(eig(R S_b R)) with R = S_a^(1/2): symmetric, so eigh is stable."""
    (mu_a, s_a), (mu_b, s_b) = stats_a, stats_b
    evals, evecs = torch.linalg.eigh(s_a)
    root_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)
