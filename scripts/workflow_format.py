"""ComfyUI's two workflow formats, converted with the node definitions a server reports (/object_info):
API format (what POST /prompt takes: {id: {class_type, inputs}}) and UI format (what the web UI and the
template browser load: LiteGraph nodes with widgets_values and links). Used to generate workflows/ and, in the
tests, to check that every UI file describes the same graph as its API twin and is valid for the server."""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def input_specs(info: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) in the order the UI shows them."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        for name in order.get(group, []):
            spec = specs[name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):  # V1 combo: the options list itself
                kind, opts = "COMBO", {**opts, "options": kind}
            out.append((name, kind, opts, group == "required"))
    return out


def widget_values(info: dict, inputs: dict) -> list:
    values = []
    for name, kind, opts, _ in input_specs(info):
        if kind in WIDGET_TYPES and not isinstance(inputs.get(name), list):
            if name in inputs:
                values.append(inputs[name])
            elif "default" in opts:
                values.append(opts["default"])
            else:
                continue
            if opts.get("control_after_generate"):
                values.append("fixed")
    return values


IMAGE_NODES = ("SaveImage", "PreviewImage")


def node_height(info: dict, ui_inputs: list, outputs: list) -> int:
    """About what the frontend draws: one row per slot pair and per widget, more for text boxes and images."""
    widgets = [(name, kind, opts) for name, kind, opts, _ in input_specs(info) if kind in WIDGET_TYPES]
    rows = max(len(ui_inputs), len(outputs)) + len(widgets)
    rows += sum(1 for _, _, opts in widgets if opts.get("control_after_generate"))
    extra = sum(80 for _, kind, opts in widgets if kind == "STRING" and opts.get("multiline"))
    if info["name"] in IMAGE_NODES or info.get("output_node") and not outputs:
        extra += 260
    return 24 * rows + 20 + extra


def api_to_ui(api: dict, object_info: dict) -> dict:
    """A UI-format workflow laid out left to right by graph depth."""
    numeric = all(key.isdigit() for key in api)  # keep numeric API ids, so both files name nodes alike
    ids = {key: int(key) if numeric else i + 1 for i, key in enumerate(api)}
    depth = {}

    def d(key):
        if key not in depth:
            ups = [v[0] for v in api[key]["inputs"].values() if isinstance(v, list)]
            depth[key] = 1 + max((d(u) for u in ups), default=-1)
        return depth[key]
    column_y: dict[int, int] = {}
    nodes, links = [], []
    for key, node in api.items():
        info = object_info[node["class_type"]]
        col = d(key)
        ui_inputs = []
        for name, kind, opts, _ in input_specs(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                src = api[value[0]]
                src_type = object_info[src["class_type"]]["output"][value[1]]
                links.append([link_id, ids[value[0]], value[1], ids[key], len(ui_inputs), src_type])
                entry = {"name": name, "type": kind, "link": link_id}
                if kind in WIDGET_TYPES:
                    entry["widget"] = {"name": name}
                ui_inputs.append(entry)
            elif kind not in WIDGET_TYPES:
                ui_inputs.append({"name": name, "type": kind, "link": None})
        outputs = [{"name": n, "type": t, "slot_index": i, "links": []}
                   for i, (t, n) in enumerate(zip(info["output"], info.get("output_name", info["output"])))]
        height = node_height(info, ui_inputs, outputs)
        y = column_y.get(col, 40)
        column_y[col] = y + height + 60  # room for the title bar and a gap: nodes never overlap
        nodes.append({"id": ids[key], "type": node["class_type"], "pos": [40 + 380 * col, y],
                      "size": [340, height], "flags": {}, "order": 0, "mode": 0, "inputs": ui_inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widget_values(info, node["inputs"])})
        if node.get("_meta", {}).get("title"):
            nodes[-1]["title"] = node["_meta"]["title"]
    by_id = {n["id"]: n for n in nodes}
    for link in links:
        by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
    for i, key in enumerate(sorted(api, key=d)):
        by_id[ids[key]]["order"] = i
    return {"last_node_id": max(ids.values()), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}  # no saved view: the frontend fits it


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Back to API format (what the web UI sends when you press Queue)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        inputs, values = {}, list(node.get("widgets_values", []))
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, kind, opts, _ in input_specs(info):
            if kind in WIDGET_TYPES and values:
                value = values.pop(0)
                if opts.get("control_after_generate") and values:
                    values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def validate_api(api: dict, object_info: dict, file_inputs_ok: bool = True) -> list[str]:
    """Problems that would make ComfyUI reject the prompt. With file_inputs_ok, combo values naming model
    files the user may not have (checkpoints, VAEs...) are accepted."""
    problems = []
    for key, node in api.items():
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"{key}: unknown node type {node['class_type']}")
            continue
        specs = {name: (kind, opts, req) for name, kind, opts, req in input_specs(info)}
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{key}.{name}: not an input of {node['class_type']}")
                continue
            kind, opts, _ = specs[name]
            if isinstance(value, list):
                src = api.get(value[0])
                if src is None:
                    problems.append(f"{key}.{name}: links to missing node {value[0]}")
                    continue
                out_type = object_info[src["class_type"]]["output"][value[1]]
                if kind not in ("*", out_type) and not (kind == "COMBO" and out_type == "COMBO"):
                    problems.append(f"{key}.{name}: {out_type} linked into {kind}")
            elif kind == "COMBO":
                options = opts.get("options", [])
                is_file = any(str(o).endswith((".safetensors", ".ckpt", ".pt", ".gguf", ".sft")) for o in options) \
                    or str(value).endswith((".safetensors", ".ckpt", ".pt", ".sft", ".gguf"))
                if value not in options and not (file_inputs_ok and is_file):
                    problems.append(f"{key}.{name}: {value!r} not in {options[:8]}")
            elif kind in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"{key}.{name}: {value!r} is not a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(f"{key}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
        for name, (kind, opts, req) in specs.items():
            if req and name not in node["inputs"]:
                problems.append(f"{key}.{name}: required input missing")
    return problems
