"""Shared fixtures. ComfyUI's own code (for reference samplers and the real server) comes from
COMFYUI_PATH or the runtime that scripts/setup_runtime.sh installs into .comfyui/ (bench/comfy_runtime.py); the
helpers the benchmarks and scripts share with the tests are in bench/ (`from bench.comfyui_server import ...`)."""
import contextlib
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from bench.comfy_runtime import import_comfy_sampling  # noqa: E402  (tests import it from here too)


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's global default dtype set for a block, restored afterwards (test modules differ in what they need)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


PACK_PACKAGE = "comfyui_epd_under_test"  # the pack is a package when ComfyUI loads it


def import_pack_nodes(*modules: str) -> dict:
    """The pack's node modules imported in-process (ComfyUI first, on the CPU) as part of the pack, as ComfyUI's
    loader does, but without running the pack's __init__ files, which register samplers and folders."""
    import_comfy_sampling()
    import comfy.model_management  # noqa: F401  (decides the device once, on first import: the CPU)
    if PACK_PACKAGE not in sys.modules:
        for name, path in ((PACK_PACKAGE, REPO), (PACK_PACKAGE + ".nodes", REPO / "nodes")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    return {m: importlib.import_module(f"{PACK_PACKAGE}.nodes.{m}") for m in modules}


@pytest.fixture(scope="session")
def comfy_sampling():
    return import_comfy_sampling()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (main.py --cpu) with this pack and the test-only nodes, shared by the session."""
    from bench.comfyui_server import ComfyServer
    server = ComfyServer(tmp_path_factory.mktemp("comfy_base")).start()
    yield server
    server.stop()


@pytest.fixture
def float64_one_thread():
    """Tiny float64 ops on one thread: OpenMP spin-waiting on a busy 2-core machine makes them 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with default_dtype(torch.float64):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gmm32():
    """The exact 32-d Gaussian-mixture denoiser of the distillation tests."""
    from epd_core.demo.gmm import GaussianMixtureDenoiser
    return GaussianMixtureDenoiser(dim=32, seed=0)


# ---- the 8x8 demo model's in-process reference for the server tests: ComfyUI's own scheduler / noise code ----
@pytest.fixture(scope="module")
def comfy_ref(comfy_sampling):
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers

    from epd_core.demo.models import DemoDenoiser, load_demo_model

    class Settings:
        sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}

    class DemoSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    class ModelStub:  # what KSampler needs to compute sigmas
        def __init__(self, ms):
            self.ms = ms

        def get_model_object(self, name):
            return self.ms

    ms = DemoSampling(Settings())
    return {"ms": ms, "stub": ModelStub(ms), "samplers": comfy.samplers, "sample": comfy.sample,
            "denoiser": DemoDenoiser(load_demo_model(), cfg=2.0)}  # the server tests' CFG
