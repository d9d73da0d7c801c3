"""A small embedded demo diffusion model: class-conditional eps prediction on scikit-learn's 8x8 digits.

It lets the pack (and its tests, benchmark and example workflows) run a real learned diffusion model on a
CPU in seconds, with nothing downloaded. The "latent" is the digit image itself: 1 channel, 8x8, values
0..16 mapped to [-1, 1] (background -1, ink +1).

The noise schedule is exactly SD1.5's discrete VP schedule (scaled_linear betas, 1000 steps), and the network
takes what ComfyUI's `BaseModel` gives a discrete EPS model: the scaled input x / sqrt(sigma^2 + 1), the
integer timestep index of the nearest sigma, and a CONDITIONING tensor of shape (B, 1, 16) whose first 11
entries are a one-hot label (digits 0..9, 10 = "null" for the unconditional branch of classifier-free
guidance). So ComfyUI's ModelSamplingDiscrete, its schedulers and samplers apply unchanged, and
`DemoDenoiser` reproduces ComfyUI's numerics outside ComfyUI.

Pure torch + numpy + safetensors + einops; never imports ComfyUI.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 10
NULL_LABEL = 10             # label of the unconditional branch (trained with label dropout)
CONTEXT_DIM = 16            # one-hot of 11 labels, padded to 16 (entries 11..15 are reserved, ignored)
NUM_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.012   # SD1.5 "scaled_linear" (ComfyUI calls it "linear")
ASSETS = Path(__file__).resolve().parent / "assets"
# The embedded models: name -> weights file, network config, image size and the model_family of its tables.
DEMO_MODELS = {
    "mnist": {"weights": ASSETS / "demo_mnist.safetensors", "size": 28, "family": "epd_demo_mnist",
              "config": {"channels": [32, 64, 64], "emb_dim": 128, "groups": 8}},
    "digits": {"weights": ASSETS / "demo_digits.safetensors", "size": 8, "family": "epd_demo_digits",
               "config": {"channels": [32, 64], "emb_dim": 128, "groups": 8}},
}
DEFAULT_WEIGHTS = DEMO_MODELS["digits"]["weights"]
DEFAULT_CONFIG = DEMO_MODELS["digits"]["config"]


class DemoModelError(RuntimeError):
    """The demo weights are missing, corrupt or do not fit the network."""


# ----------------------------------------------------------------------------------------------- schedule

def demo_alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t of SD1.5's schedule, float64, computed the way ComfyUI's make_beta_schedule does."""
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def demo_sigmas() -> torch.Tensor:
    """The 1000 ascending sigmas (float32, bit-identical to ModelSamplingDiscrete.sigmas for SD1.5)."""
    ac = demo_alphas_cumprod()
    return (((1 - ac) / ac) ** 0.5).float()


# ---------------------------------------------------------------------------------------------- conditioning

def label_context(labels, dtype=torch.float32, device=None) -> torch.Tensor:
    """Labels (int, list or tensor; 0..9 digits, 10 or any negative = null) -> (B, 1, 16) one-hot context."""
    labels = torch.as_tensor(labels, device=device).long().flatten()
    labels = torch.where(labels < 0, torch.full_like(labels, NULL_LABEL), labels)
    if ((labels < 0) | (labels > NULL_LABEL)).any():
        raise ValueError(f"labels must be 0..{NUM_CLASSES - 1} or {NULL_LABEL} (null), got {labels.tolist()}")
    return F.one_hot(labels, CONTEXT_DIM).to(dtype).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------- network

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of the (float) timestep index 0..999."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time+class embedding modulates the second norm (scale/shift), which
    conditions far better than adding it to the features."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.emb(F.silu(emb)), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class DemoUNet(nn.Module):
    """A small UNet predicting eps: one ResBlock per level on the way down (stride-2 downsampling between
    levels), one in the middle, one per level on the way up (nearest upsampling + conv, skip concatenation).
    channels=(32, 64) is the 8x8 digits model (8x8, 4x4); (32, 64, 64) the 28x28 MNIST one (28, 14, 7).

    forward(x_in, timestep, context): x_in = x / sqrt(sigma^2 + 1) (B, 1, H, W); timestep (B,) index 0..999;
    context (B, T, 16) with the one-hot label in [..., :11] (averaged over T, so ComfyUI's conditioning
    concat/average nodes blend classes), None = unconditional. Extra keyword arguments that ComfyUI's
    BaseModel passes (control, transformer_options, ...) are accepted and ignored.
    """

    def __init__(self, channels=(32, 64), emb_dim: int = 128, groups: int = 8):
        super().__init__()
        ch = [int(c) for c in channels]
        self.config = {"channels": ch, "emb_dim": emb_dim, "groups": groups}
        self.time_dim = ch[0] * 2
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # a bias-free linear map of the one-hot label is a class-embedding table (and blends linearly)
        self.label_emb = nn.Linear(NULL_LABEL + 1, emb_dim, bias=False)
        self.conv_in = nn.Conv2d(1, ch[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(ch[max(i - 1, 0)], c, emb_dim, groups) for i, c in enumerate(ch))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in ch[:-1])
        self.mid = ResBlock(ch[-1], ch[-1], emb_dim, groups)
        self.up = nn.ModuleList(ResBlock(ch[min(i + 1, len(ch) - 1)] + c, c, emb_dim, groups)
                                for i, c in enumerate(ch))
        self.upsample = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in ch[1:])  # after nearest x2
        self.norm_out = nn.GroupNorm(groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], 1, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:  # ComfyUI's BaseModel.get_dtype() reads this
        return self.conv_in.weight.dtype

    def forward(self, x, timestep, context=None, **_):
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device).float().flatten().expand(b)
        if context is None:
            context = label_context([NULL_LABEL] * b, dtype=x.dtype, device=x.device)
        onehot = context[..., : NULL_LABEL + 1].mean(dim=1).to(x.dtype)
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype)) + self.label_emb(onehot)
        h, skips = self.conv_in(x), []
        for level, block in enumerate(self.down):
            h = block(h if level == 0 else self.downsample[level - 1](h), emb)
            skips.append(h)
        h = self.mid(h, emb)
        for level in reversed(range(len(self.up))):
            if level < len(self.up) - 1:
                h = self.upsample[level](F.interpolate(h, size=skips[level].shape[-2:], mode="nearest"))
            h = self.up[level](torch.cat([h, skips[level]], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# The first (two-level) file format named its blocks down1/down2/up1/up2/downsample/upsample.
_V1_KEYS = {"down1.": "down.0.", "down2.": "down.1.", "up1.": "up.0.", "up2.": "up.1.",
            "downsample.": "downsample.0.", "upsample.": "upsample.0."}


def _current_keys(state: dict) -> dict:
    if not any(k.startswith("down1.") for k in state):
        return state

    def rename(key):
        for old, new in _V1_KEYS.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return {rename(k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------- denoiser

class DemoDenoiser:
    """k-diffusion convention D(x, sigma) around a DemoUNet, with ComfyUI's exact numerics for a discrete EPS
    model (BaseModel._apply_model + ModelSamplingDiscrete): timestep = index of the nearest log-sigma in
    the table, input x / sqrt(sigma^2 + 1), D = x - sigma * eps.

    `cond` may be labels (int / list / tensor, -1 or 10 = null) or (B, T, 16) context tensors; when x holds K
    times as many samples (K stacked points), cond is tiled point-major with .repeat like ComfyUI does.
    With cfg != 1 the conditional and null branches run in one batched call and are mixed as ComfyUI's CFG:
    D = D_uncond + cfg * (D_cond - D_uncond).
    """

    def __init__(self, net: DemoUNet, cfg: float = 1.0):
        self.net = net
        self.cfg = float(cfg)
        self.sigmas = demo_sigmas()
        self.log_sigmas = self.sigmas.log()
        self.calls = 0

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Same expression as ModelSamplingDiscrete.timestep (argmin picks the same index on ties)."""
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def _context(self, cond, batch: int, device) -> torch.Tensor:
        if cond is None:
            cond = [NULL_LABEL]
        if torch.is_tensor(cond) and cond.dim() == 3:
            ctx = cond.to(device=device, dtype=torch.float32)
        else:
            ctx = label_context(cond, device=device)
        n = ctx.shape[0]
        if batch % n:
            raise ValueError(f"batch {batch} is not a multiple of the conditioning batch {n}")
        return ctx.repeat(batch // n, 1, 1)  # point-major tiling, as comfy.utils.repeat_to_batch_size

    @torch.no_grad()
    def eps_denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One network call, no guidance: mirrors BaseModel._apply_model line by line."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        s = sigma.view(sigma.shape[:1] + (1,) * (x.dim() - 1)) if sigma.numel() > 1 else sigma.view(())
        dtype = self.net.dtype
        xc = (x / (s ** 2 + 1.0) ** 0.5).to(dtype)
        t = self.timestep(sigma).float()
        eps = self.net(xc, t, context=context.to(device=x.device, dtype=dtype))
        self.calls += 1
        return x - eps.float() * s

    def __call__(self, x: torch.Tensor, sigma, cond=None, cfg=None, **_) -> torch.Tensor:
        """`cfg` overrides the model's own scale for this call (a trainer drawing one per batch)."""
        ctx = self._context(cond, x.shape[0], x.device)
        scale = self.cfg if cfg is None else float(cfg)
        if scale == 1.0:
            return self.eps_denoise(x, sigma, ctx)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        null = label_context([NULL_LABEL] * x.shape[0], device=x.device)
        # cond first, uncond second: one call of batch 2B (ComfyUI also batches both branches)
        both = self.eps_denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([ctx, null]))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + (d_cond - d_uncond) * scale


# ---------------------------------------------------------------------------------------------- weights I/O

def save_demo_model(net: DemoUNet, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    meta = {"config": json.dumps(net.config), "format": "epd-demo-v2"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_demo_model(path=None, device="cpu") -> DemoUNet:
    """Load the shipped demo weights (float32, eval mode). Raises DemoModelError with a useful message."""
    from safetensors import safe_open
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise DemoModelError(f"demo model weights not found at {path}; they ship with the pack "
                             f"(re-create them with scripts/train_demo_model.py)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta.get("config", json.dumps(DEFAULT_CONFIG)))
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise DemoModelError(f"demo model weights at {path} are unreadable or corrupt: {e}") from e
    # build in float32 explicitly: the process-wide default dtype may have been changed by the caller
    net = DemoUNet(tuple(config["channels"]), config["emb_dim"], config["groups"]).to(torch.float32)
    try:
        net.load_state_dict(_current_keys(state), strict=True)
    except RuntimeError as e:
        raise DemoModelError(f"demo model weights at {path} do not fit the DemoUNet ({config}): {e}") from e
    return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- sampling

def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. schedule with a final 0 (as ComfyUI's "karras" scheduler)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]).float()


@torch.no_grad()
def sample_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor, **extra) -> torch.Tensor:
    """Deterministic Heun (EDM Algorithm 1 without churn), as k-diffusion's sample_heun. x is noise * sigmas[0]."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, s * x.new_ones(x.shape[0]), **extra)) / s
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            d2 = (x_euler - denoiser(x_euler, s_next * x.new_ones(x.shape[0]), **extra)) / s_next
            x = x + (s_next - s) * (d + d2) / 2
    return x


def to_digit_pixels(x: torch.Tensor) -> torch.Tensor:
    """Latents in [-1, 1] -> sklearn digits pixel scale 0..16 (clamped)."""
    return ((x.clamp(-1, 1) + 1) * 8).reshape(x.shape[0], -1)
