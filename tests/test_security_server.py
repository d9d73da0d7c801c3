"""Security review regressions (issue 14) through a real ComfyUI server: every attack is a queued graph and/or a
file an attacker can place in input/ (uploads); each must fail fast with an error that names the problem and the
fix without the server's absolute paths, write nothing, and leave the server serving."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from bench import hostile_pickles
from bench.comfyui_server import COMFYUI, REPO, error_message
from epd_core.tables.params import EPDParams
from bench.official_pickle import official_pickle, random_tables, sd15_attrs

pytestmark = pytest.mark.server
PRETRAINED = REPO / "pretrained_params"


def shared_list_bomb(width, depth):
    inner = []
    for _ in range(depth):
        inner = [inner] * width
    return inner


def demo_predictor(num_steps=6, **attrs):
    """An official-format predictor for the demo digits family (num_steps time points = num_steps - 1 rows)."""
    a = sd15_attrs(num_steps=num_steps, backend=None, dataset_name="epd_demo_digits", backend_config={})
    a.update(attrs)
    return official_pickle(random_tables(num_steps, 2, seed=11), a)


def import_graph(pkl_path="", output_name="", overwrite=False, predictor="(no .pkl in models/epd_params)"):
    return {"imp": {"class_type": "EPDImportPredictor", "inputs": {
        "predictor": predictor, "output_name": output_name, "overwrite": overwrite, "pkl_path": pkl_path}}}


def run_error(server, graph, timeout=120):
    """Run a graph that must fail; returns its readable error."""
    entry = server.run(graph, timeout=timeout)
    assert entry["status"]["status_str"] == "error", entry
    return error_message(entry)


def run_ok(server, graph, timeout=300):
    entry = server.run(graph, timeout=timeout)
    assert entry["status"]["status_str"] == "success", error_message(entry) + server.log_tail()
    return entry


def assert_private(server, msg):
    """No absolute server path, no folder listing in an error a client sees."""
    assert str(server.base) not in msg and str(REPO) not in msg and str(COMFYUI) not in msg, msg
    assert not re.search(r"(?<![\w.])/(?:tmp|home|work|etc|root|usr)/", msg), msg


def still_serving(server):
    assert server.get("/system_stats")["system"]
    name = sorted(p.name for p in PRETRAINED.glob("*.safetensors"))[0]
    run_ok(server, {"p": {"class_type": "LoadEPDParams", "inputs": {"name": name}},
                    "v": {"class_type": "PreviewEPDParams", "inputs": {"params": ["p", 0]}}})


def demo_ksampler(steps, seed=1, model=("model", 0)):
    return {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 2}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": list(model), "seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "epd",
            "scheduler": "karras", "positive": ["cond", 0], "negative": ["cond", 1], "latent_image": ["empty", 0],
            "denoise": 1.0}},
        "out": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "latents/sec"}},
    }


def chosen(server, family, steps):
    found = re.findall(rf"EPD: epd on {re.escape(family)} with {steps} steps uses (.+)", server.log_path.read_text())
    assert found, server.log_tail()
    return found[-1]


def params_dir(server):
    return server.base / "models" / "epd_params"


# ---- item 1: the memory bomb through the Import node ------------------------------------------------------
def test_pkl_memory_bomb_uploaded_to_input_is_refused_and_server_keeps_serving(comfy_server):
    (comfy_server.base / "input" / "bomb.pkl").write_bytes(
        official_pickle(attrs=sd15_attrs(M=shared_list_bomb(64, 6))))
    before = sorted(p.name for p in params_dir(comfy_server).iterdir())
    msg = run_error(comfy_server, import_graph(pkl_path="bomb.pkl", output_name="bomb"))
    assert "EPDImportError" in msg and "bomb.pkl" in msg and "refused" in msg and "'M'" in msg, msg
    assert_private(comfy_server, msg)
    assert sorted(p.name for p in params_dir(comfy_server).iterdir()) == before  # nothing written
    still_serving(comfy_server)


# ---- issue 21, item 1: pickles that crashed, froze or bloated the server ------------------------------------
@pytest.mark.parametrize("name,build,words", [
    ("deep_key.pkl", hostile_pickles.deep_tuple_key, "nesting depth 32"),            # was: ComfyUI died (SIGSEGV)
    ("collide.pkl", hostile_pickles.colliding_int_keys, "10000 opcodes"),            # was: 16 s holding the GIL
    ("sets.pkl", hostile_pickles.empty_sets, "10000 opcodes"),                       # was: +246 MB
    ("views.pkl", hostile_pickles.stride_zero_views, "bytes of tensor data"),        # was: +600 MB, saved a table
])
def test_hostile_pickles_are_refused_within_budget_and_the_server_keeps_serving(comfy_server, name, build, words):
    (comfy_server.base / "input" / name).write_bytes(build())
    before = sorted(p.name for p in params_dir(comfy_server).iterdir())
    msg = run_error(comfy_server, import_graph(pkl_path=name, output_name="hostile"))
    assert "EPDImportError" in msg and f"{name}: refused" in msg and words in msg and "budget" in msg, msg
    assert_private(comfy_server, msg)
    assert sorted(p.name for p in params_dir(comfy_server).iterdir()) == before
    assert comfy_server.proc.poll() is None
    comfy_server.get("/system_stats")
    still_serving(comfy_server)


# ---- issue 29: storage bytes that crashed, froze or bloated torch.load(weights_only=True) inside the server -----
def server_peak_rss_mb(server) -> float | None:
    """The server process's own peak RSS (VmHWM; its import children not included), None without /proc."""
    try:
        status = (Path("/proc") / str(server.proc.pid) / "status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.parametrize("title", list(hostile_pickles.STORAGE_ATTACKS))
def test_hostile_storage_bytes_through_the_import_node_are_refused_and_cost_the_server_nothing(comfy_server, title):
    build, words = hostile_pickles.STORAGE_ATTACKS[title]
    name = "storage_" + re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:40] + ".pkl"
    (comfy_server.base / "input" / name).write_bytes(hostile_pickles.storage_call(build()))
    before = sorted(p.name for p in params_dir(comfy_server).iterdir())
    peak_before = server_peak_rss_mb(comfy_server)
    msg = run_error(comfy_server, import_graph(pkl_path=name, output_name="hostile_storage"))
    assert "EPDImportError" in msg and f"{name}: refused: a tensor storage: " in msg and words in msg, msg
    assert_private(comfy_server, msg)
    assert sorted(p.name for p in params_dir(comfy_server).iterdir()) == before  # nothing written
    assert comfy_server.proc.poll() is None  # was: SIGSEGV killed ComfyUI (deep tuples)
    if peak_before is not None:  # was: +236..+576 MB; the parse now runs in a child, and refuses in any case
        assert server_peak_rss_mb(comfy_server) - peak_before < 50
    still_serving(comfy_server)


def test_hostile_reward_pt_is_refused_without_torch_load_and_the_server_keeps_serving(comfy_server):
    folder = comfy_server.base / "models" / "epd_rewards"
    folder.mkdir(parents=True, exist_ok=True)
    build, words = hostile_pickles.STORAGE_ATTACKS["deep tuple key (zip data.pkl)"]
    (folder / "hostile_hps.pt").write_bytes(build())  # 300 kB: torch.load(weights_only=True) died of SIGSEGV
    try:
        msg = run_error(comfy_server, reward_graph("hpsv2", "hostile_hps.pt"))
        assert "hostile_hps.pt" in msg and words in msg and "never pickled objects" in msg, msg
        assert "save_file" in msg, msg  # the command that converts a file the user trusts
        assert comfy_server.proc.poll() is None
        still_serving(comfy_server)
    finally:
        (folder / "hostile_hps.pt").unlink(missing_ok=True)


# ---- item 3: pkl_path restricted, tables cannot poison KSampler, overwrite choice -------------------------
def test_import_pkl_path_only_reads_input_and_model_folders(comfy_server, tmp_path):
    outside = tmp_path / "outside.pkl"
    outside.write_bytes(demo_predictor())
    messages = [run_error(comfy_server, import_graph(pkl_path=p, output_name="x_outside"))
                for p in (str(outside), "../../" + outside.name, str(tmp_path / "missing.pkl"), "/etc/passwd")]
    for msg in messages:
        assert "not an existing .pkl file in ComfyUI's input/ or models/epd_params/" in msg, msg
        assert str(comfy_server.base) not in msg
    # existing and missing files outside give the same answer: no probing of the server's files
    assert messages[0].replace(str(outside), "P") == messages[2].replace(str(tmp_path / "missing.pkl"), "P")
    assert not (params_dir(comfy_server) / "x_outside.safetensors").exists()
    still_serving(comfy_server)


def test_uploaded_table_cannot_poison_plain_ksampler_until_the_operator_lists_it(comfy_server):
    folder = params_dir(comfy_server)
    # 4 KSampler steps = 3 steps to a positive sigma (a step count no other server test reads from the log)
    (comfy_server.base / "input" / "poison.pkl").write_bytes(demo_predictor(num_steps=4))
    entry = run_ok(comfy_server, import_graph(pkl_path="poison.pkl", output_name="000_poison"))
    assert (folder / "000_poison.safetensors").exists(), entry
    try:
        run_ok(comfy_server, demo_ksampler(4))
        assert chosen(comfy_server, "epd_demo_digits", 3) == "demo_digits_epd_nfe4.safetensors"  # was 000_poison
        # the operator's allow-list makes it a KSampler preset, and protects it from being replaced by nodes
        (folder / "ksampler_presets.txt").write_text("# tables KSampler may pick\n000_poison\n")
        run_ok(comfy_server, demo_ksampler(4, seed=2))
        assert chosen(comfy_server, "epd_demo_digits", 3) == "000_poison.safetensors"
        graph = {"p": {"class_type": "LoadEPDParams", "inputs": {"name": "demo_digits_epd_s4.safetensors"}},
                 "s": {"class_type": "SaveEPDParams", "inputs": {"params": ["p", 0], "name": "000_poison",
                                                                  "overwrite": True}}}
        msg = run_error(comfy_server, graph)
        assert "ksampler_presets.txt" in msg and "may not replace" in msg, msg
        msg = run_error(comfy_server, import_graph(pkl_path="poison.pkl", output_name="000_poison", overwrite=True))
        assert "ksampler_presets.txt" in msg, msg
    finally:
        (folder / "ksampler_presets.txt").unlink(missing_ok=True)
        (folder / "000_poison.safetensors").unlink(missing_ok=True)


def test_broken_listed_user_table_is_skipped_with_a_log_line(comfy_server):
    folder = params_dir(comfy_server)
    good = EPDParams.neutral(4, model_family="epd_demo_digits")
    meta = dict(good.metadata, num_steps="three", num_points=1)
    tensors = {n: t.contiguous() for n, t in zip(("theta_r", "theta_w", "theta_c", "theta_a"), good.tensors())}
    header = {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
              "epd_metadata": json.dumps(meta)}
    (folder / "broken_three.safetensors").write_bytes(st_save(tensors, metadata=header))
    big = EPDParams.neutral(4, num_points=64, model_family="epd_demo_digits")  # K = 64: 64 model evaluations a step
    big.save(folder / "huge_k.safetensors")
    (folder / "ksampler_presets.txt").write_text("broken_three.safetensors\nhuge_k\n../escape\n")
    try:
        run_ok(comfy_server, demo_ksampler(5, seed=3))  # was: ValueError for every KSampler epd run of the family
        log = comfy_server.log_path.read_text()
        assert "KSampler skips the table broken_three.safetensors: 'num_steps' is 'three'" in log
        assert "KSampler skips the table huge_k.safetensors: 'num_points' is '64'" in log
        assert "'../escape.safetensors' is not a plain file name" in log
        assert chosen(comfy_server, "epd_demo_digits", 4) == "demo_digits_epd_nfe5.safetensors"
    finally:
        for name in ("ksampler_presets.txt", "broken_three.safetensors", "huge_k.safetensors"):
            (folder / name).unlink(missing_ok=True)


def raw_table(path, table, **meta):
    """Write `table` with hand-edited metadata, as an attacker or a careless script would (no checks)."""
    m = dict(table.metadata, **meta)
    tensors = {n: t.contiguous() for n, t in zip(("theta_r", "theta_w", "theta_c", "theta_a"), table.tensors())}
    header = {"epd_format_version": "1", "epd_scale_dir": "0.0", "epd_scale_time": "0.0",
              "epd_metadata": json.dumps(m)}
    path.write_bytes(st_save(tensors, metadata=header))


def test_listed_tables_with_a_string_schedule_or_a_false_latency_are_not_used(comfy_server):
    folder = params_dir(comfy_server)
    # a string schedule: was AttributeError in every KSampler epd run of the family
    raw_table(folder / "str_sched.safetensors", EPDParams.neutral(5, model_family="epd_demo_digits"),
              schedule="polynomial", num_steps=5, num_points=2)
    # 200 rows to zero claiming a latency of 6 calls: was picked for KSampler 6 steps, and ran 200 steps
    liar = EPDParams.neutral(200, num_points=8, model_family="epd_demo_digits")
    sigmas = torch.logspace(1.2, -1, 201).tolist()
    raw_table(folder / "liar.safetensors", liar, afs=True, latency_nfe=6, num_steps=200, num_points=8,
              schedule={"type": "explicit", "to_zero": True, "override_sigmas": True, "sigmas": sigmas})
    (folder / "ksampler_presets.txt").write_text("str_sched\nliar\n")
    try:
        run_ok(comfy_server, demo_ksampler(7, seed=4))  # 6 steps to a positive sigma (no other test uses 6)
        log = comfy_server.log_path.read_text()
        assert "KSampler skips the table str_sched.safetensors: 'schedule' is 'polynomial'" in log, log[-3000:]
        assert chosen(comfy_server, "epd_demo_digits", 6) != "str_sched.safetensors"
        run_ok(comfy_server, demo_ksampler(6, seed=5))
        assert "liar" not in comfy_server.log_path.read_text()
    finally:
        for name in ("ksampler_presets.txt", "str_sched.safetensors", "liar.safetensors"):
            (folder / name).unlink(missing_ok=True)


def save_graph(name, overwrite=None, source="demo_digits_epd_s3.safetensors"):
    inputs = {"params": ["p", 0], "name": name}
    if overwrite is not None:
        inputs["overwrite"] = overwrite
    return {"p": {"class_type": "LoadEPDParams", "inputs": {"name": source}},
            "s": {"class_type": "SaveEPDParams", "inputs": inputs}}


def test_save_needs_overwrite_and_never_shadows_or_takes_odd_names(comfy_server):
    folder = params_dir(comfy_server)
    run_ok(comfy_server, save_graph("sec_saved"))
    # another source table, so ComfyUI's cache does not skip the node
    msg = run_error(comfy_server, save_graph("sec_saved", source="demo_digits_epd_s4.safetensors"))  # was: overwritten
    assert "already exists" in msg and "overwrite" in msg, msg
    assert_private(comfy_server, msg)
    run_ok(comfy_server, save_graph("sec_saved", overwrite=True))
    msg = run_error(comfy_server, save_graph("demo_digits_epd_s4", overwrite=True))
    assert "pack's own tables" in msg and not (folder / "demo_digits_epd_s4.safetensors").exists(), msg
    for name, words in (("x\n", "not a plain file name"), ("CON", "reserved device name"),
                        ("nul.safetensors", "reserved device name"), ("Lpt1.tables", "reserved device name"),
                        ("a" * 121, "not a plain file name"), ("trailing.", "not a plain file name")):
        msg = run_error(comfy_server, save_graph(name, overwrite=True))
        assert words in msg, (name, msg)
    assert sorted(p.name for p in folder.glob("*.safetensors") if p.name.lower().startswith(("x", "con", "nul", "lpt",
                                                                                             "aaa", "trail"))) == []
    (folder / "sec_saved.safetensors").unlink()
    still_serving(comfy_server)


# ---- item 2: the reward loader stays inside models/epd_rewards --------------------------------------------
def reward_graph(kind, path):
    return {
        "model": {"class_type": "EPDDemoModelLoader", "inputs": {"model": "digits 8x8"}},
        "cond": {"class_type": "EPDDemoConditioning", "inputs": {"digit": 3}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "reward": {"class_type": "EPDRewardLocalModel", "inputs": {"kind": kind, "path": path}},
        "trainer": {"class_type": "EPDTrainer", "inputs": {
            "mode": "rl", "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1],
            "latent": ["empty", 0], "steps": 3, "num_points": 2, "solver": "epd", "schedule": "epd_discrete",
            "teacher": "heun", "inserted_steps": 1, "iterations": 1, "learning_rate": 0.1, "batch": 2,
            "seed": 0, "cfg": 2.0, "objective": "per_step", "name": "sec_rl", "reward": ["reward", 0]}},
    }


def test_reward_paths_outside_the_rewards_folder_are_refused_without_leaks(comfy_server, tmp_path):
    secret = tmp_path / "secret_folder"
    secret.mkdir()
    for name in ("private_a.pth", "private_b.pth"):
        (secret / name).write_bytes(b"x")
    (comfy_server.base / "input" / "upload").mkdir(exist_ok=True)
    cases = [str(secret), str(tmp_path / "does_not_exist"), "../../input/upload", "/etc"]
    messages = [run_error(comfy_server, reward_graph("aesthetic", p)) for p in cases]
    for path, msg in zip(cases, messages):
        assert "refused" in msg and "epd_rewards" in msg, msg
        assert "private_a" not in msg and "found [" not in msg, msg  # was: the folder's file names
        assert str(comfy_server.base) not in msg
    assert messages[0].replace(cases[0], "P") == messages[1].replace(cases[1], "P")  # existence is not revealed
    # a missing relative name: a clear error naming the rewards folder, no absolute path
    msg = run_error(comfy_server, reward_graph("aesthetic", "not_there"))
    assert "'not_there' was not found inside models/epd_rewards/" in msg, msg
    assert_private(comfy_server, msg)
    still_serving(comfy_server)


def test_links_inside_the_rewards_folder_leading_outside_are_refused_without_echoing(comfy_server, tmp_path):
    secret = tmp_path / "secret_config.json"
    secret.write_text(json.dumps({"model_type": "TOPSECRET-1234", "api_key": "TOPSECRET-5678"}))
    folder = comfy_server.base / "models" / "epd_rewards" / "linky"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").symlink_to(secret)
    (folder / "model.safetensors").write_bytes(st_save({"x": torch.zeros(4)}))
    try:
        msg = run_error(comfy_server, reward_graph("clip", "linky"))
        assert "refused" in msg and "'config.json' inside it is a link leading outside models/epd_rewards/" in msg, msg
        assert "TOPSECRET" not in msg, msg  # was: the outside file's content in the error
        assert_private(comfy_server, msg)
    finally:
        (folder / "config.json").unlink()
        (folder / "model.safetensors").unlink()
        folder.rmdir()
    still_serving(comfy_server)


def test_small_config_with_huge_sizes_is_refused_before_allocating(comfy_server):
    folder = comfy_server.base / "models" / "epd_rewards" / "clip_bomb"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "clip", "projection_dim": 4096,
              "text_config": {"hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 48,
                              "num_attention_heads": 32, "vocab_size": 250000},
              "vision_config": {"hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 48,
                                "num_attention_heads": 32, "image_size": 224, "patch_size": 14}}
    (folder / "config.json").write_text(json.dumps(config))  # about 1 kB
    (folder / "model.safetensors").write_bytes(st_save({"x": torch.zeros(4)}))
    msg = run_error(comfy_server, reward_graph("clip", "clip_bomb"))
    assert "describes a model of" in msg and "refusing to build it" in msg, msg
    assert_private(comfy_server, msg)
    still_serving(comfy_server)


# ---- item 4: preview cap, trainer maxima and memory check --------------------------------------------------
def test_preview_of_a_4096_step_table_is_bounded(comfy_server):
    folder = params_dir(comfy_server)
    EPDParams.neutral(4096, num_points=64).save(folder / "sec_4096.safetensors")
    try:
        entry = run_ok(comfy_server, {"p": {"class_type": "LoadEPDParams", "inputs": {"name": "sec_4096.safetensors"}},
                                      "v": {"class_type": "PreviewEPDParams", "inputs": {"params": ["p", 0]}}})
        img = entry["outputs"]["v"]["images"][0]
        with Image.open(comfy_server.base / img["type"] / img.get("subfolder", "") / img["filename"]) as im:
            assert im.height < 64 * 46 + 200
    finally:
        (folder / "sec_4096.safetensors").unlink()


def test_trainer_maxima_are_runnable(comfy_server):
    info = comfy_server.object_info()
    rl = {**info["EPDRLSettings"]["input"]["required"]}
    assert rl["group_size"][1]["max"] * rl["prompts_per_update"][1]["max"] <= 4096  # was 64 x 4096 = 262,144
    assert info["EPDTrainer"]["input"]["required"]["batch"][1]["max"] <= 256


def test_teacher_pool_too_large_for_memory_is_refused_before_training(comfy_server):
    g = reward_graph("aesthetic", "x")
    del g["reward"]
    g["empty"]["inputs"].update(width=8192, height=8192)
    g["trainer"]["inputs"].update(mode="distill", steps=200, batch=256, name="sec_pool", reward=None)
    del g["trainer"]["inputs"]["reward"]
    msg = run_error(comfy_server, g)
    assert "teacher pool" in msg and "GiB" in msg and "Lower batch or steps" in msg, msg
    assert not (params_dir(comfy_server) / "checkpoints" / "sec_pool").exists()
    still_serving(comfy_server)


# ---- issue 21, item 2: RL prompts are capped and their conditioning counted in the memory check -------------
def rl_prompts_graph(prompts):
    g = reward_graph("aesthetic", "x")
    g["reward"] = {"class_type": "EPDRewardDemoClassifier", "inputs": {}}
    g["init"] = {"class_type": "LoadEPDParams", "inputs": {"name": "demo_digits_epd_s3.safetensors"}}
    g["settings"] = {"class_type": "EPDRLSettings", "inputs": {
        "prompts": prompts, "group_size": 2, "prompts_per_update": 1, "ppo_epochs": 1, "learning_rate": 1e-3,
        "clip": 0.2, "kl_coef": 0.0, "kappa": 15.0, "distill_iterations": 1}}
    g["trainer"]["inputs"].update(rl_settings=["settings", 0], init_params=["init", 0], name="sec_prompts")
    return g


def test_rl_prompt_lines_are_capped_before_encoding(comfy_server):
    for prompts in ("1\n" * 100_000, "1\n" * 1025, "1 " * 300_000):  # was: +423 MB for 100,000 lines, 2M killed
        msg = run_error(comfy_server, rl_prompts_graph(prompts))
        assert "at most 1024 prompts" in msg and "EPD RL Settings" in msg, msg
    msg = run_error(comfy_server, rl_prompts_graph("1\nseven\n" * 500))
    assert "got 500 other line(s), e.g. 'seven'" in msg and len(msg) < 1500, msg  # was: the whole list echoed
    assert not (params_dir(comfy_server) / "sec_prompts.safetensors").exists()
    still_serving(comfy_server)


# ---- issue 21, item 3: the trainer never replaces a table; errors never show the server's folders -----------
def distill_graph(name, steps=3):
    g = reward_graph("aesthetic", "x")
    del g["reward"], g["trainer"]["inputs"]["reward"]
    g["trainer"]["inputs"].update(mode="distill", steps=steps, iterations=2, name=name)
    return g


def test_trainer_refuses_to_replace_an_existing_table(comfy_server):
    target = params_dir(comfy_server) / "sec_exists.safetensors"
    EPDParams.neutral(3, model_family="epd_demo_digits").save(target)
    before = target.read_bytes()
    try:
        msg = run_error(comfy_server, distill_graph("sec_exists"))  # was: trained, then silently replaced it
        assert "'sec_exists.safetensors' already exists in models/epd_params/; nothing was trained" in msg, msg
        assert target.read_bytes() == before
        assert not (params_dir(comfy_server) / "checkpoints" / "sec_exists").exists()
        assert_private(comfy_server, msg)
    finally:
        target.unlink(missing_ok=True)


def test_write_and_resume_errors_do_not_show_server_paths(comfy_server):
    folder = params_dir(comfy_server)
    (folder / "sec_dir.safetensors").mkdir()  # a folder where the table would go: the write fails
    ckpt = folder / "checkpoints" / "sec_garbage" / "distill.distill-checkpoint"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    try:
        msg = run_error(comfy_server, save_graph("sec_dir", overwrite=True))
        assert "sec_dir.safetensors" in msg and "models/epd_params" in msg, msg
        assert_private(comfy_server, msg)  # was: the absolute models/epd_params path
        msg = run_error(comfy_server, distill_graph("sec_garbage"))
        assert "checkpoint models/epd_params/checkpoints/sec_garbage/distill.distill-checkpoint is unreadable" in msg, \
            msg
        assert_private(comfy_server, msg)
    finally:
        (folder / "sec_dir.safetensors").rmdir()
        ckpt.unlink()
        ckpt.parent.rmdir()
    still_serving(comfy_server)


# ---- item 5: messages a user sees --------------------------------------------------------------------------
def test_flow_patched_model_does_not_use_the_eps_tables(comfy_server):
    g = demo_ksampler(4, seed=4, model=("flow", 0))
    g["flow"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 3.0}}
    run_ok(comfy_server, g)
    log = comfy_server.log_path.read_text()
    assert "EPD: epd on epd_demo_digits_flow with 3 steps uses neutral table" in log  # was: the eps demo table
    assert "patched to 'flow' prediction" in log


def test_epd_sigmas_with_an_imported_discrete_table_is_exact(comfy_server):
    (comfy_server.base / "input" / "discrete.pkl").write_bytes(demo_predictor(num_steps=5, schedule_type="discrete"))
    run_ok(comfy_server, import_graph(pkl_path="discrete.pkl", output_name="sec_discrete"))
    g = demo_ksampler(4)
    del g["ks"]
    g.update({
        "params": {"class_type": "LoadEPDParams", "inputs": {"name": "sec_discrete.safetensors"}},
        "sampler": {"class_type": "EPDSampler", "inputs": {"params": ["params", 0], "solver": "auto", "max_order": 0,
                                                           "afs": "auto", "execution": "auto", "max_batch": 0}},
        "sigmas": {"class_type": "EPDSigmas", "inputs": {"model": ["model", 0], "params": ["params", 0],
                                                         "append_zero": True}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["cond", 0],
                                                         "negative": ["cond", 1], "cfg": 2.0}},
        "ks": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
    })
    try:
        run_ok(comfy_server, g)
        log = comfy_server.log_path.read_text()
        assert not re.search(r"sigmas differ from the table's training schedule; using rows by_index "
                             r"\(epd K=2 steps=4 schedule=discrete", log), log[-3000:]
    finally:
        (params_dir(comfy_server) / "sec_discrete.safetensors").unlink(missing_ok=True)


def test_ksampler_epd_with_a_listed_imported_discrete_table_is_exact_too(comfy_server):
    """KSampler's `epd` (here through KSamplerSelect, on the sigmas EPD Sigmas gives) treats an imported table
    whose schedule is defined through the model like EPD Sampler does: its rows are exact on its own sigmas."""
    folder = params_dir(comfy_server)
    # 9 time points = 8 rows: a step count no other server test of this family uses
    (comfy_server.base / "input" / "ks_discrete.pkl").write_bytes(demo_predictor(num_steps=9, schedule_type="discrete"))
    run_ok(comfy_server, import_graph(pkl_path="ks_discrete.pkl", output_name="sec_ks_discrete"))
    (folder / "ksampler_presets.txt").write_text("sec_ks_discrete\n")
    g = epd_sampler_graph("sec_ks_discrete.safetensors")
    g["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "epd"}}
    try:
        run_ok(comfy_server, g)
        assert chosen(comfy_server, "epd_demo_digits", 8) == "sec_ks_discrete.safetensors"
        log = comfy_server.log_path.read_text()
        assert not re.search(r"sigmas differ from the table's training schedule; using rows by_index "
                             r"\(epd K=2 steps=8 schedule=discrete", log), log[-3000:]  # was logged, rows by index
    finally:
        for name in ("ksampler_presets.txt", "sec_ks_discrete.safetensors"):
            (folder / name).unlink(missing_ok=True)


# ---- issue 21, item 4: misleading or unchecked inputs ------------------------------------------------------
def epd_sampler_graph(table="demo_digits_epd_s3.safetensors", model=("model", 0), append_zero=True, **sampler):
    g = demo_ksampler(4)
    del g["ks"]
    inputs = {"params": ["params", 0], "solver": "auto", "max_order": 0, "afs": "auto", "execution": "auto",
              "max_batch": 0, **sampler}
    g.update({
        "params": {"class_type": "LoadEPDParams", "inputs": {"name": table}},
        "sampler": {"class_type": "EPDSampler", "inputs": inputs},
        "sigmas": {"class_type": "EPDSigmas", "inputs": {"model": list(model), "params": ["params", 0],
                                                         "append_zero": append_zero}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": list(model), "positive": ["cond", 0],
                                                         "negative": ["cond", 1], "cfg": 2.0}},
        "ks": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
    })
    return g


@pytest.mark.parametrize("name,value", [("solver", "../../x"), ("afs", "x"), ("execution", "x")])
def test_epd_sampler_dropdown_values_are_checked(comfy_server, name, value):
    msg = run_error(comfy_server, epd_sampler_graph(**{name: value}))  # was: KeyError, or silently accepted
    assert f"EPD Sampler: {name} '{value}' is not one of auto, " in msg, msg


def test_ksampler_epd_with_more_steps_than_any_table_says_so(comfy_server):
    g = demo_ksampler(5000, model=("flow", 0))  # a family without tables: the neutral table would need 4999 rows
    g["flow"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 3.0}}
    msg = run_error(comfy_server, g)
    assert "KSampler 'epd' takes at most 4097 steps (4999 steps to a positive sigma were asked)" in msg, msg
    assert "parameter table" not in msg  # was: the neutral table's internal validation message


def test_epd_sigmas_with_an_imported_polynomial_table_is_exact(comfy_server):
    (comfy_server.base / "input" / "poly.pkl").write_bytes(demo_predictor(num_steps=5, schedule_type="polynomial",
                                                                          schedule_rho=7.0))
    run_ok(comfy_server, import_graph(pkl_path="poly.pkl", output_name="sec_poly"))
    try:
        run_ok(comfy_server, epd_sampler_graph("sec_poly.safetensors"))
        log = comfy_server.log_path.read_text()
        assert not re.search(r"sigmas differ from the table's training schedule; using rows by_index "
                             r"\(epd K=2 steps=4 schedule=polynomial", log), log[-3000:]
    finally:
        (params_dir(comfy_server) / "sec_poly.safetensors").unlink(missing_ok=True)


def test_epd_sampler_warns_when_the_table_is_for_another_family(comfy_server):
    g = epd_sampler_graph(model=("flow", 0))
    g["flow"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 3.0}}
    run_ok(comfy_server, g)
    assert ("EPD Sampler: the table was trained for the model family 'epd_demo_digits', but the model is "
            "'epd_demo_digits_flow'") in comfy_server.log_path.read_text()  # was: no word


def test_node_descriptions_point_to_repository_docs(comfy_server):
    info = comfy_server.object_info()
    epd = {k: v for k, v in info.items() if v.get("python_module") == "custom_nodes.ComfyUI-EPD"}
    text = json.dumps(epd)
    named = set(re.findall(r"[\w./-]+\.md\b", text))  # every document a description sends the user to
    assert "docs/method.md" in named
    missing = [doc for doc in named if not (REPO / doc.lstrip("./")).is_file()]
    assert not missing, f"node descriptions name documents the repository does not have: {missing}"


# ---- item 4: RL rollouts are chunked on out-of-memory (in a subprocess with the pack loaded) ----------------
CHUNK_SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
repo, comfy = Path(sys.argv[1]), sys.argv[2]
sys.path.append(comfy)
import comfy.cli_args
comfy.cli_args.args.cpu = True
spec = importlib.util.spec_from_file_location("ComfyUI_EPD", repo / "__init__.py",
                                              submodule_search_locations=[str(repo)])
pack = importlib.util.module_from_spec(spec); sys.modules["ComfyUI_EPD"] = pack; spec.loader.exec_module(pack)
import torch
from ComfyUI_EPD.nodes.training import _Chunks, RL_MAX_ROWS_PER_CALL
sizes = []
def fn(x, s):  # a device that fits at most 24 samples per call
    sizes.append(x.shape[0])
    if x.shape[0] > 24:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return x * s[:, None]
x, s = torch.randn(300, 3), torch.rand(300)
chunks = _Chunks(RL_MAX_ROWS_PER_CALL)
out = chunks(fn, x, s)
again = chunks(fn, x[:50], s[:50])
print("RESULT" + json.dumps({"equal": bool(torch.equal(out, x * s[:, None])), "rows": chunks.rows,
                             "max_call": max(sizes), "again": bool(torch.equal(again, x[:50] * s[:50, None])),
                             "cap": RL_MAX_ROWS_PER_CALL}))
"""


def test_rl_rollout_model_calls_are_chunked_and_split_on_out_of_memory(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHUNK_SCRIPT, str(REPO), str(COMFYUI)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT"):])
    assert res["equal"] and res["again"] and res["rows"] == 16 and res["cap"] <= 64
    assert res["max_call"] <= res["cap"]


# ---- issue 21, item 2: the conditioning of all RL prompts is counted before they are encoded ---------------
CONDITIONING_SCRIPT = CHUNK_SCRIPT.split("import torch")[0] + r"""
import torch
from ComfyUI_EPD.nodes.trainer_nodes import _encode_all
calls = []
def encode(text):  # a text encoder whose output is 64 MiB a prompt (shapes only: meta tensors)
    calls.append(text)
    return [[torch.empty(1, 4096, 4096, device="meta"), {"pooled_output": torch.empty(1, 4096, device="meta")}]]
try:
    _encode_all(["a prompt"] * 1024, encode, None)
    print("RESULT" + json.dumps({"error": None}))
except ValueError as e:
    print("RESULT" + json.dumps({"error": str(e), "calls": len(calls)}))
"""


def test_conditioning_of_all_rl_prompts_is_checked_against_memory_before_encoding_them(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CONDITIONING_SCRIPT, str(REPO), str(COMFYUI)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT"):])
    assert res["error"] and "the conditioning of 1024 RL prompts" in res["error"] and "64.0 GiB" in res["error"], res
    assert res["calls"] == 1  # only the first prompt was encoded
