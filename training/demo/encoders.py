"""The embedded demo's text encoder and pixel VAE as the engine's encoder callables."""

from __future__ import annotations

import torch
from PIL import Image

from ..encoders import Encoders
from .model import MAX_TOKENS, TEXT_DIM, demo_text_encoder
from .pixel_vae import PixelVAE, to_uint8

ENCODER_ID = f"dit_trainer-demo:pixel_vae-2x2:text-{TEXT_DIM}x{MAX_TOKENS}"


def decode_images(latents: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(PixelVAE().decode(latents))]


def demo_encoders() -> Encoders:
    return Encoders(
        encode_images=PixelVAE().encode,
        encode_text=demo_text_encoder().encode,
        decode=decode_images,
        latent_downscale=PixelVAE.downscale,
        latent_channels=PixelVAE.latent_channels,
        encoder_id=ENCODER_ID,
    )
