"""The embedded demo end to end: the shipped DoRA run teaches the held-out colour."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfy_merge import comfy_merge
from dit_trainer.training.demo.model import BASE_CHECKPOINT
from dit_trainer.training.demo.run import DemoSettings, run_demo
from dit_trainer.training.models.loader import load_dit
from dit_trainer.training.network.comfy_format import PREFIX, load_adapter
from dit_trainer.training.network.network import LoRANetwork, NetworkConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    events = []
    result = run_demo(out, DemoSettings(), on_progress=events.append)  # exactly what `dit-trainer demo` runs
    return result, events


def test_shipped_base_never_saw_the_concept():
    with safe_open(str(BASE_CHECKPOINT), framework="pt") as f:
        assert f.metadata()["held_out_concept"] == "magenta"


@pytest.mark.slow
def test_demo_dora_run_raises_the_concept_score_well_above_the_base(demo):
    result, _ = demo
    print(f"base {result.base_score:.2f} adapter {result.adapter_score:.2f} in {result.seconds:.1f}s")
    assert result.base_score <= 0.25
    assert result.adapter_score >= result.base_score + 0.5
    assert sum(result.train.losses[-20:]) < sum(result.train.losses[:20])


@pytest.mark.slow
def test_demo_writes_a_comfyui_adapter_grid_and_loss_curve(demo):
    result, events = demo
    assert Image.open(result.grid_path).size[0] > 200
    assert Image.open(result.loss_path).size == (640, 360)
    assert [e.step for e in events] == list(range(1, 301))
    assert [e.step for e in events if e.previews] == [100, 200, 300]
    with safe_open(str(result.adapter_path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert meta["dit_trainer_algo"] == "dora" and meta["dit_trainer_dora_axis"] == "input"
    assert any(k.endswith(".dora_scale") for k in keys)
    assert all(k.startswith(PREFIX) for k in keys)


@pytest.mark.slow
def test_demo_adapter_is_reproduced_by_comfyui_merge_math(demo):
    result, _ = demo
    model = load_dit(BASE_CHECKPOINT)
    network = LoRANetwork(model, "zimage", NetworkConfig(algo="dora", rank=8, alpha=8)).attach()
    load_adapter(network, result.adapter_path)
    from safetensors.torch import load_file

    tensors = load_file(str(result.adapter_path))
    for adapter in network.adapters:
        x = torch.randn(5, adapter.base.in_features)
        with torch.no_grad():
            merged = comfy_merge(adapter.base.weight, tensors, PREFIX + adapter.name, 1.0)
            expected = adapter.base(x)
            assert (expected - x @ merged.t()).abs().max() <= 1e-5 * expected.abs().max()


def test_cli_lists_the_demo_command():
    out = subprocess.run([sys.executable, "-m", "dit_trainer.training.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_two_fresh_processes_train_bit_identical_adapters(tmp_path):
    """The adapter's random init is seeded: `dit-trainer demo` gives the same adapter and score every time."""
    runs = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, "-m", "dit_trainer.training.cli", "demo", "--steps", "30", "--out",
                               str(tmp_path / name)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        scores = [line for line in done.stdout.splitlines() if line.startswith(("  base ", "  adapter "))]
        with safe_open(str(tmp_path / name / "demo_magenta_dora.safetensors"), framework="pt") as f:
            runs.append((scores, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    (scores_a, tensors_a, meta_a), (scores_b, tensors_b, meta_b) = runs
    assert len(scores_a) == 2 and scores_a == scores_b
    assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert meta_a == meta_b
