"""pyproject.toml as the Comfy registry and comfy-cli read it (https://docs.comfy.org/registry/specifications):
the real validator (`comfy node validate`, comfy-cli in .venv-comfy-cli/, installed by scripts/setup_runtime.sh) and
its parser, and the rules a user installing the pack depends on: no dependency that ComfyUI installs itself (an
installer that honours `torch` here can replace ComfyUI's CUDA build), and every package the pack imports at load
time comes with ComfyUI."""
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH", REPO / ".comfyui"))
COMFY_CLI = REPO / ".venv-comfy-cli" / "bin"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# comfy-cli 1.23.0, comfy_cli/registry/config_parser.py: what it accepts (anything else is dropped with a warning)
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def comfyui_requirements() -> set[str]:
    lines = (COMFYUI / "requirements.txt").read_text().splitlines()
    return {requirement_name(line) for line in lines if line.strip() and not line.lstrip().startswith("#")}


def run_comfy_cli(*args, cwd):
    if not (COMFY_CLI / "comfy").exists():
        pytest.fail(f"comfy-cli is not installed in {COMFY_CLI.parent}: run `bash scripts/setup_runtime.sh` "
                    "(it installs comfy-cli 1.23.0 there, apart from the ComfyUI environment)")
    env = {"PATH": f"{COMFY_CLI}:/usr/bin:/bin", "HOME": str(cwd / "home"), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The files `comfy node validate` reads, in a folder of their own (it also lints the whole folder)."""
    folder = tmp_path_factory.mktemp("node")
    for name in ("pyproject.toml", "LICENSE", "README.md", "__init__.py"):
        shutil.copy(REPO / name, folder / name)
    return folder


def test_comfy_node_validate_passes_without_warnings(published):
    out = run_comfy_cli(str(COMFY_CLI / "comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "validate",
                        cwd=published)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "validation checks passed" in text and not re.search(r"warning|error", text, re.I), text


def test_comfy_clis_parser_reads_every_field(published):
    """What the registry gets from this pyproject.toml, read by comfy-cli's own parser."""
    code = ("import dataclasses as d, json; from comfy_cli.registry.config_parser import extract_node_configuration\n"
            "def plain(o):\n"
            "    if d.is_dataclass(o): return {f.name: plain(getattr(o, f.name)) for f in d.fields(o)}\n"
            "    return [plain(x) for x in o] if isinstance(o, list) else o\n"
            "print(json.dumps(plain(extract_node_configuration('pyproject.toml')), default=str))")
    out = run_comfy_cli(str(COMFY_CLI / "python"), "-c", code, cwd=published)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout.strip().splitlines()[-1])
    project, comfy = config["project"], config["tool_comfy"]
    assert project["dependencies"] == []
    assert project["supported_os"] == ["OS Independent"]
    assert project["supported_accelerators"] == ["GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Apple Metal"]
    assert project["supported_comfyui_version"] == COMFY["requires-comfyui"] != ""
    assert all(project["urls"][k].startswith("https://") for k in ("repository", "documentation", "issues"))
    assert project["license"]["file"] == "LICENSE" and project["version"] == PROJECT["version"]
    assert comfy["publisher_id"] and comfy["display_name"] and comfy["icon"] == COMFY["Icon"]


def test_pyproject_follows_the_registry_spec():
    name = PROJECT["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]) and PROJECT["description"]
    assert (REPO / PROJECT["license"]["file"]).is_file()
    classifiers = PROJECT["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems)
    assert accelerators and set(accelerators) <= ACCELERATORS
    assert all(PROJECT["urls"][k].startswith("https://") for k in ("Repository", "Documentation", "Issues"))
    assert COMFY["PublisherId"] and all((REPO / p).exists() for p in COMFY["includes"])
    assert all(VERSION_PART.match(part.strip()) for part in COMFY["requires-comfyui"].split(","))


def test_icon_is_a_file_of_this_repository_within_the_registry_limits():
    """Icon: an SVG, PNG, JPG or GIF URL of at most 800 x 400 pixels; here the raw URL of docs/icon.svg."""
    url = COMFY["Icon"]
    prefix = PROJECT["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert url.startswith(prefix + "/main/") and url.rsplit(".", 1)[-1] in ("svg", "png", "jpg", "gif")
    svg = ET.parse(REPO / url.removeprefix(prefix + "/main/")).getroot()
    assert svg.tag.endswith("svg") and float(svg.get("width")) <= 800 and float(svg.get("height")) <= 400


def test_requires_comfyui_is_a_version_the_tests_run_on():
    """The lower bound is no newer than the ComfyUI this suite runs on (the oldest tested)."""
    bound = re.search(r">=\s*(\d+\.\d+\.\d+)", COMFY["requires-comfyui"]).group(1)
    tested = re.search(r'__version__ = "([^"]+)"', (COMFYUI / "comfyui_version.py").read_text()).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(bound) <= as_tuple(tested), (bound, tested)


def test_no_dependency_that_comfyui_installs_itself():
    ours = {requirement_name(r) for r in PROJECT["dependencies"]}
    provided = comfyui_requirements() | {"torch", "torchvision", "torchaudio"}
    assert "torch" in provided and "numpy" in provided  # the requirements file was read
    assert not ours & provided, f"ComfyUI installs {sorted(ours & provided)} itself; keep them out of dependencies"


def module_level_imports(path: Path) -> set[str]:
    """Top-level module names imported when `path` is imported (statements at module level, also inside a
    module-level if / try); imports inside functions run only when used."""
    names, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def test_what_the_pack_imports_at_load_time_comes_with_comfyui():
    """Every third-party package imported by the pack's modules at load time is one of ComfyUI's requirements (or
    listed in dependencies): otherwise a registry install would load with an ImportError."""
    own = {p.name.removesuffix(".py") for p in COMFYUI.iterdir()} | {"epd_core", "nodes"}
    distributions = importlib.metadata.packages_distributions()
    allowed = comfyui_requirements() | {requirement_name(r) for r in PROJECT["dependencies"]} | {"torch"}
    files = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py")), *sorted((REPO / "epd_core").rglob("*.py"))]
    missing = {}
    for path in files:
        for module in module_level_imports(path) - own - set(sys.stdlib_module_names) - {"__future__"}:
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not dists & allowed:
                missing.setdefault(module, []).append(str(path.relative_to(REPO)))
    assert not missing, f"imported at load time but not installed by ComfyUI: {missing}"
