"""ComfyUI adapter (V3 schema). Importing this package registers `epd` / `epd_plugin` in the KSampler
dropdowns and the epd_params model folder; `comfy_entrypoint` returns the extension with all nodes."""
from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io

from .params_nodes import PARAMS_NODES
from .samplers import register_dropdown_samplers
from .tables import register_folder

log = logging.getLogger("epd")
register_folder()
register_dropdown_samplers()

# Node modules that may be absent in a partial checkout are optional; each exports one list of nodes.
_OPTIONAL = {"demo_nodes": "DEMO_NODES", "import_node": "IMPORT_NODES", "trainer_nodes": "TRAINER_NODES",
             "preview_nodes": "PREVIEW_NODES", "reward_nodes": "REWARD_NODES"}


def all_nodes() -> list[type[io.ComfyNode]]:
    nodes = list(PARAMS_NODES)
    for module, attr in _OPTIONAL.items():
        try:
            mod = importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(module):
                continue
            raise
        nodes += getattr(mod, attr)
    return nodes


class EPDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> EPDExtension:
    return EPDExtension()
