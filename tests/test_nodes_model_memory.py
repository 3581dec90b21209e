"""LoadDiT's memory options (fp8 storage, block swap, after use) and ComfyUI model management around
TrainLoRA / SampleWithLoRA: VRAM is freed before our DiT moves in, and the DiT leaves afterwards."""

from __future__ import annotations

import sys

import pytest
import torch

from dit_trainer.training.models.quantization import FP8_DTYPE

from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.executor import call_node
from test_nodes_training import DEMO, DEMO_DATA, NETWORK, ONE_TINY_STEP

SAMPLE_ARGS = ("None", 1.0, "a magenta circle", "", 32, 32, 2, 1.0, 3.0, 5)


@pytest.fixture
def memory_log(comfy_host, comfy_pack, monkeypatch) -> list:
    """ComfyUI's model-management calls and our DiT's moves, in one ordered list."""
    calls = comfy_host.modules["comfy.model_management"].memory_calls
    placement = sys.modules[f"{comfy_pack.__name__}.nodes.gpu_placement"]
    real_move = placement.move_model

    def move(model, device):
        calls.append(f"DiT to {torch.device(device).type}")
        return real_move(model, device)

    monkeypatch.setattr(placement, "move_model", move)
    return calls


def test_load_dit_offers_fp8_storage_block_swap_and_after_use(comfy_pack):
    (dit,) = call_node(comfy_pack.NODE_CLASS_MAPPINGS["LoadDiT"], DEMO, "fp8_scaled", "sdpa", False,
                       blocks_to_swap=2, after_use="keep on GPU")
    layers = [m for m in dit.model.modules() if type(m).__name__ == "Float8Linear"]  # the pack's own class
    assert layers and all(m.weight.dtype == FP8_DTYPE and m.weight_scale.shape == (m.out_features, 1) for m in layers)
    assert list(dit.model.block_swap.swapped)[-2:] == [len(dit.model.block_swap.blocks) - 2,
                                                         len(dit.model.block_swap.blocks) - 1]
    assert dit.keep_on_gpu
    optional = comfy_pack.NODE_CLASS_MAPPINGS["LoadDiT"].INPUT_TYPES()["optional"]
    assert {"blocks_to_swap", "compile", "after_use"} <= set(optional)  # saved workflows still validate


@pytest.mark.parametrize("after_use,tail", [("offload to host memory", ["DiT to cpu", "soft_empty_cache"]),
                                             ("keep on GPU", [])])
def test_sampling_frees_comfyui_vram_first_and_gives_it_back_after(comfy_pack, memory_log, after_use, tail):
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False, after_use=after_use)
    call_node(nodes["SampleWithLoRA"], dit, *SAMPLE_ARGS)
    assert memory_log == ["unload_all_models", "soft_empty_cache", "DiT to cpu", *tail]  # the fake's GPU is the CPU


def test_training_frees_comfyui_vram_first_and_gives_it_back_after(comfy_pack, memory_log):
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False, blocks_to_swap=1)
    data = call_node(nodes["DatasetFromFolder"], dit, "[embedded demo] magenta shapes", **DEMO_DATA)[0]
    network = call_node(nodes["BuildLoRANetwork"], dit, continue_from="None", **NETWORK)[0]
    del memory_log[:]
    call_node(nodes["TrainLoRA"], dit, network, data, name="memory", unique_id="1", **ONE_TINY_STEP)
    assert memory_log == ["unload_all_models", "soft_empty_cache", "DiT to cpu", "DiT to cpu", "soft_empty_cache"]
    assert not dit.model.block_swap.resident  # no swapped block was left on the device


def test_a_failed_run_still_gives_the_vram_back(comfy_pack, memory_log):
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    (dit,) = call_node(nodes["LoadDiT"], DEMO, "fp32", "sdpa", False)
    with pytest.raises(ValueError, match="multiples of"):
        call_node(nodes["SampleWithLoRA"], dit, "None", 1.0, "a circle", "", 33, 32, 2, 1.0, 3.0, 5)
    assert memory_log == []  # refused before anything moved
    call_node(nodes["SampleWithLoRA"], dit, "None", 1.0, "a circle", "", 32, 32, 0, 1.0, 3.0, 5)
    assert memory_log[-2:] == ["DiT to cpu", "soft_empty_cache"]


@pytest.mark.parametrize("storage", ["bf16", "fp8_scaled"])
def test_sampling_runs_a_low_precision_base_in_its_dtype(comfy_pack, storage):
    """ComfyUI runs a model in its dtype: SampleWithLoRA autocasts a bf16 / fp8 base (fp32 noise and text
    states would otherwise meet bf16 weights) and its latents stay close to the fp32 base's."""
    nodes = comfy_pack.NODE_CLASS_MAPPINGS
    images = {}
    for dtype in ("fp32", storage):
        (dit,) = call_node(nodes["LoadDiT"], DEMO, dtype, "sdpa", False)
        latent, _ = call_node(nodes["SampleWithLoRA"], dit, *SAMPLE_ARGS)
        images[dtype] = latent["samples"]
    assert images[storage].dtype == torch.float32 and bool(torch.isfinite(images[storage]).all())
    difference = float((images[storage] - images["fp32"]).abs().mean() / images["fp32"].abs().mean())
    assert difference < 0.1, difference
