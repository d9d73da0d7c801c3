"""Every shipped workflow: the UI file (template browser) describes the same graph as its API twin, both are
valid for the node definitions the real server reports, and the demo workflows run to images."""
import json
import re
from pathlib import Path

import pytest

from scripts.workflow_format import ui_to_api, validate_api

REPO = Path(__file__).resolve().parents[1]

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


def test_the_files_are_what_make_workflows_writes():
    from scripts import make_workflows
    for name, build in make_workflows.WORKFLOWS.items():
        assert json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()) == build(), name


def test_side_by_side_rows_name_their_nfe_and_cfg_and_each_cfg_has_a_reference():
    """Two blocks (CFG 1, the tables' own, and CFG 5), the same rows in each, the last one a many-step reference;
    every Save Image title states the NFE and CFG its sampler really runs at."""
    api = json.loads((REPO / "workflows" / "api" / "epd_demo_side_by_side.json").read_text())
    blocks: dict[float, list[str]] = {}
    for node in api.values():
        if node["class_type"] != "SaveImage":
            continue
        title = node["_meta"]["title"]
        sampler = api[api[node["inputs"]["images"][0]]["inputs"]["samples"][0]]
        nfe, cfg = re.search(r"NFE (\d+), CFG ([\d.]+)$", title).groups()
        assert float(cfg) == sampler["inputs"]["cfg"], title
        if sampler["class_type"] == "KSampler":  # KSampler's steps are its model calls for these samplers
            assert int(nfe) == sampler["inputs"]["steps"], title
        else:  # SamplerCustom on AlignYourSteps
            assert int(nfe) == api[sampler["inputs"]["sigmas"][0]]["inputs"]["steps"], title
        blocks.setdefault(float(cfg), []).append(title.split(":")[0])
    assert sorted(blocks) == [1.0, 5.0] and blocks[1.0] == blocks[5.0]
    assert blocks[1.0][0] == "epd_ms" and blocks[1.0][-1] == "reference"
    refs = [n for n in api.values() if n.get("_meta", {}).get("title", "").startswith("reference")
            and n["class_type"] == "KSampler"]
    assert len(refs) == 2 and all(n["inputs"]["steps"] >= 100 for n in refs)


@pytest.mark.parametrize("name", DEMO)
def test_demo_workflows_run_and_write_images(comfy_server, name, tmp_path):
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    entry = comfy_server.run(api, timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images and all(comfy_server.output_path(i).stat().st_size > 100 for i in images)
    if name == "epd_demo_side_by_side":  # scripts/demo.py's picture: a labelled row per Save Image node
        from scripts import demo
        from PIL import Image
        saved = demo.saved_images(api, entry, comfy_server, tmp_path)
        assert [title for title, _ in saved] == [n["_meta"]["title"] for n in api.values()
                                                 if n["class_type"] == "SaveImage"]
        batch = api["3"]["inputs"]["batch_size"]
        assert all(len(files) == batch for _, files in saved)
        with Image.open(demo.side_by_side(tmp_path, saved)) as picture:
            tile = 28 * api["5"]["inputs"]["scale"]
            assert picture.size == (300 + batch * tile, len(saved) * tile + 16)  # 16: the gap between the CFGs
