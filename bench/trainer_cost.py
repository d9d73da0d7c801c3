"""What the EPD Trainer's distillation costs on a real SD1.5-size model: model calls, seconds and peak memory.

    .venv/bin/python bench/trainer_cost.py [--device cpu|cuda] [--size 64|512] [--dtype fp32|fp16|bf16]
                                           [--iterations 2] [--batch 8] [--out DIR]

The model is a random-weight SD1.5 checkpoint (UNet 860M + CLIP-L + VAE, bench/real_checkpoints.py) built in
memory and loaded by ComfyUI's own checkpoint loader: no download and no file. The distillation is the node's
own (nodes.training.distill_with_comfy_model, inside ComfyUI's CFGGuider) with the EPD Trainer's default
settings (steps 10, K 2, epd, epd_discrete, heun teacher, M 3, batch 8, CFG 7.5, per_step+end_to_end) unless
options change them; only --iterations is small.

Every model call goes through a counting wrapper (ComfyUI's unet function wrapper, so one call = one UNet
forward of batch samples x cond/uncond). A call under no_grad is the teacher's, one with gradients the
student's. Per iteration the script reports the calls of each kind, the seconds of the teacher pass (first to
last teacher call; the teacher runs once per noise batch, i.e. in each of the first 8 iterations) and of the
training step (the rest: student forward + backward + Adam), and the peak memory (CUDA: max_memory_allocated;
CPU: peak RSS of the process). Out-of-memory is reported as a result, not a crash.

Results: a markdown table on stdout and <out>/trainer_cost_<device>_<size>.{md,json}.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
DTYPE_FLAGS = {"fp32": "fp32_unet", "fp16": "fp16_unet", "bf16": "bf16_unet"}


def set_up_comfy(device: str, dtype: str | None):
    """ComfyUI in-process with the device and UNet dtype decided before comfy.model_management is imported,
    and this pack loaded as a package (its `nodes` must not clash with ComfyUI's top-level nodes.py)."""
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    import comfy.cli_args
    args = comfy.cli_args.args
    args.cpu = device == "cpu"
    if dtype:
        setattr(args, DTYPE_FLAGS[dtype], True)
    spec = importlib.util.spec_from_file_location("ComfyUI_EPD", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_EPD"] = pack
    spec.loader.exec_module(pack)
    import comfy.model_management
    return comfy.model_management


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class CallCounter:
    """A unet function wrapper: counts and times every UNet call, split by teacher (no grad) / student."""

    def __init__(self, device):
        self.device, self.iteration, self.calls = device, 0, []

    def __call__(self, apply_model, args):
        x = args["input"]
        kind = "student" if torch.is_grad_enabled() else "teacher"
        self._sync()
        t0 = time.perf_counter()
        out = apply_model(x, args["timestep"], **args["c"])
        self._sync()
        self.calls.append({"iteration": self.iteration, "kind": kind, "batch": int(x.shape[0]), "start": t0,
                           "end": time.perf_counter()})
        return out

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run(opts) -> dict:
    device = torch.device(opts.device)
    mm = set_up_comfy(opts.device, opts.dtype)
    from ComfyUI_EPD.nodes.trainer_nodes import _distill_config
    from ComfyUI_EPD.nodes.training import distill_with_comfy_model
    if str(REPO) not in sys.path:  # bench.real_checkpoints; after ComfyUI's folder: its nodes.py, not the pack's nodes/
        sys.path.append(str(REPO))
    from bench.real_checkpoints import load_in_process

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    t0 = time.time()
    model, clip, _vae = load_in_process("sd15")
    build_s = time.time() - t0
    log(f"random SD1.5 built and loaded in {build_s:.1f}s; UNet dtype {model.model.get_dtype()}, "
        f"load device {model.load_device}")
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut riding a horse"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    counter = CallCounter(mm.get_torch_device())
    patched = model.clone()
    patched.set_model_unet_function_wrapper(counter)
    latent = opts.size // 8
    with tempfile.TemporaryDirectory() as tmp:  # the node's config wants a checkpoint path; none is kept
        config = _distill_config(patched, opts.steps, opts.num_points, opts.solver, opts.schedule, opts.teacher,
                                 opts.inserted_steps, opts.iterations, opts.lr, opts.batch, 0, opts.cfg,
                                 opts.objective, Path(tmp) / "unused")
    config = dataclasses.replace(config, checkpoint_path=None, resume=False, grad_checkpointing=opts.grad_checkpointing)
    iteration_end = []

    def progress(it, loss):
        iteration_end.append((time.perf_counter(), loss))
        counter.iteration = it  # calls after this belong to the next iteration
        log(f"  iteration {it}/{opts.iterations}: loss {loss:.4g}, {time.perf_counter() - start:.1f}s so far")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"error": None}
    start = time.perf_counter()
    try:
        distill_with_comfy_model(patched, positive, negative, opts.cfg, (1, 4, latent, latent), config,
                                 progress=progress)
    except Exception as e:  # noqa: BLE001 - out-of-memory (or anything else) is a figure to report
        result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        result["traceback"] = traceback.format_exc()
        log(f"distillation stopped: {result['traceback']}")
    total = time.perf_counter() - start

    # per iteration: calls by kind, teacher seconds (first to last teacher call), the rest is the training step
    rows, prev = [], start
    for it, (end, loss) in enumerate(iteration_end):
        calls = [c for c in counter.calls if c["iteration"] == it]
        teacher = [c for c in calls if c["kind"] == "teacher"]
        student = [c for c in calls if c["kind"] == "student"]
        teacher_s = (teacher[-1]["end"] - teacher[0]["start"]) if teacher else 0.0
        rows.append({"iteration": it + 1, "loss": loss, "seconds": end - prev, "teacher_seconds": teacher_s,
                     "train_seconds": end - prev - teacher_s, "teacher_calls": len(teacher),
                     "student_calls": len(student), "teacher_batches": sorted({c["batch"] for c in teacher}),
                     "student_batches": sorted({c["batch"] for c in student})})
        prev = end
    result.update({
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else (platform.processor() or "cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "unet_dtype": str(model.model.get_dtype()), "image_size": opts.size, "rows": opts.steps,
        "latent": [4, latent, latent],
        "build_and_load_seconds": build_s, "total_seconds": total, "peak_memory_gib": peak_memory_gib(device),
        "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
        "config": {k: v for k, v in config.to_json().items() if k != "sigmas"}, "iterations": rows,
        "calls_outside_iterations": len([c for c in counter.calls if c["iteration"] >= len(iteration_end)]),
    })
    return result


def markdown(res) -> str:
    c = res["config"]
    lines = [
        f"# EPD Trainer distillation cost: random SD1.5, {res['image_size']}x{res['image_size']} ({res['device']})",
        "",
        (f"- device: {res['device_name']}; torch {res['torch']}; threads {res['threads']}; UNet "
         f"{res['unet_dtype']}; latent {'x'.join(map(str, res['latent']))}"),
        (f"- settings: {res['rows']} rows, K {c['num_points']}, {c['solver']}, teacher {c['teacher']} (M "
         f"{c['inserted_steps']}, >= {c['teacher_steps']} fine steps), batch {c['batch']}, CFG "
         f"{c['guidance_scale']}, objective {c['objective']}, grad checkpointing {c['grad_checkpointing']}"),
        (f"- model built and loaded in {res['build_and_load_seconds']:.1f}s; distillation "
         f"{res['total_seconds']:.1f}s; peak memory {res['peak_memory_gib']:.2f} GiB ({res['memory_kind']})"),
        *([f"- **stopped: {res['error']}**"] if res["error"] else []),
        "",
        "| iteration | s total | s teacher | s training | teacher calls (batch) | student calls (batch) | loss |",
        "|---|---|---|---|---|---|---|"]
    for r in res["iterations"]:
        lines.append(f"| {r['iteration']} | {r['seconds']:.1f} | {r['teacher_seconds']:.1f} | "
                     f"{r['train_seconds']:.1f} | {r['teacher_calls']} ({'/'.join(map(str, r['teacher_batches']))}) "
                     f"| {r['student_calls']} ({'/'.join(map(str, r['student_batches']))}) | {r['loss']:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size / 8); 64 or 512")
    ap.add_argument("--dtype", default=None, choices=list(DTYPE_FLAGS),
                    help="UNet weight dtype (default: ComfyUI's choice, fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--iterations", type=int, default=2)
    # the EPD Trainer node's defaults
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--num-points", type=int, default=2)
    ap.add_argument("--solver", default="epd", choices=["epd", "epd_plugin"])
    ap.add_argument("--schedule", default="epd_discrete")
    ap.add_argument("--teacher", default="heun")
    ap.add_argument("--inserted-steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--objective", default="per_step+end_to_end")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute each student step in backward (DistillConfig.grad_checkpointing; the node "
                         "does not set it)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    opts = ap.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    res = run(opts)
    md = markdown(res)
    print(md)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"trainer_cost_{res['device']}_{opts.size}_b{opts.batch}" + (f"_{opts.dtype}" if opts.dtype else "")
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out / stem}.md", file=sys.stderr)
    return 1 if res["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
