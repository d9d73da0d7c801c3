"""Rewards for RDPO: `reward(images, prompts) -> scores (B,)`, higher is better.

`images` are the sampler's outputs (B, C, H, W) in the model's output space (latents for latent models: a
reward for those decodes them itself); `prompts` holds one prompt / label per image.
    DemoClassifierReward  - log p(requested digit | image) under a small classifier fitted (seeded, cached) on
                            scikit-learn's 8x8 digits: a real reward for the embedded demo model.
    LocalModelReward      - HPSv2 / PickScore / ImageReward / CLIP / Aesthetic adapters that only load weights
                            the user placed in ComfyUI's models/epd_rewards/ folder; nothing is ever downloaded.
    TableDistanceReward   - minus the distance of the sampled TABLE to a target table (toy, known optimum).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

REWARD_FOLDER = "models/epd_rewards"
LOCAL_KINDS = {  # kind -> (python packages needed, accepted weight files / folders, what to place)
    "hpsv2": (("open_clip",), "HPS_v2.1_compressed.pt (with open_clip's ViT-H-14 weights)"),
    "pickscore": (("transformers",), "a PickScore_v1 folder (config.json + model weights + processor files)"),
    "imagereward": (("ImageReward",), "ImageReward.pt and med_config.json"),
    "clip": (("transformers",), "a CLIP model folder (e.g. clip-vit-large-patch14: config.json + weights)"),
    "aesthetic": (("transformers",), "sac+logos+ava1-l14-linearMSE.pth plus a CLIP ViT-L/14 folder"),
}


class RewardUnavailableError(RuntimeError):
    """A reward model cannot be used here (weights or package missing); the message says what to install/place."""


class Reward:
    """Interface. `needs_tables`: the reward scores tables (toy rewards) rather than images."""
    name = "reward"
    needs_tables = False

    def __call__(self, images, prompts, tables=None) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ demo digits

@functools.lru_cache(maxsize=4)
def _digit_classifier(seed: int = 0, c: float = 0.1):
    """Multinomial logistic regression on sklearn digits (pixels / 16), fitted deterministically (< 1 s)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise RewardUnavailableError(f"DemoClassifierReward needs scikit-learn ({e}); pip install scikit-learn") from None
    data = load_digits()
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(data.data / 16.0, data.target)
    return (torch.tensor(clf.coef_, dtype=torch.float64), torch.tensor(clf.intercept_, dtype=torch.float64),
            float(clf.score(data.data / 16.0, data.target)))


class DemoClassifierReward(Reward):
    """log p(label | image) for the demo digits model: images in [-1, 1] (1, 8, 8) -> digit pixels 0..16."""
    name = "demo_classifier"

    def __init__(self, seed: int = 0, c: float = 0.1):
        self.weight, self.bias, self.train_accuracy = _digit_classifier(seed, c)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.detach().double().clamp(-1, 1) + 1) / 2).reshape(images.shape[0], -1)  # = pixels / 16
        return x @ self.weight.to(x.device).T + self.bias.to(x.device)

    def __call__(self, images, prompts, tables=None) -> torch.Tensor:
        labels = torch.as_tensor([int(p) for p in prompts], device=images.device)
        logp = torch.log_softmax(self.logits(images), dim=-1)
        return logp.gather(1, labels[:, None]).squeeze(1).float().cpu()


# ------------------------------------------------------------------------------------------- local models

class LocalModelReward(Reward):
    """A learned image reward loaded from a LOCAL file or folder only (never downloaded).

    kind: 'hpsv2', 'pickscore', 'imagereward', 'clip' or 'aesthetic'; path: the weights the user placed, normally
    in ComfyUI's models/epd_rewards/. Missing weights or packages raise RewardUnavailableError saying what to
    place where. The scoring back-ends need real weights, which this pack does not ship."""

    def __init__(self, kind: str, path=None, device="cpu"):
        kind = str(kind).lower()
        if kind not in LOCAL_KINDS:
            raise RewardUnavailableError(f"unknown reward {kind!r}; use one of {sorted(LOCAL_KINDS)} (or 'demo_classifier'"
                                         " for the demo digits model)")
        packages, what = LOCAL_KINDS[kind]
        self.kind, self.name, self.device = kind, kind, device
        if path is None or not Path(path).exists():
            raise RewardUnavailableError(
                f"reward model '{kind}' not found at {path!r}. Place {what} in ComfyUI's {REWARD_FOLDER}/ folder "
                f"(e.g. ComfyUI/{REWARD_FOLDER}/{kind}/) and pass that path; EPD never downloads reward weights.")
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            raise RewardUnavailableError(f"reward model '{kind}' needs the Python package(s) {', '.join(missing)}, "
                                         f"which are not installed in this environment (pip install {' '.join(missing)}).")
        self.path = Path(path)
        self._scorer = _load_backend(kind, self.path, device)

    def __call__(self, images, prompts, tables=None) -> torch.Tensor:
        return self._scorer(images, prompts)


def _load_backend(kind, path, device):
    """CLIP-family scorers through transformers from a local folder (local_files_only). Images must already be
    decoded RGB in [0, 1] (B, 3, H, W); latent models need a VAE decode before the reward."""
    if kind in ("clip", "pickscore"):
        from transformers import AutoModel, AutoProcessor
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            proc = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise RewardUnavailableError(f"cannot load the '{kind}' model from {path} ({e}); place a complete model "
                                         f"folder in ComfyUI's {REWARD_FOLDER}/") from None

        @torch.no_grad()
        def score(images, prompts):
            if images.shape[1] != 3:
                raise RewardUnavailableError(f"'{kind}' scores RGB images (B, 3, H, W) in [0, 1]; decode latents first")
            inputs = proc(text=[str(p) for p in prompts], images=list(images.clamp(0, 1).cpu()), return_tensors="pt",
                          padding=True, truncation=True, do_rescale=False).to(device)
            out = model(**inputs)
            img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
            return (model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu()
        return score
    raise RewardUnavailableError(f"the '{kind}' scorer back-end is not implemented in this version; place the weights in "
                                 f"ComfyUI's {REWARD_FOLDER}/ and use 'clip' or 'pickscore', or pass your own Reward")


# ------------------------------------------------------------------------------------------------------- toy

class TableDistanceReward(Reward):
    """-(mean squared distance) between a sampled table's rows and a target's (r and w; c, a too if given).
    Target points are sorted by r like the policy's. Maximum 0 at the target."""
    name = "table_distance"
    needs_tables = True

    def __init__(self, target_rows: dict):
        r = torch.as_tensor(target_rows["r"], dtype=torch.float64)
        order = r.argsort(-1)
        self.target = {k: torch.as_tensor(v, dtype=torch.float64).gather(-1, order)
                       for k, v in target_rows.items() if k in "rwca"}

    def distance(self, tables: dict) -> torch.Tensor:
        d = 0
        for k, t in self.target.items():
            d = d + (tables[k].double() - t).square().flatten(1).mean(1)
        return d

    def __call__(self, images, prompts, tables=None) -> torch.Tensor:
        if tables is None:
            raise ValueError("TableDistanceReward scores tables: pass tables=")
        return -self.distance(tables).float()
