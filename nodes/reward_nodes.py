"""EPD Reward nodes: what the EPD Trainer's 'rl' mode maximises (docs/method.md, "RL fine-tuning").

Each node outputs an EPD_REWARD: a reward from epd_core.training.rl.rewards plus, for rewards that score RGB images,
the VAE that turns the model's latents into pixels. Reward weights are only ever read from local files the
user placed in ComfyUI's models/epd_rewards/ folder; a missing file is a clear error, never a download.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import folder_paths
import torch

from epd_core.training.rl.rewards import (LOCAL_KINDS, REWARD_FOLDER, DemoClassifierReward, LocalModelReward, Reward,
                                          RewardUnavailableError)

from .compat import io
from .sockets import EPDRewardType
from .tables import register_model_folder

CATEGORY = "training/epd/rewards"
FOLDER = "epd_rewards"


@dataclass
class GraphReward:
    """A reward as the graph carries it; `vae` (optional) turns latents into RGB images for image rewards."""
    reward: Reward
    vae: object = None

    def for_model(self, inner_model):
        """The callable rdpo() expects: sampler outputs (model space) -> latents -> images -> scores."""
        reward, vae = self.reward, self.vae

        class Bound(Reward):
            name = reward.name
            needs_tables = reward.needs_tables

            def __call__(self, images, prompts, tables=None):
                if images is not None:
                    images = inner_model.process_latent_out(images.float())
                    if vae is not None:
                        images = _decode(vae, images)
                return reward(images, prompts, tables=tables)
        return Bound()


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE pixels (B, H, W, 3) in [0, 1] -> (B, 3, H, W), what the image rewards take."""
    pixels = vae.decode(latents)
    if pixels.dim() == 5:  # video VAEs: (B, T, H, W, 3) -> score every frame's mean image
        pixels = pixels.mean(1)
    return pixels.movedim(-1, 1).float()


class EPDRewardDemoClassifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDRewardDemoClassifier", display_name="EPD Reward (Demo Digit Classifier)", category=CATEGORY,
            description="Reward for the embedded demo models: log-probability of the requested digit under the "
                        "classifier that ships with the pack (a small CNN for MNIST 28x28, a logistic regression "
                        "for 8x8 digits; weights only, nothing is fitted or downloaded). Use digits as the prompts "
                        "of EPD RL Settings.",
            inputs=[],
            outputs=[EPDRewardType.Output(display_name="reward", tooltip="Connect to EPD Trainer's reward input.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(GraphReward(DemoClassifierReward()))


class EPDRewardLocalModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EPDRewardLocalModel", display_name="EPD Reward (Local Model)", category=CATEGORY,
            description="A learned preference reward (HPSv2, PickScore, ImageReward, CLIP score, aesthetic) loaded "
                        f"only from files you placed in ComfyUI's {REWARD_FOLDER}/ folder; nothing is downloaded. "
                        "Connect the checkpoint's VAE so latents are decoded to images before scoring.",
            inputs=[
                io.Combo.Input("kind", options=sorted(LOCAL_KINDS), default="pickscore",
                               tooltip="Which reward model. " + "; ".join(f"{k}: {v[1]}" for k, v in
                                                                         sorted(LOCAL_KINDS.items()))),
                io.String.Input("path", default="",
                                tooltip=f"File or folder inside {REWARD_FOLDER}/ (empty: a folder named like the "
                                        "kind, e.g. epd_rewards/pickscore/)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes latents to RGB for scoring (needed for latent "
                                                           "models such as SD1.5, SDXL, SD3, Flux)."),
            ],
            outputs=[EPDRewardType.Output(display_name="reward", tooltip="Connect to EPD Trainer's reward input.")],
        )

    @classmethod
    def execute(cls, kind, path, vae=None) -> io.NodeOutput:
        real = resolve_reward_path(kind, path)
        try:
            reward = LocalModelReward(kind, real)
        except RewardUnavailableError as e:  # the server's absolute paths stay on the server
            raise RewardUnavailableError(redact_paths(str(e))) from None
        return io.NodeOutput(GraphReward(reward, vae))


def reward_folders() -> list[Path]:
    return [Path(f).resolve() for f in folder_paths.get_folder_paths(FOLDER)]


def resolve_reward_path(kind: str, path: str) -> str:
    """The real path of `path` (default: a folder named like the kind) inside a registered epd_rewards folder.
    Absolute paths, '..' and anything whose real path (symlinks resolved) leaves those folders are refused,
    with one message that neither says whether the path exists nor shows the server's folders."""
    name = path.strip() or kind
    where = (f"{REWARD_FOLDER}/ (a relative name such as '{kind}' or 'hpsv2/HPS_v2.1_compressed.pt')")
    pure = Path(name)
    if "\x00" in name or pure.is_absolute() or pure.drive or ".." in pure.parts or name.startswith("~"):
        raise RewardUnavailableError(f"reward path {name[:120]!r} is refused: give a file or folder inside {where}; "
                                     "absolute paths and '..' are not allowed")
    for folder in reward_folders():
        try:
            real = (folder / pure).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real.is_relative_to(folder):
            # the loaders also read files next to a weight file or inside a model folder (config.json,
            # tokenizer/ ...): none of them may be a link leading out of the rewards folders either
            escape = _link_leaving(real if real.is_dir() else real.parent, reward_folders())
            if escape is not None:
                raise RewardUnavailableError(
                    f"reward path {name[:120]!r} is refused: '{escape}' inside it is a link leading outside "
                    f"{REWARD_FOLDER}/. Copy the model files themselves into {REWARD_FOLDER}/ instead of linking "
                    "them from elsewhere")
            return str(real)
    packages, what = LOCAL_KINDS.get(str(kind).lower(), ((), "the model files"))
    raise RewardUnavailableError(f"reward model '{kind}': {name[:120]!r} was not found inside {where}. Place {what} "
                                 f"there; EPD never downloads reward weights.")


_MAX_ENTRIES = 5000  # files and folders looked at under one reward model's folder


def _link_leaving(folder: Path, roots: list[Path]) -> str | None:
    """The first entry under `folder` (relative name) that is a symlink whose target lies outside every one of
    `roots`, else None. Bounded: a folder with more than _MAX_ENTRIES entries counts as leaving."""
    seen = 0
    for top, dirs, files in os.walk(folder, followlinks=False):
        for entry in dirs + files:
            seen += 1
            if seen > _MAX_ENTRIES:
                return f"(more than {_MAX_ENTRIES} entries)"
            path = Path(top) / entry
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    return str(path.relative_to(folder))
                if not any(target.is_relative_to(root) for root in roots):
                    return str(path.relative_to(folder))
    return None


_ABS_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:)?[/\\](?:[^\s'\"(),:;\[\]{}]+[/\\])+[^\s'\"(),:;\[\]{}]*")


def redact_paths(message: str) -> str:
    """`message` with the registered reward folders shown as models/epd_rewards and any other absolute path
    replaced by '<path>'."""
    for folder in sorted(reward_folders() + [Path(f) for f in folder_paths.get_folder_paths(FOLDER)],
                         key=lambda f: -len(str(f))):
        message = message.replace(str(folder), REWARD_FOLDER)
    return _ABS_PATH.sub("<path>", message)


register_model_folder(FOLDER, {".pt", ".pth", ".safetensors", ".bin"})
REWARD_NODES = [EPDRewardDemoClassifier, EPDRewardLocalModel]
