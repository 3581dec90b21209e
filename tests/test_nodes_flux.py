"""Flux.1 and Flux.2 through the nodes, under the executor's rules: LoadDiT reads a tiny Flux file,
DatasetFromFolder encodes with the connected CLIP (states + pooled vector) and VAE (edit pairs
too), TrainLoRA trains and saves ComfyUI-keyed adapters, SampleWithLoRA reads FluxGuidance and
ReferenceLatent from its conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_trainer.training.models.flux import FluxConfig, FluxDiT
from dit_trainer.training.models.loader import save_dit
from fake_comfy import comfy_host, comfy_pack  # noqa: F401  (fixtures)
from fake_comfy.core_nodes import CORE_LIKE, VAELoader
from fake_comfy.executor import PromptExecutor
from test_bad_inputs import DATA, NETWORK, TRAIN

TEXT = 32  # FakeCLIP's state and pooled width
FLUX1 = FluxConfig(family="flux1", in_channels=16, patch_size=2, hidden_size=32, num_heads=2, depth=1,
                   depth_single_blocks=1, context_in_dim=TEXT, vec_in_dim=TEXT, guidance_embed=True, axes_dim=[4, 6, 6])
FLUX2 = FluxConfig(family="flux2", in_channels=128, patch_size=1, hidden_size=32, num_heads=2, depth=1,
                   depth_single_blocks=1, mlp_ratio=3.0, context_in_dim=TEXT, vec_in_dim=0, guidance_embed=False,
                   axes_dim=[4, 4, 4, 4], theta=2000, qkv_bias=False)
SAMPLE = dict(lora_name="None", strength=1.0, prompt="", negative_prompt="", width=32, height=32, steps=2, cfg=1.0,
              shift=3.0, seed=0)


def tiny_flux(folder, cfg: FluxConfig, name: str) -> None:
    torch.manual_seed(0)
    model = FluxDiT(cfg)
    with torch.no_grad():  # away from the zero-initialised modulation, so guidance and references matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_dit(model, folder / name)


def pictures(folder, stems, size=32, seed=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{stem}.png")


def graph(checkpoint: str, folder: str, run: str, guidance: float = 1.0, control_folder: str = "",
          reference: bool = False) -> dict:
    """LoadDiT -> DatasetFromFolder -> TrainLoRA, and SampleWithLoRA from CLIPTextEncode -> [ReferenceLatent] ->
    FluxGuidance."""
    positive = ["9", 0]
    prompt = {
        "1": {"class_type": "LoadDiT", "inputs": {"checkpoint": checkpoint, "weight_dtype": "fp32",
                                                 "attention": "sdpa", "gradient_checkpointing": False}},
        "2": {"class_type": "CLIPLoader", "inputs": {}},
        "3": {"class_type": "VAELoader", "inputs": {}},
        "4": {"class_type": "BuildLoRANetwork", "inputs": {"model": ["1", 0], "continue_from": "None", **NETWORK}},
        "5": {"class_type": "DatasetFromFolder", "inputs": {"model": ["1", 0], "folder": folder, "clip": ["2", 0],
                                                           "vae": ["3", 0], "control_folder": control_folder, **DATA}},
        "6": {"class_type": "TrainLoRA", "inputs": {"model": ["1", 0], "network": ["4", 0], "dataset": ["5", 0],
                                                   "name": run, "guidance": guidance,
                                                   **{**TRAIN, "steps": 3, "sample_every": 3,
                                                      "sample_prompts": "photo number 0 --s 2 --g 3.5"}}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "photo number 0"}},
        "9": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["7", 0], "guidance": 2.5}},
        "10": {"class_type": "SampleWithLoRA", "inputs": {"model": ["1", 0], "lora": ["6", 0], "positive": positive,
                                                         "vae": ["3", 0], **SAMPLE}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}},  # an output node: 10 runs
    }
    if reference:
        prompt["11"] = {"class_type": "SolidImage", "inputs": {"size": 32, "seed": 3}}
        prompt["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["3", 0]}}
        prompt["13"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["12", 0]}}
        prompt["9"]["inputs"]["conditioning"] = ["13", 0]
    return prompt


@pytest.fixture
def executor(comfy_host, comfy_pack, monkeypatch):
    return PromptExecutor(comfy_host, {**comfy_pack.NODE_CLASS_MAPPINGS, **CORE_LIKE})


def test_flux1_trains_from_clip_states_and_pooled_vector_and_saves_comfyui_keys(comfy_host, executor):
    tiny_flux(comfy_host.folder("diffusion_models"), FLUX1, "flux.safetensors")
    folder = comfy_host.root / "input" / "photos"
    pictures(folder, ["0", "1"])
    for stem in ("0", "1"):
        (folder / f"{stem}.txt").write_text(f"photo number {stem}")
    run = executor.execute(graph("flux.safetensors", "photos", "flux_run"))
    dit = run.outputs["1"][0]
    assert dit.architecture == "flux" and dit.model.conditioning_fields == ("pooled", "guidance", "reference_latents")
    batch = next(run.outputs["5"][0].data.batches(2, seed=0))
    assert batch.cond.pooled is not None and batch.cond.pooled.shape == (2, TEXT)  # CLIP-L's pooled output kept
    assert run.ui["6"]["dit_trainer_samples"] and run.ui["6"]["dit_trainer_saved"] == ["flux_run.safetensors"]
    keys = load_file(str(comfy_host.folder("loras") / "flux_run.safetensors"))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    assert "diffusion_model.single_blocks.0.linear1.lora_B.weight" in keys
    assert not any("_attn_" in k for k in keys)  # never kohya-style underscores after a dotted prefix


def test_flux_guidance_on_the_conditioning_reaches_the_sampler(comfy_host, executor):
    tiny_flux(comfy_host.folder("diffusion_models"), FLUX1, "flux.safetensors")
    folder = comfy_host.root / "input" / "photos"
    pictures(folder, ["0", "1"])
    samples = {}
    for guidance in (2.5, 6.0):
        prompt = graph("flux.safetensors", "photos", "g_run")
        prompt["9"]["inputs"]["guidance"] = guidance
        samples[guidance] = executor.execute(prompt).outputs["10"][0]["samples"]
    assert (samples[2.5] - samples[6.0]).abs().max() > 1e-4


def test_flux2_edit_pairs_train_and_the_reference_latent_is_sampled(comfy_host, executor, monkeypatch):
    monkeypatch.setattr(VAELoader, "shape", {"downscale_ratio": 16, "latent_channels": 128})
    tiny_flux(comfy_host.folder("diffusion_models"), FLUX2, "klein.safetensors")
    folder = comfy_host.root / "input" / "pairs"
    pictures(folder, ["0", "1"])
    pictures(folder / "control", ["0", "1"], size=48, seed=1)
    with_reference = executor.execute(graph("klein.safetensors", "pairs", "edit", control_folder="control",
                                            reference=True))
    dataset = with_reference.outputs["5"][0].data
    (reference,) = next(dataset.batches(2, seed=0)).cond.reference_latents
    assert reference.shape == (2, 128, 2, 2)  # the 48 px control image, resized to its 32 px target's bucket
    assert with_reference.ui["6"]["dit_trainer_samples"]  # previews edit the first pair's control image
    without = executor.execute(graph("klein.safetensors", "pairs", "edit", control_folder="control"))
    assert (with_reference.outputs["10"][0]["samples"] - without.outputs["10"][0]["samples"]).abs().max() > 1e-4


def test_a_text_to_image_model_refuses_edit_pairs(comfy_host, executor):
    tiny_flux(comfy_host.folder("diffusion_models"), FLUX1, "flux.safetensors")
    from test_host_semantics import tiny_z_image

    tiny_z_image(comfy_host.folder("diffusion_models"))
    folder = comfy_host.root / "input" / "pairs"
    pictures(folder, ["0", "1"])
    pictures(folder / "control", ["0", "1"], seed=1)
    prompt = graph("tiny.safetensors", "pairs", "zimage_edit", control_folder="control")
    prompt["10"]["inputs"]["positive"] = ["7", 0]  # Z-Image has no FluxGuidance; plain conditioning
    with pytest.raises(Exception, match="no reference-image input"):
        executor.execute(prompt)
