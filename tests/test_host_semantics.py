"""The nodes under ComfyUI's real execution rules (fake_comfy/executor.py): inference mode, one executor
whose caches live across prompts, core-node outputs that are inference tensors, masks that really weigh
the loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dit_trainer.training.models.loader import save_dit
from dit_trainer.training.models.zimage import ZImageConfig, ZImageDiT
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.core_nodes import CORE_LIKE
from fake_comfy.executor import PromptExecutor, PromptRejected
from test_bad_inputs import DATA, DEMO, DEMO_FOLDER, NETWORK, TRAIN



def tiny_z_image(folder) -> None:
    torch.manual_seed(0)
    cfg = ZImageConfig(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_dim=64, cap_feat_dim=32,
                       t_mid_dim=64, axes_dims=[4, 6, 6])
    save_dit(ZImageDiT(cfg), folder / "tiny.safetensors")


def photos(folder, count: int = 2) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo number {i}")


def real_model_prompt(mask_min_weight: float = 0.0) -> dict:
    """A tiny real Z-Image trained from CLIP / VAE / CONDITIONING / MASK that core nodes made."""
    data = {**DATA, "masks": "none", "caption_dropout": 0.5}  # dropped captions are encoded while training
    return {
        "1": {"class_type": "LoadDiT", "inputs": {"checkpoint": "tiny.safetensors", "weight_dtype": "fp32",
                                                 "attention": "sdpa", "gradient_checkpointing": False}},
        "2": {"class_type": "CLIPLoader", "inputs": {}},
        "3": {"class_type": "VAELoader", "inputs": {}},
        "4": {"class_type": "BuildLoRANetwork", "inputs": {"model": ["1", 0], "continue_from": "None",
                                                          **{**NETWORK, "algo": "dora"}}},
        "5": {"class_type": "DatasetFromFolder", "inputs": {"model": ["1", 0], "folder": "photos", "clip": ["2", 0],
                                                           "vae": ["3", 0], **data}},
        "6": {"class_type": "SolidMask", "inputs": {"size": 32}},
        "7": {"class_type": "WeightedMask", "inputs": {"dataset": ["5", 0], "mask": ["6", 0], "mask_gamma": 1.0,
                                                      "mask_min_weight": mask_min_weight}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "photo number 0"}},
        "9": {"class_type": "TrainLoRA", "inputs": {"model": ["1", 0], "network": ["4", 0], "dataset": ["7", 0],
                                                   "name": f"real_{mask_min_weight:g}", "sample_conditioning": ["8", 0],
                                                   "vae": ["3", 0], **{**TRAIN, "steps": 2, "sample_every": 1,
                                                                       "sample_prompts": ""}}},
        "10": {"class_type": "SampleWithLoRA", "inputs": {"model": ["1", 0], "lora": ["9", 0], "positive": ["8", 0],
                                                         "vae": ["3", 0], "lora_name": "None", "strength": 1.0,
                                                         "prompt": "", "negative_prompt": "", "width": 32,
                                                         "height": 32, "steps": 2, "cfg": 1.0, "shift": 3.0,
                                                         "seed": 0}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}},
    }


@pytest.fixture
def real_model(comfy_host, comfy_pack):
    tiny_z_image(comfy_host.folder("diffusion_models"))
    photos(comfy_host.root / "input" / "photos")
    return PromptExecutor(comfy_host, {**comfy_pack.NODE_CLASS_MAPPINGS, **CORE_LIKE})


def test_inference_tensors_from_core_nodes_train_and_sample(comfy_host, real_model):
    run = real_model.execute(real_model_prompt())
    assert set(run.executed) == {str(i) for i in range(1, 12)}
    dit = run.outputs["1"][0]
    assert not any(p.is_inference() for p in dit.model.parameters())  # LoadDiT's weights are trainable against
    # What the dataset nodes keep is made outside inference mode, so training may even change it in place.
    weighted = run.outputs["7"][0].data
    kept = [*weighted._latents, *weighted._weights, *(r.context for r in weighted._text._memory.values())]
    assert len(kept) >= 6 and not any(t.is_inference() for t in kept)
    assert next(weighted.batches(2, seed=0)).weights is not None  # the MASK weighs the loss
    assert [m["step"] for m in comfy_host.events("dit_trainer.samples")] == [1, 2]  # previews from CONDITIONING
    assert run.ui["11"]["images"][0].shape == (1, 32, 32, 3)


def test_the_mask_really_changes_what_is_learned(real_model):
    masked = real_model.execute(real_model_prompt(mask_min_weight=0.0)).ui["9"]["dit_trainer_losses"]
    uniform = real_model.execute(real_model_prompt(mask_min_weight=1.0)).ui["9"]["dit_trainer_losses"]
    assert masked != uniform  # same data, noise and steps: only the loss weights differ


def test_the_settings_advisor_warns_in_the_ui_without_stopping_the_run(real_model):
    # A real model at 32 px for 2 steps: far from every recipe, so the advisor speaks; the run still trains.
    run = real_model.execute(real_model_prompt())
    advice = run.ui["9"]["dit_trainer_advice"]
    assert any("resolution 32 is outside 256-2048" in line for line in advice), advice
    assert run.ui["9"]["dit_trainer_saved"]


def test_a_second_run_of_the_same_prompt_comes_from_the_cache(comfy_host, real_model):
    prompt = real_model_prompt()
    first = real_model.execute(prompt)
    comfy_host.updates.clear()
    comfy_host.messages.clear()
    again = real_model.execute(copy.deepcopy(prompt))
    assert again.executed == [] and set(again.cached) == set(first.executed)
    assert comfy_host.updates == []  # nothing trained
    executed = [m["node"] for e, m in comfy_host.messages if e == "executed"]
    assert "9" in executed  # ComfyUI sends the cached UI again, so the chart reappears

    changed = copy.deepcopy(prompt)
    changed["9"]["inputs"]["lr"] = 2e-4
    third = real_model.execute(changed)
    assert "9" in third.executed and "1" in third.cached  # the cached model is trained on again, cleanly
    dit = third.outputs["1"][0]
    assert all(getattr(m.forward, "__self__", m) is m for m in dit.model.modules())  # no adapter left hooked


def test_a_changed_dataset_folder_reruns_the_dataset_node(comfy_host, real_model):
    prompt = real_model_prompt()
    real_model.execute(prompt)
    (comfy_host.root / "input" / "photos" / "1.txt").write_text("a new caption")
    again = real_model.execute(copy.deepcopy(prompt))
    assert {"5", "7", "9"} <= set(again.executed)  # IS_CHANGED saw the edit


def test_prompt_validation_rejects_values_out_of_range_before_anything_runs(comfy_host, comfy_pack):
    executor = PromptExecutor(comfy_host, comfy_pack.NODE_CLASS_MAPPINGS)
    bad = {"1": {"class_type": "LoadDiT", "inputs": {"checkpoint": "nope.safetensors", "weight_dtype": "fp32",
                                                    "attention": "sdpa", "gradient_checkpointing": False}},
           "2": {"class_type": "DatasetFromFolder", "inputs": {"model": ["1", 0], "folder": DEMO_FOLDER,
                                                              **{**DATA, "resolution": 1}}},
           "3": {"class_type": "BuildLoRANetwork", "inputs": {"model": ["1", 0], "continue_from": "None", **NETWORK}},
           "4": {"class_type": "TrainLoRA", "inputs": {"model": ["1", 0], "network": ["3", 0], "dataset": ["2", 0],
                                                      "name": "x", **TRAIN}}}
    with pytest.raises(PromptRejected, match="nope.safetensors.*not in the list.*resolution 1 is smaller than min"):
        executor.execute(bad)
    bad["1"]["inputs"]["checkpoint"] = DEMO
    bad["2"]["inputs"]["resolution"] = 32
    assert executor.execute(bad).executed == ["1", "3", "2", "4"]
