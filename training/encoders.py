"""What the engine needs from a VAE and a text encoder, as plain callables.

The engine never holds a VAE or text encoder object: ComfyUI's nodes wrap the
connected CLIP / VAE in these callables, and the embedded demo wraps its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .conditioning import Conditioning

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] -> latents (B, C, H/d, W/d)
# -> a Conditioning of N rows (text states, lengths, pooled vector), or (states (N, L, D) zero-padded,
# lengths (N,)) for text-only models
TextEncoder = Callable[[list[str]], Conditioning | tuple[torch.Tensor, torch.Tensor]]
LatentDecoder = Callable[[torch.Tensor], list[Image.Image]]  # latents -> images


# Architectures whose text encoder also reads an edit pair's control images: Qwen-Image-Edit's
# Qwen2.5-VL sees the image it edits (ComfyUI's TextEncodeQwenImageEdit tokenizes prompt + image).
TEXT_ENCODER_READS_IMAGES = frozenset({"qwen_image"})


@dataclass
class Encoders:
    encode_images: ImageEncoder
    encode_text: TextEncoder
    decode: LatentDecoder
    latent_downscale: int  # pixels per latent cell along each side
    latent_channels: int
    encoder_id: str  # names the encoders in cache keys: a different VAE / text encoder re-encodes
    # The text encoder also reads an edit pair's control images: encode_text(captions, images=[[3, H, W] ...])
    # (Qwen-Image-Edit's Qwen2.5-VL, as ComfyUI's TextEncodeQwenImageEdit feeds it).
    text_reads_images: bool = False
