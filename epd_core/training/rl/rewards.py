"""Rewards for RDPO: `reward(images, prompts) -> scores (B,)`, higher is better.

`images` are the sampler's outputs (B, C, H, W) in the model's output space (latents for latent models: a
reward for those decodes them itself); `prompts` holds one prompt / label per image.
    DemoClassifierReward  - log p(requested digit | image) under the classifier shipped with the demo models (a
                            small CNN for MNIST 28x28, a logistic regression for 8x8 digits): tensors only.
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
LOCAL_KINDS = {  # kind -> (python packages needed, what to place: a file or folder in models/epd_rewards/)
    "hpsv2": (("open_clip",), "HPS_v2.1_compressed.pt (the full fine-tuned open_clip ViT-H-14 state dict; pass the "
                              "file or a folder holding exactly one .pt/.pth/.safetensors; needs pip install "
                              "open_clip_torch)"),
    "pickscore": (("transformers",), "a PickScore_v1 folder (config.json + model weights + processor files)"),
    "imagereward": (("transformers", "timm"), "an imagereward/ folder holding ImageReward.pt (the ImageReward-v1.0 "
                                              "state dict), tokenizer/vocab.txt (bert-base-uncased's vocab) and "
                                              "med_config.json (BLIP's BERT config; BLIP's defaults if absent); the "
                                              "image-reward package is not needed"),
    "clip": (("transformers",), "a CLIP model folder (e.g. clip-vit-large-patch14: config.json + weights + "
                                "processor files)"),
    "aesthetic": (("transformers",), "a folder holding the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth "
                                     "(or .safetensors) plus a clip/ subfolder with CLIP ViT-L/14 (config.json + "
                                     "weights + processor files); or the head file itself with that clip/ folder "
                                     "beside it"),
}
PIP_NAMES = {"open_clip": "open_clip_torch"}  # import name -> pip name


class RewardUnavailableError(RuntimeError):
    """A reward model cannot be used here (weights or package missing); the message says what to install/place."""


class Reward:
    """Interface. `needs_tables`: the reward scores tables (toy rewards) rather than images."""
    name = "reward"
    needs_tables = False

    def __call__(self, images, prompts, tables=None) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ demo digits

_DIGITS_CLASSIFIER = Path(__file__).resolve().parents[2] / "demo" / "assets" / "digits_classifier.safetensors"


@functools.lru_cache(maxsize=1)
def _digits_logistic_regression():
    """The 8x8 digits classifier: a multinomial logistic regression on pixels / 16 (fitted once with
    scikit-learn, C = 0.1, seed 0, and shipped as its coefficients: nothing is fitted at run time)."""
    from safetensors.torch import load_file
    t = load_file(str(_DIGITS_CLASSIFIER))
    return t["weight"], t["bias"]


@functools.lru_cache(maxsize=1)
def _mnist_classifier():
    from epd_core.demo.classifier import load_classifier
    return load_classifier()


class DemoClassifierReward(Reward):
    """log p(label | image) for the demo models' images in [-1, 1]: (1, 28, 28) MNIST digits go to the shipped
    CNN (98.4 % held-out accuracy), (1, 8, 8) digits to the shipped logistic regression."""
    name = "demo_classifier"

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        if size == (28, 28):
            net = _mnist_classifier()
            return net(images.detach().float().cpu()).double().to(images.device)
        if size == (8, 8):
            weight, bias = _digits_logistic_regression()
            x = ((images.detach().double().clamp(-1, 1) + 1) / 2).reshape(images.shape[0], -1)  # = pixels / 16
            return x @ weight.to(x.device).T + bias.to(x.device)
        raise RewardUnavailableError(f"the demo digit classifier scores 28x28 (MNIST) or 8x8 demo images, got "
                                     f"{size[0]}x{size[1]}; use EPD Reward (Local Model) for other models")

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
            raise RewardUnavailableError(f"unknown reward {kind!r}; use one of {sorted(LOCAL_KINDS)} (or "
                                         "'demo_classifier' for the demo digits model)")
        packages, what = LOCAL_KINDS[kind]
        self.kind, self.name, self.device = kind, kind, device
        if path is None or not Path(path).exists():
            raise RewardUnavailableError(
                f"reward model '{kind}' not found at {path!r}. Place {what} in ComfyUI's {REWARD_FOLDER}/ folder "
                f"(e.g. ComfyUI/{REWARD_FOLDER}/{kind}/) and pass that path; EPD never downloads reward weights.")
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            raise RewardUnavailableError(f"reward model '{kind}' needs the Python package(s) {', '.join(missing)}, "
                                         f"which are not installed in this environment "
                                         f"(pip install {' '.join(PIP_NAMES.get(m, m) for m in missing)}).")
        self.path = Path(path)
        self._scorer = _load_backend(kind, self.path, device)

    def __call__(self, images, prompts, tables=None) -> torch.Tensor:
        return self._scorer(images, prompts)


HPSV2_ARCH = "ViT-H-14"  # open_clip architecture HPSv2 fine-tunes (tests point this at a tiny registered config)
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _load_backend(kind, path, device):
    """Build `score(images, prompts) -> (B,)` from LOCAL files only. Images must already be decoded RGB in [0, 1]
    (B, 3, H, W) of any size (the model's preprocessing resizes); latent models need a VAE decode first."""
    if kind in ("clip", "pickscore"):
        return _clip_scorer(kind, path, device)
    if kind == "aesthetic":
        return _aesthetic_scorer(path, device)
    if kind == "hpsv2":
        return _hpsv2_scorer(path, device)
    if kind == "imagereward":
        return _imagereward_scorer(path, device)
    raise RewardUnavailableError(f"the '{kind}' scorer back-end is not implemented in this version; use one of "
                                 f"{sorted(LOCAL_KINDS)} with weights placed in ComfyUI's {REWARD_FOLDER}/, or pass "
                                 f"your own Reward")


def _check_rgb(kind, images):
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardUnavailableError(f"'{kind}' scores RGB images (B, 3, H, W) in [0, 1], got shape "
                                     f"{tuple(images.shape)}; decode latents first (connect the VAE)")
    return images.detach().float().clamp(0, 1).cpu()


# Sizes a config.json may declare (anything larger is no reward model this pack supports), and how many bytes of
# weights a declared parameter needs at least (1: 8-bit). A 1 kB config with huge sizes beside a tiny weight file
# must not make the server allocate gigabytes before the weights are found not to fit.
_CONFIG_LIMITS = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 128, "vocab_size": 1_000_000,
                  "max_position_embeddings": 65536, "image_size": 4096, "projection_dim": 16384,
                  "num_attention_heads": 256}
_MAX_CONFIG_BYTES = 1024 * 1024


def _check_config_sizes(kind, folder):
    """Refuse a transformers folder whose config.json describes a model larger than its weight files, before
    anything is allocated: the sizes are bounded, the model is built on the meta device (no memory) and its
    parameter count is compared with the bytes of the weight files."""
    import json
    from transformers import AutoConfig, AutoModel
    folder = Path(folder)
    cfg_file = folder / "config.json"
    try:
        if cfg_file.stat().st_size > _MAX_CONFIG_BYTES:
            raise RewardUnavailableError(f"'{kind}': config.json is larger than {_MAX_CONFIG_BYTES} bytes; not a "
                                         "model config")
        raw = json.loads(cfg_file.read_text())
    except OSError:
        return  # missing: from_pretrained reports it
    except (ValueError, RecursionError) as e:
        raise RewardUnavailableError(f"'{kind}': config.json is not valid JSON ({type(e).__name__})") from None
    sections = [raw] + [v for v in raw.values() if isinstance(v, dict)] if isinstance(raw, dict) else []
    for section in sections:
        for key, limit in _CONFIG_LIMITS.items():
            v = section.get(key)
            if v is not None and not (type(v) is int and 0 <= v <= limit):
                raise RewardUnavailableError(f"'{kind}': config.json sets {key}={str(v)[:30]}, outside 0..{limit}; "
                                             "this is not a supported reward model")
    have = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            wanted = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    except Exception as e:  # noqa: BLE001
        raise RewardUnavailableError(f"cannot read the '{kind}' model's config.json ({type(e).__name__}: "
                                     f"{str(e)[:200]})") from None
    if wanted > 1.1 * have + 100_000:
        raise RewardUnavailableError(f"'{kind}': config.json describes a model of {wanted:,} parameters but the "
                                     f"weight files hold only {have:,} bytes; refusing to build it. Place the "
                                     "model's own config.json and weights together")


def _load_hf_clip(kind, folder, device):
    """(model, processor) from a transformers CLIP-like folder, local files only; sizes checked first."""
    from transformers import AutoModel, AutoProcessor
    _check_config_sizes(kind, folder)
    try:
        # safetensors only: transformers reads pytorch_model.bin with torch.load, whose unpickler is unbounded
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).to(device).eval()
        proc = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise RewardUnavailableError(f"cannot load the '{kind}' model from {folder} ({type(e).__name__}: {e}); place a "
                                     f"complete model folder (config.json + model.safetensors + processor/tokenizer "
                                     f"files) in ComfyUI's {REWARD_FOLDER}/; weights only as safetensors (a "
                                     f"pytorch_model.bin you trust converts with: {CONVERT_TO_SAFETENSORS})") from None
    return model, proc


def _pixel_values(proc, images, device):
    """The processor's resize / crop / normalise on [0, 1] tensors (no 1/255 rescale)."""
    image_processor = getattr(proc, "image_processor", proc)
    return image_processor(images=list(images), return_tensors="pt", do_rescale=False)["pixel_values"].to(device)


def _image_features(model, pixel_values):
    """Projected CLIP image embeddings (works for transformers 4.x and 5.x, whose get_image_features differ)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def _clip_scorer(kind, path, device):
    model, proc = _load_hf_clip(kind, path, device)
    tokenizer = getattr(proc, "tokenizer", None)
    if tokenizer is None or not hasattr(model, "get_text_features"):
        raise RewardUnavailableError(f"'{kind}' at {path} needs a CLIP model with text and image towers plus its "
                                     "tokenizer files")

    @torch.no_grad()
    def score(images, prompts):
        images = _check_rgb(kind, images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"'{kind}' needs one prompt per image ({len(prompts)} prompts, {images.shape[0]} images)")
        pixels = _pixel_values(proc, images, device)
        text = tokenizer([str(p) for p in prompts], padding=True, truncation=True, return_tensors="pt").to(device)
        out = model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"), pixel_values=pixels)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu()
    return score


# How a user turns a reward .pt/.pth/.bin that our reader refuses into safetensors (README, Security), on a file
# they trust and on their own machine: torch.load runs there, never in the server.
CONVERT_TO_SAFETENSORS = ("python -c \"import sys, torch; from safetensors.torch import save_file; "
                          "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
                          "sd = sd.get('state_dict', sd); "
                          "save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])\" IN.pt OUT.safetensors")


def _load_state_dict(kind, file):
    """Tensors only: safetensors, or torch's .pt/.pth/.bin layouts read by our own bounded parser
    (epd_core/tables/torch_storage.py: an exact allow-list of what a saved state dict holds, every budget checked before
    anything is built). No byte of the file reaches torch.load or pickle: their unpicklers have no depth, size or
    time limit, so a crafted .pt could crash or freeze the server even with weights_only=True."""
    from epd_core.tables.torch_storage import TorchFileError, read_state_dict
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(file), device="cpu")
        else:
            sd = read_state_dict(file)
    except TorchFileError as e:
        raise RewardUnavailableError(
            f"cannot read the '{kind}' weights {file} as a tensor state dict ({str(e)[:300]}); EPD only loads plain "
            f"state dicts (.safetensors, or a torch .pt/.pth/.bin holding tensors), never pickled objects. If you "
            f"trust the file, convert it on your own machine with: {CONVERT_TO_SAFETENSORS}") from None
    except Exception as e:  # noqa: BLE001
        raise RewardUnavailableError(f"cannot read the '{kind}' weights {file} as a tensor state dict "
                                     f"({type(e).__name__}: {str(e)[:300]}); EPD only loads plain state dicts "
                                     "(.safetensors, or a torch .pt/.pth/.bin holding tensors), never pickled "
                                     "objects") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RewardUnavailableError(f"the '{kind}' weights {file} are not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _single_weight_file(kind, folder):
    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise RewardUnavailableError(f"'{kind}': expected exactly one weight file ({'/'.join(WEIGHT_SUFFIXES)}) in "
                                     f"{folder}, found {len(files)}; pass the file itself")
    return files[0]


# The score head shared by the LAION aesthetic predictor and ImageReward: nn.Sequential of Linear(d, 1024),
# Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1), no activations.
HEAD_LINEARS = (0, 2, 4, 6, 7)  # the Linear layers' indices in that Sequential (1, 3, 5 are Dropout)


def _linear_head(sd, in_width, file, what, prefix="", width_hint=""):
    """That head from its state dict (keys layers.{0,2,4,6,7}.{weight,bias}; `prefix` is how the file names
    them), every key and shape checked against an input of `in_width`. Dropout is the identity at eval, so the
    Linear layers alone are the head."""
    expected = {f"layers.{i}.{p}" for i in HEAD_LINEARS for p in ("weight", "bias")}
    if set(sd) != expected:
        raise RewardUnavailableError(
            f"{file} is not {what}: expected the keys {sorted(prefix + k for k in expected)} (Linear(d,1024)-Dropout-"
            f"Linear(1024,128)-Dropout-Linear(128,64)-Dropout-Linear(64,16)-Linear(16,1)), got missing "
            f"{sorted(prefix + k for k in expected - set(sd))}, unexpected {sorted(set(sd) - expected)[:8]}")
    linears, width = [], in_width
    for i in HEAD_LINEARS:
        w, b = sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise RewardUnavailableError(f"{file}: {prefix}layers.{i}.weight has shape {tuple(w.shape)}, expected "
                                         f"(n, {width}){width_hint}")
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w.float())
            lin.bias.copy_(b.float())
        linears.append(lin)
        width = w.shape[0]
    if width != 1:
        raise RewardUnavailableError(f"{file}: the last layer of {what} has {width} outputs, expected 1")
    return torch.nn.Sequential(*linears)


def _aesthetic_scorer(path, device):
    """LAION aesthetic predictor v2: MLP(L2-normalised CLIP image embedding) -> score (about 1..10 for ViT-L/14)."""
    path = Path(path)
    if path.is_dir():
        head_file, clip_dir = _single_weight_file("aesthetic", path), path / "clip"
        if not (clip_dir / "config.json").exists() and (path / "config.json").exists():
            clip_dir = path  # CLIP folder with the head file inside it
    else:
        head_file, clip_dir = path, path.parent / "clip"
    if not (clip_dir / "config.json").exists():
        raise RewardUnavailableError(f"'aesthetic' needs a CLIP ViT-L/14 folder (config.json + weights + processor "
                                     f"files) at {clip_dir}, next to the head {head_file.name}; place it in "
                                     f"ComfyUI's {REWARD_FOLDER}/aesthetic/clip/")
    sd = _load_state_dict("aesthetic", head_file)
    model, proc = _load_hf_clip("aesthetic", clip_dir, device)
    dim = int(getattr(model.config, "projection_dim", 0) or model.visual_projection.out_features)
    head = _linear_head(sd, dim, head_file, "a LAION aesthetic predictor head", "",
                        f" (the CLIP at {clip_dir} embeds to {dim})").to(device).eval()

    @torch.no_grad()
    def score(images, prompts):
        emb = _image_features(model, _pixel_values(proc, _check_rgb("aesthetic", images), device)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return head(emb).squeeze(-1).float().cpu()
    return score


def _resize_crop_normalise(images, size, mean, std):
    """CLIP-style eval transform on [0, 1] tensors: resize the short side to `size` (bicubic, antialiased), centre
    crop, normalise with per-channel mean / std (tensors of shape (1, 3, 1, 1))."""
    h, w = images.shape[-2:]
    s = max(size[0] / h, size[1] / w)
    nh, nw = max(size[0], round(h * s)), max(size[1], round(w * s))
    x = torch.nn.functional.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0, 1)
    top, left = (nh - size[0]) // 2, (nw - size[1]) // 2
    x = x[..., top:top + size[0], left:left + size[1]]
    return (x - mean) / std


def _hpsv2_scorer(path, device):
    """HPSv2(.1): an open_clip ViT-H-14 fine-tuned on human preferences; 100 * cos(image, prompt) (about 20..35)."""
    import open_clip
    path = Path(path)
    file = _single_weight_file("hpsv2", path) if path.is_dir() else path
    sd = _load_state_dict("hpsv2", file)
    try:
        with torch.device("meta"):  # keys and shapes first, on the meta device: ViT-H-14 is ~4 GB when built
            skeleton = open_clip.create_model(HPSV2_ARCH, pretrained=None, precision="fp32", device="meta")
    except Exception as e:  # noqa: BLE001
        raise RewardUnavailableError(f"open_clip cannot build {HPSV2_ARCH} ({type(e).__name__}: {e})") from None
    own = skeleton.state_dict()
    missing, unexpected, shapes = _key_mismatch(own, sd)
    if missing or unexpected or shapes:
        raise RewardUnavailableError(
            f"{file} does not match open_clip's {HPSV2_ARCH} (HPS_v2.1_compressed.pt expected), found before "
            f"building it: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}), {len(shapes)} size mismatches (e.g. {shapes[:2]})")
    del skeleton, own
    try:
        model = open_clip.create_model(HPSV2_ARCH, pretrained=None, precision="fp32", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise RewardUnavailableError(f"open_clip cannot build {HPSV2_ARCH} ({type(e).__name__}: {e})") from None
    try:
        result = model.load_state_dict(sd, strict=False)
        problem = (f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                   f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
                   if result.missing_keys or result.unexpected_keys else "")
    except RuntimeError as e:  # shape mismatches
        problem = str(e)[:400]
    if problem:
        raise RewardUnavailableError(f"{file} does not match open_clip's {HPSV2_ARCH} (HPS_v2.1_compressed.pt "
                                     f"expected): {problem}")
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(HPSV2_ARCH)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)

    def preprocess(images):  # open_clip's eval transform: resize the short side (bicubic), centre crop, normalise
        return _resize_crop_normalise(images, size, mean, std)

    @torch.no_grad()
    def score(images, prompts):
        images = _check_rgb("hpsv2", images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"'hpsv2' needs one prompt per image ({len(prompts)} prompts, {images.shape[0]} images)")
        img = model.encode_image(preprocess(images).to(device), normalize=True)
        txt = model.encode_text(tokenizer([str(p) for p in prompts]).to(device), normalize=True)
        return (100.0 * (img * txt).sum(-1)).float().cpu()
    return score


# ------------------------------------------------------------------------------------------------ ImageReward
# ImageReward (Xu et al. 2023) rebuilt from standard parts, WITHOUT the image-reward package (which pins old timm /
# transformers and unpickles): BLIP's ViT (timm VisionTransformer layout) -> BLIP's BERT text encoder with
# cross-attention to all image tokens (transformers' BlipTextModel, a port of BLIP's med.py BertModel: same key names,
# no token_type_embeddings, and cross-attention key/value of input width = the ViT width, 1024 for ViT-L, which plain
# BertModel cannot express) -> [CLS] state -> MLP -> (x - mean) / std. Sizes come from the checkpoint's shapes.

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.mean / .std
IMAGEREWARD_MAX_TOKENS = 35  # ImageReward.score: padding="max_length", truncation=True, max_length=35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION_HEAD_DIM = 64  # BLIP ViT-B 768/12, ViT-L 1024/16 heads: the head count is not visible in tensor shapes
_IR_VISION, _IR_TEXT, _IR_MLP = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
_IR_TEXT_UNUSED = ("embeddings.position_ids", "pooler.")  # a buffer / an unused pooler, if a checkpoint has them


def _imagereward_files(path):
    """(checkpoint, med_config.json or None, tokenizer folder) for a folder or for the ImageReward.pt inside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        ckpt = path / "ImageReward.pt"
        if not ckpt.is_file():
            ckpt = _single_weight_file("imagereward", path)
    else:
        ckpt = path
    tok = folder / "tokenizer"
    if not (tok / "vocab.txt").is_file():
        if (folder / "vocab.txt").is_file():
            tok = folder
        else:
            raise RewardUnavailableError(
                f"'imagereward' needs BERT's uncased WordPiece vocabulary: place bert-base-uncased's vocab.txt at "
                f"{folder / 'tokenizer' / 'vocab.txt'} (ComfyUI/{REWARD_FOLDER}/imagereward/tokenizer/vocab.txt); "
                f"EPD never downloads it")
    med = folder / "med_config.json"
    return ckpt, (med if med.is_file() else None), tok


def _built_checked(factory, sd, what, file):
    """factory() -> module, first built on the meta device (no memory) and compared key by key and shape by
    shape with `sd`: a crafted checkpoint cannot make the real build allocate more than the file holds."""
    with torch.device("meta"):
        _state_problems(factory(), sd, what, file)
    return factory()


def _strict_load(module, sd, what, file):
    """module.load_state_dict(sd, strict=True), with a message listing missing / unexpected / mis-shaped keys."""
    _state_problems(module, sd, what, file)
    module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _key_mismatch(own: dict, sd: dict) -> tuple[list, list, list]:
    """`sd`'s keys missing from a module's own state dict `own`, its unexpected keys, and shape mismatches."""
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(sd) & set(own))
              if sd[k].shape != own[k].shape]
    return missing, unexpected, shapes


def _state_problems(module, sd, what, file):
    missing, unexpected, shapes = _key_mismatch(module.state_dict(), sd)
    if missing or unexpected or shapes:
        raise RewardUnavailableError(
            f"{file} does not match ImageReward's {what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} shape mismatches (e.g. {shapes[:2]})")


def _ir_count(sd, fmt):
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def _imagereward_scorer(path, device):
    """ImageReward-v1.0: BLIP ViT-L/16 at 224 px + BLIP BERT with cross-attention + MLP head; about -2..2."""
    import json
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertTokenizer, BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    ckpt, med_file, tok_dir = _imagereward_files(path)
    sd = _load_state_dict("imagereward", ckpt)
    vis = {k[len(_IR_VISION):]: v for k, v in sd.items() if k.startswith(_IR_VISION)}
    txt = {k[len(_IR_TEXT):]: v for k, v in sd.items() if k.startswith(_IR_TEXT)
           and not k[len(_IR_TEXT):].startswith(_IR_TEXT_UNUSED)}
    mlp = {k[len(_IR_MLP):]: v for k, v in sd.items() if k.startswith(_IR_MLP)}
    # other keys (blip.vision_proj / blip.text_proj, unused by ImageReward.score) are ignored, like its strict=False
    needed = ["pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
    needed = [_IR_VISION + k for k in needed if k not in vis]
    needed += [_IR_TEXT + k for k in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                                      "encoder.layer.0.intermediate.dense.weight",
                                      "encoder.layer.0.crossattention.self.key.weight") if k not in txt]
    needed += [_IR_MLP + f"layers.{i}.weight" for i in HEAD_LINEARS if f"layers.{i}.weight" not in mlp]
    if needed:
        raise RewardUnavailableError(
            f"{ckpt} is not an ImageReward checkpoint (the state dict of ImageReward-v1.0's ImageReward.pt expected): "
            f"missing {needed[:6]} ({len(sd)} keys, e.g. {sorted(sd)[:3]})")

    # vision tower: sizes from the shapes (image size from the position table, BLIP's pos_embed has 1 + grid^2 rows)
    dim, patch = vis["pos_embed"].shape[-1], vis["patch_embed.proj.weight"].shape[-1]
    grid = round((vis["pos_embed"].shape[1] - 1) ** 0.5)
    if grid * grid + 1 != vis["pos_embed"].shape[1]:
        raise RewardUnavailableError(f"{ckpt}: {_IR_VISION}pos_embed has {vis['pos_embed'].shape[1]} rows, expected "
                                     f"1 + a square grid")
    img_size = grid * patch
    visual = _built_checked(lambda: VisionTransformer(
        img_size=img_size, patch_size=patch, embed_dim=dim, depth=_ir_count(vis, "blocks.{}.norm1.weight"),
        num_heads=max(1, dim // VISION_HEAD_DIM), mlp_ratio=vis["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias=True, num_classes=0, global_pool=""), vis, "BLIP ViT (blip.visual_encoder)", ckpt)
    _strict_load(visual, vis, "BLIP ViT (blip.visual_encoder)", ckpt)

    # text tower: BLIP's med_config.json gives heads / eps / activation; every size is read from the shapes
    med = {}
    if med_file is not None:
        try:
            med = json.loads(med_file.read_text())
        except (ValueError, RecursionError) as e:
            raise RewardUnavailableError(f"cannot read {med_file} as JSON ({type(e).__name__})") from None
    vocab, hidden = txt["embeddings.word_embeddings.weight"].shape
    if not isinstance(med, dict):
        raise RewardUnavailableError(f"{med_file} is not a JSON object; place ImageReward's own med_config.json")
    heads = med.get("num_attention_heads", max(1, hidden // 64))
    if type(heads) is not int or not 1 <= heads <= 256 or med.get("hidden_size", hidden) != hidden or hidden % heads:
        raise RewardUnavailableError(f"{med_file} (hidden_size {med.get('hidden_size')}, {heads} heads) does not fit "
                                     f"{ckpt} (text hidden size {hidden}); place ImageReward's own med_config.json")
    enc_width = txt["encoder.layer.0.crossattention.self.key.weight"].shape[1]
    if enc_width != dim:
        raise RewardUnavailableError(f"{ckpt}: the text encoder cross-attends to width {enc_width} but the ViT "
                                     f"embeds to {dim}")
    from transformers.activations import ACT2FN
    try:
        eps, pad = float(med.get("layer_norm_eps", 1e-12)), int(med.get("pad_token_id", 0))
        if med.get("hidden_act", "gelu") not in ACT2FN:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise RewardUnavailableError(f"{med_file}: layer_norm_eps / pad_token_id / hidden_act are invalid; place "
                                     "ImageReward's own med_config.json") from None
    config = BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=enc_width,
        intermediate_size=txt["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_ir_count(txt, "encoder.layer.{}.attention.self.query.weight"), num_attention_heads=heads,
        max_position_embeddings=txt["embeddings.position_embeddings.weight"].shape[0],
        hidden_act=str(med.get("hidden_act", "gelu")), layer_norm_eps=eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=pad,
        bos_token_id=None, eos_token_id=None, sep_token_id=None)
    if config.max_position_embeddings < IMAGEREWARD_MAX_TOKENS:
        raise RewardUnavailableError(f"{ckpt}: {config.max_position_embeddings} text positions, ImageReward needs "
                                     f"{IMAGEREWARD_MAX_TOKENS}")
    text = _built_checked(lambda: BlipTextModel(config, add_pooling_layer=False), txt,
                          "BLIP text encoder (blip.text_encoder)", ckpt)
    _strict_load(text, txt, "BLIP text encoder (blip.text_encoder)", ckpt)

    head = _linear_head(mlp, hidden, ckpt, "an ImageReward head", _IR_MLP)

    try:  # bert-base-uncased WordPiece, local files only (BLIP's extra [DEC] / [ENC] tokens are unused by score())
        tokenizer = BertTokenizer.from_pretrained(str(tok_dir), local_files_only=True, do_lower_case=True)
    except Exception as e:  # noqa: BLE001
        raise RewardUnavailableError(f"cannot load the BERT tokenizer from {tok_dir} ({type(e).__name__}: {e}); place "
                                     f"bert-base-uncased's vocab.txt there") from None
    if len(tokenizer) > vocab:
        raise RewardUnavailableError(f"the tokenizer at {tok_dir} has {len(tokenizer)} tokens but {ckpt} embeds only "
                                     f"{vocab}; place bert-base-uncased's vocab.txt")
    visual, text, head = visual.to(device).eval(), text.to(device).eval(), head.to(device).eval()
    size = (img_size, img_size)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(images, prompts):
        images = _check_rgb("imagereward", images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"'imagereward' needs one prompt per image ({len(prompts)} prompts, {images.shape[0]} "
                             f"images)")
        image_embeds = visual.forward_features(_resize_crop_normalise(images, size, mean, std).to(device))
        tokens = tokenizer([str(p) for p in prompts], padding="max_length", truncation=True,
                           max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")
        out = text(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
                   encoder_hidden_states=image_embeds,
                   encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device))
        x = head(out.last_hidden_state[:, 0].float()).squeeze(-1)
        return ((x - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).float().cpu()
    return score


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
