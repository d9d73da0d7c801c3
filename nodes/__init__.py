"""ComfyUI adapter (V3 schema). Importing this package registers every solver of the registry
(epd_core/sampling/registry.py) in the KSampler dropdowns and the epd_params model folder; `comfy_entrypoint`
returns the extension with all nodes."""
from __future__ import annotations

import sys

from .compare_nodes import COMPARE_NODES
from .compat import ComfyExtension, io
from .demo_nodes import DEMO_NODES
from .import_node import IMPORT_NODES
from .params_nodes import PARAMS_NODES
from .preview_nodes import PREVIEW_NODES
from .reward_nodes import REWARD_NODES
from .samplers import register_dropdown_samplers
from .tables import register_folder
from .trainer_nodes import TRAINER_NODES

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


def all_nodes() -> list[type[io.ComfyNode]]:
    return [*PARAMS_NODES, *DEMO_NODES, *IMPORT_NODES, *TRAINER_NODES, *PREVIEW_NODES, *REWARD_NODES, *COMPARE_NODES]


class EPDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> EPDExtension:
    return EPDExtension()
