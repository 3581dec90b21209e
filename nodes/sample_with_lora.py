"""SampleWithLoRA: sample the base model with an adapter at a LoraLoader-style strength."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..training.conditioning import as_conditioning
from ..training.network.comfy_format import load_adapter, read_safetensors
from ..training.network.file_config import config_for_file
from ..training.network.network import LoRANetwork
from ..training.sampler import base_precision, check_sampling_fits, sample_euler
from . import host
from .comfy_io import conditioning_record, image_decoder_for, pil_to_image, text_encoder_for
from .gpu_placement import on_compute_device
from .sockets import CATEGORY, DITT_LORA, DITT_MODEL, DitModel, TrainedLora

NO_FILE = "None"


def network_for_file(dit: DitModel, path: Path) -> LoRANetwork:
    """A network shaped like the file (ours, kohya / musubi, diffusers, PEFT ...), loaded from it."""
    _, metadata = read_safetensors(path, "adapter file")
    architecture = metadata.get("dit_trainer_architecture", dit.architecture)
    if architecture != dit.architecture:
        raise ValueError(f"{path.name} is an adapter for {architecture}, but the model is {dit.architecture}")
    network = LoRANetwork(dit.model, dit.architecture, config_for_file(dit.model, dit.architecture, path))
    load_adapter(network, path)
    return network


def no_vae_notice(width: int, height: int, count: int) -> list[Image.Image]:
    """Stand-in images that say why there is no picture, instead of a confusing downstream error."""
    images = []
    for _ in range(count):
        image = Image.new("RGB", (width, height), (40, 40, 48))
        ImageDraw.Draw(image).text((8, 8), "connect a VAE to\nSampleWithLoRA\n(LATENT output works)", fill=(230, 230, 230))
        images.append(image)
    return images


class SampleWithLoRA:
    DESCRIPTION = (
        "Samples the base model with an adapter (a connected DITT_LORA or a file from models/loras) using the "
        "pack's flow-matching Euler sampler. Strength works as in stock LoraLoader: LoRA scales the change "
        "linearly, DoRA interpolates between the base and the re-normalised weight; 0 is the base model. "
        "One prompt per line samples a batch (seed + line index)."
    )
    CATEGORY = f"{CATEGORY}/sample"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "image")
    OUTPUT_TOOLTIPS = (
        "Raw VAE latents: decode with stock VAE Decode and the model's VAE.",
        "The decoded images (a notice image when no VAE is connected to a real model).",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DITT_MODEL, {"tooltip": "The base model (LoadDiT)."}),
                "lora_name": ([NO_FILE, *host.model_files("loras")],
                              {"tooltip": "Adapter file from models/loras (ours, kohya / musubi, ai-toolkit, "
                                          "diffusers or PEFT names), used when no lora is connected; None samples "
                                          "the base model."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                       "tooltip": "Adapter strength, as LoraLoader's strength_model."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "One prompt per line (a batch); ignored when positive is connected."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Negative prompt for CFG (used when cfg is not 1)."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "Image width in pixels (a multiple of VAE downscale x 2)."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "Image height in pixels (a multiple of VAE downscale x 2)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Euler steps."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 skips the negative pass."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                    "tooltip": "Sigma shift, as ModelSamplingAuraFlow's shift (Z-Image: 3)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Noise seed of the first image."}),
            },
            "optional": {  # guidance is an optional widget: workflows saved before it existed still validate
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Distilled guidance, as FluxGuidance (Flux.1-dev / Kontext, Flux.2 "
                                                  "dev: 2.5-4); models without a guidance input (schnell, klein, "
                                                  "Z-Image) ignore it. FluxGuidance on a connected positive wins."}),
                "lora": (DITT_LORA, {"tooltip": "An adapter from TrainLoRA / EMAMerge (overrides lora_name)."}),
                "positive": ("CONDITIONING", {"tooltip": "Conditioning instead of the prompt text; its FluxGuidance and "
                                                         "ReferenceLatent (edit models) are used."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative conditioning instead of the negative prompt."}),
                "clip": ("CLIP", {"tooltip": "Encodes the prompt text (not needed for the embedded demo)."}),
                "vae": ("VAE", {"tooltip": "Decodes the IMAGE output (not needed for the embedded demo)."}),
            },
        }

    def sample(self, model: DitModel, lora_name: str, strength: float, prompt: str, negative_prompt: str,
               width: int, height: int, steps: int, cfg: float, shift: float, seed: int, guidance: float = 3.5,
               lora: TrainedLora | None = None, positive=None, negative=None, clip=None, vae=None):
        node = "SampleWithLoRA"
        if positive is not None:
            cond = conditioning_record(positive, f"{node} positive", model)
        else:
            prompts = [line.strip() for line in prompt.splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"{node}: write a prompt (one per line) or connect a positive CONDITIONING")
            cond = as_conditioning(text_encoder_for(model, clip, node)(prompts), len(prompts))
        if cond.guidance is None:  # FluxGuidance on the positive wins, as in ComfyUI
            cond = cond.with_guidance(guidance)
        batch = cond.batch
        neg_cond = None
        if cfg != 1.0:
            if negative is not None:
                neg_cond = conditioning_record(negative, f"{node} negative", model)
            else:
                neg_cond = as_conditioning(text_encoder_for(model, clip, node)([negative_prompt]), 1)
            neg_cond = neg_cond.expand(batch)
        decode = image_decoder_for(model, vae, node)
        downscale = model.latent_format.downscale
        multiple = downscale * model.model.cfg.patch_size
        if width % multiple or height % multiple:
            raise ValueError(f"{node}: width {width} and height {height} must be multiples of {multiple}")

        path = lora.path if lora is not None else None if lora_name == NO_FILE else host.model_path("loras", lora_name)
        with on_compute_device(model) as device:  # first: adapters are created on their layer's device
            # .to: the adapters of blocks that block swap keeps in host memory were made there.
            network = None if path is None else network_for_file(model, path).to(device)
            shape = (model.latent_format.channels, height // downscale, width // downscale)
            check_sampling_fits(model.model, (batch, *shape), cond, neg_cond, cfg, device, f"{node} at {width}x{height}")
            # One seed per image (seed + index), so image i is the same whatever the batch size.
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)])
            if network is not None:
                network.set_multiplier(strength)
                network.attach()
            try:
                with base_precision(model.model):
                    latents = sample_euler(model.model, noise.to(device), cond.to(device),
                                           None if neg_cond is None else neg_cond.to(device),
                                           steps=steps, cfg=cfg, shift=shift).float().cpu()
            finally:
                if network is not None:
                    network.detach_from_model()
        image = decode(latents) if decode is not None else pil_to_image(no_vae_notice(width, height, batch))
        return ({"samples": model.latent_format.to_vae(latents)}, image)
