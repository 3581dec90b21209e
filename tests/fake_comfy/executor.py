"""A tiny stand-in for ComfyUI's executor: runs an API-format prompt node by node.

Topological order over the links, link resolution ([node id, output slot] -> that
node's output), the hidden UNIQUE_ID input, and the {"ui", "result"} return form.
Core nodes come from `core_nodes` (only what the example workflows need to run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class PreviewImage:
    """Core PreviewImage, reduced to keeping the images it was given."""

    FUNCTION = "save_images"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save_images(self, images: torch.Tensor):
        return {"ui": {"images": [images]}, "result": ()}


CORE_NODES = {"PreviewImage": PreviewImage}


@dataclass
class Execution:
    order: list[str]
    outputs: dict[str, tuple] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def topological_order(prompt: dict) -> list[str]:
    order, state = [], {}

    def visit(node_id: str) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            raise ValueError(f"the prompt has a cycle through node {node_id}")
        state[node_id] = "visiting"
        for value in prompt[node_id]["inputs"].values():
            if is_link(value):
                visit(value[0])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in sorted(prompt, key=int):
        visit(node_id)
    return order


def execute(prompt: dict, node_classes: dict[str, type]) -> Execution:
    classes = {**CORE_NODES, **node_classes}
    run = Execution(topological_order(prompt))
    for node_id in run.order:
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        inputs = {}
        for name, value in node["inputs"].items():
            if is_link(value):
                inputs[name] = run.outputs[value[0]][value[1]]
            else:
                inputs[name] = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
        hidden = cls.INPUT_TYPES().get("hidden", {})
        if hidden.get("unique_id") == "UNIQUE_ID":
            inputs["unique_id"] = node_id
        returned = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(returned, dict):
            run.ui[node_id] = returned.get("ui", {})
            returned = returned.get("result", ())
        run.outputs[node_id] = tuple(returned)
    return run
