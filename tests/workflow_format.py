"""ComfyUI workflow files as the frontend writes and reads them, for the example-workflow tests.

Three jobs, each following the rules of ComfyUI 0.3.64 with frontend 1.27.10:

* `widget_specs(definition)`: the widgets the frontend builds for a node definition (one
  per `widgets_values` slot, in order): every input whose type is a widget type and that
  is not `forceInput` (an optional `defaultInput` counts as forced) gives a widget; an INT
  with `control_after_generate` (or named seed / noise_seed) is followed by its control
  value, a COMBO with it by a control value and a filter string; a required combo with
  an upload flag appends one "upload" value at the very end.
* `validate(workflow, info)`: problems of a UI-format (0.4) workflow against node
  definitions: structure, links (ids, endpoints, slots, both ends agree, types), widget
  count / type / range / choices, unconnected required sockets.
* `ui_to_api(workflow, info)`: the API-format prompt `POST /prompt` takes, as the
  frontend's graphToPrompt builds it for graphs without reroutes, primitives,
  subgraphs or muted / bypassed nodes (anything else is refused, not guessed).

`info` is {node type: definition} in the shape of `GET /object_info`; the core part
comes from `fixtures/comfyui_core_nodes.json`, captured from a real server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORE_NODES_FILE = Path(__file__).resolve().parent / "fixtures" / "comfyui_core_nodes.json"
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "COLOR"})
VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote"})  # drawn by the frontend, never sent to the server
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
ACTIVE = 0  # node mode "always"; 2 (never) and 4 (bypass) are not supported here


def core_node_info() -> dict[str, dict]:
    """Definitions of the core nodes the example workflows use (captured from ComfyUI 0.3.64)."""
    return json.loads(CORE_NODES_FILE.read_text(encoding="utf-8"))["nodes"]


@dataclass(frozen=True)
class WidgetSpec:
    name: str
    input: str | None  # the backend input it sets; None for frontend-only values (control, filter, upload)
    kind: str  # value | control | filter | upload
    type: str = ""
    options: dict = field(default_factory=dict)
    choices: tuple | None = None


def _parse_input(spec: list) -> tuple[str, dict, tuple | None]:
    """An INPUT_TYPES entry -> (type, options, combo choices)."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return "COMBO", options, tuple(kind)
    return str(kind), options, None


def _ordered_inputs(definition: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the order the frontend creates inputs."""
    sections = definition.get("input", {})
    order = definition.get("input_order", {})
    found = []
    for section in ("required", "optional"):
        specs = sections.get(section, {})
        found += [(name, specs[name], section == "optional") for name in order.get(section, list(specs))]
    return found


def widget_specs(definition: dict) -> list[WidgetSpec]:
    specs, upload = [], False
    for name, spec, optional in _ordered_inputs(definition):
        kind, options, choices = _parse_input(spec)
        if options.get("forceInput") or (optional and options.get("defaultInput")):
            continue
        if (options.get("widgetType") or kind) not in WIDGET_TYPES:
            continue  # a socket (IMAGE, MODEL, the pack's DITT_* types, ...)
        specs.append(WidgetSpec(name, name, "value", kind, options, choices))
        control = options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
            specs.append(WidgetSpec("control_after_generate", None, "control"))
        if kind == "COMBO" and control:
            specs.append(WidgetSpec("control_after_generate", None, "control"))
            specs.append(WidgetSpec("control_filter_list", None, "filter"))
        upload = upload or (kind == "COMBO" and not optional and any(options.get(f) is True for f in UPLOAD_FLAGS))
    if upload:
        specs.append(WidgetSpec("upload", None, "upload"))
    return specs


def _looks_like_file(value: Any) -> bool:
    return isinstance(value, str) and bool(re.search(r"\.[A-Za-z0-9]{2,12}$", value))


def value_problem(spec: WidgetSpec, value: Any) -> tuple[str, str] | None:
    """(level, message) when `value` does not fit the widget; None when it does.

    A value missing from a combo of file names is only a warning: which model and image
    files exist depends on the machine.
    """
    if spec.kind == "control":
        return None if value in CONTROL_VALUES else ("error", f"control value {value!r} is not one of {sorted(CONTROL_VALUES)}")
    if spec.kind != "value":
        return None
    expected = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str}.get(spec.type)
    if expected is not None:
        if isinstance(value, bool) != (spec.type == "BOOLEAN") or not isinstance(value, expected):
            return "error", f"expected {spec.type}, got {value!r}"
        if spec.type in ("INT", "FLOAT"):
            if "min" in spec.options and value < spec.options["min"]:
                return "error", f"{value} is below the minimum {spec.options['min']}"
            if "max" in spec.options and value > spec.options["max"]:
                return "error", f"{value} is above the maximum {spec.options['max']}"
    if spec.type == "COMBO" and spec.choices is not None and value not in spec.choices:
        files = _looks_like_file(value) or any(_looks_like_file(c) for c in spec.choices)
        return ("warning" if files else "error"), f"{value!r} is not one of {list(spec.choices)[:8]}"
    return None


def _links(workflow: dict) -> tuple[dict[int, tuple], list[str]]:
    """link id -> (origin id, origin slot, target id, target slot, type), and malformed entries."""
    table, errors = {}, []
    for link in workflow.get("links", []):
        if not isinstance(link, list) or len(link) != 6:
            errors.append(f"link {link!r} is not [id, origin, origin slot, target, target slot, type]")
            continue
        if link[0] in table:
            errors.append(f"link id {link[0]} is used twice")
        table[link[0]] = tuple(link[1:])
    return table, errors


def validate(workflow: dict, info: dict[str, dict]) -> list[tuple[str, str]]:
    """Every problem found, as (level, message) with level 'error' or 'warning'."""
    problems: list[tuple[str, str]] = []

    def error(message: str) -> None:
        problems.append(("error", message))

    if workflow.get("version") != 0.4:
        error(f"version is {workflow.get('version')!r}; these files are UI format 0.4")
    for key in ("nodes", "links", "last_node_id", "last_link_id"):
        if key not in workflow:
            error(f"missing top-level {key!r}")
    nodes = {node.get("id"): node for node in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        error("node ids are not unique")
    for node_id, node in nodes.items():
        for key in ("type", "pos", "size", "flags", "order", "mode", "properties"):
            if key not in node:
                error(f"node {node_id}: missing {key!r}")
    links, link_errors = _links(workflow)
    for message in link_errors:
        error(message)
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        error(f"last_node_id {workflow.get('last_node_id')} is below the largest node id {max(nodes)}")
    if links and workflow.get("last_link_id", 0) < max(links):
        error(f"last_link_id {workflow.get('last_link_id')} is below the largest link id {max(links)}")

    for link_id, (origin, out_slot, target, in_slot, kind) in links.items():
        if origin not in nodes or target not in nodes:
            error(f"link {link_id}: node {origin if origin not in nodes else target} does not exist")
            continue
        outputs, inputs = nodes[origin].get("outputs", []), nodes[target].get("inputs", [])
        if out_slot >= len(outputs) or link_id not in (outputs[out_slot].get("links") or []):
            error(f"link {link_id}: node {origin} output {out_slot} does not list it")
        if in_slot >= len(inputs) or inputs[in_slot].get("link") != link_id:
            error(f"link {link_id}: node {target} input {in_slot} does not point back to it")
        definition = info.get(nodes[origin]["type"])
        if definition and out_slot < len(definition["output"]) and definition["output"][out_slot] != kind:
            error(f"link {link_id}: type {kind!r}, but {nodes[origin]['type']} output {out_slot} is "
                  f"{definition['output'][out_slot]!r}")
    for node_id, node in nodes.items():
        for socket in node.get("inputs", []):
            if socket.get("link") is not None and socket["link"] not in links:
                error(f"node {node_id}: input {socket.get('name')!r} points at missing link {socket['link']}")

    for node_id, node in nodes.items():
        kind = node.get("type")
        if kind in VIRTUAL_TYPES:
            continue
        label = f"node {node_id} ({kind})"
        definition = info.get(kind)
        if definition is None:
            error(f"{label}: no such node type")
            continue
        specs = widget_specs(definition)
        values = node.get("widgets_values", [])
        if len(values) != len(specs):
            error(f"{label}: {len(values)} widget values, expected {len(specs)} ({[s.name for s in specs]})")
        for spec, value in zip(specs, values):
            problem = value_problem(spec, value)
            if problem:
                problems.append((problem[0], f"{label} widget {spec.name!r}: {problem[1]}"))
        if [o.get("type") for o in node.get("outputs", [])] != definition["output"]:
            error(f"{label}: outputs {[o.get('type') for o in node.get('outputs', [])]} differ from the "
                  f"definition's {definition['output']}")
        widget_inputs = {s.input for s in specs if s.input}
        linked = {s.get("name") for s in node.get("inputs", []) if s.get("link") is not None}
        for name in definition["input"].get("required", {}):
            if name not in widget_inputs and name not in linked:
                error(f"{label}: required input {name!r} is not connected")
    return problems


def ui_to_api(workflow: dict, info: dict[str, dict]) -> dict[str, dict]:
    """The API prompt of a UI-format workflow: widget values by input name, links as [node id, slot]."""
    links, errors = _links(workflow)
    if errors:
        raise ValueError("; ".join(errors))
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_TYPES:
            continue
        if node.get("mode", ACTIVE) != ACTIVE:
            raise ValueError(f"node {node['id']} ({kind}): muted / bypassed nodes are not supported by this converter")
        if kind not in info:
            raise ValueError(f"node {node['id']}: unknown node type {kind!r}")
        inputs: dict[str, Any] = {}
        for spec, value in zip(widget_specs(info[kind]), node.get("widgets_values", [])):
            if spec.input is not None:
                inputs[spec.input] = {"__value__": value} if isinstance(value, list) else value
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                origin, out_slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(origin), int(out_slot)]
        title = node.get("title") or info[kind].get("display_name") or kind
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt
