"""ComfyUI objects in, plain tensors and callables out (and back).

ComfyUI layouts: IMAGE float [B, H, W, C] in [0, 1]; MASK float [B, H, W];
LATENT {"samples": raw VAE latents [B, C, h, w]}; CONDITIONING [[states [1, L, D], {...}], ...].
The engine takes images [B, 3, H, W] in [0, 1], model-space latents and conditioning
records (training/conditioning.py) for text, pooled vectors, guidance and reference images.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..training.demo.encoders import demo_encoders
from ..training.demo.model import demo_text_encoder
from ..training.demo.pixel_vae import PixelVAE
from ..training.conditioning import Conditioning
from ..training.encoders import TEXT_ENCODER_READS_IMAGES, Encoders, ImageEncoder, LatentDecoder, TextEncoder
from .edit_text_encoding import STYLES, tokenize_with_images
from .inference_mode import comfy_call
from .sockets import DitModel


# --- images -----------------------------------------------------------------


def pil_to_image(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (one size) -> IMAGE [B, H, W, 3]."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays))


def image_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """IMAGE [B, H, W, C] -> PIL RGB images."""
    pixels = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


# --- text -------------------------------------------------------------------


def _trim(states: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
    """[1, L, D] encoder output -> [1, valid tokens, D] float32 CPU, honouring an attention mask."""
    mask = extra.get("attention_mask")
    length = int(mask.sum()) if mask is not None else states.shape[1]
    return states[:, : max(length, 1)].detach().float().cpu()


def _pooled(extra: dict[str, Any]) -> torch.Tensor | None:
    """CLIP-L's pooled vector [1, 768] where the encoder gives one (Flux.1's DualCLIPLoader type flux)."""
    pooled = extra.get("pooled_output")
    return None if pooled is None else pooled.detach().float().cpu().reshape(1, -1)


def _record(states: torch.Tensor, extra: dict[str, Any]) -> Conditioning:
    trimmed = _trim(states, extra)
    return Conditioning(trimmed, torch.tensor([trimmed.shape[1]]), _pooled(extra))


def clip_text_encoder(clip: Any, edit_style: str = STYLES[0]) -> TextEncoder:
    """Captions through a ComfyUI CLIP, exactly as CLIPTextEncode encodes a prompt (states, and the
    pooled vector for encoders that give one); with `images`, each prompt's control images go to the
    tokenizer too, as the Qwen-Image-Edit node `edit_style` does (edit_text_encoding.py)."""

    def encode(prompts: list[str], images: list[list[torch.Tensor]] | None = None) -> Conditioning:
        records = []
        for index, prompt in enumerate(prompts):
            if images and images[index]:
                tokens = tokenize_with_images(clip, prompt, images[index], edit_style)
            else:
                tokens = clip.tokenize(prompt)
            out = comfy_call(clip.encode_from_tokens, tokens, return_dict=True)
            records.append(_record(out["cond"], out))
        return Conditioning.collate(records)

    return encode


def conditioning_record(conditioning: list, option: str, dit: DitModel) -> Conditioning:
    """CONDITIONING -> a one-row record from its first entry: states, pooled vector, FluxGuidance's
    guidance and ReferenceLatent's reference latents (raw VAE latents, turned into model space)."""
    if not conditioning:
        raise ValueError(f"{option}: the CONDITIONING is empty; connect a CLIPTextEncode output")
    states, extra = conditioning[0][0], conditioning[0][1]
    record = _record(states, extra)
    if extra.get("guidance") is not None:
        record = record.with_guidance(float(extra["guidance"]))
    references = extra.get("reference_latents") or []
    return dataclasses.replace(record, reference_latents=tuple(
        dit.latent_format.to_model(r.detach().float().cpu())[:1] for r in references))


# --- latents ----------------------------------------------------------------


def vae_image_encoder(vae: Any, dit: DitModel) -> ImageEncoder:
    """Images [B, 3, H, W] in [0, 1] -> model-space latents, through ComfyUI's VAE."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        raw = comfy_call(vae.encode, images.permute(0, 2, 3, 1))  # ComfyUI's VAE takes IMAGE layout
        return dit.latent_format.to_model(raw.float().cpu())

    return encode


def vae_latent_decoder(vae: Any, dit: DitModel) -> LatentDecoder:
    def decode(latents: torch.Tensor) -> list[Image.Image]:
        return image_to_pil(comfy_call(vae.decode, dit.latent_format.to_vae(latents.float())))

    return decode


def weights_fingerprint(module: Any) -> str:
    """Short identity of an encoder's weights, for the latent / text cache keys.

    Hashing a multi-GB text encoder would take longer than encoding a dataset, so this
    hashes every tensor's name, shape and dtype plus a fixed sample of its values.
    """
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


# --- what each node needs -----------------------------------------------------


def _refuse_on_demo(dit: DitModel, node: str, **connected: Any) -> None:
    extra = [name for name, obj in connected.items() if obj is not None]
    if dit.demo and extra:
        raise ValueError(
            f"{node}: the embedded demo model uses its own text encoder and pixel VAE; disconnect {' and '.join(extra)}"
        )


def dataset_encoders(dit: DitModel, clip: Any | None, vae: Any | None, node: str,
                     edit_style: str = STYLES[0]) -> Encoders:
    """Everything a dataset and its previews need: the connected CLIP + VAE, or the demo's own."""
    _refuse_on_demo(dit, node, CLIP=clip, VAE=vae)
    if dit.demo:
        return demo_encoders()
    missing = [name for name, obj in (("CLIP", clip), ("VAE", vae)) if obj is None]
    if missing:
        raise ValueError(
            f"{node}: connect a {' and a '.join(missing)} (Load CLIP / Load VAE for this {dit.architecture} model); "
            "only the embedded demo model has built-in encoders"
        )
    # ComfyUI's CLIP and VAE objects hold their torch modules in these attributes.
    encoder_id = (f"comfyui:{dit.architecture}:vae-{weights_fingerprint(vae.first_stage_model)}"
                  f":text-{weights_fingerprint(clip.cond_stage_model)}")
    reads_images = dit.architecture in TEXT_ENCODER_READS_IMAGES
    if reads_images:  # the captions' states depend on how the control image was shown to the encoder
        encoder_id += f":edit-text-{edit_style}"
    return Encoders(
        encode_images=vae_image_encoder(vae, dit),
        encode_text=clip_text_encoder(clip, edit_style),
        decode=vae_latent_decoder(vae, dit),
        latent_downscale=dit.latent_format.downscale,
        latent_channels=dit.latent_format.channels,
        encoder_id=encoder_id,
        text_reads_images=reads_images,
    )


def text_encoder_for(dit: DitModel, clip: Any | None, node: str) -> TextEncoder:
    _refuse_on_demo(dit, node, CLIP=clip)
    if dit.demo:
        return demo_text_encoder().encode
    if clip is None:
        raise ValueError(f"{node}: connect a CLIP (Load CLIP for this {dit.architecture} model) or a CONDITIONING")
    return clip_text_encoder(clip)


def image_decoder_for(dit: DitModel, vae: Any | None, node: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Model-space latents -> IMAGE [B, H, W, 3] exactly as stock VAEDecode gives it; None without a VAE."""
    _refuse_on_demo(dit, node, VAE=vae)
    if dit.demo:
        return lambda latents: PixelVAE().decode(latents.float().cpu()).permute(0, 2, 3, 1)
    if vae is None:
        return None
    return lambda latents: comfy_call(vae.decode, dit.latent_format.to_vae(latents.float())).float().cpu()
