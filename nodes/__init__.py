"""ComfyUI adapter (V3 schema). Importing this package registers `epd` / `epd_plugin` in the KSampler
dropdowns and the epd_params model folder; `comfy_entrypoint` returns the extension with all nodes."""
from __future__ import annotations

import importlib
import logging
import sys

from .compat import ComfyExtension, io
from .params_nodes import PARAMS_NODES
from .samplers import register_dropdown_samplers
from .tables import register_folder

log = logging.getLogger("epd")
register_folder()
register_dropdown_samplers()


def _register_again(json_data):
    """Before each prompt is validated: puts `epd` / `epd_plugin` back where a pack loaded after this one replaced
    ComfyUI's sampler name lists (PromptServer on-prompt handler; it must return the prompt)."""
    register_dropdown_samplers()
    return json_data


def _install_prompt_hook() -> bool:
    """Only inside a running ComfyUI (main.py imports its `server` and creates the PromptServer before loading
    custom nodes); elsewhere (scripts, tests) the names registered above are enough."""
    server = sys.modules.get("server")
    add = getattr(getattr(getattr(server, "PromptServer", None), "instance", None), "add_on_prompt_handler", None)
    if callable(add):
        add(_register_again)
        return True
    return False


_install_prompt_hook()

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
