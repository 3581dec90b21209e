"""An exact, parameter-free "VAE" for the demo: pixel (un)shuffle of images in [-1, 1].

Latents are a lossless rearrangement of pixels, so the demo's image quality
depends only on the diffusion model, and uint8 images survive a round trip bit-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class PixelVAE:
    """Maps images float [B, 3, H, W] in [0, 1] to latents [B, 12, H/2, W/2] and back."""

    downscale = 2
    latent_channels = 3 * downscale**2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents in [-1, 1] with 2x2 pixel blocks folded into channels."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}; convert to RGB first")
        height, width = images.shape[-2:]
        if height % self.downscale or width % self.downscale:
            raise ValueError(
                f"image size {height}x{width} is not divisible by {self.downscale}; crop or resize to even sides"
            )
        return F.pixel_unshuffle(images * 2 - 1, self.downscale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Exact inverse of `encode`, clamped to [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents [B, {self.latent_channels}, h, w], got shape {tuple(latents.shape)}"
            )
        return ((F.pixel_shuffle(latents, self.downscale) + 1) / 2).clamp(0, 1)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] arrays (all the same size) -> float32 [B, 3, H, W] in [0, 1]."""
    batch = torch.from_numpy(np.stack(images))
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] images, got {batch.dtype} batch of shape {tuple(batch.shape)}")
    return batch.permute(0, 3, 1, 2).float() / 255


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded and clamped."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
