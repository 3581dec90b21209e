"""ComfyUI's prompt executor, reduced to what the pack's nodes can tell apart.

Reproduced from ComfyUI 0.3.64 (execution.py, main.py, comfy_execution/caching.py,
server.py), because a kinder fake let a failure through that every real user met:

* Worker thread, event loop, inference mode: main.py runs prompts on a
  `prompt_worker` thread; `PromptExecutor.execute` wraps `execute_async` in
  `asyncio.run`, and the whole prompt runs inside `torch.inference_mode()`. So every
  tensor a node makes or receives is an inference tensor, unless the node opts out.
* Only output nodes run (`OUTPUT_NODE = True`) and what they depend on, ancestors first.
* Output cache across prompts (`CacheKeySetInputSignature`): a node whose signature
  (class, IS_CHANGED value, constant inputs, the signatures of its ancestors, and its
  node id when it takes UNIQUE_ID or is NOT_IDEMPOTENT) equals the one of its last run
  is not executed again; its outputs are reused and its UI block is sent again.
  IS_CHANGED sees constant inputs only (linked inputs arrive as None); a NaN or an
  exception (recorded as NaN) means "always run".
* One node object per node id and class, reused across prompts (`caches.objects`).
* The interrupt flag is cleared when a prompt starts (`nodes.interrupt_processing(False)`)
  and checked before every node (`nodes.before_node_execution`); an interrupt or error
  stops the prompt with `execution_interrupted` / `execution_error`.
* Inputs are validated first like `validate_inputs` (required present, combo choices
  from a fresh INPUT_TYPES, INT / FLOAT min and max).
* UI blocks are merged like `get_output_from_returns`: each value is iterated, so it
  must be a list; everything sent to the browser must be JSON without NaN / Infinity
  (the browser's JSON.parse rejects what Python's json.dumps writes for them).

Core nodes come from `CORE_NODES` (only what the example workflows need to run).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import json_for_browser


class PreviewImage:
    """Core PreviewImage, reduced to keeping the images it was given."""

    FUNCTION = "save_images"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save_images(self, images: torch.Tensor):
        return {"ui": {"images": [images]}, "result": ()}


CORE_NODES = {"PreviewImage": PreviewImage}


class PromptRejected(ValueError):
    """What POST /prompt answers with HTTP 400: the prompt failed validation, nothing ran."""


@dataclass
class Execution:
    order: list[str]  # nodes in execution order (cached ones included)
    outputs: dict[str, tuple] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)  # nodes whose function ran in this prompt
    cached: list[str] = field(default_factory=list)  # nodes served from the cache


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _constant(value: Any) -> Any:
    return value["__value__"] if isinstance(value, dict) and "__value__" in value else value


def run_on_worker(function: Callable[[], Any]) -> Any:
    """Call `function` as ComfyUI calls node code: on another thread, in a running event loop,
    inside torch.inference_mode(). Its exception, if any, is raised here."""
    box: dict[str, Any] = {}

    async def in_loop() -> Any:
        with torch.inference_mode():
            return function()

    def worker() -> None:
        try:
            box["value"] = asyncio.run(in_loop())
        except BaseException as error:  # handed to the calling thread
            box["error"] = error

    thread = threading.Thread(target=worker, name="prompt_worker")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def call_node(cls: type, *args: Any, **inputs: Any) -> Any:
    """Run one node function of a fresh node object the way the executor does (see run_on_worker)."""
    return run_on_worker(lambda: getattr(cls(), cls.FUNCTION)(*args, **inputs))


def _merged_ui(ui: dict) -> dict:
    """The UI block as ComfyUI forwards it: every value must be a list it can concatenate."""
    for key, value in ui.items():
        if not isinstance(value, list):
            raise TypeError(f"UI output {key!r} is a {type(value).__name__}; ComfyUI iterates UI values, "
                            "so each must be a list")
    return {key: list(value) for key, value in ui.items()}


class PromptExecutor:
    """One ComfyUI server's executor: its caches live as long as this object (a restart drops them)."""

    def __init__(self, host, node_classes: dict[str, type]):
        self.host = host
        self.classes = {**CORE_NODES, **node_classes}
        self._outputs: dict[str, tuple[Any, tuple, dict | None]] = {}  # node id -> (signature, outputs, ui)
        self._objects: dict[tuple[str, str], Any] = {}

    # --- validation (POST /prompt) -------------------------------------------------

    def validate(self, prompt: dict) -> None:
        errors = []
        for node_id, node in prompt.items():
            cls = self.classes.get(node["class_type"])
            if cls is None:
                raise PromptRejected(f"Cannot execute because node {node['class_type']} does not exist.")
            spec = cls.INPUT_TYPES()
            for name, entry in spec.get("required", {}).items():
                if name not in node["inputs"]:
                    errors.append(f"node {node_id}: required input {name!r} is missing")
            for section in ("required", "optional"):
                for name, entry in spec.get(section, {}).items():
                    if name not in node["inputs"] or is_link(node["inputs"][name]):
                        continue
                    value, kind = _constant(node["inputs"][name]), entry[0]
                    options = entry[1] if len(entry) > 1 else {}
                    if isinstance(kind, list) and value not in kind:
                        errors.append(f"node {node_id}: {name} {value!r} is not in the list of choices")
                    elif kind in ("INT", "FLOAT"):
                        if "min" in options and value < options["min"]:
                            errors.append(f"node {node_id}: {name} {value} is smaller than min {options['min']}")
                        if "max" in options and value > options["max"]:
                            errors.append(f"node {node_id}: {name} {value} is bigger than max {options['max']}")
        if errors:
            raise PromptRejected("; ".join(errors))

    # --- signatures (comfy_execution/caching.py) -----------------------------------

    def _is_changed(self, node_id: str, node: dict) -> Any:
        cls = self.classes[node["class_type"]]
        if not hasattr(cls, "IS_CHANGED"):
            return False
        inputs = {k: None if is_link(v) else _constant(v) for k, v in node["inputs"].items()}
        if cls.INPUT_TYPES().get("hidden", {}).get("unique_id") == "UNIQUE_ID":
            inputs["unique_id"] = node_id
        try:
            return cls.IS_CHANGED(**inputs)
        except Exception:  # ComfyUI logs a warning and records NaN: the node always runs
            return math.nan

    def _signature(self, prompt: dict, node_id: str, memo: dict) -> Any:
        if node_id not in memo:
            node = prompt[node_id]
            cls = self.classes[node["class_type"]]
            parts: list[Any] = [node["class_type"], repr(self._is_changed(node_id, node))]
            takes_id = "UNIQUE_ID" in cls.INPUT_TYPES().get("hidden", {}).values()
            if takes_id or getattr(cls, "NOT_IDEMPOTENT", False):
                parts.append(node_id)
            for key in sorted(node["inputs"]):
                value = node["inputs"][key]
                if is_link(value):
                    parts.append((key, self._signature(prompt, value[0], memo), value[1]))
                else:
                    parts.append((key, json.dumps(_constant(value), sort_keys=True)))
            memo[node_id] = tuple(parts)
        return memo[node_id]

    # --- running -------------------------------------------------------------------

    def _order(self, prompt: dict) -> list[str]:
        """Output nodes and their ancestors, each after everything it reads from."""
        order, state = [], {}

        def visit(node_id: str) -> None:
            if state.get(node_id) == "done":
                return
            if state.get(node_id) == "visiting":
                raise PromptRejected(f"the prompt has a cycle through node {node_id}")
            state[node_id] = "visiting"
            for value in prompt[node_id]["inputs"].values():
                if is_link(value):
                    visit(value[0])
            state[node_id] = "done"
            order.append(node_id)

        outputs = [k for k in sorted(prompt, key=int) if getattr(self.classes[prompt[k]["class_type"]], "OUTPUT_NODE", False)]
        if not outputs:
            raise PromptRejected("Prompt has no outputs")
        for node_id in outputs:
            visit(node_id)
        return order

    def _send(self, event: str, data: dict) -> None:
        json_for_browser(data)
        self.host.messages.append((event, data))

    def _run_node(self, node_id: str, node: dict, run: Execution) -> tuple[tuple, dict | None]:
        cls = self.classes[node["class_type"]]
        self.host.modules["comfy.model_management"].throw_exception_if_processing_interrupted()
        inputs = {k: run.outputs[v[0]][v[1]] if is_link(v) else _constant(v) for k, v in node["inputs"].items()}
        if cls.INPUT_TYPES().get("hidden", {}).get("unique_id") == "UNIQUE_ID":
            inputs["unique_id"] = node_id
        instance = self._objects.setdefault((node_id, node["class_type"]), cls())
        self.host.executing = node_id
        try:
            returned = getattr(instance, cls.FUNCTION)(**inputs)
        finally:
            self.host.executing = None
        ui = None
        if isinstance(returned, dict):
            ui = _merged_ui(returned["ui"]) if "ui" in returned else None
            returned = returned.get("result", ())
        returned = tuple(returned)
        expected = len(getattr(cls, "RETURN_TYPES", ()))
        if len(returned) != expected:
            raise TypeError(f"{node['class_type']} returned {len(returned)} outputs, RETURN_TYPES has {expected}")
        return returned, ui

    def execute(self, prompt: dict) -> Execution:
        """Queue `prompt` and wait for it, as the frontend's Run does; a node's exception is raised here
        after the `execution_interrupted` / `execution_error` message went out."""
        self.validate(prompt)
        model_management = self.host.modules["comfy.model_management"]

        def work() -> Execution:
            model_management.interrupt_current_processing(False)
            run = Execution(self._order(prompt))
            signatures: dict = {}
            for node_id in run.order:
                node = prompt[node_id]
                signature = self._signature(prompt, node_id, signatures)
                cached = self._outputs.get(node_id)
                if cached is not None and cached[0] == signature:
                    run.outputs[node_id], ui = cached[1], cached[2]
                    run.cached.append(node_id)
                else:
                    try:
                        run.outputs[node_id], ui = self._run_node(node_id, node, run)
                    except model_management.InterruptProcessingException:
                        self._send("execution_interrupted", {"node_id": node_id, "node_type": node["class_type"],
                                                             "executed": list(run.executed)})
                        raise
                    except Exception as error:
                        self._send("execution_error", {"node_id": node_id, "node_type": node["class_type"],
                                                       "exception_message": str(error),
                                                       "exception_type": type(error).__name__})
                        raise
                    self._outputs[node_id] = (signature, run.outputs[node_id], ui)
                    run.executed.append(node_id)
                if ui is not None:
                    run.ui[node_id] = ui
                    self._send("executed", {"node": node_id, "output": _browser_view(ui)})
            return run

        return run_on_worker(work)


def _browser_view(ui: dict) -> dict:
    """What of a UI block reaches the browser: tensors (PreviewImage's stand-in) become placeholders."""
    return {k: [v if not isinstance(v, torch.Tensor) else "<image>" for v in values] for k, values in ui.items()}


def execute(prompt: dict, host, node_classes: dict[str, type]) -> Execution:
    """Run `prompt` on a freshly started server (empty caches)."""
    return PromptExecutor(host, node_classes).execute(prompt)
