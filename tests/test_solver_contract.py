"""What every registered solver variant does (epd_core/sampling/registry.py), each through the same code: an untrained
table on a sigma list, sampling it with a counted model (its registered calls per step), a save / load round trip, two
iterations of distillation with the EPD Trainer's recipe giving a table of the same variant, and in a real ComfyUI
server KSampler's entry, EPD Sampler and EPD Compare with that table. And what lets a new variant be its module plus
one registry entry: no other code compares a solver's name, and epd_core's module-level imports have no cycle."""
import ast
import math
import re
from pathlib import Path

import pytest
import torch

from epd_core.demo.models import karras_sigmas
from epd_core.training.distill import DistillConfig, distill
from epd_core.tables.params import EPDParams
from epd_core.demo.problems import demo_problem
from epd_core.sampling.plan import sampler_sigmas
from epd_core.sampling.registry import NAMES, SOLVERS, variant
from test_multistep import CountingModel

REPO = Path(__file__).resolve().parents[1]
BATCH, STEPS, K = 2, 4, 2  # samples, the EPD Trainer's `steps` input, points per row


@pytest.fixture(scope="module")
def digits():
    """The 8x8 demo model with gradients, on one thread (tiny ops on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield demo_problem("digits")
    torch.set_num_threads(threads)


def karras_list(problem, rows: int):
    """What the EPD Trainer's scheduler_list gives: a karras list of rows + 1 positive sigmas and a final 0."""
    return karras_sigmas(rows + 1, problem.sigma_min, problem.sigma_max).double().tolist(), \
        {"type": "explicit", "comfy_scheduler": "karras"}


@pytest.fixture(scope="module")
def trained(digits):
    """Every variant's table after 2 iterations of distillation, configured by its EPD Trainer recipe."""
    tables = {}
    for v in SOLVERS.values():
        fields = v.trainer_fields(lambda rows: karras_list(digits, rows), steps=STEPS, num_points=K, cfg_scale=2.0,
                                  lr=0.1 * v.lr_scale, sigma_min=digits.sigma_min)
        run = dict(solver=v.name, lr=0.1 * v.lr_scale, iterations=2, batch=BATCH, num_batches=1, teacher_steps=20,
                   inserted_steps=1, teacher_sigma_min=digits.sigma_min, model_family=digits.family)
        cfg = DistillConfig(**{**run, **fields})  # as the EPD Trainer: the variant's own fields win
        tables[v.name] = distill(digits.model, None, digits.noise_fn(cfg.sigmas[0]), cfg,
                                 extra_args_fn=digits.extra_args_fn)
    return tables


def calls_for(v, table) -> int:
    """Model calls on a list ending in 0 of one step per row, or one more for the final Euler step of a variant
    whose rows end at a positive sigma."""
    return v.calls_per_step * table.num_steps + (0 if v.own_last_step else 1)


def sample_counted(problem, v, table, sigmas):
    model = CountingModel(problem.model)
    g = torch.Generator().manual_seed(0)
    x = problem.noise_fn(float(sigmas[0]))(g, BATCH)
    with torch.no_grad():
        out = v.sample_fn()(model, x, torch.as_tensor(sigmas), table, extra_args=problem.extra_args_fn(g, BATCH),
                            disable=True)
    assert torch.isfinite(out).all() and out.shape == x.shape
    points = table.num_points if v.parallel_points else 1
    assert set(model.batches) <= {BATCH, BATCH * points}, model.batches  # the K points of a row in one call
    return out, len(model.batches)


def assert_round_trip(table, path, problem, sigmas):
    table.save(path)
    loaded = EPDParams.load(path)
    assert loaded.variant is table.variant and loaded.tensor_names() == table.variant.tensors
    for a, b in zip(loaded.tensors(), table.tensors()):
        assert torch.equal(a, b.float())
    assert loaded.metadata == {**table.metadata, "num_steps": table.num_steps, "num_points": table.num_points}
    stored = table.with_tensors([t.float() for t in table.tensors()])  # what the file holds: float32
    v = table.variant
    torch.testing.assert_close(sample_counted(problem, v, loaded, sigmas)[0],
                               sample_counted(problem, v, stored, sigmas)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_an_untrained_table_samples_with_its_registered_calls_and_survives_a_file(digits, tmp_path, name):
    v = variant(name)
    sigmas = karras_list(digits, STEPS)[0]
    table = v.untrained_table(sigmas, K)
    assert table.variant is v and table.tensor_names() == v.tensors
    _, calls = sample_counted(digits, v, table, sigmas)
    assert calls == calls_for(v, table)
    assert_round_trip(table, tmp_path / f"{name}.safetensors", digits, sigmas)


@pytest.mark.parametrize("name", NAMES)
def test_two_iterations_of_distillation_give_a_table_of_the_same_variant(digits, trained, tmp_path, name):
    v, table = variant(name), trained[name]
    assert table.solver == name and table.variant is v and table.tensor_names() == v.tensors
    assert math.isfinite(table.metadata["provenance"]["final_loss"])
    own = sampler_sigmas(table)  # EPD Sigmas' list
    assert sample_counted(digits, v, table, own)[1] == calls_for(v, table)
    assert_round_trip(table, tmp_path / f"{name}.safetensors", digits, own)


# ---- the structure: a variant is its module and its registry entry ---------------------------------------------
def module_level_imports(path: Path):
    """The import statements that run when the module is imported (not those inside functions)."""
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def epd_core_modules() -> dict[str, Path]:
    out = {}
    for path in (REPO / "epd_core").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """epd_core module -> the epd_core modules its module-level imports load (`from A import B`: A.B when B is a
    module, else A)."""
    modules = epd_core_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in module_level_imports(path):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                source = ".".join(p for p in (base, node.module) if p)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_epd_core_module_level_imports_have_no_cycle():
    graph = import_graph()
    # the registry imports the variant modules and the table format; tables/params.py reaches it only at call time
    variants = {"epd_core.tables.params"} | {v.sample.__module__ for v in SOLVERS.values()}
    assert variants <= graph["epd_core.sampling.registry"]
    assert "epd_core.sampling.registry" not in graph["epd_core.tables.params"]
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        visit(module)


def test_no_code_outside_a_variants_module_and_the_registry_compares_a_solver_name():
    """`solver == "epd_ms"`, `name in ("epd", ...)` and the like only where a variant checks its own tables."""
    own = {REPO / "epd_core" / "sampling" / "registry.py"} | {REPO / (v.sample.__module__.replace(".", "/") + ".py")
                                                 for v in SOLVERS.values()}
    found = []
    for path in sorted((REPO / "epd_core").rglob("*.py")) + sorted((REPO / "nodes").rglob("*.py")):
        if path in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    if any(isinstance(c, ast.Constant) and c.value in NAMES for c in values):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, found


# ---- through a real ComfyUI server ----------------------------------------------------------------------------
@pytest.mark.server
def test_ksampler_epd_sampler_and_epd_compare_run_every_variant(comfy_server, comfy_ref, trained):
    """Each variant's trained table, listed for KSampler: KSampler's entry picks it, EPD Sampler (with EPD Sigmas)
    runs it, both as epd_core samples them with the registered calls per step, and EPD Compare scores it."""
    from bench.comfyui_server import error_message
    from test_server_sampling import base_graph, batches, ksampler, read_latent, reference, save_latent
    folder = comfy_server.base / "models" / "epd_params"
    seed, graph, steps = 7, base_graph("contract"), {}
    for name, table in trained.items():
        v = variant(name)
        table.save(folder / f"contract_{name}.safetensors")
        steps[name] = table.num_steps + (0 if v.own_last_step else 1)  # KSampler steps: rows, or + a final step
        graph.update({
            f"logged_ks_{name}": {"class_type": "EPDTestCallLogger",
                                  "inputs": {"model": ["model", 0], "tag": f"contract_ks_{name}"}},
            f"logged_es_{name}": {"class_type": "EPDTestCallLogger",
                                  "inputs": {"model": ["model", 0], "tag": f"contract_es_{name}"}},
            f"ks_{name}": ksampler(("empty", 0), name, steps[name], seed, model=(f"logged_ks_{name}", 0)),
            f"params_{name}": {"class_type": "LoadEPDParams", "inputs": {"name": f"contract_{name}.safetensors"}},
            f"sampler_{name}": {"class_type": "EPDSampler", "inputs": {
                "params": [f"params_{name}", 0], "solver": "auto", "max_order": 0, "afs": "auto",
                "execution": "auto", "max_batch": 0}},
            f"sigmas_{name}": {"class_type": "EPDSigmas", "inputs": {
                "model": ["model", 0], "params": [f"params_{name}", 0], "append_zero": True}},
            f"guider_{name}": {"class_type": "CFGGuider", "inputs": {
                "model": [f"logged_es_{name}", 0], "positive": ["cond", 0], "negative": ["cond", 1], "cfg": 2.0}},
            f"es_{name}": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": [f"guider_{name}", 0], "sampler": [f"sampler_{name}", 0],
                "sigmas": [f"sigmas_{name}", 0], "latent_image": ["empty", 0]}},
            f"compare_{name}": {"class_type": "EPDCompare", "inputs": {
                "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1], "latent": ["empty", 0],
                "cfg": 2.0, "seeds": "0,1", "fit_seeds": 1, "nfe": str(calls_for(v, table)), "pack_pick": "none",
                "builtins": "euler", "schedulers": "karras", "reference_sampler": "dpmpp_2m",
                "reference_scheduler": "karras", "reference_steps": 10, "max_minutes": 5.0, "timing_repeats": 0,
                "params": [f"params_{name}", 0]}},
            f"save_ks_{name}": save_latent(f"ks_{name}", f"contract_ks_{name}"),
            f"save_es_{name}": save_latent(f"es_{name}", f"contract_es_{name}"),
        })
    graph["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    (folder / "ksampler_presets.txt").write_text("".join(f"contract_{name}\n" for name in trained))
    try:
        entry = comfy_server.run(graph, timeout=600)
    finally:
        for path in [folder / "ksampler_presets.txt", *(folder / f"contract_{name}.safetensors" for name in trained)]:
            path.unlink(missing_ok=True)
    assert entry["status"]["status_str"] == "success", error_message(entry) + comfy_server.log_tail()
    log = comfy_server.log_path.read_text(errors="replace")
    for name, table in trained.items():
        v = variant(name)
        calls, points = calls_for(v, table), table.num_points if v.parallel_points else 1
        # KSampler's entry logs the steps to a positive sigma
        assert f"{name} on epd_demo_digits with {steps[name] - 1} steps uses contract_{name}.safetensors" in log
        expected, _ = reference(comfy_ref, name, table, steps[name], seed)
        torch.testing.assert_close(read_latent(comfy_server, entry, f"save_ks_{name}"), expected, rtol=1e-4,
                                   atol=1e-4)
        own = sampler_sigmas(table, comfy_ref["ms"]).float()  # EPD Sigmas' output
        expected, _ = reference(comfy_ref, name, table, None, seed, sigmas=own)
        torch.testing.assert_close(read_latent(comfy_server, entry, f"save_es_{name}"), expected, rtol=1e-4,
                                   atol=1e-4)
        for tag in (f"contract_ks_{name}", f"contract_es_{name}"):  # cond + uncond in each call
            assert len(batches(comfy_server, tag)) == calls and set(batches(comfy_server, tag)) <= {
                2 * BATCH, 2 * BATCH * points}, (tag, batches(comfy_server, tag))
        text = entry["outputs"][f"compare_{name}"]["text"][0]
        assert re.search(rf"\n\s*{calls} \|.*table 1 - {name}, {table.num_steps} steps, K={table.num_points}: "
                         r"[\d.e+-]+ \([\d.]+\)", text), text
