"""The shipped demo workflow, converted to the API format and run node by node on the fake ComfyUI host.

Step counts are cut after conversion so the run takes seconds; everything else is the file as shipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import build_example_workflows as builder
import workflow_format
from comfy_merge import comfy_merge
from dit_trainer.training.demo.model import BASE_CHECKPOINT
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.network.comfy_format import PREFIX, load_adapter
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.executor import execute, is_link

PROMPTS = ["a magenta circle", "a magenta square"]
SMALL = {
    "TrainLoRA": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "save_every": 2, "sample_every": 2,
                  "sample_prompts": "\n".join(f"{p} --l 4 --fs 1 --s 2" for p in PROMPTS)},
    "SampleWithLoRA": {"steps": 2},
}
RUN = "demo_magenta_dora"  # the run name in the shipped workflow
PROGRESS_KEYS = {"node", "step", "total", "loss", "lr", "eta_s", "elapsed_s", "validation"}


@pytest.fixture(scope="module")
def demo_prompt() -> dict:
    workflow = json.loads((builder.OUT / f"{builder.DEMO_STEM}.json").read_text(encoding="utf-8"))
    prompt = workflow_format.ui_to_api(workflow, builder.object_info())
    for node in prompt.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
    return prompt


def node_id(prompt: dict, class_type: str, title: str | None = None) -> str:
    (found,) = [k for k, n in prompt.items() if n["class_type"] == class_type and title in (None, n["_meta"]["title"])]
    return found


def upstream(prompt: dict, target: str) -> dict:
    """The part of the prompt that `target` needs (what ComfyUI runs for that output)."""
    needed, todo = set(), [target]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo += [v[0] for v in prompt[key]["inputs"].values() if is_link(v)]
    return {k: prompt[k] for k in needed}


def test_demo_workflow_trains_previews_merges_and_samples(comfy_host, comfy_pack, demo_prompt):
    start = time.perf_counter()
    run = execute(demo_prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    train = node_id(demo_prompt, "TrainLoRA")

    # ComfyUI progress bar: every step, on the TrainLoRA node. No previews through it: the frontend would
    # draw them a second time under the pack's own gallery.
    steps = [u for u in comfy_host.updates if u.total == 4]
    assert [u.value for u in steps[:4]] == [1, 2, 3, 4] and {u.node for u in steps} == {train}
    assert all(u.preview is None for u in comfy_host.updates)

    # Websocket contract of the web extension.
    progress = comfy_host.events("dit_trainer.progress")
    assert [m["step"] for m in progress] == [1, 2, 3, 4]
    assert all(set(m) == PROGRESS_KEYS and m["node"] == train and m["total"] == 4 for m in progress)
    samples = comfy_host.events("dit_trainer.samples")
    assert [m["step"] for m in samples] == [2, 4] and all(m["captions"] == PROMPTS for m in samples)
    for image in samples[-1]["images"]:
        assert image["type"] == "temp" and (comfy_host.root / "temp" / image["subfolder"] / image["filename"]).is_file()

    ui = run.ui[train]
    assert [p[0] for p in ui["dit_trainer_losses"]] == [1, 2, 3, 4]
    assert all(m["validation"] == [] for m in progress) and ui["dit_trainer_validation"] == []  # nothing held out
    assert [s["step"] for s in ui["dit_trainer_samples"]] == [2, 4] and ui["dit_trainer_samples"][-1]["images"] == \
        samples[-1]["images"]
    assert "images" not in ui and ui["dit_trainer_saved"] == [f"{RUN}.safetensors"]  # one gallery, not two

    # The adapter in models/loras: the engine's weights are what ComfyUI's merge computes from the file.
    _, path, curve = run.outputs[train]
    assert Path(path) == comfy_host.folder("loras") / f"{RUN}.safetensors" and curve.shape[-1] == 3
    tensors = load_file(path)
    model = load_dit(BASE_CHECKPOINT)
    network = LoRANetwork(model, "zimage", NetworkConfig(algo="dora", rank=8, alpha=8.0))
    load_adapter(network, path)
    modules = dict(model.named_modules())
    moved = 0
    for adapter in network.adapters:
        prefix = PREFIX + adapter.name
        assert f"{prefix}.dora_scale" in tensors
        expected = comfy_merge(modules[adapter.name].weight, tensors, prefix, 1.0)
        assert torch.allclose(adapter.adapted_weight(), expected, atol=1e-5), adapter.name
        moved += not torch.allclose(expected, modules[adapter.name].weight.float(), atol=1e-6)
    assert moved == len(network.adapters)  # training changed every adapted layer

    _, merged_path = run.outputs[node_id(demo_prompt, "EMAMerge")]
    assert Path(merged_path).name == f"{RUN}_posthoc_ema.safetensors"
    assert load_file(merged_path).keys() == tensors.keys()
    for title in ("Sample with the DoRA", "Sample the base (strength 0)"):
        latent, image = run.outputs[node_id(demo_prompt, "SampleWithLoRA", title)]
        assert image.shape == (4, 32, 32, 3) and latent["samples"].shape == (4, 12, 16, 16)

    # The base model left the graph clean: no adapter stays hooked into its layers.
    dit = run.outputs[node_id(demo_prompt, "LoadDiT")][0]
    assert all(getattr(m.forward, "__self__", m) is m for m in dit.model.modules())
    assert time.perf_counter() - start < 60


def test_cancel_leaves_a_resumable_checkpoint_and_requeue_finishes_the_run(comfy_host, comfy_pack, demo_prompt):
    prompt = upstream(demo_prompt, node_id(demo_prompt, "TrainLoRA"))
    model_management = comfy_host.modules["comfy.model_management"]
    run_dir = comfy_host.root / "output" / "dit_trainer" / RUN
    final = comfy_host.folder("loras") / f"{RUN}.safetensors"

    # Cancel pressed while step 2 is reported: the run stops at most one step later.
    comfy_host.on_update = lambda update: update.value == 2 and comfy_host.interrupt()
    with pytest.raises(model_management.InterruptProcessingException):
        execute(prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    assert not model_management.processing_interrupted()  # cleared as ComfyUI clears it
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    stopped_at = int(newest.name.removeprefix("step_"))
    assert stopped_at in (2, 3) and (newest / "state.safetensors").is_file()
    assert not final.exists()

    comfy_host.on_update = None
    comfy_host.updates.clear()
    run = execute(prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)  # queued again, resume on
    # Only the steps after the checkpoint are trained, then the end is reported.
    assert [u.value for u in comfy_host.updates] == [*range(stopped_at + 1, 5), 4]
    train = node_id(prompt, "TrainLoRA")
    assert [p[0] for p in run.ui[train]["dit_trainer_losses"]] == [1, 2, 3, 4]
    resumed = load_file(final)

    # Queued again unchanged after ComfyUI restarted (its cache is gone): the run is finished, nothing trains.
    comfy_host.updates.clear()
    execute(prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    assert [u.value for u in comfy_host.updates] == [4]

    # Same inputs under another name, without interruption: the same adapter.
    prompt[train]["inputs"]["name"] = "uninterrupted"
    execute(prompt, comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    reference = load_file(comfy_host.folder("loras") / "uninterrupted.safetensors")
    assert reference.keys() == resumed.keys()
    diffs = {k: (reference[k] - resumed[k]).abs().max().item() for k in reference}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_validation_split_reaches_the_web_view_and_the_run_folder(comfy_host, comfy_pack, demo_prompt):
    prompt = json.loads(json.dumps(demo_prompt))
    train = node_id(prompt, "TrainLoRA")
    prompt[train]["inputs"].update(validation_split=0.25, validate_every=2, sample_every=0)
    run = execute(upstream(prompt, train), comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    progress = comfy_host.events("dit_trainer.progress")
    sent = [point for m in progress for point in m["validation"]]
    assert [step for step, _ in sent] == [0, 2, 4]  # the baseline goes out with step 1's message
    assert progress[0]["validation"][0][0] == 0 and progress[1]["validation"][0][0] == 2
    assert run.ui[train]["dit_trainer_validation"] == sent
    run_dir = comfy_host.root / "output" / "dit_trainer" / prompt[train]["inputs"]["name"]
    lines = (run_dir / "validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [loss for _, loss in sent]
