"""Every shipped workflow: the UI file (template browser) describes the same graph as its API twin, both are
valid for the node definitions the real server reports, and the demo workflows run to images."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from workflow_format import ui_to_api, validate_api  # noqa: E402

pytestmark = pytest.mark.server
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
DEMO = [p.stem for p in UI_FILES if p.stem.startswith("epd_demo") and "trainer" not in p.stem]


def test_every_workflow_has_an_api_twin():
    assert {p.stem for p in UI_FILES} == {p.stem for p in (REPO / "workflows" / "api").glob("*.json")}
    assert len(UI_FILES) >= 6


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_describe_the_same_valid_graph(comfy_server, path):
    info = comfy_server.object_info()
    ui = json.loads(path.read_text())
    api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    assert validate_api(api, info) == []
    converted = ui_to_api(ui, info)
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert converted == strip
    assert all(n["type"] in info for n in ui["nodes"])


def test_template_route_lists_and_serves_the_workflows(comfy_server):
    listed = comfy_server.get("/workflow_templates")["ComfyUI-EPD"]
    assert sorted(listed) == sorted(p.stem for p in UI_FILES)
    served = comfy_server.get("/api/workflow_templates/ComfyUI-EPD/epd_demo_txt2img.json")
    assert served["nodes"]


@pytest.mark.parametrize("name", DEMO)
def test_demo_workflows_run_and_write_images(comfy_server, name):
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    entry = comfy_server.run(api)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and all(comfy_server.output_path(i).stat().st_size > 100 for i in images)
