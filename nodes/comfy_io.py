"""ComfyUI objects in, plain tensors and callables out (and back).

ComfyUI layouts: IMAGE float [B, H, W, C] in [0, 1]; MASK float [B, H, W];
LATENT {"samples": raw VAE latents [B, C, h, w]}; CONDITIONING [[states [1, L, D], {...}], ...].
The engine takes images [B, 3, H, W] in [0, 1], model-space latents and
(states [N, L, D] zero-padded, lengths [N]) for text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..training.demo.encoders import demo_encoders
from ..training.demo.model import demo_text_encoder
from ..training.demo.pixel_vae import PixelVAE
from ..training.encoders import Encoders, ImageEncoder, LatentDecoder, TextEncoder
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


def _pad_states(states: list[torch.Tensor], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, D] tensors -> ([N, max L, D] zero past each length, lengths [N])."""
    longest = max(s.shape[0] for s in states)
    batch = torch.stack([F.pad(s, (0, 0, 0, longest - s.shape[0])) for s in states])
    return batch, torch.tensor(lengths, dtype=torch.int64)


def _trim(states: torch.Tensor, extra: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """[1, L, D] encoder output -> ([L, D] float32 CPU, valid tokens), honouring an attention mask."""
    states = states[0].detach().float().cpu()
    mask = extra.get("attention_mask")
    length = int(mask.sum()) if mask is not None else states.shape[0]
    return states[:length], max(length, 1)


def clip_text_encoder(clip: Any) -> TextEncoder:
    """Captions through a ComfyUI CLIP, exactly as CLIPTextEncode encodes a prompt."""

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, lengths = [], []
        for prompt in prompts:
            out = comfy_call(clip.encode_from_tokens, clip.tokenize(prompt), return_dict=True)
            trimmed, length = _trim(out["cond"], out)
            states.append(trimmed)
            lengths.append(length)
        return _pad_states(states, lengths)

    return encode


def conditioning_context(conditioning: list, option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CONDITIONING -> (states [1, L, D], lengths [1]) from its first entry."""
    if not conditioning:
        raise ValueError(f"{option}: the CONDITIONING is empty; connect a CLIPTextEncode output")
    states, extra = conditioning[0][0], conditioning[0][1]
    trimmed, length = _trim(states, extra)
    return _pad_states([trimmed], [length])


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


def dataset_encoders(dit: DitModel, clip: Any | None, vae: Any | None, node: str) -> Encoders:
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
    return Encoders(
        encode_images=vae_image_encoder(vae, dit),
        encode_text=clip_text_encoder(clip),
        decode=vae_latent_decoder(vae, dit),
        latent_downscale=dit.latent_format.downscale,
        latent_channels=dit.latent_format.channels,
        encoder_id=encoder_id,
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
