"""What a user sees in the node library and on the canvas, read from the real server's /object_info: every
EPD node sits under sampling/epd or training/epd, has a display name and a description, a tooltip on every
input and named outputs."""
import pytest

pytestmark = pytest.mark.server
PACK_PYTHON_MODULE = "custom_nodes.ComfyUI-EPD"


def epd_nodes(info):
    return {k: v for k, v in info.items() if v.get("python_module") == PACK_PYTHON_MODULE}


def test_every_node_is_documented(comfy_server):
    nodes = epd_nodes(comfy_server.object_info())
    assert len(nodes) >= 13, sorted(nodes)
    problems = []
    for name, node in nodes.items():
        if not node["category"].startswith(("sampling/epd", "training/epd")):
            problems.append(f"{name}: category {node['category']!r}")
        if not node.get("display_name") or node["display_name"] == name:
            problems.append(f"{name}: no display name")
        if len(node.get("description", "")) < 40:
            problems.append(f"{name}: description too short")
        for group in ("required", "optional"):
            for inp, spec in node["input"].get(group, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                if not opts.get("tooltip"):
                    problems.append(f"{name}.{inp}: no tooltip")
        if any(not n for n in node["output_name"]):
            problems.append(f"{name}: unnamed output")
    assert not problems, "\n".join(problems)


def test_numeric_inputs_have_sensible_ranges(comfy_server):
    for name, node in epd_nodes(comfy_server.object_info()).items():
        for group in ("required", "optional"):
            for inp, spec in node["input"].get(group, {}).items():
                if spec[0] in ("INT", "FLOAT"):
                    o = spec[1]
                    assert o["min"] <= o["default"] <= o["max"], f"{name}.{inp}: {o}"
