"""The pack's node definitions in the shape of ComfyUI's GET /object_info.

Mirrors server.py `node_info()` of ComfyUI 0.3.64 for V1 node classes, so the
workflow validator and the UI -> API converter see our nodes exactly as a running
ComfyUI would serve them. `python_module` is what ComfyUI sets for a pack folder
(`custom_nodes.<folder>`).
"""

from __future__ import annotations

import json


def node_info(name: str, cls: type, display_name: str, folder: str) -> dict:
    inputs = cls.INPUT_TYPES()
    info = {
        "input": inputs,
        "input_order": {section: list(values) for section, values in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": name,
        "display_name": display_name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": f"custom_nodes.{folder}",
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    # A JSON round trip turns tuples into lists, as the server's json.dumps does.
    return json.loads(json.dumps(info))


def pack_object_info(pack, folder: str) -> dict:
    """{node name: node info} for every node the pack registers."""
    return {
        name: node_info(name, cls, pack.NODE_DISPLAY_NAME_MAPPINGS.get(name, name), folder)
        for name, cls in pack.NODE_CLASS_MAPPINGS.items()
    }
