"""Example workflows: valid against core + pack node definitions, current with the nodes, with thumbnails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import build_example_workflows as builder
from object_info import CORE_OBJECT_INFO

WORKFLOWS = sorted(builder.OUT.glob("*.json"))
EXPECTED = {graph().stem for graph in builder.GRAPHS}


@pytest.fixture(scope="module")
def info() -> dict:
    return builder.object_info()


def test_the_four_examples_are_there():
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    assert any(stem.startswith("demo_") for stem in EXPECTED)


def test_every_workflow_passes_the_validator(info, tmp_path):
    pack_info = tmp_path / "pack_object_info.json"
    pack_info.write_text(json.dumps({k: v for k, v in info.items() if v["python_module"].startswith("custom_nodes.")}))
    result = subprocess.run(
        [sys.executable, str(builder.VALIDATOR), *map(str, WORKFLOWS), "--object-info", str(CORE_OBJECT_INFO),
         "--object-info", str(pack_info), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    report = json.loads(result.stdout)
    errors = {path: [m for m in messages if m["level"] == "error"] for path, messages in report.items()}
    assert result.returncode == 0 and not any(errors.values()), errors
    # Warnings may only be model / image files a fresh ComfyUI does not have.
    for path, messages in report.items():
        for m in messages:
            assert "not in choices" in m["message"] or "choice list is empty" in m["message"], (path, m)
            assert ".safetensors" in m["message"] or ".png" in m["message"], (path, m)


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
    demo = json.loads((builder.OUT / "demo_embedded_dora.json").read_text(encoding="utf-8"))
    types = {n["type"] for n in demo["nodes"]}
    pack_nodes = {k for k, v in info.items() if v["python_module"].startswith("custom_nodes.")}
    assert types <= pack_nodes | {"PreviewImage", "MarkdownNote"}, types - pack_nodes
    prompt = builder.validate_workflow.ui_to_api(demo, info)
    loaders = [n for n in prompt.values() if n["class_type"] == "LoadDiT"]
    assert [n["inputs"]["checkpoint"] for n in loaders] == ["[embedded demo] dit_trainer_demo"]
    datasets = [n for n in prompt.values() if n["class_type"] == "DatasetFromFolder"]
    assert [n["inputs"]["folder"] for n in datasets] == ["[embedded demo] magenta shapes"]
    assert all("clip" not in n["inputs"] and "vae" not in n["inputs"] for n in prompt.values())
