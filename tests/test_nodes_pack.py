"""The node pack as ComfyUI loads it: path-derived import against a fake host, well-formed node definitions."""

from __future__ import annotations

import ast
from pathlib import Path

from fake_comfy import ROOT, comfy_host, comfy_pack, pack_module_name  # noqa: F401  (fixtures)
from object_info import pack_object_info

NODE_IDS = {"LoadDiT", "BuildLoRANetwork", "DatasetFromFolder", "WeightedMask", "TrainLoRA", "SampleWithLoRA", "EMAMerge"}
PACK_TYPES = {"DITT_MODEL", "DITT_LORA_NETWORK", "DITT_DATASET", "DITT_LORA"}
COMFY_TYPES = {"CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK"}
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING"}
HOST_MODULES = {"comfy", "folder_paths", "server", "execution", "latent_preview", "comfy_api", "comfy_extras"}


def test_pack_registers_the_seven_nodes_under_its_path_derived_module(comfy_pack):
    assert comfy_pack.__name__ == pack_module_name()
    assert set(comfy_pack.NODE_CLASS_MAPPINGS) == NODE_IDS
    assert set(comfy_pack.NODE_DISPLAY_NAME_MAPPINGS) == NODE_IDS
    for cls in comfy_pack.NODE_CLASS_MAPPINGS.values():
        # Loaded through the pack's own module tree (relative imports), not an installed copy.
        assert cls.__module__.startswith(pack_module_name() + ".nodes.")


def _check_input(node_id: str, name: str, spec) -> None:
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    where = f"{node_id}.{name}"
    assert options.get("tooltip"), f"{where} has no tooltip"
    if isinstance(kind, list):
        assert kind and all(isinstance(c, str) for c in kind), f"{where}: combo choices must be strings"
        assert options.get("default", kind[0]) in kind, f"{where}: default not among the choices"
        return
    assert kind in WIDGET_TYPES | PACK_TYPES | COMFY_TYPES, f"{where}: unknown type {kind!r}"
    if kind in ("INT", "FLOAT"):
        default = options["default"]
        assert options.get("min", default) <= default <= options.get("max", default), f"{where}: default out of range"
        assert isinstance(default, int if kind == "INT" else (int, float)) and not isinstance(default, bool), where
    if kind == "BOOLEAN":
        assert isinstance(options["default"], bool), where
    if kind == "STRING":
        assert isinstance(options["default"], str), where


def test_every_node_definition_is_well_formed(comfy_pack):
    for node_id, cls in comfy_pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"}, node_id
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                _check_input(node_id, name, spec)
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, node_id
        assert set(cls.RETURN_TYPES) <= PACK_TYPES | COMFY_TYPES | {"STRING"}, node_id
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert cls.CATEGORY.split("/")[0] == "DiT Trainer", node_id
        assert cls.DESCRIPTION, node_id


def test_custom_socket_types_connect_only_within_the_pack(comfy_pack):
    produced, consumed = set(), set()
    for cls in comfy_pack.NODE_CLASS_MAPPINGS.values():
        produced |= set(cls.RETURN_TYPES) & PACK_TYPES
        for section in ("required", "optional"):
            consumed |= {spec[0] for spec in cls.INPUT_TYPES().get(section, {}).values()
                         if isinstance(spec[0], str) and spec[0] in PACK_TYPES}
    assert produced == consumed == PACK_TYPES


def test_object_info_has_the_shape_comfyui_serves(comfy_pack):
    info = pack_object_info(comfy_pack, "comfyui-dit-trainer")
    keys = {"input", "input_order", "output", "output_is_list", "output_name", "name", "display_name", "description",
            "python_module", "category", "output_node", "output_tooltips"}
    for node_id, node in info.items():
        assert set(node) == keys, node_id
        assert node["python_module"] == "custom_nodes.comfyui-dit-trainer"
        assert node["input_order"]["required"] == list(node["input"]["required"])
        assert len(node["output_is_list"]) == len(node["output"]) == len(node["output_name"])
    assert info["TrainLoRA"]["output_node"] and info["EMAMerge"]["output_node"]
    assert info["TrainLoRA"]["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_model_lists_come_from_comfyui_folders(comfy_host, comfy_pack):
    (comfy_host.folder("loras") / "style.safetensors").write_bytes(b"")
    (comfy_host.folder("diffusion_models") / "z_image.safetensors").write_bytes(b"")
    mappings = comfy_pack.NODE_CLASS_MAPPINGS
    assert mappings["LoadDiT"].INPUT_TYPES()["required"]["checkpoint"][0] == [
        "[embedded demo] dit_trainer_demo", "z_image.safetensors"]
    assert "style.safetensors" in mappings["SampleWithLoRA"].INPUT_TYPES()["required"]["lora_name"][0]
    assert "style.safetensors" in mappings["BuildLoRANetwork"].INPUT_TYPES()["required"]["continue_from"][0]


def test_only_host_module_imports_comfyui():
    offenders = []
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n.split(".")[0] in HOST_MODULES for n in names) and path.name != "host.py":
                offenders.append(f"{Path(path).name}: {names}")
    assert not offenders, offenders


def test_node_reference_documents_every_input(comfy_pack):
    sections = {}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    nodes_part = readme.split("\n## The nodes\n", 1)[1].split("\n## ", 1)[0]
    for block in nodes_part.split("\n### ")[1:]:
        title, _, body = block.partition("\n")
        sections[title.strip()] = body
    for node_id, cls in comfy_pack.NODE_CLASS_MAPPINGS.items():
        assert node_id in sections, f"README's nodes part has no '### {node_id}' section"
        inputs = cls.INPUT_TYPES()
        names = [*inputs.get("required", {}), *inputs.get("optional", {})]
        missing = [name for name in names if f"`{name}`" not in sections[node_id]]
        assert not missing, f"README {node_id}: inputs not documented: {missing}"
