"""Loss-weight masks: the weighting formula and masks brought to latent resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .buckets import Placement
from .images import fit_to_bucket


def mask_weights(mask: torch.Tensor, gamma: float = 1.0, min_weight: float = 0.0) -> torch.Tensor:
    """Per-pixel loss weights w = m^gamma * (1 - min_weight) + min_weight (DESIGN §3).

    `mask` in [0, 1] (1 = train on this pixel). gamma > 1 sharpens a soft mask, gamma < 1
    widens it; min_weight keeps some signal outside the mask. The loss then reduces to
    sum(L * w) / (C * sum(w)), a weighted mean.
    """
    if not gamma > 0:
        raise ValueError(f"mask gamma must be > 0, got {gamma}")
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"mask min_weight must lie in [0, 1], got {min_weight}")
    return mask.clamp(0, 1).pow(gamma) * (1 - min_weight) + min_weight


def mask_to_latent(mask: torch.Tensor, placement: Placement, downscale: int) -> torch.Tensor:
    """Image-space mask [H, W] -> [1, h, w] at the latent size of its bucket.

    The same resize and crop as its image, then area averaging down to latent pixels, so a
    latent pixel's weight is the mean of the image pixels it encodes.
    """
    in_bucket = fit_to_bucket(mask[None].float(), placement)
    latent_size = (placement.bucket[1] // downscale, placement.bucket[0] // downscale)
    return F.interpolate(in_bucket[None], size=latent_size, mode="area")[0].clamp(0, 1)
