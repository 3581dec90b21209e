"""Example workflows: valid against core + pack node definitions, current with the nodes, with thumbnails."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

import build_example_workflows as builder
import workflow_format

WORKFLOWS = sorted(builder.OUT.glob("*.json"))
EXPECTED = {graph().stem for graph in builder.GRAPHS}
# Combo values newer than the 0.3.64 node definitions the tests carry: (node type, widget value) -> why.
NEWER_THAN_SNAPSHOT = {
    ("CLIPLoader", "'flux2'"): "Flux.2 text encoders (CLIPLoader type flux2) arrived in ComfyUI after 0.3.64",
}


def documented_exception(message: str) -> bool:
    return any(f"({node}) " in message and f"{value} is not one of" in message
               for node, value in NEWER_THAN_SNAPSHOT)


@pytest.fixture(scope="module")
def info() -> dict:
    return builder.object_info()


def test_the_ten_examples_are_there():
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    assert builder.DEMO_STEM in EXPECTED and sum(graph().demo for graph in builder.GRAPHS) == 1
    assert all(" " in stem for stem in EXPECTED)  # readable titles in the Templates dialog, not file-name slugs


def test_every_workflow_passes_the_validator(info):
    for path in WORKFLOWS:
        problems = workflow_format.validate(json.loads(path.read_text(encoding="utf-8")), info)
        assert not [m for level, m in problems if level == "error" and not documented_exception(m)], (path.name, problems)
        # Warnings may only be model / image files a fresh ComfyUI does not have.
        for _, message in problems:
            if documented_exception(message):
                continue
            assert "is not one of" in message and (".safetensors" in message or ".png" in message), (path.name, message)


def test_the_validator_catches_broken_workflows(info):
    demo = json.loads((builder.OUT / f"{builder.DEMO_STEM}.json").read_text(encoding="utf-8"))
    train = next(n for n in demo["nodes"] if n["type"] == "TrainLoRA")
    specs = workflow_format.widget_specs(info["TrainLoRA"])
    steps = [s.name for s in specs].index("steps")

    def errors_after(change) -> list[str]:
        broken = copy.deepcopy(demo)
        change(broken, next(n for n in broken["nodes"] if n["id"] == train["id"]))
        return [m for level, m in workflow_format.validate(broken, info) if level == "error"]

    assert any("below the minimum" in m for m in errors_after(lambda wf, n: n["widgets_values"].__setitem__(steps, 0)))
    assert any("widget values" in m for m in errors_after(lambda wf, n: n["widgets_values"].pop()))
    assert any("not connected" in m for m in errors_after(
        lambda wf, n: [s.__setitem__("link", None) for s in n["inputs"] if s["name"] == "model"]))
    assert any("does not list it" in m for m in errors_after(lambda wf, n: wf["links"].append([99, 1, 0, n["id"], 0, "DITT_MODEL"])))
    assert any("no such node type" in m for m in errors_after(lambda wf, n: n.__setitem__("type", "TrainLoRAX")))


def test_files_are_what_the_builder_makes_from_the_current_nodes(info):
    for make in builder.GRAPHS:
        graph = make()
        on_disk = json.loads((builder.OUT / f"{graph.stem}.json").read_text(encoding="utf-8"))
        assert on_disk == builder.build(graph, info), (
            f"{graph.stem}.json is stale: run `.venv/bin/python tests/build_example_workflows.py`")


def test_each_workflow_has_a_real_jpg_thumbnail():
    for workflow in WORKFLOWS:
        thumbnail = workflow.with_suffix(".jpg")
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 256, thumbnail.name
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{thumbnail.name} looks blank"


def test_demo_workflow_needs_no_downloads(info):
    demo = json.loads((builder.OUT / f"{builder.DEMO_STEM}.json").read_text(encoding="utf-8"))
    types = {n["type"] for n in demo["nodes"]}
    pack_nodes = {k for k, v in info.items() if v["python_module"].startswith("custom_nodes.")}
    assert types <= pack_nodes | {"PreviewImage", "MarkdownNote"}, types - pack_nodes
    prompt = workflow_format.ui_to_api(demo, info)
    loaders = [n for n in prompt.values() if n["class_type"] == "LoadDiT"]
    assert [n["inputs"]["checkpoint"] for n in loaders] == ["[embedded demo] dit_trainer_demo"]
    datasets = [n for n in prompt.values() if n["class_type"] == "DatasetFromFolder"]
    assert [n["inputs"]["folder"] for n in datasets] == ["[embedded demo] magenta shapes"]
    assert all("clip" not in n["inputs"] and "vae" not in n["inputs"] for n in prompt.values())
