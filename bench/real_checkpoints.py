"""Random-weight checkpoints with the real SD1.5 / SDXL architectures, for tests and benchmarks that need the
real networks (UNet + CLIP + VAE, as CheckpointLoaderSimple loads them) but no downloaded weights.

The layout (every key name and shape) comes from ComfyUI's own classes: the UNet, text encoders and VAE are
constructed on the meta device (no memory) and their state dicts are converted with the model config's own
"for saving" functions, so the file is exactly what ComfyUI writes for such a checkpoint (CheckpointSave).
The values are seeded random numbers with a variance-preserving scale (N(0, 1/fan_in) for weights, ones for
norm scales): activations stay O(1) through the deep networks, so outputs are finite and depend on the input,
which is all the tests need. The same seed gives the same bytes on every machine.

SDXL is 3.5 B parameters (6.5 GiB in fp16), more than a CI machine's disk may have free. Its transformer blocks'
attention and feed-forward matrices (UNet and CLIP-G, 2.8 B parameters) are zero and the file is written sparse
(the zeros are holes, not bytes): those residual blocks pass their input through, while the convolutions, the
time / ADM embeddings, the text embeddings and the VAE keep random values, so the file takes ~1.3 GiB on disk
and the network still computes (every layer runs, the output depends on the latent, the text and `y`).

    path = ensure_checkpoint("sd15")  # built once (15 s; SDXL 40 s), then reused from the cache folder
    model, clip, vae = load_in_process("sd15")  # no file at all: for a GPU machine (bench/trainer_cost.py)

The cache folder is $EPD_TEST_MODEL_CACHE, else .comfyui/epd-test-models/ in the repo (git-ignored, and not a
models/ folder, so no ComfyUI instance lists these files as real checkpoints).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
CACHE = Path(os.environ.get("EPD_TEST_MODEL_CACHE", REPO / ".comfyui" / "epd-test-models"))
FORMAT_VERSION = {"sd15": 1, "sdxl": 2}  # bump when the values or layout change: the cached file name changes too
# SDXL's zeroed matrices: attention / feed-forward weights inside the UNet's and CLIP-G's transformer blocks
ZEROED = {"sdxl": re.compile(r"(transformer_blocks\.\d+\.(attn1|attn2|ff)\.|embedders\.1\.model\.transformer\."
                             r"resblocks\.\d+\.(attn|mlp)\.)")}

# The complete UNet configs ComfyUI's model detection derives from real checkpoints
# (comfy/model_detection.py, unet_config_from_diffusers_unet); dtype is added per build.
UNET_CONFIGS = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
# The SD / SDXL VAE (comfy/sd.py, VAE.__init__ for AutoencoderKL checkpoints)
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SEEDS = {"sd15": 1515, "sdxl": 2020}


def import_comfy(cpu: bool = True):
    """ComfyUI's package, imported in-process. `cpu` must be decided before comfy.model_management is imported."""
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_detection
    import comfy.sd
    return comfy


def checkpoint_path(arch: str) -> Path:
    return CACHE / f"epd-random-{arch}-fp16-v{FORMAT_VERSION[arch]}.safetensors"


# ---- layout ----------------------------------------------------------------------------------------------
def model_config(arch: str, dtype=torch.float16):
    comfy = import_comfy()
    config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[arch], dtype=dtype))
    if config is None or type(config).__name__.lower() != arch:
        raise RuntimeError(f"ComfyUI does not recognise the {arch} UNet config (got {type(config).__name__})")
    return config


def checkpoint_layout(arch: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as ComfyUI saves it, on the meta device (names, shapes, dtypes only)."""
    comfy = import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    config = model_config(arch)
    with torch.device("meta"):
        base = config.get_model({}, device=torch.device("meta"))
        clip_model = config.clip_target().clip(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    # the same prefixes the CLIP / VAE objects give their state dicts (comfy.sd.CLIP.get_sd, VAE.get_sd)
    clip_sd = clip_model.state_dict()
    vae_sd = vae.state_dict()
    del comfy
    return base.state_dict_for_saving(clip_sd, vae_sd)


# ---- values ----------------------------------------------------------------------------------------------
def random_value(name: str, like: torch.Tensor, gen: torch.Generator, arch: str = "") -> torch.Tensor:
    """A seeded value for one tensor: N(0, 1/fan_in) weights keep every layer's output at the scale of its
    input; norm scales are 1 and biases small, as in a trained network. ZEROED matrices are 0."""
    shape = tuple(like.shape)
    if len(shape) >= 2 and arch in ZEROED and ZEROED[arch].search(name):
        return torch.zeros(shape)
    if not like.dtype.is_floating_point:  # e.g. CLIP position_ids
        return torch.arange(shape[-1], dtype=like.dtype).expand(shape).clone() if shape else torch.zeros(())
    if name.endswith("logit_scale"):
        return torch.full(shape, 4.6052)
    if len(shape) <= 1:
        if name.endswith("weight"):  # a 1-d weight is always a norm's scale (linear / conv weights are >= 2-d)
            return torch.ones(shape)
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return torch.randn(shape, generator=gen) * fan_in ** -0.5


def random_state_dict(arch: str, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with seeded random values (keys in sorted order draw from one generator)."""
    layout = checkpoint_layout(arch)
    gen = torch.Generator().manual_seed(SEEDS[arch])
    out = {}
    for name in sorted(layout):
        value = random_value(name, layout[name], gen, arch)
        out[name] = value.to(dtype) if value.dtype.is_floating_point else value
    return out


def ensure_checkpoint(arch: str = "sd15") -> Path:
    """The cached random checkpoint, built when missing in a child process: building holds the whole state dict
    (8 GiB for SDXL), which the allocator would keep in the caller's resident memory after it is freed."""
    path = checkpoint_path(arch)
    if not path.is_file():
        subprocess.run([sys.executable, __file__, arch], check=True, env={**os.environ, "COMFYUI_PATH": str(COMFYUI)})
    return path


def build_checkpoint(arch: str, verbose: bool = True) -> Path:
    """Build and write the random checkpoint (atomically: concurrent builders never see a half file)."""
    path = checkpoint_path(arch)
    if path.is_file():
        return path
    t0 = time.time()
    sd = random_state_dict(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write_sparse(sd, tmp, {"epd_test": f"random {arch} weights, seed {SEEDS[arch]}, v{FORMAT_VERSION[arch]}"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if verbose:
        n = sum(t.numel() for t in sd.values())
        print(f"built {path.name}: {n / 1e6:.0f}M parameters, {path.stat().st_size / 2 ** 30:.2f} GiB "
              f"({path.stat().st_blocks * 512 / 2 ** 30:.2f} GiB on disk) in {time.time() - t0:.1f}s", file=sys.stderr)
    return path


DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def write_sparse(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file (8-byte header length, JSON header, raw little-endian data) whose all-zero tensors are
    left as holes: the file reads as zeros, as safetensors' own writer would have stored them, but the holes take
    no disk. Refuses up front, naming the folder and the fix, when the non-zero bytes would not fit."""
    header, offset, chunks = {"__metadata__": metadata}, 0, []
    for name in sorted(sd):
        t = sd[name].contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        if t.any():
            chunks.append((offset, t))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    need = sum(t.numel() * t.element_size() for _, t in chunks) + len(head)
    want = need * 1.05 + 2 ** 28
    free = make_room(path, want)
    if free < want:
        raise RuntimeError(f"{path.parent} has {free / 2 ** 30:.1f} GiB free; the random checkpoint needs "
                           f"{need / 2 ** 30:.1f} GiB: free some disk, or set EPD_TEST_MODEL_CACHE to a folder "
                           "with room")
    base = 8 + len(head)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for start, t in chunks:
            f.seek(base + start)
            f.write(t.reshape(-1).view(torch.uint8).numpy())
        f.truncate(base + offset)


def make_room(path: Path, want: float) -> int:
    """The free bytes beside `path`, after evicting the other cached random checkpoints (oldest first) while fewer
    than `want` are free: they are a cache, rebuilt in a minute when a later test needs them again."""
    others = sorted((p for p in path.parent.glob("epd-random-*.safetensors") if p != path),
                    key=lambda p: p.stat().st_mtime)
    free = shutil.disk_usage(path.parent).free
    while free < want and others:
        old = others.pop(0)
        print(f"{path.parent} has {free / 2 ** 30:.1f} GiB free: evicting the cached {old.name}", file=sys.stderr)
        old.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
    return free


def load_in_process(arch: str = "sd15", dtype=torch.float16):
    """(ModelPatcher, CLIP, VAE) of a random checkpoint built in memory, loaded by ComfyUI's own checkpoint
    loader (no file written): what a benchmark on a machine without the cached file uses."""
    comfy = import_comfy(cpu=False)  # the caller decides the device (set comfy.cli_args.args.cpu before)
    sd = random_state_dict(arch, dtype)
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True)
    return model, clip, vae


if __name__ == "__main__":
    for a in sys.argv[1:] or ["sd15"]:
        print(build_checkpoint(a))
