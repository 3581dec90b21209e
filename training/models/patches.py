"""Latents <-> image tokens the way ComfyUI's Flux and Qwen-Image models cut them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(latents: torch.Tensor, patch: int) -> tuple[torch.Tensor, int, int]:
    """(B, C, H, W) -> tokens (B, gh * gw, C * p * p) ordered (c, ph, pw), and the grid gh, gw.

    Odd sizes are padded circularly to the patch size, as ComfyUI's pad_to_patch_size does.
    """
    b, c, h, w = latents.shape
    latents = F.pad(latents, (0, (-w) % patch, 0, (-h) % patch), mode="circular")
    grid_h, grid_w = latents.shape[2] // patch, latents.shape[3] // patch
    tokens = latents.view(b, c, grid_h, patch, grid_w, patch).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, grid_h * grid_w, c * patch * patch), grid_h, grid_w


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], patch: int,
               channels: int) -> torch.Tensor:
    """Inverse of `patchify`, cropped back to (B, C, h, w) for `size` = (h, w)."""
    grid_h, grid_w = grid
    latents = tokens.view(tokens.shape[0], grid_h, grid_w, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(tokens.shape[0], channels, grid_h * patch, grid_w * patch)[:, :, : size[0], : size[1]]
