"""Writes example_workflows/*.json (UI format 0.4, as the ComfyUI frontend saves them) and .jpg thumbnails.

    .venv/bin/python tests/build_example_workflows.py             JSON files + diagram thumbnails
    .venv/bin/python tests/build_example_workflows.py --demo-run  also the demo's before/after thumbnail,
                                                                  from a real run of the demo workflow (minutes)

Graphs are declared with node, socket and widget *names*. widgets_values are laid out in
the frontend's order from the node definitions (the pack's own INPUT_TYPES and ComfyUI's
core node definitions, through workflow_format.widget_specs), so the files follow the nodes;
test_workflows.py checks that the files on disk equal what this builds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
OUT = ROOT / "example_workflows"
PACK_ID, PACK_VERSION = "comfyui-dit-trainer", "0.1.0"
CORE_ID, CORE_VERSION = "comfy-core", "0.3.64"
FRONTEND_VERSION = "1.27.10"
VIRTUAL = {"MarkdownNote"}
COLUMN_GAP, ROW_GAP, TOP_LEFT = 60, 40, (40, 60)
SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT = 20, 24, 84
EXTENSION_HEIGHT = {"TrainLoRA": 300}  # the web extension's chart + gallery (web/lib/view.js VIEW_MIN_HEIGHT)
THUMBNAIL_SIZE = (768, 432)
OPTIONAL_SHAPE = 7  # LiteGraph's hollow circle, which the frontend uses for optional inputs

sys.path.insert(0, str(TESTS))
import fake_comfy  # noqa: E402
import workflow_format  # noqa: E402
from object_info import pack_object_info  # noqa: E402


# --- declaring graphs -------------------------------------------------------------


@dataclass
class Node:
    key: str  # name used by the links below
    type: str
    column: int
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    width: int = 340


@dataclass
class Graph:
    stem: str  # the file name, which is also the title ComfyUI's Templates dialog shows
    heading: str  # thumbnail title
    nodes: list[Node]
    links: list[tuple[str, str, str, str]]  # (from node, output name, to node, input name)
    notes: list[tuple[int, str]] = field(default_factory=list)  # (column, markdown) MarkdownNote nodes
    demo: bool = False  # the embedded demo: its thumbnail comes from a real run


def object_info() -> dict:
    """Core node definitions plus the pack's, with the pack imported against an empty fake ComfyUI."""
    with tempfile.TemporaryDirectory() as tmp:
        host = fake_comfy.install(Path(tmp))
        try:
            pack = fake_comfy.import_pack()
            info = {**workflow_format.core_node_info(), **pack_object_info(pack, PACK_ID)}
        finally:
            fake_comfy.unload_pack()
            fake_comfy.uninstall(host)
    return info


def _default(spec: workflow_format.WidgetSpec, node: Node) -> Any:
    if spec.kind == "control":
        return "fixed"  # reproducible examples
    if spec.kind == "filter":
        return ""
    if spec.kind == "upload":
        return "image"
    if spec.name in node.widgets:
        return node.widgets[spec.name]
    if "default" in spec.options:
        return spec.options["default"]
    if spec.choices:
        return spec.choices[0]
    raise ValueError(f"{node.key} ({node.type}): widget {spec.name!r} has no default; give a value")


def _socket_inputs(definition: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs that are sockets (not widgets), in the frontend's order."""
    widget_names = {w.input for w in workflow_format.widget_specs(definition) if w.input}
    order = definition.get("input_order", {})
    sockets = []
    for section in ("required", "optional"):
        specs = definition["input"].get(section, {})
        for name in order.get(section, list(specs)):
            if name not in widget_names:
                kind = specs[name][0]
                sockets.append((name, kind if isinstance(kind, str) else "COMBO", section == "optional"))
    return sockets


def _height(node_type: str, n_inputs: int, n_outputs: int, specs: list[workflow_format.WidgetSpec]) -> int:
    height = max(n_inputs, n_outputs, 1) * SLOT_HEIGHT + 12 + EXTENSION_HEIGHT.get(node_type, 0)
    for w in specs:
        multiline = w.type == "STRING" and w.options.get("multiline")
        height += MULTILINE_HEIGHT if multiline else WIDGET_HEIGHT
    return height


def build(graph: Graph, info: dict) -> dict:
    """The UI-format 0.4 workflow for `graph`."""
    ids = {node.key: i for i, node in enumerate(graph.nodes, start=1)}
    inputs, outputs, widgets, sizes = {}, {}, {}, {}
    for node in graph.nodes:
        definition = info[node.type]
        specs = workflow_format.widget_specs(definition)
        unknown = set(node.widgets) - {w.name for w in specs}
        if unknown:
            raise ValueError(f"{node.key} ({node.type}): no widgets named {sorted(unknown)}")
        widgets[node.key] = [_default(w, node) for w in specs]
        inputs[node.key] = [
            {"name": name, "type": kind, "link": None, **({"shape": OPTIONAL_SHAPE} if optional else {})}
            for name, kind, optional in _socket_inputs(definition)
        ]
        outputs[node.key] = [
            {"name": name, "type": kind, "links": [], "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(definition["output_name"], definition["output"]))
        ]
        sizes[node.key] = [node.width, _height(node.type, len(inputs[node.key]), len(outputs[node.key]), specs)]

    links = []
    for link_id, (src, out_name, dst, in_name) in enumerate(graph.links, start=1):
        out_slot = next(i for i, o in enumerate(outputs[src]) if o["name"] == out_name)
        in_slot = next(i for i, s in enumerate(inputs[dst]) if s["name"] == in_name)
        kind = outputs[src][out_slot]["type"]
        outputs[src][out_slot]["links"].append(link_id)
        inputs[dst][in_slot]["link"] = link_id
        links.append([link_id, ids[src], out_slot, ids[dst], in_slot, kind])

    # Execution order: a node after every node it reads from.
    order: dict[str, int] = {}

    def place(key: str) -> int:
        if key not in order:
            sources = [src for src, _, dst, _ in graph.links if dst == key]
            order[key] = 1 + max((place(s) for s in sources), default=-1)
        return order[key]

    for node in graph.nodes:
        place(node.key)
    ranked = sorted(graph.nodes, key=lambda n: (order[n.key], ids[n.key]))
    order_index = {node.key: i for i, node in enumerate(ranked)}

    columns = max(n.column for n in graph.nodes) + 1
    widths = [max([n.width for n in graph.nodes if n.column == c] or [300]) for c in range(columns)]
    x_of = [TOP_LEFT[0] + sum(widths[:c]) + COLUMN_GAP * c for c in range(columns)]
    y_next = [TOP_LEFT[1]] * columns
    nodes = []
    for node in graph.nodes:
        pos = [x_of[node.column], y_next[node.column]]
        y_next[node.column] += sizes[node.key][1] + ROW_GAP + 30  # 30: the title bar above pos
        core = info[node.type]["python_module"].startswith(("nodes", "comfy_extras"))
        entry = {
            "id": ids[node.key],
            "type": node.type,
            "pos": pos,
            "size": sizes[node.key],
            "flags": {},
            "order": order_index[node.key],
            "mode": 0,
            "inputs": inputs[node.key],
            "outputs": outputs[node.key],
            "properties": {"Node name for S&R": node.type, "cnr_id": CORE_ID if core else PACK_ID,
                           "ver": CORE_VERSION if core else PACK_VERSION},
            "widgets_values": widgets[node.key],
        }
        if node.title:
            entry["title"] = node.title
        nodes.append(entry)
    for column, text in graph.notes:
        note_id = len(nodes) + 1
        lines = text.count("\n") + 1
        nodes.append({
            "id": note_id, "type": "MarkdownNote", "pos": [x_of[column], y_next[column]],
            "size": [widths[column], 40 + 18 * lines], "flags": {}, "order": len(nodes), "mode": 0,
            "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
            "color": "#432", "bgcolor": "#653",
        })
        y_next[column] += 40 + 18 * lines + ROW_GAP + 30
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/{graph.stem}")),
        "revision": 0,
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


# --- the example graphs ---------------------------------------------------------------

# ComfyUI's Templates dialog titles a pack's examples by their file names, so the names are titles.
DEMO_STEM = "Embedded demo, DoRA learns a new colour (CPU, no downloads)"
DEMO_PROMPTS = "\n".join(f"a magenta {shape} --l 4 --fs 1 --s 20" for shape in ("circle", "square", "triangle", "diamond"))
DEMO_SAMPLE = {"prompt": "a magenta circle\na magenta square\na magenta triangle\na magenta diamond",
               "width": 32, "height": 32, "steps": 20, "cfg": 4.0, "shift": 1.0, "seed": 1000}
ZIMAGE_CHECKPOINT = "z_image_turbo_bf16.safetensors"
ZIMAGE_LOADERS = [
    Node("clip", "CLIPLoader", 0, {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"}, width=300),
    Node("vae", "VAELoader", 0, {"vae_name": "ae.safetensors"}, width=300),
]
ZIMAGE_DATASET = {"folder": "my_dataset", "resolution": 1024, "bucket_step": 64}
ZIMAGE_TRAIN = {"steps": 2000, "lr": 1e-4, "schedule": "cosine", "warmup_steps": 100, "timestep_sampling": "shift",
                "discrete_flow_shift": 3.0, "mixed_precision": "bf16", "save_every": 250, "sample_every": 250,
                "sample_prompts": "a photo of sks person in a garden --w 1024 --h 1024 --s 8 --fs 3 --d 1"}


def demo_graph() -> Graph:
    return Graph(
        DEMO_STEM,
        "Embedded demo: DoRA on a tiny Z-Image (CPU)",
        [
            Node("model", "LoadDiT", 0, {"checkpoint": "[embedded demo] dit_trainer_demo", "weight_dtype": "fp32"}),
            Node("network", "BuildLoRANetwork", 0, {"algo": "dora", "rank": 8, "alpha": 8.0}),
            Node("data", "DatasetFromFolder", 1, {"folder": "[embedded demo] magenta shapes", "resolution": 32,
                                                  "enable_buckets": False, "bucket_step": 16, "min_side": 16,
                                                  "max_side": 64}),
            Node("mask", "WeightedMask", 1, {"mask_gamma": 1.0, "mask_min_weight": 0.2}),
            Node("train", "TrainLoRA", 2, {"name": "demo_magenta_dora", "steps": 300, "batch_size": 4, "lr": 3e-3,
                                           "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 10,
                                           "timestep_sampling": "sigmoid", "seed": 0, "save_every": 50,
                                           "keep_last": 2, "sample_every": 50, "sample_prompts": DEMO_PROMPTS},
                 width=420),
            Node("ema", "EMAMerge", 3, {"mode": "sigma_rel", "sigma_rel": 0.2, "t_from_steps": True}),
            Node("loss", "PreviewImage", 3, title="Loss curve", width=360),
            Node("sample", "SampleWithLoRA", 4, {**DEMO_SAMPLE, "strength": 1.0}, title="Sample with the DoRA"),
            Node("base", "SampleWithLoRA", 4, {**DEMO_SAMPLE, "strength": 0.0}, title="Sample the base (strength 0)"),
            Node("show", "PreviewImage", 5, title="With the DoRA: magenta", width=300),
            Node("show_base", "PreviewImage", 5, title="Base: never saw magenta", width=300),
        ],
        [
            ("model", "model", "network", "model"),
            ("model", "model", "data", "model"),
            ("data", "dataset", "mask", "dataset"),
            ("model", "model", "train", "model"),
            ("network", "network", "train", "network"),
            ("mask", "dataset", "train", "dataset"),
            ("train", "lora", "ema", "lora"),
            ("train", "loss_curve", "loss", "images"),
            ("model", "model", "sample", "model"),
            ("ema", "lora", "sample", "lora"),
            ("model", "model", "base", "model"),
            ("ema", "lora", "base", "lora"),
            ("sample", "image", "show", "images"),
            ("base", "image", "show_base", "images"),
        ],
        [(0, "## Embedded demo (CPU, no downloads)\nA tiny Z-Image pretrained on coloured shapes, never on "
              "**magenta**.\nTrainLoRA teaches magenta with a rank-8 DoRA in 300 steps\n(a few minutes on a CPU), "
              "with previews every 50 steps.\nEMAMerge averages the checkpoints; the two samplers compare\nthe "
              "base (strength 0) with the trained adapter.")],
        demo=True,
    )


# LoadDiT + CLIP / VAE -> BuildLoRANetwork, DatasetFromFolder -> TrainLoRA -> loss preview.
TRAINING_LINKS = [
            ("model", "model", "network", "model"),
            ("model", "model", "data", "model"),
            ("clip", "CLIP", "data", "clip"),
            ("vae", "VAE", "data", "vae"),
            ("model", "model", "train", "model"),
            ("network", "network", "train", "network"),
            ("data", "dataset", "train", "dataset"),
            ("train", "loss_curve", "loss", "images"),
]
FLUX1_LOADERS = [
    Node("clip", "DualCLIPLoader", 0, {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                       "type": "flux"}, width=300),
    Node("vae", "VAELoader", 0, {"vae_name": "ae.safetensors"}, width=300),
]
FLUX_TRAIN = {"steps": 2000, "lr": 1e-4, "schedule": "cosine", "warmup_steps": 100, "timestep_sampling": "flux_shift",
              "mixed_precision": "bf16", "save_every": 250, "sample_every": 250, "guidance": 1.0}


def _compare_graph(stem: str, heading: str, checkpoint: str, loaders: list[Node], run: str, train: dict,
                   sample: dict, note: str, network: dict | None = None) -> Graph:
    """Train a LoRA, then sample the base and the LoRA with the same seed, side by side."""
    return Graph(
        stem,
        heading,
        [
            Node("model", "LoadDiT", 0, {"checkpoint": checkpoint, "gradient_checkpointing": True}),
            *loaders,
            Node("network", "BuildLoRANetwork", 1, network or {"algo": "lora", "rank": 16, "alpha": 16.0}),
            Node("data", "DatasetFromFolder", 1, ZIMAGE_DATASET),
            Node("train", "TrainLoRA", 2, {"name": run, **train}, width=420),
            Node("loss", "PreviewImage", 3, title="Loss curve", width=360),
            Node("base", "SampleWithLoRA", 3, {**sample, "strength": 0.0}, title="Base (strength 0)"),
            Node("sample", "SampleWithLoRA", 3, {**sample, "strength": 1.0}, title="With the LoRA"),
            Node("grid", "ImageStitch", 4, {"direction": "right", "spacing_width": 16}, width=300),
            Node("save", "SaveImage", 5, {"filename_prefix": f"dit_trainer/{run}_compare"}, width=300),
        ],
        [
            *TRAINING_LINKS,
            *[link for node in ("base", "sample") for link in (
                ("model", "model", node, "model"), ("train", "lora", node, "lora"),
                ("clip", "CLIP", node, "clip"), ("vae", "VAE", node, "vae"))],
            ("base", "image", "grid", "image1"),
            ("sample", "image", "grid", "image2"),
            ("grid", "IMAGE", "save", "images"),
        ],
        [(0, note)],
    )


def zimage_graph() -> Graph:
    sample = {"prompt": "a photo of sks person in a garden", "width": 1024, "height": 1024, "steps": 8,
              "cfg": 1.0, "shift": 3.0, "seed": 1}
    return _compare_graph(
        "Z-Image LoRA training, base and LoRA side by side", "Z-Image LoRA training + base / LoRA grid",
        ZIMAGE_CHECKPOINT, ZIMAGE_LOADERS, "zimage_subject", ZIMAGE_TRAIN, sample,
        "## Z-Image LoRA\nModels: the Z-Image diffusion model in models/diffusion_models,\nQwen3-4B in "
        "models/text_encoders, the Flux VAE (ae) in models/vae.\nDataset: ComfyUI/input/my_dataset with "
        "images + same-name .txt captions.\nThe result lands in models/loras/zimage_subject.safetensors;\n"
        "the grid compares the base (left) with the LoRA (right).")


def zimage_base_graph() -> Graph:
    """The Z-Image Base recipe users report working: sigmoid timesteps, shift 1, AdamW 1e-4, wd 0.01, r32 / a32."""
    sample = {"prompt": "a photo of sks person in a garden", "negative_prompt": "blurry, low quality",
              "width": 1024, "height": 1024, "steps": 50, "cfg": 5.0, "shift": 3.0, "seed": 1}
    train = {**ZIMAGE_TRAIN, "lr": 1e-4, "weight_decay": 0.01, "optimizer": "adamw", "timestep_sampling": "sigmoid",
             "discrete_flow_shift": 1.0,
             "sample_prompts": "a photo of sks person in a garden --n blurry, low quality --w 1024 --h 1024 --d 1"}
    return _compare_graph(
        "Z-Image Base LoRA, the recipe that works, base and LoRA side by side", "Z-Image Base LoRA recipe + grid",
        "z_image_base_bf16.safetensors", ZIMAGE_LOADERS, "zimage_base_subject", train, sample,
        "## Z-Image Base recipe\nsigmoid timesteps, shift 1.0, AdamW lr 1e-4, weight decay 0.01,\nrank 32 / "
        "alpha 32 (what Base users report working).\nBase samples at 50 steps with CFG 5 and a negative; "
        "previews\nuse that too (LoadDiT reads Base / Turbo from the file name,\nor set its variant).",
        network={"algo": "lora", "rank": 32, "alpha": 32.0})


def masked_dora_graph() -> Graph:
    return Graph(
        "Z-Image DoRA with a masked loss",
        "Z-Image DoRA with a masked loss",
        [
            Node("model", "LoadDiT", 0, {"checkpoint": ZIMAGE_CHECKPOINT, "gradient_checkpointing": True}),
            *ZIMAGE_LOADERS,
            Node("network", "BuildLoRANetwork", 1, {"algo": "dora", "rank": 16, "alpha": 16.0}),
            Node("data", "DatasetFromFolder", 1, {**ZIMAGE_DATASET, "masks": "none"}),
            Node("mask_image", "LoadImage", 1, {"image": "subject_mask.png"}, title="Mask (paint it in the mask editor)"),
            Node("weights", "WeightedMask", 2, {"mask_gamma": 1.0, "mask_min_weight": 0.1}),
            Node("train", "TrainLoRA", 2, {"name": "zimage_masked_dora", **ZIMAGE_TRAIN}, width=420),
            Node("loss", "PreviewImage", 3, title="Loss curve", width=360),
        ],
        [
            ("model", "model", "network", "model"),
            ("model", "model", "data", "model"),
            ("clip", "CLIP", "data", "clip"),
            ("vae", "VAE", "data", "vae"),
            ("data", "dataset", "weights", "dataset"),
            ("mask_image", "MASK", "weights", "mask"),
            ("model", "model", "train", "model"),
            ("network", "network", "train", "network"),
            ("weights", "dataset", "train", "dataset"),
            ("train", "loss_curve", "loss", "images"),
        ],
        [(0, "## Masked-loss DoRA\nThe loss counts where the MASK is 1: paint the subject in\nLoad Image's mask "
              "editor (one mask for all images of that size),\nor disconnect the MASK, put masks/<image>.png "
              "(white = train)\nin the dataset folder and set masks to auto.\nmask_min_weight keeps a little "
              "signal outside the mask.")],
    )


def use_result_graph() -> Graph:
    return Graph(
        "Z-Image, use the trained LoRA in LoraLoader and KSampler",
        "Use the trained LoRA: LoraLoader + KSampler",
        [
            Node("unet", "UNETLoader", 0, {"unet_name": ZIMAGE_CHECKPOINT}, width=320),
            *ZIMAGE_LOADERS,
            Node("lora", "LoraLoader", 1, {"lora_name": "zimage_subject.safetensors", "strength_model": 1.0,
                                           "strength_clip": 1.0}, width=320),
            Node("shift", "ModelSamplingAuraFlow", 2, {"shift": 3.0}, width=300),
            Node("positive", "CLIPTextEncode", 2, {"text": "a photo of sks person in a garden"}, width=300),
            Node("negative", "CLIPTextEncode", 2, {"text": ""}, width=300),
            Node("latent", "EmptySD3LatentImage", 2, {"width": 1024, "height": 1024}, width=300),
            Node("sampler", "KSampler", 3, {"seed": 1, "steps": 8, "cfg": 1.0, "sampler_name": "euler",
                                            "scheduler": "simple"}, width=300),
            Node("decode", "VAEDecode", 4, width=220),
            Node("save", "SaveImage", 5, {"filename_prefix": "dit_trainer/zimage_lora"}, width=300),
        ],
        [
            ("unet", "MODEL", "lora", "model"),
            ("clip", "CLIP", "lora", "clip"),
            ("lora", "MODEL", "shift", "model"),
            ("lora", "CLIP", "positive", "clip"),
            ("lora", "CLIP", "negative", "clip"),
            ("shift", "MODEL", "sampler", "model"),
            ("positive", "CONDITIONING", "sampler", "positive"),
            ("negative", "CONDITIONING", "sampler", "negative"),
            ("latent", "LATENT", "sampler", "latent_image"),
            ("sampler", "LATENT", "decode", "samples"),
            ("vae", "VAE", "decode", "vae"),
            ("decode", "IMAGE", "save", "images"),
        ],
        [(0, "## Use the trained LoRA in stock ComfyUI\nThe adapter TrainLoRA saved in models/loras loads in the "
              "stock\nLoraLoader; its DoRA magnitudes (dora_scale) are applied too.")],
    )


def flux1_graph() -> Graph:
    sample = {"prompt": "a photo of sks person in a garden", "width": 1024, "height": 1024, "steps": 20,
              "cfg": 1.0, "shift": 3.16, "guidance": 3.5, "seed": 1}
    train = {**FLUX_TRAIN, "sample_prompts": "a photo of sks person in a garden --w 1024 --h 1024 --s 20 --g 3.5 "
                                             "--fs 3.16 --d 1"}
    return _compare_graph(
        "Flux.1-dev LoRA training, base and LoRA side by side", "Flux.1-dev LoRA training + base / LoRA grid",
        "flux1-dev.safetensors", FLUX1_LOADERS, "flux_subject", train, sample,
        "## Flux.1-dev LoRA\nModels: flux1-dev in models/diffusion_models, clip_l and t5xxl\nin "
        "models/text_encoders (DualCLIPLoader, type flux), ae in models/vae.\nDataset: ComfyUI/input/my_dataset "
        "with images + same-name .txt captions.\nTraining sees guidance 1.0 (musubi-tuner's default); samples "
        "use\n--g 3.5, like FluxGuidance. Result: models/loras/flux_subject.safetensors.")


def flux2_graph() -> Graph:
    sample = {"prompt": "a photo of sks person in a garden", "width": 1024, "height": 1024, "steps": 20,
              "cfg": 4.0, "shift": 3.16, "seed": 1}
    train = {**FLUX_TRAIN, "sample_prompts": "a photo of sks person in a garden --n blurry --w 1024 --h 1024 "
                                             "--s 20 --l 4 --fs 3.16 --d 1"}
    loaders = [
        Node("clip", "CLIPLoader", 0, {"clip_name": "qwen_3_4b.safetensors", "type": "flux2"}, width=300),
        Node("vae", "VAELoader", 0, {"vae_name": "flux2-vae.safetensors"}, width=300),
    ]
    return _compare_graph(
        "Flux.2 klein LoRA training, base and LoRA side by side", "Flux.2 klein LoRA training + base / LoRA grid",
        "flux-2-klein-4b.safetensors", loaders, "klein_subject", train, sample,
        "## Flux.2 klein LoRA\nModels: a klein 4B (or 9B) diffusion model in models/diffusion_models,\nits "
        "Qwen3 text encoder in models/text_encoders (CLIPLoader type flux2,\nComfyUI with Flux.2 support), the "
        "Flux.2 VAE in models/vae.\nklein has no guidance input: samples use CFG (--l 4) and a negative.\n"
        "Result: models/loras/klein_subject.safetensors.")


def kontext_graph() -> Graph:
    instruction = "turn the photo into a watercolor painting"
    return Graph(
        "Flux.1 Kontext edit LoRA from image pairs",
        "Flux.1 Kontext edit LoRA from before / after pairs",
        [
            Node("model", "LoadDiT", 0, {"checkpoint": "flux1-kontext-dev.safetensors", "gradient_checkpointing": True}),
            *FLUX1_LOADERS,
            Node("network", "BuildLoRANetwork", 1, {"algo": "lora", "rank": 16, "alpha": 16.0}),
            Node("data", "DatasetFromFolder", 1, {**ZIMAGE_DATASET, "folder": "my_pairs", "control_folder": "control"}),
            Node("train", "TrainLoRA", 2, {"name": "kontext_watercolor", **FLUX_TRAIN,
                                           "sample_prompts": f"{instruction} --s 20 --g 2.5 --fs 3.16 --d 1"},
                 width=420),
            Node("loss", "PreviewImage", 3, title="Loss curve", width=360),
            Node("photo", "LoadImage", 1, {"image": "edit_me.png"}, title="Image to edit"),
            Node("scale", "FluxKontextImageScale", 2, width=260),
            Node("encode", "VAEEncode", 2, width=220),
            Node("prompt", "CLIPTextEncode", 2, {"text": instruction}, width=300),
            Node("reference", "ReferenceLatent", 3, width=260),
            Node("guidance", "FluxGuidance", 3, {"guidance": 2.5}, width=260),
            Node("sample", "SampleWithLoRA", 4, {"width": 1024, "height": 1024, "steps": 20, "shift": 3.16,
                                                 "seed": 1}, title="Edit with the LoRA"),
            Node("save", "SaveImage", 5, {"filename_prefix": "dit_trainer/kontext_edit"}, width=300),
        ],
        [
            *TRAINING_LINKS,
            ("photo", "IMAGE", "scale", "image"),
            ("scale", "IMAGE", "encode", "pixels"),
            ("vae", "VAE", "encode", "vae"),
            ("clip", "CLIP", "prompt", "clip"),
            ("prompt", "CONDITIONING", "reference", "conditioning"),
            ("encode", "LATENT", "reference", "latent"),
            ("reference", "CONDITIONING", "guidance", "conditioning"),
            ("model", "model", "sample", "model"),
            ("train", "lora", "sample", "lora"),
            ("guidance", "CONDITIONING", "sample", "positive"),
            ("vae", "VAE", "sample", "vae"),
            ("sample", "image", "save", "images"),
        ],
        [(0, "## Kontext edit LoRA\nPairs: ComfyUI/input/my_pairs/a.png (the edited result) + a.txt\n(the "
              "instruction) + control/a.png (the image before the edit).\nControl images are resized to their "
              "target's bucket; previews\nedit the first pair's control image. The sampler edits the image\n"
              "given to ReferenceLatent, like stock Kontext workflows.")],
    )


QWEN_LOADERS = [
    Node("clip", "CLIPLoader", 0, {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image"},
         width=300),
    Node("vae", "VAELoader", 0, {"vae_name": "qwen_image_vae.safetensors"}, width=300),
]
QWEN_TRAIN = {"steps": 2000, "lr": 1e-4, "schedule": "cosine", "warmup_steps": 100, "timestep_sampling": "shift",
              "discrete_flow_shift": 2.2, "mixed_precision": "bf16", "save_every": 250, "sample_every": 250}


def qwen_persona_graph() -> Graph:
    """RS-LoRA + LoRA+ with the modulation layers trained, masked loss, shift 2.2, 1328 px buckets."""
    sample = {"prompt": "a photo of sks person in a garden", "negative_prompt": "blurry, low quality",
              "width": 1328, "height": 1328, "steps": 30, "cfg": 4.0, "shift": 2.2, "seed": 1}
    graph = _compare_graph(
        "Qwen-Image persona LoRA (RS-LoRA, LoRA+, masks), base and LoRA side by side",
        "Qwen-Image persona LoRA + base / LoRA grid", "qwen_image_bf16.safetensors", QWEN_LOADERS, "qwen_persona",
        {**QWEN_TRAIN, "sample_prompts": "a photo of sks person in a garden --n blurry, low quality --w 1328 --h 1328 "
                                         "--s 30 --l 4 --fs 2.2 --d 1"},
        sample,
        "## Qwen-Image persona LoRA\nRS-LoRA rank 32, LoRA+ ratio 4, img_mod / txt_mod trained\n(exclude_mod off), "
        "loss weighted by masks/ (white = the person),\ntimestep shift 2.2, 1328 px buckets in steps of 32 (even "
        "token\ngrids: the positions ComfyUI samples with). Models: qwen_image,\nQwen2.5-VL 7B (CLIPLoader "
        "qwen_image), the Qwen-Image VAE.",
        network={"algo": "lora", "rank": 32, "alpha": 32.0, "use_rslora": True, "loraplus_lr_ratio": 4.0,
                 "exclude_mod": False})
    data = next(n for n in graph.nodes if n.key == "data")
    data.widgets = {"folder": "my_dataset", "resolution": 1328, "bucket_step": 32, "min_side": 512, "max_side": 2048,
                    "masks": "folder"}
    graph.nodes.insert(graph.nodes.index(data) + 1,
                       Node("weights", "WeightedMask", 2, {"mask_gamma": 1.0, "mask_min_weight": 0.1}))
    graph.links = [(a, b, c, d) if (a, c) != ("data", "train") else ("weights", b, c, d) for a, b, c, d in graph.links]
    graph.links.append(("data", "dataset", "weights", "dataset"))
    return graph


def qwen_edit_graph() -> Graph:
    instruction = "turn the photo into a watercolor painting"
    return Graph(
        "Qwen-Image-Edit LoRA from image pairs",
        "Qwen-Image-Edit LoRA from before / after pairs",
        [
            Node("model", "LoadDiT", 0, {"checkpoint": "qwen_image_edit_2509_bf16.safetensors",
                                         "gradient_checkpointing": True}),
            *QWEN_LOADERS,
            Node("network", "BuildLoRANetwork", 1, {"algo": "lora", "rank": 16, "alpha": 16.0}),
            Node("data", "DatasetFromFolder", 1, {**ZIMAGE_DATASET, "folder": "my_pairs", "control_folder": "control",
                                                  "edit_text_encoder": "TextEncodeQwenImageEditPlus"}),
            Node("train", "TrainLoRA", 2, {"name": "qwen_edit_watercolor", **QWEN_TRAIN,
                                           "sample_prompts": f"{instruction} --n blurry --s 30 --l 4 --fs 2.2 --d 1"},
                 width=420),
            Node("loss", "PreviewImage", 3, title="Loss curve", width=360),
            Node("photo", "LoadImage", 1, {"image": "edit_me.png"}, title="Image to edit"),
            Node("prompt", "TextEncodeQwenImageEditPlus", 2, {"prompt": instruction}, width=300),
            Node("negative", "TextEncodeQwenImageEditPlus", 2, {"prompt": ""}, width=300, title="Negative"),
            Node("sample", "SampleWithLoRA", 3, {"width": 1024, "height": 1024, "steps": 30, "cfg": 4.0,
                                                 "shift": 2.2, "seed": 1}, title="Edit with the LoRA"),
            Node("save", "SaveImage", 4, {"filename_prefix": "dit_trainer/qwen_edit"}, width=300),
        ],
        [
            *TRAINING_LINKS,
            *[link for node in ("prompt", "negative") for link in (
                ("clip", "CLIP", node, "clip"), ("vae", "VAE", node, "vae"), ("photo", "IMAGE", node, "image1"))],
            ("model", "model", "sample", "model"),
            ("train", "lora", "sample", "lora"),
            ("prompt", "CONDITIONING", "sample", "positive"),
            ("negative", "CONDITIONING", "sample", "negative"),
            ("vae", "VAE", "sample", "vae"),
            ("sample", "image", "save", "images"),
        ],
        [(0, "## Qwen-Image-Edit LoRA\nPairs: ComfyUI/input/my_pairs/a.png (the result) + a.txt (the\ninstruction) "
              "+ control/a.png (the image before the edit).\nCaptions are encoded with their control image, as "
              "TextEncodeQwenImageEditPlus\nencodes the prompt (edit_text_encoder); the control latents are\nthe "
              "model's reference tokens. Sampling edits the image given to the node.")],
    )


GRAPHS = (demo_graph, zimage_graph, zimage_base_graph, masked_dora_graph, use_result_graph, flux1_graph, flux2_graph,
          kontext_graph, qwen_persona_graph, qwen_edit_graph)


# --- thumbnails ----------------------------------------------------------------------


def _curve(start: tuple[float, float], end: tuple[float, float], points: int = 24) -> list[tuple[float, float]]:
    """A link as the frontend draws it: a cubic Bezier leaving and entering horizontally."""
    (x0, y0), (x1, y1) = start, end
    pull = max(30.0, abs(x1 - x0) / 2)
    controls = [(x0, y0), (x0 + pull, y0), (x1 - pull, y1), (x1, y1)]
    out = []
    for i in range(points + 1):
        t = i / points
        weights = ((1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3)
        out.append((sum(w * c[0] for w, c in zip(weights, controls)), sum(w * c[1] for w, c in zip(weights, controls))))
    return out


def diagram(workflow: dict, heading: str, size: tuple[int, int] = THUMBNAIL_SIZE) -> Image.Image:
    """The graph drawn small under a heading: node boxes with titles, links as curves, the pack's nodes in blue."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values()) - 20
    top = min(n["pos"][1] for n in nodes.values()) - 50
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 20
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 20
    header = 44
    scale = min(size[0] / (right - left), (size[1] - header) / (bottom - top))
    image = Image.new("RGB", size, (32, 33, 38))
    draw = ImageDraw.Draw(image)
    draw.text((14, 10), heading, fill=(240, 240, 240), font=ImageFont.load_default(size=22))
    font = ImageFont.load_default(size=max(9, min(14, int(24 * scale))))
    margin = (size[0] - (right - left) * scale) / 2  # centre a graph narrower than the picture

    def xy(x: float, y: float) -> tuple[float, float]:
        return margin + (x - left) * scale, header + (y - top) * scale

    def fitted(text: str, width: float) -> str:
        while text and font.getlength(text) > width:
            text = text[:-2] + "…" if len(text) > 2 else ""
        return text

    for _, origin, out_slot, target, in_slot, _ in workflow["links"]:
        o, t = nodes[origin], nodes[target]
        start = xy(o["pos"][0] + o["size"][0], o["pos"][1] + 14 + SLOT_HEIGHT * out_slot)
        end = xy(t["pos"][0], t["pos"][1] + 14 + SLOT_HEIGHT * in_slot)
        draw.line(_curve(start, end), fill=(150, 170, 215), width=2)
    for n in nodes.values():
        x0, y0 = xy(n["pos"][0], n["pos"][1] - 30)
        x1, y1 = xy(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        ours = n.get("properties", {}).get("cnr_id") == PACK_ID
        note = n["type"] in VIRTUAL
        body = (92, 70, 48) if note else (52, 68, 104) if ours else (60, 60, 64)
        draw.rounded_rectangle([x0, y0, x1, y1], radius=4, fill=body, outline=(190, 190, 190))
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y0 + 30 * scale], fill=(34, 46, 80) if ours else (44, 44, 48))
        label = "Note" if note else n.get("title") or n["type"]
        draw.text((x0 + 4, y0 + 2), fitted(label, x1 - x0 - 8), fill=(240, 240, 240), font=font)
    return image


def demo_thumbnail(graph: Graph, workflow: dict, info: dict) -> Image.Image:
    """Run the demo workflow as shipped (fake ComfyUI host) and draw base vs DoRA samples and the loss."""
    from dit_trainer.training.demo.score import dominant_colour
    from dit_trainer.training.demo.shapes import HELD_OUT_COLOUR
    from dit_trainer.training.plots import image_grid
    from fake_comfy.executor import execute

    ids = {node.key: str(i) for i, node in enumerate(graph.nodes, start=1)}
    with tempfile.TemporaryDirectory() as tmp:
        host = fake_comfy.install(Path(tmp))
        try:
            run = execute(workflow_format.ui_to_api(workflow, info), host, fake_comfy.import_pack().NODE_CLASS_MAPPINGS)
        finally:
            fake_comfy.unload_pack()
            fake_comfy.uninstall(host)

    def shown(key: str) -> list[Image.Image]:
        pixels = (run.ui[ids[key]]["images"][0].clamp(0, 1) * 255).round().byte().numpy()
        return [Image.fromarray(p) for p in pixels]

    base, adapted, loss = shown("show_base"), shown("show"), shown("loss")[0]
    hits = [sum(dominant_colour(np.asarray(i)) == HELD_OUT_COLOUR for i in row) for row in (base, adapted)]
    grid = image_grid([("base", base), ("DoRA", adapted)], cell=96, label_width=56)
    canvas = Image.new("RGB", THUMBNAIL_SIZE, (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    draw.text((14, 12), "Embedded demo: teach a colour the base never saw", fill=(20, 20, 20),
              font=ImageFont.load_default(size=24))
    canvas.paste(grid, (8, 64))
    curve_width = THUMBNAIL_SIZE[0] - grid.width - 28
    canvas.paste(loss.resize((curve_width, curve_width * 9 // 16)), (grid.width + 18, 70))
    text = ImageFont.load_default(size=18)
    draw.text((14, 300), f"{HELD_OUT_COLOUR} samples: base {hits[0]}/{len(base)}, DoRA {hits[1]}/{len(adapted)}",
              fill=(20, 20, 20), font=text)
    draw.text((14, 330), "rank-8 DoRA, 300 steps, previews every 50 steps, post-hoc EMA;", fill=(60, 60, 60), font=text)
    draw.text((14, 356), "tiny Z-Image on a CPU, no downloads", fill=(60, 60, 60), font=text)
    return canvas


def write(workflow: dict, stem: str) -> Path:
    path = OUT / f"{stem}.json"
    path.write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", action="store_true", help="run the demo workflow for its thumbnail (minutes)")
    args = parser.parse_args(argv)
    info = object_info()
    OUT.mkdir(exist_ok=True)
    for make in GRAPHS:
        graph = make()
        workflow = build(graph, info)
        print("wrote", write(workflow, graph.stem))
        if graph.demo and not args.demo_run:
            continue
        thumbnail = demo_thumbnail(graph, workflow, info) if graph.demo else diagram(workflow, graph.heading)
        thumbnail.save(OUT / f"{graph.stem}.jpg", format="JPEG", quality=88)
    return 0


if __name__ == "__main__":
    sys.exit(main())
