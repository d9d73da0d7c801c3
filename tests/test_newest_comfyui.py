"""What newer ComfyUI changed under the pack (docs/compatibility.md), checked on the installed ComfyUI 0.3.75:
the real 0.3.75 classes wherever they exist, and a minimal in-process stand-in only for what 0.3.75 lacks
(a dynamic-VRAM patcher, the in_training flag, multi-GPU clones, the new fix_empty_latent_channels signature,
a model that reads the sampler's sigma list, a pack that replaces the sampler name lists). The server tests at
the end run the pack in a real ComfyUI server: registration against such a pack, and the trainer's progress
text (stage and time left) on the websocket."""
import json
import re
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from epd_core.params import EPDParams

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pack():
    """ComfyUI 0.3.75 (CPU) and the pack's node modules, imported in-process."""
    from conftest import import_pack_nodes
    mods = import_pack_nodes("compat", "samplers", "training", "trainer_nodes", "demo_nodes")
    return types.SimpleNamespace(**mods)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_patcher(pack, patcher_class=None):
    """The 8x8 demo model as the executor leaves it: built under inference_mode (inference-tensor weights), its
    layers turned into comfy.ops layers as in a real checkpoint (the demo UNet uses plain torch layers)."""
    import comfy.model_management
    import comfy.ops
    with torch.inference_mode():
        patcher = pack.demo_nodes.build_demo_model_patcher(which="digits")
    ops = {torch.nn.Conv2d: comfy.ops.disable_weight_init.Conv2d, torch.nn.Linear: comfy.ops.disable_weight_init.Linear,
           torch.nn.GroupNorm: comfy.ops.disable_weight_init.GroupNorm}
    for m in patcher.model.modules():
        if type(m) in ops:
            m.__class__ = ops[type(m)]
    if patcher_class is not None:
        patcher = patcher_class(patcher.model, patcher.load_device, patcher.offload_device)
    return patcher


def conds(pack):
    return pack.demo_nodes.demo_conditioning(3), pack.demo_nodes.demo_conditioning(10)


def distill_small(pack, patcher, **kw):
    from epd_core.training.distill import DistillConfig
    sigmas, spec = pack.training.training_sigmas(patcher, "epd_discrete", 2)
    config = DistillConfig(sigmas=sigmas, schedule=spec, num_points=2, inserted_steps=1, iterations=3, batch=2,
                           num_batches=2, lr=0.05, seed=1)
    pos, neg = conds(pack)
    history = []
    table = pack.training.distill_with_comfy_model(patcher, pos, neg, 2.0, (1, 1, 8, 8), config, history=history,
                                                        **kw)
    return table, history


def make_fake_dynamic_class():
    """A stand-in for ModelPatcherDynamic (new ComfyUI): the real 0.3.75 ModelPatcher, reporting is_dynamic(),
    streaming every comfy.ops weight per call and keeping state on the weight object, as the dynamic patcher
    does with the weight's model dtype."""
    from comfy.model_patcher import ModelPatcher

    class FakeDynamicPatcher(ModelPatcher):
        def is_dynamic(self):
            return True

        def load(self, *args, **kwargs):
            out = super().load(*args, **kwargs)
            for m in self.model.modules():
                if hasattr(m, "weight_function"):
                    m.comfy_cast_weights = True  # streamed: cast per call, through the weight functions
                    m.weight._dynamic_state = "streamed"  # what the real one keeps on the weight (its dtype)
            return out
    return FakeDynamicPatcher


def comfy_ops_weights(patcher):
    return {n: m.weight for n, m in patcher.model.named_modules() if hasattr(m, "weight_function")}


# ============================================================================== 1. dynamic VRAM patchers

def test_dynamic_patcher_trains_without_replacing_its_weights(pack, one_thread):
    patcher = demo_patcher(pack, make_fake_dynamic_class())
    assert pack.compat.is_dynamic(patcher)
    before = comfy_ops_weights(patcher)
    assert before and all(w.is_inference() for w in before.values())
    table, history = distill_small(pack, patcher)
    after = comfy_ops_weights(patcher)
    assert all(after[n] is before[n] for n in before), "a streamed weight of the dynamic patcher was replaced"
    assert all(getattr(w, "_dynamic_state", None) == "streamed" and w.is_inference() for w in after.values())
    # and yet the gradient reached the table through those inference-tensor weights
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))
    assert table.num_steps == 2 and table.num_points == 2
    assert not patcher.weight_wrapper_patches  # the wrappers went on a clone, not on the user's patcher


def test_plain_patcher_still_gets_autograd_safe_copies(pack, one_thread):
    patcher = demo_patcher(pack)
    assert not pack.compat.is_dynamic(patcher)
    before = comfy_ops_weights(patcher)
    distill_small(pack, patcher)
    after = comfy_ops_weights(patcher)
    assert all(after[n] is not before[n] and not after[n].is_inference() for n in before)


# ============================================================================= 2. in_training around training

def test_in_training_is_set_during_training_and_restored_after_errors(pack, one_thread, monkeypatch):
    import comfy.model_management as mm
    monkeypatch.setattr(mm, "in_training", False, raising=False)  # newer ComfyUI has this flag, 0.3.75 not
    seen = []
    patcher = demo_patcher(pack)

    def wrapper(apply_model, args):
        seen.append(mm.in_training)
        return apply_model(args["input"], args["timestep"], **args["c"])
    patcher.set_model_unet_function_wrapper(wrapper)
    distill_small(pack, patcher)
    assert seen and all(seen) and mm.in_training is False

    seen.clear()
    calls = []

    def cancel():  # Cancel after the first iteration, as comfy's interrupt does
        calls.append(1)
        if len(calls) > 1:
            raise InterruptedError("cancelled")
        return False
    with pytest.raises(InterruptedError):
        distill_small(pack, patcher, should_stop=cancel)
    assert seen and all(seen) and mm.in_training is False
    mm.in_training = "kept"  # a caller's own value comes back, not a hard-coded False
    with pytest.raises(InterruptedError):
        calls.clear()
        distill_small(pack, patcher, should_stop=cancel)
    assert mm.in_training == "kept"


def test_without_the_flag_nothing_is_added(pack):
    import comfy.model_management as mm
    assert not hasattr(mm, "in_training")  # ComfyUI 0.3.75
    with pack.compat.training_mode():
        assert not hasattr(mm, "in_training")


# ================================================================================= 3. multi-GPU clones

def test_multigpu_model_is_refused_for_distillation_with_the_fix(pack, one_thread):
    patcher = demo_patcher(pack)
    patcher.set_additional_models("multigpu", [patcher.clone()])  # what MultiGPU CFG Split leaves on the model
    with pytest.raises(RuntimeError, match="MultiGPU CFG Split") as e:
        distill_small(pack, patcher)
    assert "without the MultiGPU CFG Split node" in str(e.value)
    # the key the newest guider puts into the sampling model_options is found too
    assert pack.compat.multigpu_problem(None, {"multigpu_clones": {}})
    assert pack.compat.multigpu_problem(demo_patcher(pack)) is None
    # RL only samples through the model: its guider run is allowed
    pos, neg = conds(pack)
    out = pack.training.inside_guider(patcher, pos, neg, 2.0, (1, 1, 8, 8), [14.6, 1.0, 0.0], 0,
                                           lambda ctx: "sampled", needs_gradient=False)
    assert out == "sampled"


def run_epd_sampler(pack, patcher, seed=5):
    """The KSampler `epd` entry through ComfyUI's real CFGGuider (in-process)."""
    import comfy.samplers
    pos, neg = conds(pack)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(pos, neg)
    guider.set_cfg(2.0)
    table = EPDParams.from_values(torch.full((4, 1), 0.5), torch.ones(4, 1))  # one midpoint: dpm_2

    def epd(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return pack.samplers.run_epd("epd", model, x, sigmas, table, extra_args, callback, disable)
    sampler = comfy.samplers.KSAMPLER(epd)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "karras", 4)
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=seed)


def test_sampling_is_the_same_under_no_grad_as_on_the_multigpu_path(pack, one_thread):
    """The multi-GPU path runs the model under torch.no_grad and keeps the batch per cond: EPD sampling needs
    neither gradients nor a particular split, so it is unchanged (and not sent to the sequential fallback)."""
    patcher = demo_patcher(pack)
    reference = run_epd_sampler(pack, patcher)
    with torch.no_grad():
        patcher_mg = patcher.clone()
        patcher_mg.model_options["multigpu_clones"] = {}
        out = run_epd_sampler(pack, patcher_mg)
    assert torch.equal(out, reference)
    assert pack.compat.sequential_reasons(None, {"model_options": {"multigpu_clones": {}}}) == []


# ============================================================================ 4. fix_empty_latent_channels

def test_trainer_latent_uses_the_downscale_ratio_where_comfyui_takes_it(pack, monkeypatch, tmp_path):
    import comfy.sample
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd_params", ([str(tmp_path)], {".safetensors"}))
    patcher = demo_patcher(pack)
    latent = {"samples": torch.zeros(1, 4, 8, 8), "downscale_ratio_spacial": 16}
    # ComfyUI 0.3.75: no ratio parameter; the call must not pass it
    assert tuple(pack.compat.fix_empty_latent(patcher, latent).shape) == (1, 1, 8, 8)

    def newest(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        """The newer signature: an empty latent made for another spatial ratio is resized to the model's (8)."""
        channels = model.get_model_object("latent_format").latent_channels
        out = latent_image[:, :channels]
        if downscale_ratio_spacial is not None and downscale_ratio_spacial != 8:
            f = downscale_ratio_spacial / 8
            out = torch.zeros(out.shape[0], channels, round(out.shape[2] * f), round(out.shape[3] * f))
        return out
    monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", newest)
    assert tuple(pack.compat.fix_empty_latent(patcher, latent).shape) == (1, 1, 16, 16)

    class Shape(Exception):
        pass

    def stop(device, what, needed, fix):  # the trainer's first use of the shape; stop there
        raise Shape(what)
    monkeypatch.setattr(pack.trainer_nodes, "check_memory", stop)
    with pytest.raises(Shape, match=r"of shape \[1, 16, 16\]"):
        pack.trainer_nodes.run_distill(None, patcher, *conds(pack), latent, 2, 2, "epd", "epd_discrete", "heun", 1,
                                       3, 0.05, 2, 0, 2.0, "per_step", "shape_probe")


def test_trainer_splits_the_points_on_out_of_memory_and_else_names_the_fix(pack, monkeypatch, tmp_path, one_thread,
                                                                          caplog):
    """A device too small for training (as an SD1.5 at 512x512 and batch 8 on a GPU): when the K-point call does
    not fit, the points are evaluated in smaller calls and training goes on; when not even one call fits, the node
    says what ran out and what to lower, instead of a bare allocator error."""
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "epd_params", ([str(tmp_path)], {".safetensors"}))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def train(name, most_samples_per_call):
        patcher = demo_patcher(pack)

        def small_device(apply_model, args):
            if torch.is_grad_enabled() and args["input"].shape[0] > most_samples_per_call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return apply_model(args["input"], args["timestep"], **args["c"])
        patcher.set_model_unet_function_wrapper(small_device)
        return pack.trainer_nodes.run_distill(None, patcher, *conds(pack), latent, 2, 2, "epd", "epd_discrete",
                                              "euler", 0, 2, 0.05, 2, 0, 2.0, "per_step", name)
    # batch 2 x (cond, uncond): one point's call has 4 samples, the two points' call 8
    table = train("oom_points", 4).result[0]
    assert table.num_steps == 2 and "retrying 1 point(s) per call" in caplog.text
    with pytest.raises(RuntimeError, match=r"out of memory while training 2 steps at batch 2 .*Lower batch"):
        train("oom_probe", 2)


# ============================================================= 5. models that look their step up in the list

def test_meanflow_model_reading_the_sigma_list_is_refused_clearly(pack, one_thread):
    patcher = demo_patcher(pack)
    assert pack.compat.sigma_list_reader(patcher) is None
    run_epd_sampler(pack, patcher)  # an ordinary model samples
    patcher.model.diffusion_model.time_r_in = torch.nn.Linear(256, 4)  # HunyuanVideo 1.5 meanflow's r-embedder
    with pytest.raises(RuntimeError, match="meanflow") as e:
        run_epd_sampler(pack, patcher)
    assert "sample_sigmas" in str(e.value) and "euler" in str(e.value)
    with pytest.raises(RuntimeError, match="EPD Trainer: .*meanflow"):
        distill_small(pack, patcher)


# ============================================================== 6. sampler registration and the API version

def test_registration_reaches_every_list_and_repeats_without_duplicates(pack, monkeypatch):
    import comfy.samplers
    monkeypatch.setattr(comfy.samplers, "KSAMPLER_NAMES", [n for n in comfy.samplers.KSAMPLER_NAMES
                                                           if not n.startswith("epd")])
    monkeypatch.setattr(comfy.samplers, "SAMPLER_NAMES", comfy.samplers.KSAMPLER_NAMES + ["ddim"])
    # a pack loaded earlier gave KSampler its own copy (KSampler.SAMPLERS is SAMPLER_NAMES in ComfyUI)
    monkeypatch.setattr(comfy.samplers.KSampler, "SAMPLERS", comfy.samplers.SAMPLER_NAMES + ["rival"])
    lists = pack.samplers.sampler_name_lists()
    assert len(lists) == 3
    for _ in range(2):
        pack.samplers.register_dropdown_samplers()
    for names in lists:
        assert names.count("epd") == 1 and names.count("epd_plugin") == 1
    fn = comfy.samplers.ksampler("epd").sampler_function  # how ComfyUI finds a sampler by name
    assert fn.epd_solver == "epd"


def test_pinned_api_version_and_its_fallback(pack, monkeypatch, caplog):
    import comfy_api.latest
    import comfy_api.v0_0_2
    assert pack.compat.PINNED_API == "comfy_api.v0_0_2"
    assert pack.compat.load_comfy_api() is comfy_api.v0_0_2  # in 0.3.75 (and the newest ComfyUI)
    assert pack.compat.io is comfy_api.latest.io  # v0_0_2 re-exports it today: one set of types for all nodes
    monkeypatch.setitem(sys.modules, "comfy_api.v0_0_2", None)  # a ComfyUI without it
    with caplog.at_level("WARNING", logger="epd"):
        api = pack.compat.load_comfy_api()
    assert api is comfy_api.latest and "comfy_api.v0_0_2 is not importable" in caplog.text


# ====================================================================================== real server

RIVAL_PACK = '''"""Test-only pack: rebuilds ComfyUI's sampler name lists from scratch, dropping every name it did
not make."""
import comfy.samplers
base = [n for n in comfy.samplers.KSAMPLER_NAMES if not n.startswith("epd")]
comfy.samplers.KSAMPLER_NAMES = base + ["rival"]
comfy.samplers.SAMPLER_NAMES = comfy.samplers.KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
comfy.samplers.KSampler.SAMPLERS = comfy.samplers.SAMPLER_NAMES
NODE_CLASS_MAPPINGS = {}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from bench.comfyui_server import ComfyServer
    base = tmp_path_factory.mktemp("newest_base")
    rival = base / "custom_nodes" / "rival_sampler_pack"
    rival.mkdir(parents=True)
    (rival / "__init__.py").write_text(RIVAL_PACK)
    srv = ComfyServer(base, env={"OMP_NUM_THREADS": "1"}).start()
    yield srv
    srv.stop()


def ksampler_graph(sampler, select=False):
    g = {"model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
         "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 3}},
         "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    if select:
        g["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
        g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "karras",
                                                                  "steps": 4, "denoise": 1.0}}
        g["run"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["model", 0], "add_noise": True, "noise_seed": 1, "cfg": 2.0, "positive": ["cond", 0],
            "negative": ["cond", 1], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}}
    else:
        g["run"] = {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": 1, "steps": 4, "cfg": 2.0, "sampler_name": sampler, "scheduler": "karras",
            "positive": ["cond", 0], "negative": ["cond", 1], "latent_image": ["empty", 0], "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "newest"}}
    return g


@pytest.mark.server
def test_epd_stays_selectable_when_another_pack_replaces_the_lists(server):
    from bench.comfyui_server import error_message
    for select in (False, True):
        for sampler in ("epd", "epd_plugin"):
            entry = server.run(ksampler_graph(sampler, select))
            assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    info = server.get("/object_info")
    assert "epd" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert "epd" in json.dumps(info["KSamplerSelect"]["input"]["required"]["sampler_name"])
    assert "rival" in info["KSampler"]["input"]["required"]["sampler_name"][0]  # the other pack's names stay


def progress_texts(server, prompt, timeout=300):
    """Queue `prompt`; the trainer node's progress-text lines from the websocket (binary TEXT frames)."""
    import websocket
    from bench.comfyui_server import error_message
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=timeout)
    texts = []
    try:
        pid = server.queue(prompt)
        while True:
            raw = ws.recv()
            if isinstance(raw, bytes):
                event, = struct.unpack(">I", raw[:4])
                if event == 3:  # BinaryEventTypes.TEXT: node id length, node id, text
                    n, = struct.unpack(">I", raw[4:8])
                    if raw[8:8 + n].decode() == "trainer":
                        texts.append(raw[8 + n:].decode())
                continue
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") == pid and (msg["type"] in ("execution_success", "execution_error")
                                                 or (msg["type"] == "executing" and data.get("node") is None)):
                break
    finally:
        ws.close()
    entry = server.wait(pid, timeout)
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    return texts


def trainer_graph(name, iterations, mode="distill"):
    g = {"model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
         "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 3}},
         "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "trainer": {"class_type": "EPDTrainer", "inputs": {
             "mode": mode, "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
             "latent": ["empty", 0], "steps": 3, "num_points": 2, "solver": "epd", "schedule": "epd_discrete",
             "teacher": "heun", "inserted_steps": 1, "iterations": iterations, "learning_rate": 0.1, "batch": 2,
             "seed": 7, "cfg": 2.0, "objective": "per_step", "name": name, "measure_minutes": 0.0}}}
    if mode == "rl":
        g["reward"] = {"class_type": "EPDRewardDemoClassifier", "inputs": {}}
        g["settings"] = {"class_type": "EPDRLSettings", "inputs": {
            "prompts": "1\n7", "group_size": 2, "prompts_per_update": 2, "ppo_epochs": 1, "learning_rate": 1e-3,
            "clip": 0.2, "kl_coef": 0.0, "kappa": 15.0, "distill_iterations": 10}}
        g["trainer"]["inputs"].update(reward=["reward", 0], rl_settings=["settings", 0])
    return g


ETA = re.compile(r"ETA (teacher )?\d+(s|m\d\ds|h\d\dm)")


@pytest.mark.server
@pytest.mark.slow
def test_distill_progress_names_the_stage_and_the_time_left(server):
    texts = progress_texts(server, trainer_graph("progress_distill", 20))
    print("\n".join(texts))
    teacher = [t for t in texts if t.startswith("teacher: solving noise batch")]
    assert [t.split()[4] for t in teacher] == [f"{i}/8" for i in range(1, 9)]  # every teacher batch announced
    assert all(ETA.search(t) for t in teacher[1:])  # an ETA from the measured iterations, also for the teacher
    assert "all at most" in teacher[-1]  # before any training iteration: the teacher ETA and a bound for all
    training = [t for t in texts if t.startswith("training: iteration")]
    assert training and training[-1].startswith("training: iteration 20/20") and training[-1].endswith("done")
    assert any(ETA.search(t) and "at most" not in t for t in training[:-1])  # a point estimate once measured


@pytest.mark.server
@pytest.mark.slow
def test_rl_progress_names_cold_start_rollouts_and_updates(server):
    texts = progress_texts(server, trainer_graph("progress_rl", 3, mode="rl"))
    print("\n".join(texts))
    assert texts[0].startswith("cold-start distillation: the starting table (10 iterations), then 3 RL updates")
    assert any(t.startswith("cold-start distillation, teacher: solving noise batch 2/8") and ETA.search(t)
               for t in texts)
    assert any(t.startswith("cold-start distillation, training: iteration 10/10") for t in texts)
    assert "RL update 1/3: rollouts, ETA after the first update" in texts
    done = [t for t in texts if re.match(r"RL update \d/3 done  mean reward", t)]
    assert done and done[-1].startswith("RL update 3/3 done") and any(ETA.search(t) for t in done[:-1])
